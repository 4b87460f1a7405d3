"""The thin Prefect wrapper around `tasks.stages.contract.execute`: caching, result storage, a UI summary.

One generic task serves every stage; `submit_stage` names each run after its stage and
submits it with its upstream stages' futures, so the server records the DAG's edges. Its
cache key is the stage's content key, so a rerun of an unchanged stage is a Prefect `Cached`
state in milliseconds; its results persist under the store (`prefect-results/`), not ~/.prefect.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import httpx
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture
from prefect.utilities.annotations import quote

from flows.secrets import stage_runtime
from storage.store import Store
from tasks.config.pipeline import PipelineConfig
from tasks.stages.contract import PlannedStage, execute
from tasks.stages.registry import BY_NAME


def _cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return f"kpod-{parameters['stage']}-{parameters['keys'][parameters['stage']]}"


def _summary_markdown(outcome: dict[str, Any]) -> str:
    lines = [
        f"### {outcome['stage']}: {outcome['status']}",
        f"key `{outcome['key']}`, {outcome['seconds']:.2f} s",
        "",
        "| table | rows |",
        "|---|---|",
    ]
    lines += [f"| {t} | {n} |" for t, n in outcome["rows"].items()]
    for k, v in outcome.get("summary", {}).items():
        if isinstance(v, (int, float, str, bool)):
            lines.append(f"\n- **{k}**: {v}")
    return "\n".join(lines)


@task(persist_result=True, result_serializer="json", cache_key_fn=_cache_key)
def run_stage(
    stage: str,
    config: PipelineConfig,
    keys: dict[str, str],
    store_root: str,
    force: bool = False,
) -> dict[str, Any]:
    """The stage's outcome, with when it ran (ISO UTC, measured here, inside its own thread)."""
    started = datetime.now(timezone.utc)
    artifact_id = create_progress_artifact(progress=0.0, description=f"kpod stage {stage}")
    logger = get_run_logger()

    def report(percent: float) -> None:
        # _sync: the hook may fire inside a stage's own event loop (the teacher's). A failed
        # UI update must not kill hours of training: it is logged, and the work goes on.
        try:
            update_progress_artifact(artifact_id=artifact_id, progress=percent, _sync=True)
        except (httpx.HTTPError, RuntimeError) as exc:
            logger.warning("progress artifact of %s not updated: %s", stage, exc)

    outcome = execute(
        BY_NAME[stage], config, keys, Store(store_root), force=force, progress_hook=report,
        runtime=stage_runtime(stage, config),
    ).as_dict()
    finished = datetime.now(timezone.utc)
    outcome.update(
        started_at=started.isoformat(),
        finished_at=finished.isoformat(),
        seconds=round((finished - started).total_seconds(), 3),
    )
    update_progress_artifact(artifact_id=artifact_id, progress=100.0)
    if outcome["status"] == "computed":
        create_markdown_artifact(
            key=f"kpod-{stage.replace('_', '-')}",
            markdown=_summary_markdown(outcome),
            description=f"kpod stage {stage}",
        )
    return outcome


def submit_stage(
    p: PlannedStage,
    upstream: list[PrefectFuture],
    config: PipelineConfig,
    keys: dict[str, str],
    store: Store,
    forced: bool,
) -> PrefectFuture:
    """Submit stage `p` to the flow's task runner, after `upstream` (its upstream stages' futures).

    Results go to `store.prefect_results_dir()` through `result_storage`: the local storage
    path setting, changed inside a running flow, is ignored (results landed in ~/.prefect).
    quote(): Prefect draws an edge from any earlier task whose result holds the very object
    passed as a parameter (a stage's key string, say); the only edges are the `wait_for` ones.
    """
    # a missing artifact must run even if Prefect remembers a result for this key
    refresh = forced or not store.is_complete(p.name, p.key)
    stage = run_stage.with_options(
        name=p.name, task_run_name=p.name, refresh_cache=refresh,
        result_storage=store.prefect_results_dir(),
    )
    args = (p.name, config, keys, str(store.root), forced)
    return stage.submit(*(quote(a) for a in args), wait_for=upstream)


def outcome_of(future: PrefectFuture) -> dict[str, Any]:
    """A finished stage's outcome. A `Cached` run did not run the stage: its result is the
    outcome of the run that computed it, so its status and times are this run's instead."""
    state = future.state
    outcome = dict(future.result())
    if state.name == "Cached":
        at = state.timestamp.astimezone(timezone.utc).isoformat()
        outcome.update(status="cached", seconds=0.0, started_at=at, finished_at=at)
    return outcome
