"""A store with two recorded runs of configs/smoke.yaml, computed in-process without Prefect
(as bench/stage_run.py does), shared by the export and lineage tests: built once per session.

- `run_std`: Std-CoT (no weights, difficulty or schedule stage);
- `run_kpod`: KPOD (token weights and schedule), recorded last, so the default run.
A sentinel API key sits in the environment variable the config names while the stages run;
tests check that it never reaches a written file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from storage.store import Store
from tasks.config.pipeline import load_config
from tasks.stages.contract import execute, plan
from tasks.stages.registry import BY_NAME, STAGES

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
KEY_ENV = "KPOD_TEST_SMOKE_API_KEY"
SENTINEL = "sk-kpod-smoke-store-sentinel-7f3a9c"
RUNS = (("run_std", "std_cot", "2026-01-01T00:00:00+00:00"), ("run_kpod", "kpod", "2026-01-01T00:01:00+00:00"))


@dataclass
class SmokeStore:
    store: Store
    keys: dict[str, dict[str, str]]  # run id -> stage -> key (every planned stage, as runs record)


_BUILT: dict[str, SmokeStore] = {}


def smoke_store(tmp_path_factory: Any) -> SmokeStore:
    """The shared store (built on the first call of the session)."""
    if "store" not in _BUILT:
        store = Store(tmp_path_factory.mktemp("smoke-store"))
        keys = {}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(KEY_ENV, SENTINEL)
            for run_id, method, started in RUNS:
                keys[run_id] = _run(store, run_id, method, started)
        _BUILT["store"] = SmokeStore(store, keys)
    return _BUILT["store"]


def smoke_config(method: str) -> Any:
    return load_config(CONFIG, [f"train.method={method}", f"teacher.api_key_env={KEY_ENV}"])


def _run(store: Store, run_id: str, method: str, started: str) -> dict[str, str]:
    """Execute every stage the method needs and record the run as `kpod run` would."""
    cfg = smoke_config(method)
    planned = plan(cfg, STAGES)
    keys = {p.name: p.key for p in planned}
    for p in planned:
        if p.enabled:
            execute(BY_NAME[p.name], cfg, keys, store, show_progress=False)
    store.save_run(run_id, {
        "run_id": run_id, "name": f"smoke-{method}", "started_at": started, "finished_at": started,
        "stages": keys, "status": "completed", "prefect": False,
    })
    return keys
