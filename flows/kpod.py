"""The kpod DAG as one Prefect flow. It only wires: plan keys, pick stages, run them in order.

Parameters: the whole typed config (Prefect validates it and renders a form), `stages` (run
these; an incomplete upstream stage is run too), `force` (recompute although cached) and
`store` (the artifact store root; default `$KPOD_STORE` or ./kpod-store).
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# a loaded 2-core machine can take longer than Prefect's 20 s to start its ephemeral server
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import time  # noqa: E402
import uuid  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_table_artifact  # noqa: E402

from flows.stage_task import results_in_store, stage_task  # noqa: E402
from storage.catalog import write_catalog_file  # noqa: E402
from storage.store import Store  # noqa: E402
from tasks.config.pipeline import PipelineConfig  # noqa: E402
from tasks.stages.registry import BY_NAME, STAGES  # noqa: E402
from tasks.stages.contract import PlannedStage, plan  # noqa: E402


class StageSelectionError(ValueError):
    pass


def select_stages(
    planned: list[PlannedStage], store: Store, stages: list[str] | None, force: list[str]
) -> list[PlannedStage]:
    """The stages to run: the requested ones plus any upstream stage that is not complete."""
    for name in list(stages or []) + list(force):
        if name not in BY_NAME:
            raise StageSelectionError(f"unknown stage {name!r}; stages are: {', '.join(BY_NAME)}")
    if not stages:
        stages = [p.name for p in planned if p.enabled]
    by_name = {p.name: p for p in planned}
    wanted: set[str] = set()

    def need(name: str) -> None:
        if name in wanted:
            return
        wanted.add(name)
        for up in by_name[name].upstream:
            if up not in wanted and not store.is_complete(up, by_name[up].key):
                need(up)

    for name in list(stages) + list(force):
        need(name)
    return [p for p in planned if p.name in wanted]


def _run_one(p: PlannedStage, config: PipelineConfig, keys: dict[str, str], st: Store, forced: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    # a missing artifact must run even if Prefect remembers a result for this key
    refresh = forced or not st.is_complete(p.name, p.key)
    state = stage_task(p.name, refresh)(p.name, config, keys, str(st.root), forced, return_state=True)
    outcome = dict(state.result())
    if state.name == "Cached":
        outcome["status"] = "cached"
    outcome["seconds"] = round(time.perf_counter() - t0, 3)
    return outcome


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:4]


@flow(name="kpod", log_prints=True)
def kpod(
    config: PipelineConfig = PipelineConfig(),
    stages: list[str] | None = None,
    force: list[str] | None = None,
    store: str | None = None,
) -> list[dict[str, Any]]:
    logger = get_run_logger()
    st = Store(store)
    force = list(force or [])
    planned = plan(config, STAGES)
    todo = select_stages(planned, st, stages, force)
    keys = {p.name: p.key for p in planned}
    run_id = new_run_id()
    record: dict[str, Any] = {
        "run_id": run_id,
        "name": config.name,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stages": keys,
        "status": "running",
    }
    st.save_run(run_id, record)
    outcomes: list[dict[str, Any]] = []
    try:
        with results_in_store(st):
            for p in todo:
                outcomes.append(_run_one(p, config, keys, st, p.name in force))
                o = outcomes[-1]
                logger.info(
                    "%-14s %-8s key=%s rows=%s %.2fs",
                    p.name, o["status"].upper(), p.key, o["rows"], o["seconds"],
                )
        record["status"] = "completed"
    except BaseException:
        record["status"] = "failed"
        raise
    finally:
        record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record["outcomes"] = outcomes
        st.save_run(run_id, record)
        write_catalog_file(st)
    create_table_artifact(
        key="kpod-run-summary",
        table=[
            {k: o[k] for k in ("stage", "status", "key", "seconds")}
            | {"rows": sum(o["rows"].values())}
            for o in outcomes
        ],
        description=f"kpod run {run_id}",
    )
    return outcomes
