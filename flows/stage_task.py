"""The thin Prefect wrapper around `tasks.stages.contract.execute`: caching, result storage, a UI summary.

One generic task serves every stage; `submit_stage` names each run after its stage and
submits it with its upstream stages' futures, so the server records the DAG's edges. Its
cache key is the stage's content key, so a rerun of an unchanged stage is a Prefect `Cached`
state in milliseconds; its results persist under the store (`prefect-results/`), not ~/.prefect.

When stages may run at once, a stage that computes runs in a worker process of its own, never
in a thread beside another one: loading a model, transformers swaps `torch.nn.init` for no-ops
process-wide, and seeds are process-wide too, so two stages computing in one process corrupt
each other (a mentor loaded as meta tensors while `weights` built its predictor). A stage
complete in the store only reads its manifest: it runs in a thread of the flow, in milliseconds.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import httpx
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner
from prefect.utilities.annotations import quote

from flows.secret_blocks import stage_runtime
from flows.shards import shard_runtime
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
    keep_work: bool = False,
    dask: str | None = None,
) -> dict[str, Any]:
    """The stage's outcome, with when it ran (ISO UTC, measured here, inside its own thread).
    `dask`: the scheduler the teacher's shards go to (flows/shards.py; None: threads)."""
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
        # looked up only if the stage computes
        runtime=lambda: {**stage_runtime(stage, config), **shard_runtime(stage, config, dask)},
        keep_work=keep_work,
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
    processes: TaskRunner | None,
    keep_work: bool = False,
    dask: str | None = None,
) -> PrefectFuture:
    """Submit stage `p` after `upstream` (its upstream stages' futures): to `processes` (a
    process pool; None when one stage runs at a time) if it computes, else to the flow's
    own thread pool.

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
    params = dict(
        stage=p.name, config=config, keys=keys, store_root=str(store.root), force=forced, keep_work=keep_work,
        dask=dask,
    )
    params = {k: quote(v) for k, v in params.items()}
    if refresh and processes is not None:
        return processes.submit(stage, params, wait_for=upstream)
    return stage.submit(**params, wait_for=upstream)


def start_workers(pool: Any, n: int) -> None:
    """Start the pool's `n` worker processes now, beside the first stages: each takes ~10 s to
    import torch and the stages, and a branch that waited for that would not overlap its
    sibling. The executor spawns a process per job it cannot hand to an idle one."""
    executor = getattr(pool, "_executor", None)  # Prefect's runner has no public hook for this
    for _ in range(n if executor is not None else 0):
        executor.submit(time.sleep, 0.5)


def ready_worker() -> None:
    """The initializer of each worker process (a stage runs in one when stages may run at once).

    Unpickling it imports this module and through it every stage, before the worker takes a
    stage: a worker still starting leaves the stage to a ready one instead of holding it.
    """


def outcome_of(future: PrefectFuture) -> dict[str, Any]:
    """A finished stage's outcome. A `Cached` run did not run the stage: its result is the
    outcome of the run that computed it, so its status and times are this run's instead."""
    state = future.state
    outcome = dict(future.result())
    if state.name == "Cached":
        at = state.timestamp.astimezone(timezone.utc).isoformat()
        outcome.update(status="cached", seconds=0.0, started_at=at, finished_at=at)
    return outcome
