"""`kpod lineage QUESTION_ID`: one question's path through a run, for people.

The rows come from the catalog's `lineage` view (storage/lineage.py): the question's teacher
calls, its rationales (correct, steps, token weights, schedule input steps, trained on or not)
and its predictions, each with its stage key. A val or test question has no teacher call of its
own (the teacher answers train questions); what fed its prediction is the whole training set of
the run's train stage, summarised at the end (`trained_on`).
"""

from __future__ import annotations

from typing import Any

from storage.catalog import CatalogError, connect, default_run
from storage.store import Store


def question_lineage(
    store: Store, question_id: str, run_id: str | None = None
) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
    """(columns, the question's `lineage` rows, what the run's student was trained on)."""
    con = connect(store, run_id)  # no run, or an unknown one: a CatalogError naming it
    run = run_id or default_run(store.list_runs())["run_id"]
    try:
        cur = con.execute("SELECT * FROM lineage WHERE question_id = ? ORDER BY rationale_id, request_id", [question_id])
        columns = [d[0] for d in cur.description]
        rows = [dict(zip(columns, r)) for r in cur.fetchall()]
        if not rows:
            example = con.execute("SELECT min(question_id) FROM lineage").fetchone()[0]
            raise CatalogError(f"no question {question_id!r} in run {run} (e.g. {example!r}; "
                               "`kpod sql \"select distinct question_id from lineage\"`)")
        trained = con.execute(
            "SELECT count(DISTINCT rationale_id), count(DISTINCT request_id), sum(tokens_in), sum(tokens_out), "
            "sum(cost_usd) FROM lineage WHERE trained"
        ).fetchone()
    finally:
        con.close()
    keys = ("rationales", "teacher_calls", "tokens_in", "tokens_out", "cost_usd")
    return columns, rows, {"run_id": run, **dict(zip(keys, trained))}


def _key(rows: list[dict[str, Any]], column: str) -> str:
    keys = sorted({r[column] for r in rows if r[column] is not None})
    return ", ".join(keys) if keys else "-"


def _call_line(r: dict[str, Any]) -> str:
    status = "ok" if r["teacher_error"] is None else f"error: {r['teacher_error'][:60]}"
    return (f"  {r['request_id']}  sample {r['sample']}  {r['teacher_model']}  {r['tokens_in']} in / "
            f"{r['tokens_out']} out  ${r['cost_usd'] or 0:.4f}  {status}")


def _rationale_line(r: dict[str, Any]) -> str:
    parts = [f"  {r['rationale_id']}", "correct" if r["rationale_correct"] else "wrong", f"{r['steps'] or 0} steps"]
    if r["weighted_tokens"] is not None:
        parts.append(f"{r['weighted_tokens']} tokens, mean weight {r['mean_weight']:.3f}")
    if r["schedule_input_steps"] is not None:
        parts.append(f"input steps per curriculum stage {list(r['schedule_input_steps'])}")
    if r["trained"] is not None:
        parts.append("trained on" if r["trained"] else "not trained on")
    return "  ".join(parts)


def format_lineage(rows: list[dict[str, Any]], trained_on: dict[str, Any]) -> list[str]:
    """The readable summary `kpod lineage` prints."""
    first = rows[0]
    calls = [r for r in rows if r["request_id"] is not None]
    rationales = [r for r in rows if r["rationale_id"] is not None]
    out = [f"question {first['question_id']} ({first['split']}), run {first['run_id']}, dataset {first['dataset_key']}"]
    out.append(f"teacher calls: {len(calls)} (teacher {_key(rows, 'teacher_key')})")
    out += [_call_line(r) for r in calls]
    out.append(f"rationales: {len(rationales)} (rationales {_key(rows, 'rationales_key')}, "
               f"weights {_key(rows, 'weights_key')}, schedule {_key(rows, 'schedule_key')})")
    out += [_rationale_line(r) for r in rationales]
    if first["evaluate_key"] is None:
        out.append("prediction: none (this run evaluated no such split or has no evaluate stage)")
    else:
        verdict = "correct" if first["prediction_correct"] else "wrong"
        out.append(f"prediction: {first['prediction']!r} ({verdict}; evaluate {first['evaluate_key']})")
    t = trained_on
    if first["train_key"] is not None:
        out.append(f"student: train {first['train_key']}, trained on {t['rationales']} rationales from "
                   f"{t['teacher_calls']} teacher calls ({t['tokens_in'] or 0} tokens in, "
                   f"{t['tokens_out'] or 0} out, ${t['cost_usd'] or 0:.4f}): `kpod sql \"select * from lineage where trained\"`")
    return out
