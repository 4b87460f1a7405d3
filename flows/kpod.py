"""The kpod DAG as one Prefect flow. It only wires: plan keys, pick stages, run them as a DAG.

Parameters: the whole typed config (Prefect validates it and renders a form), `stages` (run
these; an incomplete upstream stage is run too), `force` (recompute although cached), `store`
(the artifact store root; default `$KPOD_STORE` or ./kpod-store) and `parallel` (how many
stages may run at once: independent branches, such as the mentor's beside weights ->
difficulty -> schedule, run side by side, each stage that computes in a process of its own;
1 runs one at a time, all in the flow's process) and `keep_work` (keep a computed stage's
checkpoints in its work dir; by default they are deleted once the stage commits) and `run_id`
(record the run under this id; `kpod compare` names its runs; default a new one) and
`report_page` (a run that evaluated writes its HTML page, as `kpod report RUN` does, and
attaches a link to it to the flow run) and `dask` (where the teacher's shards run when
`teacher.shards` > 1: a Dask scheduler's address, or `local:N` for a cluster of N worker
processes on 127.0.0.1 for this run; default: threads of the stage's process; flows/shards.py).

Each stage is its own task run, submitted with its upstream stages' futures (flows/dag.py), so
the Prefect UI draws the real DAG. A failed stage fails the flow with its own exception, after
every stage that does not depend on it has finished; the stages below it never run.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# a loaded 2-core machine can take longer than Prefect's 20 s to start its ephemeral server
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import traceback  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_table_artifact  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner  # noqa: E402

from flows.dag import can_overlap, raise_first_failure, run_dag  # noqa: E402
from flows.selection import StageSelectionError, new_run_id, select_stages, utcnow  # noqa: E402
from flows.shards import dask_scheduler  # noqa: E402
from flows.stage_task import outcome_of, ready_worker, start_workers, submit_stage  # noqa: E402
from flows.threads import apply_threads, thread_default  # noqa: E402
from storage.catalog import write_catalog_file  # noqa: E402
from storage.store import Store  # noqa: E402
from tasks.config.pipeline import PipelineConfig  # noqa: E402
from tasks.stages.contract import plan  # noqa: E402
from tasks.stages.registry import STAGES  # noqa: E402


def error_tail(exc: BaseException, lines: int = 12) -> str:
    """The last `lines` lines of the exception's traceback, for the run record."""
    text = "".join(traceback.format_exception(exc)).rstrip()
    return "\n".join(text.splitlines()[-lines:])


# threads run the stages complete in the store (every stage when parallel=1); `parallel` bounds them all
@flow(name="kpod", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=len(STAGES)))
def kpod(
    config: PipelineConfig = PipelineConfig(),
    stages: list[str] | None = None,
    force: list[str] | None = None,
    store: str | None = None,
    parallel: int = 2,
    keep_work: bool = False,
    run_id: str | None = None,
    report_page: bool = True,
    dask: str | None = None,
) -> list[dict[str, Any]]:
    if parallel < 1:
        raise StageSelectionError(f"parallel must be at least 1 (stages at once), not {parallel}")
    st, force = Store(store), list(force or [])
    apply_threads(thread_default(config))  # before any stage trains (flows/threads.py says why)
    st.remove_dead_temps()
    planned = plan(config, STAGES)
    todo = select_stages(planned, st, stages, force)
    keys = {p.name: p.key for p in planned}
    run_id = run_id or new_run_id()
    record: dict[str, Any] = {
        "run_id": run_id, "name": config.name, "started_at": utcnow(), "stages": keys, "status": "running",
    }
    st.save_run(run_id, record)
    outcomes: list[dict[str, Any]] = []
    try:
        # when two stages may run at once, one that computes runs in a worker process of its own
        # (flows/stage_task.py), started up front; a chain computes in the flow's own process
        # (a chain, or one stage, opens no pool at all: nothing to start, nothing to tear down)
        overlap = parallel > 1 and can_overlap(todo, planned)
        with dask_scheduler(dask, config, todo, st, force) as address, (
            ProcessPoolTaskRunner(max_workers=parallel, initializer=ready_worker) if overlap else nullcontext()
        ) as pool:
            if pool is not None:
                start_workers(pool, parallel)
            futures = run_dag(
                todo, lambda p, ups: submit_stage(p, ups, config, keys, st, p.name in force, pool, keep_work, address),
                parallel,
            )
        # DAG order; a stage that failed or sat below a failure has no outcome
        outcomes = [outcome_of(futures[p.name]) for p in todo
                    if p.name in futures and futures[p.name].state.is_completed()]
        raise_first_failure(todo, futures)
        record["status"] = "completed"
    except BaseException as exc:
        # the run record says why (kpod status, the deployment test), not only the worker's log
        record.update(status="failed", error=error_tail(exc))
        raise
    finally:
        record.update(finished_at=utcnow(), outcomes=outcomes)
        st.save_run(run_id, record)
        write_catalog_file(st)
    _summarise(run_id, outcomes)
    if report_page and any(o["stage"] == "evaluate" for o in outcomes):
        attach_report(st, run_id)
    return outcomes


def attach_report(st: Store, run_id: str) -> None:
    """Write the run's HTML page (`kpod report RUN`) and attach a link to it to the flow run.

    A page that cannot be written is a warning, never a failed run: the stages are committed."""
    from prefect.artifacts import create_link_artifact

    from tasks.core.report_data import write_report

    try:
        page = write_report(st, run_id, None)
    except Exception as exc:  # noqa: BLE001 - the page is a convenience; the run stands
        get_run_logger().warning("the report page of run %s was not written: %s", run_id, exc)
        return
    create_link_artifact(key="kpod-run-report", link=page.resolve().as_uri(),
                         link_text=f"kpod report {run_id}", description=f"the page of run {run_id}")
    print(f"report: {page}")


def _summarise(run_id: str, outcomes: list[dict[str, Any]]) -> None:
    """One log line per stage, and the run's summary table in the UI."""
    logger = get_run_logger()
    for o in outcomes:
        logger.info("%-14s %-8s key=%s rows=%s %.2fs", o["stage"], o["status"].upper(), o["key"], o["rows"], o["seconds"])
    create_table_artifact(
        key="kpod-run-summary",
        table=[
            {k: o[k] for k in ("stage", "status", "key", "seconds", "started_at", "finished_at")}
            | {"rows": sum(o["rows"].values())}
            for o in outcomes
        ],
        description=f"kpod run {run_id}",
    )
