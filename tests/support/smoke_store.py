"""A small real store for report tests: the smoke config's stages run in-process (no Prefect),
one recorded run per (method, seed), and a comparison over them.

The comparison's rows come from the runs' own tables through `flows.comparison.run_rows`, the
code `kpod compare` records them with, so a page built from the store can be checked against
the same numbers.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

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


def build(root: Path, methods: tuple[str, ...] = ("std_cot", "kpod"), seeds: tuple[int, ...] = (0, 1),
          name: str = "smoke <&> test") -> dict[str, Any]:
    """The store at `root` with one run per (method, seed), a failed mentor_kd run, and a
    comparison `cmp_test` of them all. `name` and the failed run's error carry HTML's special
    characters so pages are checked for escaping."""
    from flows.comparison import run_rows, write_tables
    from storage.store import Store

    store = Store(root)
    cid = "cmp_test"
    runs, rows, steps = [], [], []
    for i, (method, seed) in enumerate((m, s) for m in methods for s in seeds):
        run_id = run_method(store, method, seed, f"2026-01-01T00:00:{i:02d}+00:00")
        runs.append({"method": method, "seed": seed, "run_id": run_id, "status": "completed", "error": None})
        row, step_rows = run_rows(store, cid, method, seed, store.load_run(run_id))
        rows.append(row)
        steps += step_rows
    # a method whose run failed: in the record and the table, with no accuracy and its error
    error = "Traceback (most recent call last):\nRuntimeError: mentor <b>diverged</b> & stopped"
    failed = record_failed_run(store, "mentor_kd", 0, "2025-12-31T00:00:00+00:00", error)
    runs.append({"method": "mentor_kd", "seed": 0, "run_id": failed, "status": "failed", "error": error})
    rows.append(run_rows(store, cid, "mentor_kd", 0, store.load_run(failed))[0])
    write_tables(store, cid, rows, steps)
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
