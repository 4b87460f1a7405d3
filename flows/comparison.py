"""What `kpod compare` runs and what it records: plain code, no Prefect.

A comparison is every (method, seed) pipeline of one config over one store: the stages the runs
share (dataset, teacher, rationales, the student's tokenizer, ...) have the same keys, so they
are computed once and served to the others. Its record (`comparisons/<id>.json`) names each run;
its tables, rewritten as each run ends (a killed comparison keeps the rows of the runs that
finished), are:
- `comparisons`: one row per run: val and test accuracy with 95% intervals, train time and tokens;
- `comparison_steps`: accuracy by the question's number of steps (synthetic data's `n_steps`).
"""

from __future__ import annotations

import json
from typing import Any, get_args

import pyarrow as pa
from pydantic import ValidationError

from storage.schemas import schema_for
from storage.store import Store
from tasks.config.pipeline import ConfigError, PipelineConfig, format_validation_error
from tasks.config.train import Method

METHODS = get_args(Method)  # train.method's values, in the order the config declares them


class CompareError(ValueError):
    """A bad comparison request (methods, seeds, how many at once): the user's to fix."""


def check_request(methods: list[str], seeds: list[int], runs_at_once: int) -> None:
    """Refuse what cannot run, before any pipeline starts."""
    if not methods:
        raise CompareError("no method given; methods are: " + ", ".join(METHODS))
    for m in methods:
        if m not in METHODS:
            raise CompareError(f"unknown method {m!r}; methods are: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise CompareError("each method and each seed may be named once")
    if not seeds:
        raise CompareError("no seed given")
    if runs_at_once < 1:
        raise CompareError(f"runs_at_once must be at least 1, not {runs_at_once}")


def jobs(methods: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(method, seed) in the order they start: seed by seed, so each seed's first runs compute
    the stages the later ones share, and an early look at the table covers every method."""
    return [(m, s) for s in seeds for m in methods]


def job_config(config: PipelineConfig, method: str, seed: int) -> PipelineConfig:
    """The config with train.method and train.seed set, validated again (a method may need
    sections the config must allow, e.g. the mentor's)."""
    data = config.model_dump(mode="json")
    data["train"] = dict(data.get("train", {}), method=method, seed=seed)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"train.method={method}")) from None


def run_rows(store: Store, comparison_id: str, method: str, seed: int, run: dict[str, Any]) -> tuple[dict, list[dict]]:
    """One run's `comparisons` row and its `comparison_steps` rows (none for a failed run)."""
    row: dict[str, Any] = dict.fromkeys(schema_for("comparisons").names)
    row.update(comparison_id=comparison_id, method=method, seed=seed, run_id=run["run_id"],
               status=run.get("status"), error=run.get("error"))
    if run.get("status") != "completed":
        return row, []
    keys = run.get("stages", {})
    metrics = _table(store, "evaluate", keys, "metrics")
    for r in metrics.to_pylist() if metrics is not None else []:
        if r["split"] in ("val", "test"):
            row.update({f"{r['split']}_accuracy": r["accuracy"], f"{r['split']}_ci_low": r["ci_low"],
                        f"{r['split']}_ci_high": r["ci_high"]})
    log = _table(store, "train", keys, "train_log")
    if log is not None:
        row.update(train_tokens=sum(log.column("tokens").to_pylist()),
                   train_seconds=store.manifest("train", keys["train"]).get("seconds"))
    return row, _step_rows(store, keys, {"comparison_id": comparison_id, "method": method, "seed": seed})


def _step_rows(store: Store, keys: dict[str, str], label: dict[str, Any]) -> list[dict]:
    """Accuracy by the question's number of steps (synthetic data's `meta.n_steps`), per split."""
    predictions, questions = _table(store, "evaluate", keys, "predictions"), _table(store, "dataset", keys, "questions")
    if predictions is None or questions is None:
        return []
    n_steps = {q["question_id"]: json.loads(q["meta"] or "{}").get("n_steps")
               for q in questions.select(["question_id", "meta"]).to_pylist()}
    tally: dict[tuple[str, int], list[int]] = {}
    for p in predictions.select(["question_id", "split", "correct"]).to_pylist():
        if (k := n_steps.get(p["question_id"])) is not None:
            tally.setdefault((p["split"], int(k)), []).append(int(p["correct"]))
    return [dict(label, split=sp, n_steps=k, n=len(c), accuracy=sum(c) / len(c)) for (sp, k), c in sorted(tally.items())]


def _table(store: Store, stage: str, keys: dict[str, str], table: str) -> pa.Table | None:
    """One of the run's own tables, read by its stage key (not through the catalog's views of
    "the latest run": runs of a comparison end in any order); None when the run has no such
    complete stage."""
    key = keys.get(stage)
    if key is None or not store.is_complete(stage, key) or table not in store.manifest(stage, key).get("tables", {}):
        return None
    return store.read_table(stage, key, table)


def write_tables(store: Store, comparison_id: str, rows: list[dict], step_rows: list[dict]) -> None:
    """Rewrite the comparison's two tables with every row so far."""
    for table, data in (("comparisons", rows), ("comparison_steps", step_rows)):
        schema = schema_for(table)
        store.write_comparison_table(comparison_id, table, pa.Table.from_pylist(data, schema=schema))
