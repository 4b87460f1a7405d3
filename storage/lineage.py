"""Lineage: which stages, and which rows of them, fed a run's student and its predictions.

- `used_stages(store, run)`: the stages a run's result was computed from: the closure of the
  evaluate (else train) stage over the `upstream` keys in the manifests. A run record lists
  every stage its config plans, some of them unused by its method (a Std-CoT run still names a
  weights key, which another run of the store may have computed); the manifests say what was read.
- `lineage_sql(store, run)`: the SELECT of the `lineage` view (storage/catalog.py creates it per
  run): one row per (question, teacher call or rationale), following teacher_calls ->
  rationales -> steps -> token_weights -> schedule -> training examples -> predictions, with
  the key of every stage each value came from. Valid whatever stages the run used: a table the
  run lacks (a Std-CoT run has no token_weights, no schedule) reads as no rows, so its columns
  are NULL.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from storage.store import Store

# the stage whose result a run is about, best first: its upstream closure is what the run used
_RESULT_STAGES = ("evaluate", "train")


def used_stages(store: Store, run: dict[str, Any]) -> dict[str, str]:
    """stage -> key of the complete stages the run's result read, directly or not. A run with
    neither a complete evaluate nor train stage: every complete stage it lists."""
    listed = run.get("stages", {})
    complete = {s: k for s, k in listed.items() if store.is_complete(s, k)}
    result = next((s for s in _RESULT_STAGES if s in complete), None)
    if result is None:
        return complete
    used, todo = {}, [(result, complete[result])]
    while todo:
        stage, key = todo.pop()
        if stage in used or not store.is_complete(stage, key):
            continue
        used[stage] = key
        todo.extend(store.manifest(stage, key).get("upstream", {}).items())
    return {s: used[s] for s in listed if s in used} | {s: k for s, k in used.items() if s not in listed}


def _literal(text: str | None) -> str:
    return "NULL::VARCHAR" if text is None else "'" + text.replace("'", "''") + "'"


_SCALAR_SQL = {
    "string": "VARCHAR", "large_string": "VARCHAR", "bool": "BOOLEAN", "int8": "TINYINT",
    "int16": "SMALLINT", "int32": "INTEGER", "int64": "BIGINT", "float": "FLOAT", "double": "DOUBLE",
    "date32[day]": "DATE", "binary": "BLOB",
}


def sql_type(t: pa.DataType) -> str:
    """The DuckDB type of an Arrow type, nested lists and structs included (a declared table's
    column as a typed NULL)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"{sql_type(t.value_type)}[]"
    if pa.types.is_struct(t):
        return "STRUCT(" + ", ".join(f'"{f.name}" {sql_type(f.type)}' for f in t) + ")"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if str(t) not in _SCALAR_SQL:
        raise ValueError(f"no DuckDB type for the Arrow type {t}")
    return _SCALAR_SQL[str(t)]


def _empty(table: str) -> str:
    """`table`'s declared columns and no rows, tagged like a real source (a stage the run lacks)."""
    from storage.schemas import schema_for

    cols = [f'NULL::{sql_type(f.type)} AS "{f.name}"' for f in schema_for(table)]
    return f"SELECT {', '.join(cols)}, NULL::VARCHAR AS _stage, NULL::VARCHAR AS _key WHERE false"


def _source(store: Store, used: dict[str, str], table: str) -> str:
    """`table` over every used stage that wrote it, each row tagged with that stage and key."""
    selects = [
        f"SELECT *, {_literal(stage)} AS _stage, {_literal(key)} AS _key "
        f"FROM read_parquet({_literal(str(store.table_path(stage, key, table)))})"
        for stage, key in used.items()
        if table in store.manifest(stage, key).get("tables", {})
    ]
    return " UNION ALL BY NAME ".join(selects) or _empty(table)


# teacher calls and rationales, joined by (question, sample): a failed call has no rationale, a
# mentor rationale no call, and both still get a row
_CHAIN = """
chain AS (
  SELECT coalesce(r.question_id, c.question_id) AS question_id, coalesce(r.sample, c.sample) AS sample,
         c.request_id, c.model AS teacher_model, c.tokens_in, c.tokens_out, c.cost_usd,
         c.error AS teacher_error, c._key AS teacher_key,
         r.rationale_id, r.source AS rationale_source, r.correct AS rationale_correct,
         r._stage AS rationale_stage, r._key AS rationales_key
  FROM calls c FULL OUTER JOIN rat r
    ON r.source = 'teacher' AND r.question_id = c.question_id AND r.sample = c.sample),
step_n AS (SELECT rationale_id, count(*) AS steps FROM st GROUP BY rationale_id),
weights AS (SELECT rationale_id, count(*) AS weighted_tokens, avg(weight) AS mean_weight,
                   any_value(_key) AS weights_key FROM tw GROUP BY rationale_id),
sched AS (SELECT rationale_id, list(input_steps ORDER BY stage) AS schedule_input_steps,
                 any_value(_key) AS schedule_key FROM sch GROUP BY rationale_id)
"""

_SELECT = """
SELECT {run} AS run_id, q.question_id, q.split, q._key AS dataset_key,
       ch.request_id, ch.sample, ch.teacher_model, ch.tokens_in, ch.tokens_out, ch.cost_usd,
       ch.teacher_error, ch.teacher_key,
       ch.rationale_id, ch.rationale_source, ch.rationale_correct, sn.steps, ch.rationale_stage, ch.rationales_key,
       w.weighted_tokens, w.mean_weight, w.weights_key, s.schedule_input_steps, s.schedule_key,
       {trained} AS trained, {train_key} AS train_key,
       p.pred AS prediction, p.correct AS prediction_correct, p._key AS evaluate_key
FROM q
LEFT JOIN chain ch ON ch.question_id = q.question_id
LEFT JOIN step_n sn ON sn.rationale_id = ch.rationale_id
LEFT JOIN weights w ON w.rationale_id = ch.rationale_id
LEFT JOIN sched s ON s.rationale_id = ch.rationale_id
LEFT JOIN pred p ON p.question_id = q.question_id
"""


def _trained(store: Store, used: dict[str, str]) -> str:
    """Whether a row's rationale was a training example: a correct rationale of a train question
    from a rationale stage the train stage read (the rule of tasks/training's example builders)."""
    if "train" not in used:
        return "NULL::BOOLEAN"
    read = store.manifest("train", used["train"]).get("upstream", {})
    stages = ", ".join(_literal(s) for s in sorted(read)) or "NULL"
    return (
        "CASE WHEN ch.rationale_id IS NULL THEN NULL ELSE coalesce(ch.rationale_correct AND "
        f"q.split = 'train' AND ch.rationale_stage IN ({stages}), false) END"
    )


def lineage_sql(store: Store, run: dict[str, Any]) -> str:
    """The SELECT of one run's `lineage` view (columns: see docs; one row per question and
    teacher call or rationale, a question with neither on one row)."""
    used = used_stages(store, run)
    sources = {
        "q": "questions", "calls": "teacher_calls", "rat": "rationales", "st": "steps",
        "tw": "token_weights", "sch": "schedule", "pred": "predictions",
    }
    ctes = [f"{alias} AS ({_source(store, used, table)})" for alias, table in sources.items()]
    select = _SELECT.format(
        run=_literal(run["run_id"]), trained=_trained(store, used), train_key=_literal(used.get("train")),
    )
    return "WITH " + ",\n".join(ctes) + "," + _CHAIN + select
