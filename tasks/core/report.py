"""The text a run ends with: accuracy per method and split, wall time per stage, SQL to try.

Plain data in, a string out, so the CLI, the flow and tests share it:
- `stages`: one dict per stage as `tasks.stages.contract.Outcome.as_dict()` gives it (only `stage`,
  `status` and `seconds` are read);
- `metrics`: rows of the `metrics` table (method, seed, split, n, accuracy, ci_low, ci_high).
"""

from __future__ import annotations

from datetime import datetime

from typing import Any, Iterable, Mapping, Sequence

SPLIT_ORDER = ("val", "test")  # the columns a reader looks for first; other splits follow

SQL_EXAMPLES = (
    "SELECT method, seed, split, n, accuracy, ci_low, ci_high FROM metrics ORDER BY split",
    "SELECT q.question, p.output, p.pred, p.answer FROM predictions p "
    "JOIN questions q USING (question_id) WHERE p.split = 'test' AND NOT p.correct LIMIT 5",
)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], right: set[int]) -> list[str]:
    """Rows as aligned text columns; the columns in `right` align right (numbers)."""
    rows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    return [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]


def _accuracy_cell(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "-"
    return f"{row['accuracy']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] n={row['n']}"


def accuracy_lines(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per (method, seed): accuracy with its 95% interval for each split."""
    if not metrics:
        return ["(no metrics: the evaluate stage did not run)"]
    present = {m["split"] for m in metrics}
    splits = [s for s in SPLIT_ORDER if s in present] + sorted(present - set(SPLIT_ORDER))
    by_run: dict[tuple[str, int], dict[str, Mapping[str, Any]]] = {}
    for m in metrics:
        by_run.setdefault((m["method"], m["seed"]), {})[m["split"]] = m
    header = ["method", "seed"] + [f"{s} accuracy [95% CI]" for s in splits]
    rows = [
        [method, str(seed)] + [_accuracy_cell(per_split.get(s)) for s in splits]
        for (method, seed), per_split in sorted(by_run.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]
    return _table(header, rows, right={1})


def timing_lines(stages: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per stage (status and wall seconds), then the total: the wall time from the
    first stage's start to the last one's end when the stages carry their times (stages of
    independent branches overlap, so their seconds do not add up), else the sum."""
    rows = [[s["stage"], s["status"], f"{float(s['seconds']):.1f}"] for s in stages]
    times = [(s["started_at"], s["finished_at"]) for s in stages if s.get("started_at") and s.get("finished_at")]
    if times and len(times) == len(stages):
        first = min(datetime.fromisoformat(a) for a, _ in times)
        total = (max(datetime.fromisoformat(b) for _, b in times) - first).total_seconds()
    else:
        total = sum(float(s["seconds"]) for s in stages)
    return _table(["stage", "status", "seconds"], rows + [["total", "", f"{total:.1f}"]], right={2})


def format_report(
    stages: Sequence[Mapping[str, Any]],
    metrics: Sequence[Mapping[str, Any]],
    sql_command: str = "kpod sql",
) -> str:
    """The end-of-run summary: accuracy table, per-stage wall time, and two SQL queries."""
    lines = ["Accuracy (greedy decoding, 95% Wilson interval)"]
    lines += ["  " + ln for ln in accuracy_lines(metrics)]
    lines += ["", "Stages (wall time of this run; cached stages cost only a lookup)"]
    lines += ["  " + ln for ln in timing_lines(stages)]
    lines += ["", "Try:"]
    lines += [f'  {sql_command} "{q}"' for q in SQL_EXAMPLES]
    return "\n".join(lines)
