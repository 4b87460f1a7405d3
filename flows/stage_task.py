"""The thin Prefect wrapper around `tasks.stages.contract.execute`: caching, result storage, a UI summary.

One generic task serves every stage (its run name is the stage's). Its cache key is the
stage's content key, so a rerun of an unchanged stage is a Prefect `Cached` state in
milliseconds; its results persist under the store (`prefect-results/`), not ~/.prefect.
"""

from __future__ import annotations

from typing import Any

import httpx
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from flows.secrets import stage_runtime
from storage.store import Store
from tasks.config.pipeline import PipelineConfig
from tasks.stages.registry import BY_NAME
from tasks.stages.contract import execute


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
    update_progress_artifact(artifact_id=artifact_id, progress=100.0)
    if outcome["status"] == "computed":
        create_markdown_artifact(
            key=f"kpod-{stage.replace('_', '-')}",
            markdown=_summary_markdown(outcome),
            description=f"kpod stage {stage}",
        )
    return outcome


def stage_task(stage: str, refresh: bool):
    """The task configured for one stage, named after it (results: see `results_in_store`)."""
    return run_stage.with_options(name=stage, task_run_name=stage, refresh_cache=refresh)


def results_in_store(store: Store):
    """Prefect persists task results under the store, beside the artifacts they describe.

    A `result_storage=` block would have to be saved server-side first; the local storage
    path setting needs no server round trip and applies to the task runs of this flow.
    """
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    return temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(store.prefect_results_dir())})
