"""What `kpod report` reads from the store, and `write_report`, which writes the page.

The tables come through the DuckDB catalog (`storage.catalog`: `run_<id>.<table>` per run,
`comparisons`, `comparison_steps`), read-only like `kpod sql`; a table a run lacks is asked
about first (information_schema) and left as None, so its section says so instead of failing.
Record files (runs, comparisons, stage manifests) come from `storage.store`. The page itself
is built by `report_html` from the plain data gathered here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.catalog import CatalogError, connect, default_run, schema_name
from storage.store import Store
from tasks.core.report_html import (
    WEIGHT_BINS,
    ComparisonData,
    RunData,
    comparison_page,
    ran_stages,
    run_page,
)
from tasks.core.synthetic import token_roles

COMPARISON_PREFIX = "cmp_"  # comparison ids start with it; anything else is a run id
SAMPLE_RATIONALES = 3  # rationales shown token by token on a run page


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Reader:
    """One catalog connection for a whole page: building the catalog's views costs as much as a
    query (0.2 s over four runs, more in a big store), and a page asks a dozen questions."""

    def __init__(self, store: Store):
        self.store = store
        self.con = connect(store)
        views = self.con.execute("select table_schema, table_name from information_schema.tables").fetchall()
        self.views = {(s, t) for s, t in views}
        self.owned: dict[str, set[str]] = {}

    def has(self, run: dict[str, Any], table: str) -> bool:
        """Whether one of the stages the run submitted wrote `table`. Its catalog schema also
        shows stages it only planned (a std_cot run's `weights`, computed by a kpod run of the
        same store): content-addressed and correct, but not what this run trained on."""
        rid = run["run_id"]
        if rid not in self.owned:
            self.owned[rid] = set()
            for stage, key in ran_stages(run).items():
                if self.store.is_complete(stage, key):
                    self.owned[rid] |= set(self.store.manifest(stage, key).get("tables", {}))
        return table in self.owned[rid] and (schema_name(rid), table) in self.views

    def rows(self, sql: str) -> list[dict[str, Any]]:
        import duckdb

        try:
            cur = self.con.execute(sql)
        except duckdb.Error as exc:  # an unreadable file (the catalog said so in a warning)
            raise CatalogError(str(exc).splitlines()[0]) from None
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def close(self) -> None:
        self.con.close()


def _find_run(store: Store, run_id: str | None) -> dict[str, Any]:
    runs = store.list_runs()
    if not runs:
        raise FileNotFoundError(f"no run recorded in {store.root}; run `kpod run` first")
    if run_id is None:
        return default_run(runs)
    for run in runs:
        if run["run_id"] == run_id:
            return run
    raise FileNotFoundError(f"no run {run_id!r} in {store.root} (see `kpod sql \"select * from kpod_runs\"`)")


def stage_config(store: Store, stages: dict[str, str]) -> dict[str, Any]:
    """The config sections a run's stages hashed (each stage's manifest `inputs`), merged: a
    section read by several stages (student, train) is one value under one key."""
    config: dict[str, Any] = {}
    for stage, key in stages.items():
        if store.is_complete(stage, key):
            for section, value in (store.manifest(stage, key).get("inputs") or {}).items():
                config.setdefault(section, value)
    return config


def run_data(store: Store, run_id: str | None = None) -> RunData:
    """A run's tables for its page (None: the latest completed run)."""
    run = _find_run(store, run_id)
    reader = Reader(store)
    try:
        sch = schema_name(run["run_id"])

        def rows(table: str, sql: str) -> list[dict[str, Any]] | None:
            return reader.rows(sql.format(t=f"{sch}.{table}")) if reader.has(run, table) else None

        data = RunData(
            run=run, config=stage_config(store, run.get("stages", {})),
            metrics=rows("metrics", "select * from {t} order by method, seed, split desc"),
            val_curve=rows("val_selection", "select epoch, accuracy, selected from {t} order by epoch"),
            train_loss=rows("train_log", "select step, stage, loss, nll, kd from {t} order by step"),
            schedule_stages=rows("schedule_stages", "select * from {t} order by stage"),
        )
        steps = rows("schedule", "select stage, input_steps, count(*) n from {t} group by all order by all")
        data.input_steps = None if steps is None else [(r["stage"], r["input_steps"], r["n"]) for r in steps]
        _weights(reader, run, sch, data)
        _teacher(reader, run, sch, data)
        return data
    finally:
        reader.close()


