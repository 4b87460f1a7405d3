"""Where the teacher's shards run: Prefect tasks on a thread pool, or on a Dask cluster.

`teacher.shards` > 1 splits the teacher's missing requests into shards
(tasks/teacher_backends/shards.py); the stage stays Prefect-free and runs them through the
`map_shards` callable handed in here (`ctx.runtime["map_shards"]`). Each shard is one task run
of `teacher_shard`, submitted to
- a `ThreadPoolTaskRunner` in the stage's process, by default (one thread per shard);
- a `prefect_dask.DaskTaskRunner` connected to a Dask scheduler, with the flow parameter `dask`
  (`kpod run --dask ADDRESS`): an address such as tcp://10.0.0.5:8786 connects to a running
  cluster; `local:N` starts a cluster of N worker processes on 127.0.0.1 for this run.
The shards write straight into the store's ledger, so every worker must see the store at the
same path. The API key never travels with a shard: a worker reads it from its own environment
(`teacher.api_key_env`) or from the Secret block `teacher.api_key_block`.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.errors import DaskError
from flows.secret_blocks import secret_from_block
from storage.store import Store
from tasks.config.pipeline import PipelineConfig
from tasks.stages.contract import PlannedStage

log = logging.getLogger("kpod")

CONNECT_TIMEOUT_S = 10.0  # for a scheduler that does not answer, before the run starts
_LOCAL = re.compile(r"local:(\d+)")


# no cache: a shard must run whenever it is submitted (the ledger, not Prefect, says what is done),
# and hashing a shard's requests for a cache key would cost more than the shard's bookkeeping
@task(cache_policy=NO_CACHE, persist_result=False)
def teacher_shard(fn: Callable[..., dict[str, Any]], job: str, key_block: str | None) -> dict[str, Any]:
    """One shard (`job`: its JSON), run where the task runner put it; the API key is looked up there."""
    return fn(json.loads(job), api_key=secret_from_block(key_block) if key_block else None)


@dataclass
class ShardMapper:
    """The stage's `map_shards`: each job a `teacher_shard` task run; all waited for."""

    address: str | None  # a Dask scheduler; None: threads of this process
    key_block: str | None  # teacher.api_key_block

    def __call__(self, fn: Callable[..., dict[str, Any]], jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self._runner(len(jobs)) as runner:
            futures = [
                runner.submit(
                    teacher_shard.with_options(task_run_name=f"teacher-shard-{job['index']}"),
                    # as one string: Prefect would otherwise walk every request dict looking for
                    # futures to resolve (and `quote` reached a Dask worker as a bare tuple)
                    {"fn": fn, "job": json.dumps(job), "key_block": self.key_block},
                )
                for job in jobs
            ]
            for f in futures:  # every shard ends (and ledgers what it finished) before any error
                f.wait()
            return [f.result() for f in futures]

    def _runner(self, n: int) -> Any:
        if self.address is None:
            return ThreadPoolTaskRunner(max_workers=n)
        return dask_runner_class()(address=self.address)


def shard_runtime(stage: str, config: PipelineConfig, dask: str | None) -> dict[str, Any]:
    """The teacher's `map_shards` when it shards (see the module docstring)."""
    if stage != "teacher" or config.teacher.shards <= 1:
        return {}
    return {"map_shards": ShardMapper(dask, config.teacher.api_key_block)}


def dask_runner_class() -> type:
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise DaskError("a Dask cluster needs the dask extra: pip install 'kpod[dask]' (prefect-dask)") from None
    return DaskTaskRunner


def check_scheduler(address: str, timeout_s: float | None = None) -> None:
    """Connect to the scheduler once, so an address that cannot work is one line before any stage."""
    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    dask_runner_class()  # the extra first: its absence is the likelier problem
    from distributed import Client

    try:
        with Client(address, timeout=timeout_s, set_as_default=False):
            pass
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DaskError(f"cannot reach the Dask scheduler at {address!r} within {timeout_s:g} s: {reason}") from None


def teacher_computes(todo: list[PlannedStage], store: Store, force: list[str]) -> bool:
    return any(p.name == "teacher" and (p.name in force or not store.is_complete(p.name, p.key)) for p in todo)


@contextmanager
def dask_scheduler(
    dask: str | None, config: PipelineConfig, todo: list[PlannedStage], store: Store, force: list[str]
) -> Iterator[str | None]:
    """The scheduler address the teacher's shards go to during the run (None: threads).

    `local:N` starts N worker processes on 127.0.0.1, closed when the run ends; an address is
    checked now. Nothing starts or connects unless the teacher computes in shards this run."""
    if dask is None or not teacher_computes(todo, store, force):
        yield None
        return
    if config.teacher.shards <= 1:
        log.warning("kpod: teacher.shards is 1, so the teacher runs in-process; the Dask cluster %s is unused", dask)
        yield None
        return
    local = _LOCAL.fullmatch(dask.strip())
    if local is None:
        check_scheduler(dask)
        yield dask
        return
    yield from _local_cluster(int(local.group(1)))


def _local_cluster(workers: int) -> Iterator[str]:
    if workers < 1:
        raise DaskError("dask 'local:N' needs N >= 1 worker processes")
    dask_runner_class()
    from distributed import LocalCluster

    # one thread per worker: processes are what spread the client's CPU over cores; everything,
    # the status page too, on 127.0.0.1 (a free port: another cluster may hold Dask's 8787)
    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as cluster:
        log.info("kpod: a local Dask cluster of %d workers at %s", workers, cluster.scheduler_address)
        yield cluster.scheduler_address
