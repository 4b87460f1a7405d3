"""A small real store for report tests: the smoke config's stages run in-process (no Prefect),
one recorded run per (method, seed), and a comparison over them.

The comparison's rows are computed here from the runs' own tables, as `kpod compare` records
them, so a page built from the store can be checked against the same numbers.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pyarrow as pa

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
# score val after every epoch, so each run has a val curve (val_selection) to plot
SETS = ["train.select_every=1", "train.select_limit=6", "train.select_max_new_tokens=64"]


def run_method(store: Any, method: str, seed: int, started_at: str) -> str:
    """Compute (or reuse) every stage `method` needs and record a completed run; its id."""
    from flows.selection import recorded_outcome
    from tasks.config.pipeline import load_config
    from tasks.stages.contract import execute, plan
    from tasks.stages.registry import BY_NAME, STAGES

    cfg = load_config(SMOKE, SETS + [f"train.method={method}", f"train.seed={seed}"])
    planned = plan(cfg, STAGES)
    keys = {p.name: p.key for p in planned}
    for p in planned:
        if p.enabled:
            execute(BY_NAME[p.name], cfg, keys, store, show_progress=False)
    run_id = f"20260101_000000_{method}_{seed}"
    store.save_run(run_id, {
        "run_id": run_id, "name": cfg.name, "started_at": started_at, "finished_at": started_at,
        # as the flow records a run: every planned stage's key, outcomes of those it submitted
        "stages": keys, "status": "completed", "prefect": False,
        "outcomes": [recorded_outcome(store, p) for p in planned if p.enabled],
    })
    return run_id


def record_failed_run(store: Any, method: str, seed: int, started_at: str, error: str) -> str:
    """A run of `method` that died after the rationales stage (as the flow records one: the
    stages it planned, outcomes of those that finished, status failed and the error's tail)."""
    from flows.selection import recorded_outcome
    from tasks.config.pipeline import load_config
    from tasks.stages.contract import plan
    from tasks.stages.registry import STAGES

    planned = plan(load_config(SMOKE, SETS + ["train.method=std_cot", f"train.seed={seed}"]), STAGES)
    done = [p for p in planned if p.name in ("dataset", "teacher", "rationales")]  # std_cot computed them
    run_id = f"20260101_000000_{method}_{seed}"
    store.save_run(run_id, {
        "run_id": run_id, "name": "smoke", "started_at": started_at, "finished_at": started_at,
        "stages": {p.name: p.key for p in planned}, "status": "failed", "error": error, "prefect": False,
        "outcomes": [recorded_outcome(store, p) for p in done],
    })
    return run_id


def comparison_rows(store: Any, cid: str, method: str, seed: int, run_id: str) -> tuple[dict, list[dict]]:
    """One `comparisons` row and the `comparison_steps` rows of one run, from its tables."""
    from storage.catalog import query, schema_name

    sch = schema_name(run_id)
    _, metrics = query(store, f"select split, accuracy, ci_low, ci_high from {sch}.metrics", run_id)
    m = {s: (a, lo, hi) for s, a, lo, hi in metrics}
    _, tokens = query(store, f"select sum(tokens) from {sch}.train_log", run_id)
    keys = store.load_run(run_id)["stages"]
    row = {
        "comparison_id": cid, "method": method, "seed": seed, "run_id": run_id, "status": "completed",
        "val_accuracy": m["val"][0], "val_ci_low": m["val"][1], "val_ci_high": m["val"][2],
        "test_accuracy": m["test"][0], "test_ci_low": m["test"][1], "test_ci_high": m["test"][2],
        "train_seconds": float(store.manifest("train", keys["train"])["seconds"]),
        "train_tokens": int(tokens[0][0]), "error": None,
    }
    _, by_steps = query(
        store,
        f"select p.split, cast(json_extract(q.meta, '$.n_steps') as bigint) k, count(*), avg(p.correct::int) "
        f"from {sch}.predictions p join {sch}.questions q using (question_id) group by all",
        run_id,
    )
    steps = [
        {"comparison_id": cid, "method": method, "seed": seed, "split": s, "n_steps": k, "n": n, "accuracy": a}
        for s, k, n, a in by_steps
    ]
    return row, steps


def build(root: Path, methods: tuple[str, ...] = ("std_cot", "kpod"), seeds: tuple[int, ...] = (0, 1),
          name: str = "smoke <&> test") -> dict[str, Any]:
    """The store at `root` with one run per (method, seed), a failed mentor_kd run, and a
    comparison `cmp_test` of them all. `name` and the failed run's error carry HTML's special
    characters so pages are checked for escaping."""
    from storage.store import Store

    store = Store(root)
    cid = "cmp_test"
    runs, rows, steps = [], [], []
    for i, (method, seed) in enumerate((m, s) for m in methods for s in seeds):
        run_id = run_method(store, method, seed, f"2026-01-01T00:00:{i:02d}+00:00")
        runs.append({"method": method, "seed": seed, "run_id": run_id, "status": "completed", "error": None})
        row, step_rows = comparison_rows(store, cid, method, seed, run_id)
        rows.append(row)
        steps += step_rows
    # a method whose run failed: in the record and the table, with no accuracy and its error
    error = "Traceback (most recent call last):\nRuntimeError: mentor <b>diverged</b> & stopped"
    failed = record_failed_run(store, "mentor_kd", 0, "2025-12-31T00:00:00+00:00", error)
    runs.append({"method": "mentor_kd", "seed": 0, "run_id": failed, "status": "failed", "error": error})
    rows.append({"comparison_id": cid, "method": "mentor_kd", "seed": 0, "run_id": failed, "status": "failed",
                 "val_accuracy": None, "val_ci_low": None, "val_ci_high": None, "test_accuracy": None,
                 "test_ci_low": None, "test_ci_high": None, "train_seconds": None, "train_tokens": None,
                 "error": error})
    store.write_comparison_table(cid, "comparisons", pa.Table.from_pylist(rows))
    store.write_comparison_table(cid, "comparison_steps", pa.Table.from_pylist(steps))
    record = {
        "comparison_id": cid, "name": name, "config": {"name": name, "train": {"epochs": 2}},
        "methods": [*methods, "mentor_kd"], "seeds": list(seeds), "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": "2026-01-01T00:01:00+00:00", "status": "completed", "runs": runs,
    }
    store.save_comparison(cid, record)
    completed = [r for r in rows if r["status"] == "completed"]
    means = {
        (m, split): statistics.fmean(r[f"{split}_accuracy"] for r in completed if r["method"] == m)
        for m in methods for split in ("val", "test")
    }
    return {"store": store, "comparison": record, "rows": rows, "steps": steps, "means": means, "failed": failed}


_BUILT: dict[str, Any] = {}


def shared(tmp_path_factory: Any) -> dict[str, Any]:
    """`build`'s store, built once per test process: the unit and browser tests of the report
    share it when they run together (20 s of stages on one core), and each builds it alone."""
    if not _BUILT:
        _BUILT.update(build(tmp_path_factory.mktemp("report-store")))
    return _BUILT