def _weights(reader: Reader, run: dict[str, Any], sch: str, data: RunData) -> None:
    """The weight histogram per word role (all tokens), and a few rationales token by token."""
    if not reader.has(run, "token_weights"):
        return
    labels = reader.has(run, "word_labels")
    if labels:  # a token's role is the strongest of the words it overlaps (synthetic.token_roles)
        tokens = (
            "select case min(case w.role when 'core' then 0 when 'context' then 1 else 2 end) "
            "when 0 then 'core' when 1 then 'context' else 'filler' end role, any_value(t.weight) weight "
            f"from {sch}.token_weights t join {sch}.word_labels w on t.rationale_id = w.rationale_id "
            "and w.char_start < t.char_end and t.char_start < w.char_end group by t.rationale_id, t.pos"
        )
    else:  # real data: no roles are known, one distribution of all tokens
        tokens = f"select 'all tokens' role, weight from {sch}.token_weights"
    hist = reader.rows(
        f"select role, least(cast(floor(weight * {WEIGHT_BINS}) as int), {WEIGHT_BINS - 1}) bin, count(*) n "
        f"from ({tokens}) group by all order by all"
    )
    data.role_hist = [(h["role"], h["bin"], h["n"]) for h in hist]
    ids = f"select distinct rationale_id from {sch}.token_weights order by 1 limit {SAMPLE_RATIONALES}"
    sample = reader.rows(f"select * from {sch}.token_weights where rationale_id in ({ids}) order by rationale_id, pos")
    if labels:
        words: dict[str, list[tuple[int, int, str]]] = {}
        for w in reader.rows(f"select rationale_id, char_start, char_end, role from {sch}.word_labels "
                             f"where rationale_id in ({ids})"):
            words.setdefault(w["rationale_id"], []).append((w["char_start"], w["char_end"], w["role"]))
        for t in sample:
            t["role"] = token_roles([(t["char_start"], t["char_end"])], words.get(t["rationale_id"], []))[0]
    data.token_sample = sample


def _teacher(reader: Reader, run: dict[str, Any], sch: str, data: RunData) -> None:
    """Totals of the run's teacher calls, and its errors by message (the 10 most frequent)."""
    if not reader.has(run, "teacher_calls"):
        return
    data.teacher = reader.rows(
        "select count(*) calls, coalesce(sum(tokens_in), 0) tokens_in, coalesce(sum(tokens_out), 0) tokens_out, "
        "coalesce(sum(cost_usd), 0) cost_usd, count(error) errors, string_agg(distinct model, ', ') models "
        f"from {sch}.teacher_calls"
    )[0]
    errors = reader.rows(f"select left(error, 200) error, count(*) n from {sch}.teacher_calls "
                         "where error is not null group by 1 order by 2 desc, 1 limit 10")
    data.teacher_errors = [(e["error"], e["n"]) for e in errors]


def comparison_data(store: Store, comparison_id: str) -> ComparisonData:
    """A comparison's record and rows, and each of its recorded runs' val curve, training loss
    and stage keys."""
    known = [c.get("comparison_id") for c in store.list_comparisons()]
    if comparison_id not in known:
        listed = f" (there are: {', '.join(map(str, known[-5:]))})" if known else ""
        raise FileNotFoundError(f"no comparison {comparison_id!r} in {store.root}{listed}")
    record = store.load_comparison(comparison_id)
    runs = {r["run_id"]: r for r in store.list_runs()}
    reader = Reader(store)
    try:
        where = f"where comparison_id = {_lit(comparison_id)} order by method, seed"
        data = ComparisonData(
            record=record, rows=reader.rows(f"select * from comparisons {where}"),
            steps=reader.rows(f"select * from comparison_steps {where}, split, n_steps"),
            val_curves={}, train_loss={}, stage_keys={},
        )
        for entry in record.get("runs", []):
            rid = entry.get("run_id")
            if rid not in runs:  # a run that failed before it was recorded
                continue
            data.stage_keys[rid] = ran_stages(runs[rid])
            sch = schema_name(rid)
            if reader.has(runs[rid], "val_selection"):
                data.val_curves[rid] = [(r["epoch"], r["accuracy"]) for r in
                                        reader.rows(f"select epoch, accuracy from {sch}.val_selection order by epoch")]
            if reader.has(runs[rid], "train_log"):
                data.train_loss[rid] = [(r["step"], r["loss"]) for r in
                                        reader.rows(f"select step, loss from {sch}.train_log order by step")]
        return data
    finally:
        reader.close()


def write_report(store: Store, target: str | None = None, out: Path | None = None) -> Path:
    """Write the page of a run or a comparison (an id starting with `cmp_`) and return its path.

    target None: the latest completed run. out None: `<store>/reports/<id>.html`.
    Raises FileNotFoundError for an unknown id or a store without runs.
    """
    if target is not None and target.startswith(COMPARISON_PREFIX):
        page, name = comparison_page(comparison_data(store, target)), target
    else:
        data = run_data(store, target)
        page, name = run_page(data), data.run["run_id"]
    path = Path(out) if out is not None else store.page_path(f"{name}.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
