"""The kpod DAG as one Prefect flow. It only wires: plan keys, pick stages, run them in order.

Parameters: the whole typed config (Prefect validates it and renders a form), `stages` (run
these; an incomplete upstream stage is run too), `force` (recompute although cached) and
`store` (the artifact store root; default `$KPOD_STORE` or ./kpod-store).
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import time  # noqa: E402
import uuid  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_table_artifact  # noqa: E402

from flows.stage_task import stage_task  # noqa: E402
from storage.catalog import write_catalog_file  # noqa: E402
from storage.store import Store  # noqa: E402
from tasks.pipeline import PipelineConfig  # noqa: E402
from tasks.registry import BY_NAME, STAGES  # noqa: E402
from tasks.stage import PlannedStage, plan  # noqa: E402


class StageSelectionError(ValueError):
    pass


def select_stages(
    planned: list[PlannedStage], store: Store, stages: list[str] | None, force: list[str]
) -> list[PlannedStage]:
    """The stages to run: the requested ones plus any upstream stage that is not complete."""
    names = [p.name for p in planned]
    for name in list(stages or []) + list(force):
        if name not in BY_NAME:
            raise StageSelectionError(f"unknown stage {name!r}; stages are: {', '.join(BY_NAME)}")
        if name not in names:
            raise StageSelectionError(f"stage {name!r} is not part of this config's pipeline")
    if not stages:
        return planned
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
        for p in todo:
            t0 = time.perf_counter()
            refresh = p.name in force or not st.is_complete(p.name, p.key)
            state = stage_task(p.name, st, refresh)(
                p.name, config, keys, str(st.root), p.name in force, return_state=True
            )
            outcome = dict(state.result())
            if state.name == "Cached":
                outcome["status"] = "cached"
            outcome["seconds"] = round(time.perf_counter() - t0, 3)
            outcomes.append(outcome)
            logger.info(
                "%-14s %-8s key=%s rows=%s %.2fs",
                p.name, outcome["status"].upper(), p.key, outcome["rows"], outcome["seconds"],
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
