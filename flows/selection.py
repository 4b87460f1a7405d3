"""Which stages a run submits, and the run's id and clock: plain code, no Prefect.

`kpod run` uses it before any server starts (a run whose stages are all complete needs none:
flows/cli.py records it from the manifests); the flow uses it to pick what it submits.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any

from storage.store import Store
from tasks.stages.contract import PlannedStage, cached_outcome
from tasks.stages.registry import BY_NAME


class StageSelectionError(ValueError):
    """A bad choice of stages (or of how many run at once): the user's to fix."""


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


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:4]


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def recorded_outcome(store: Store, stage: PlannedStage) -> dict[str, Any]:
    """A complete stage's outcome in a run that did not submit it, as the flow records one."""
    at = utcnow()
    outcome = cached_outcome(stage.name, stage.key, store, time.perf_counter()).as_dict()
    return dict(outcome, seconds=0.0, started_at=at, finished_at=at)
