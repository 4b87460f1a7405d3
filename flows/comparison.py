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

from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from storage.catalog import CatalogError, query, schema_name
from storage.schemas import schema_for
from storage.store import Store
from tasks.config.methods import MENTOR_DATA_METHODS, PROGRESSIVE, WEIGHTED
from tasks.config.pipeline import ConfigError, PipelineConfig, format_validation_error

METHODS = ("std_cot", *sorted(PROGRESSIVE | WEIGHTED | MENTOR_DATA_METHODS))


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
    sch = schema_name(run["run_id"])
    for split, _n, acc, low, high in _select(store, run, f"select split, n, accuracy, ci_low, ci_high from {sch}.metrics"):
        if split in ("val", "test"):
            row.update({f"{split}_accuracy": acc, f"{split}_ci_low": low, f"{split}_ci_high": high})
    tokens = _select(store, run, f"select sum(tokens)::bigint from {sch}.train_log")
    row["train_tokens"] = tokens[0][0] if tokens else None
    if key := run.get("stages", {}).get("train"):
        row["train_seconds"] = store.manifest("train", key).get("seconds")
    steps = _select(
        store, run,
        f"select p.split, cast(json_extract(q.meta, '$.n_steps') as bigint) k, count(*), avg(p.correct::int) "
        f"from {sch}.predictions p join {sch}.questions q using (question_id) where k is not null "
        f"group by all order by p.split, k",
    )
    step_rows = [{"comparison_id": comparison_id, "method": method, "seed": seed, "split": sp, "n_steps": k,
                  "n": n, "accuracy": a} for sp, k, n, a in steps]
    return row, step_rows


def _select(store: Store, run: dict[str, Any], sql: str) -> list[tuple]:
    """Rows of `sql` over one run's schema; none when the run lacks a table (no train stage)."""
    try:
        return query(store, sql, run["run_id"])[1]
    except CatalogError:
        return []


def write_tables(store: Store, comparison_id: str, rows: list[dict], step_rows: list[dict]) -> None:
    """Rewrite the comparison's two tables with every row so far."""
    for table, data in (("comparisons", rows), ("comparison_steps", step_rows)):
        schema = schema_for(table)
        store.write_comparison_table(comparison_id, table, pa.Table.from_pylist(data, schema=schema))
