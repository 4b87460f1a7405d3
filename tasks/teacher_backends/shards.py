"""Teacher shards: the requests missing from the ledger, split into parts sent independently.

One process sends a few hundred requests a second at most (the client's CPU per request, issue
16), so `teacher.shards: N` splits them into N shards, each sent by its own dispatcher, that an
engine the user already runs can spread over processes and machines (flows/shards.py: each shard
a Prefect task on a thread pool or a Dask cluster). Sharding never changes what a request
returns: `shards` is runtime (outside the stage key) and the ledger is an unsharded run's.

- `write_shards` streams the requests (built lazily from the questions, teach.py) into one
  JSON-lines file per shard, so neither the stage nor a shard holds the run's request list, and
  a shard job names its file instead of carrying its requests (a Dask task's parameters stay a
  few hundred bytes at any scale). A question's requests stay in one shard (an `n` call asks for
  all of its samples at once; they arrive together, in question order), and each question goes
  to the shard with the fewest requests so far, earliest first: the same split for the same
  requests, sizes within one question's requests of each other.
- Each shard opens its own ledger writer, and every flush is a part file with a name of its own
  (time, pid, random suffix), so two shards never write one file; the stage then reads the
  ledger (the union of all parts) exactly as after an unsharded run.
- The stage's limits (concurrency, rpm, tpm, max_cost_usd) are divided evenly between shards,
  so N shards together never pass what one dispatcher would.
- A shard is plain data (`shard_job`: its index, the config as JSON, its requests file and count,
  the store root) run by the module-level `run_shard`, so a worker in another process or on
  another machine (sharing the store's filesystem, where the files are written: the stage's
  work dir) can run it; it reads its file as its dispatcher draws requests.
- A shard that dies leaves what it finished in the ledger; the rerun sends only what is missing,
  and so does a shard run again by the engine (Dask reruns the task of a worker that died): each
  shard skips the requests the ledger already holds.

`map_shards(run_shard, jobs)` is the orchestrator's: it calls `run_shard(job, api_key=...)`
wherever each shard runs (the API key is looked up there, never shipped with the job) and
returns the results in job order once every shard has ended, raising the first shard's error.
Without one (unit tests, bench/), the shards run here one after another.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import shutil
import socket
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from storage.store import Store
from tasks.config.teacher import TeacherConfig
from tasks.teacher_backends import factory
from tasks.teacher_backends.base import Backend, TeacherInputError, TeacherRequest
from tasks.teacher_backends.dispatcher import (
    RunStats,
    merge_stats,
    open_ledger,
    run_and_close,
    run_sync,
)
from tasks.teacher_backends.request_files import read_requests, request_line

log = logging.getLogger("kpod.teacher")

ShardJob = dict[str, Any]  # plain data: index, config (JSON), requests file and count, store (root path)
# (run_shard, jobs) -> each job's RunStats as a dict, in job order; raises the first shard's error
MapShards = Callable[[Callable[..., dict[str, Any]], list[ShardJob]], list[dict[str, Any]]]


@dataclasses.dataclass
class ShardFile:
    path: Path  # JSON lines, one request each
    count: int  # requests in it


def question_groups(requests: Iterable[TeacherRequest]) -> Iterator[list[TeacherRequest]]:
    """Runs of consecutive requests of one question (requests are built in question order)."""
    group: list[TeacherRequest] = []
    for r in requests:
        if group and r.question_id != group[0].question_id:
            yield group
            group = []
        group.append(r)
    if group:
        yield group


def write_shards(requests: Iterable[TeacherRequest], n: int, where: Path) -> list[ShardFile]:
    """Stream `requests` into at most `n` non-empty JSON-lines files in `where`: a question's
    requests in one file, each question to the file with the fewest requests so far (the lowest
    index on a tie). Only one question's requests are held at a time."""
    where.mkdir(parents=True, exist_ok=True)
    files = [ShardFile(where / f"shard-{i:04d}.jsonl", 0) for i in range(n)]
    heap = [(0, i) for i in range(n)]  # (requests so far, shard index)
    with ExitStack() as stack:
        out = [stack.enter_context(f.path.open("w", encoding="utf-8")) for f in files]
        for group in question_groups(requests):
            load, i = heapq.heappop(heap)
            out[i].writelines(request_line(r) for r in group)
            files[i].count += len(group)
            heapq.heappush(heap, (load + len(group), i))
    for f in files:
        if not f.count:
            f.path.unlink()
    return [f for f in files if f.count]


