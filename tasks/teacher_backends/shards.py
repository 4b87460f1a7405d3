"""Teacher shards: the requests missing from the ledger, split into parts sent independently.

One process sends a few hundred requests a second at most (the client's CPU per request, issue
16), so `teacher.shards: N` splits them into N shards, each sent by its own dispatcher, that an
engine the user already runs can spread over processes and machines (flows/shards.py: each shard
a Prefect task on a thread pool or a Dask cluster). Sharding never changes what a request
returns: `shards` is runtime (outside the stage key) and the ledger is an unsharded run's.

- `split_requests` keeps a question's requests in one shard (an `n` call asks for all of its
  samples at once) and gives each question to the least-loaded shard, earliest first: the same
  split for the same requests, sizes within one question's requests of each other.
- Each shard opens its own ledger writer, and every flush is a part file with a name of its own
  (time, pid, random suffix), so two shards never write one file; the stage then reads the
  ledger (the union of all parts) exactly as after an unsharded run.
- The stage's limits (concurrency, rpm, tpm, max_cost_usd) are divided evenly between shards,
  so N shards together never pass what one dispatcher would.
- A shard is plain data (`shard_job`: its index, the config as JSON, its requests as dicts and
  the store root) run by the module-level `run_shard`, so a worker in another process or on
  another machine (sharing the store's filesystem) can run it.
- A shard that dies leaves what it finished in the ledger; the rerun sends only what is missing,
  and so does a shard run again by the engine (Dask reruns the task of a worker that died): each
  shard starts by dropping the requests the ledger already holds.

`map_shards(run_shard, jobs)` is the orchestrator's: it calls `run_shard(job, api_key=...)`
wherever each shard runs (the API key is looked up there, never shipped with the job) and
returns the results in job order once every shard has ended, raising the first shard's error.
Without one (unit tests, bench/), the shards run here one after another.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import socket
from typing import Any, Callable, Sequence

from storage.store import Store
from tasks.config.teacher import TeacherConfig
from tasks.teacher_backends import factory
from tasks.teacher_backends.base import Backend, TeacherInputError, TeacherRequest
from tasks.teacher_backends.dispatcher import (
    RunStats,
    merge_stats,
    open_ledger,
    pending_requests,
    run_and_close,
    run_sync,
)

log = logging.getLogger("kpod.teacher")

ShardJob = dict[str, Any]  # plain data: index, config (JSON), requests (dicts), store (root path)
# (run_shard, jobs) -> each job's RunStats as a dict, in job order; raises the first shard's error
MapShards = Callable[[Callable[..., dict[str, Any]], list[ShardJob]], list[dict[str, Any]]]


def split_requests(requests: Sequence[TeacherRequest], n: int) -> list[list[TeacherRequest]]:
    """At most `n` non-empty shards; a question's requests stay together, each question going to
    the shard with the fewest requests so far (the lowest index on a tie)."""
    groups: dict[str, list[TeacherRequest]] = {}
    for r in requests:
        groups.setdefault(r.question_id, []).append(r)
    shards: list[list[TeacherRequest]] = [[] for _ in range(min(n, len(groups)))]
    heap = [(0, i) for i in range(len(shards))]  # (requests so far, shard index)
    for group in groups.values():
        load, i = heapq.heappop(heap)
        shards[i].extend(group)
        heapq.heappush(heap, (load + len(group), i))
    return shards


def shard_config(cfg: TeacherConfig, n: int) -> TeacherConfig:
    """One shard's config out of `n`: an equal part of each stage-wide limit."""
    return cfg.model_copy(
        update={
            "shards": 1,
            "concurrency": max(1, cfg.concurrency // n),
            "rpm": None if cfg.rpm is None else cfg.rpm / n,
            "tpm": None if cfg.tpm is None else cfg.tpm / n,
            "max_cost_usd": None if cfg.max_cost_usd is None else cfg.max_cost_usd / n,
        }
    )


def shard_job(index: int, requests: Sequence[TeacherRequest], cfg: TeacherConfig, store: Store) -> ShardJob:
    return {
        "index": index,
        "config": cfg.model_dump(mode="json"),
        "requests": [dataclasses.asdict(r) for r in requests],
        "store": str(store.root),
    }


def request_from_dict(data: dict[str, Any]) -> TeacherRequest:
    return TeacherRequest(**{**data, "messages": tuple(data["messages"])})


def run_shard(job: ShardJob, api_key: str | None = None, backend: Backend | None = None, progress: Any = None) -> dict[str, Any]:
    """Send one shard's requests into the ledger; its `RunStats` as a dict.

    `backend` (in-process shards only) is used instead of making one from the config."""
    store = Store(job["store"])
    if not store.root.is_dir():  # a worker without the shared filesystem would ledger elsewhere
        raise TeacherInputError(
            f"teacher shard {job['index']}: the store {store.root} does not exist on {socket.gethostname()}; "
            "every worker must see the store at the same path (a shared filesystem)"
        )
    cfg = TeacherConfig.model_validate(job["config"])
    ledger = open_ledger(store, cfg)
    # a shard run again (Dask reschedules the task of a worker that died) sends only what its
    # first attempt did not ledger
    requests = pending_requests([request_from_dict(d) for d in job["requests"]], ledger)
    if not requests:
        return RunStats().as_dict()
    backend = factory.make_backend(cfg, api_key) if backend is None else backend
    stats = run_sync(run_and_close(requests, backend, ledger, cfg, progress))
    return stats.as_dict()


def run_sharded(
    todo: Sequence[TeacherRequest],
    cfg: TeacherConfig,
    store: Store,
    backend: Backend | None,
    progress: Callable[[int], Any] | None,
    api_key: str | None,
    map_shards: MapShards | None,
) -> RunStats:
    """Send `todo` in `cfg.shards` shards: through `map_shards` when the orchestrator gave one
    (and no backend object, which cannot travel), else here one after another."""
    parts = split_requests(todo, cfg.shards)
    one = shard_config(cfg, len(parts))
    jobs = [shard_job(i, part, one, store) for i, part in enumerate(parts)]
    log.info("teacher: %d requests in %d shards of %s", len(todo), len(jobs), [len(p) for p in parts])
    bar = progress(len(todo)) if progress is not None else None
    try:
        if map_shards is not None and backend is None:
            results = map_shards(run_shard, jobs)
            if bar is not None:  # shards elsewhere cannot move this bar: it moves as they end
                bar.update(sum(r["done"] for r in results))
        else:
            results = run_in_process(jobs, api_key, backend, bar)
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()
    return merge_shards([RunStats(**r) for r in results])


def run_in_process(jobs: list[ShardJob], api_key: str | None, backend: Backend | None, bar: Any) -> list[dict[str, Any]]:
    """Each shard in turn; a shard that fails does not stop the others (as on a cluster), and
    the first failure is raised once all have ended."""
    results, first_error = [], None
    for job in jobs:
        try:
            results.append(run_shard(job, api_key, backend, bar))
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other shards
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return results


def merge_shards(stats: Sequence[RunStats]) -> RunStats:
    """The shards' statistics as one run's; they ran side by side, so seconds is the longest."""
    out = RunStats()
    for s in stats:
        out = merge_stats(out, s)
    out.seconds = max((s.seconds for s in stats), default=0.0)
    return out