class ShardRequests:
    """A shard's requests, read from its file as the dispatcher draws them, without those the
    ledger has a success for (`ok`); `len` is their number."""

    def __init__(self, path: Path, ok: set[str]):
        self.path, self.ok = path, ok
        self.pending = sum(1 for _ in self)

    def __len__(self) -> int:
        return self.pending

    def __iter__(self) -> Iterator[TeacherRequest]:
        return (r for r in read_requests(self.path) if r.request_id not in self.ok)


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


def shard_job(index: int, part: ShardFile, cfg: TeacherConfig, store: Store) -> ShardJob:
    return {
        "index": index,
        "config": cfg.model_dump(mode="json"),
        "requests_file": str(part.path),
        "requests": part.count,
        "store": str(store.root),
    }


def run_shard(job: ShardJob, api_key: str | None = None, backend: Backend | None = None, progress: Any = None) -> dict[str, Any]:
    """Send one shard's requests into the ledger; its `RunStats` as a dict.

    `backend` (in-process shards only) is used instead of making one from the config."""
    store, path = Store(job["store"]), Path(job["requests_file"])
    for what, where in (("store", store.root), ("requests file", path)):
        if not where.exists():  # a worker without the shared filesystem would ledger elsewhere
            raise TeacherInputError(
                f"teacher shard {job['index']}: the {what} {where} does not exist on {socket.gethostname()}; "
                "every worker must see the store at the same path (a shared filesystem)"
            )
    cfg = TeacherConfig.model_validate(job["config"])
    ledger = open_ledger(store, cfg)
    # a shard run again (Dask reschedules the task of a worker that died) sends only what its
    # first attempt did not ledger
    requests = ShardRequests(path, ledger.ok_ids())
    if not len(requests):
        return RunStats().as_dict()
    backend = factory.make_backend(cfg, api_key) if backend is None else backend
    stats = run_sync(run_and_close(requests, backend, ledger, cfg, progress))
    return stats.as_dict()


def run_sharded(
    todo: Iterable[TeacherRequest],
    cfg: TeacherConfig,
    store: Store,
    backend: Backend | None,
    progress: Callable[[int], Any] | None,
    api_key: str | None,
    map_shards: MapShards | None,
    scratch: Path,
) -> RunStats:
    """Send `todo` in `cfg.shards` shards: through `map_shards` when the orchestrator gave one
    (and no backend object, which cannot travel), else here one after another. The shards'
    request files live in a fresh folder in `scratch` (the stage's work dir, in the store, so
    workers elsewhere read them) until every shard has ended."""
    scratch.mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="shards-", dir=scratch))
    bar = None
    try:
        parts = write_shards(todo, cfg.shards, where)
        one = shard_config(cfg, len(parts))
        jobs = [shard_job(i, part, one, store) for i, part in enumerate(parts)]
        total = sum(p.count for p in parts)
        log.info("teacher: %d requests in %d shards of %s", total, len(jobs), [p.count for p in parts])
        bar = progress(total) if progress is not None else None
        if map_shards is not None and backend is None:
            results = map_shards(run_shard, jobs)
            if bar is not None:  # shards elsewhere cannot move this bar: it moves as they end
                bar.update(sum(r["done"] for r in results))
        else:
            results = run_in_process(jobs, api_key, backend, bar)
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()
        shutil.rmtree(where, ignore_errors=True)
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
