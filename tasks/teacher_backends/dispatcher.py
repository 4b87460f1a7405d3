"""Sending teacher requests: asyncio workers, a cost cap, retries, rate limits, a ledger.

All pending requests run as asyncio inside one call: `concurrency` workers, optional
requests/tokens-per-minute buckets, retries with jittered exponential backoff that honour
Retry-After, a cost budget checked before every request. Each finished request is appended to
the ledger as it ends (the ledger flushes every `flush_every` records or `flush_seconds`), so a
killed run loses at most one flush.

A request that still fails after its retries is recorded with `error` set; a request that can
never succeed (`FatalTeacherError`) stops the run at once, after what finished is flushed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Sequence

from storage.ledger import Ledger
from storage.store import Store
from tasks.config.teacher import Price, TeacherConfig
from tasks.core.rate_limit import per_minute_bucket
from tasks.teacher_backends.base import Backend, RetryableTeacherError, TeacherRequest, TeacherResult

log = logging.getLogger("kpod.teacher")

_sleep = asyncio.sleep  # retry waits; tests replace it to observe delays without waiting

LEDGER_NAME = "teacher"  # the ledger every teacher stage key shares

Unit = list[TeacherRequest]  # what one backend call answers: one request, or a question's samples (n)
# what a run sends: a list, or a sized re-iterable built lazily (the teacher stage's pending requests)
Requests = Sequence[TeacherRequest] | Any
MAX_QUEUED_RECORDS = 4096  # records waiting for the ledger's thread before workers wait for it


@dataclass
class RunStats:
    total: int = 0  # requests handed to run_requests
    done: int = 0  # recorded in the ledger (success or failure)
    ok: int = 0
    failed: int = 0
    calls: int = 0  # backend calls, retries and n-calls included
    retries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    budget_stopped: bool = False
    not_sent: int = 0  # left unsent by the budget stop
    seconds: float = 0.0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def add(self, res: TeacherResult, cost: float, n: int) -> None:
        """Count one recorded result of a call that returned `n` choices."""
        self.done += 1
        self.tokens_in += int(res.tokens_in / n) if n > 1 else int(res.tokens_in)
        self.tokens_out += int(res.tokens_out)
        self.cost_usd += cost
        if res.error is None:
            self.ok += 1
        else:
            self.failed += 1
            self.last_error = res.error


def merge_stats(a: RunStats, b: RunStats) -> RunStats:
    """The statistics of two runs as one: counts add up, a budget stop in either is kept, the
    later last error wins (two-stage's two rounds; shards)."""
    out = RunStats()
    for name, value in a.as_dict().items():
        other = getattr(b, name)
        if isinstance(value, bool):
            setattr(out, name, value or other)
        elif isinstance(value, (int, float)):
            setattr(out, name, value + other)
        else:
            setattr(out, name, other if other is not None else value)
    return out


def open_ledger(store: Store, cfg: TeacherConfig) -> Ledger:
    """A writer (and reader) of the teacher ledger; each writer flushes into part files of its own."""
    return Ledger(store, LEDGER_NAME, "teacher_calls", "request_id", cfg.flush_every, cfg.flush_seconds)


# ---- arithmetic ---------------------------------------------------------------------------
def estimate_prompt_tokens(request: TeacherRequest) -> int:
    """A provider-neutral upper-ish guess (4 characters a token, plus per-message overhead)."""
    return math.ceil(len(request.prompt) / 4) + 4 * len(request.messages)


def request_cost(price: Price | None, tokens_in: float, tokens_out: float) -> float:
    if price is None:
        return 0.0
    return (tokens_in * price.input_per_1k + tokens_out * price.output_per_1k) / 1000.0


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None, u: float) -> float:
    """Delay before retry number `attempt` (0-based): base * 2**attempt capped, times a jitter
    in [0.5, 1) drawn from `u` in [0, 1), and never shorter than the server's Retry-After."""
    delay = min(cap, base * (2.0**attempt)) * (0.5 + 0.5 * u)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay


def ledger_record(req: TeacherRequest, res: TeacherResult, cost: float) -> dict[str, Any]:
    """One `teacher_calls` row."""
    return {
        "request_id": req.request_id,
        "question_id": req.question_id,
        "sample": req.sample,
        "prompt": req.prompt,
        "completion": res.completion,
        "model": req.model,
        "finish_reason": res.finish_reason,
        "tokens_in": int(res.tokens_in),
        "tokens_out": int(res.tokens_out),
        "cost_usd": float(cost),
        "latency_s": float(res.latency_s),
        "error": res.error,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "teacher_answer": res.teacher_answer,
        "source_correct": res.source_correct,
        "part": req.part,
        "logprobs": res.logprobs,  # in the same record: as durable as the call it belongs to
    }


def work_units(requests: Sequence[TeacherRequest], grouped: bool) -> collections.deque[Unit]:
    """The calls to make: one per request, or (`grouped`) one per question with all its samples."""
    if not grouped:
        return collections.deque([r] for r in requests)
    by_q: dict[str, Unit] = {}
    for r in requests:
        by_q.setdefault(r.question_id, []).append(r)
    return collections.deque(by_q.values())


class UnitQueue:
    """The units still to send, drawn lazily from `requests` so that only the calls in flight are
    held (a million requests are never all in memory at once).

    A `Sequence` is grouped by question wherever its samples stand (`work_units`); any other
    iterable (the teacher's requests built batch by batch) must yield a question's samples next
    to each other. A unit the budget stopped goes back in front; samples a server answered one
    by one (it ignored `n`) go after everything else, as they did in one deque.
    """

    def __init__(self, requests: Iterable[TeacherRequest], grouped: bool):
        self._front: collections.deque[Unit] = collections.deque()
        self._tail: collections.deque[Unit] = collections.deque()
        if isinstance(requests, Sequence):
            self._fresh: Iterator[Unit] = iter(work_units(requests, grouped))
        elif grouped:
            self._fresh = (list(g) for _, g in itertools.groupby(requests, key=lambda r: r.question_id))
        else:
            self._fresh = ([r] for r in requests)

    def pop(self) -> Unit | None:
        if self._front:
            return self._front.popleft()
        unit = next(self._fresh, None)
        if unit is None and self._tail:
            return self._tail.popleft()
        return unit

    def push_front(self, unit: Unit) -> None:
        self._front.appendleft(unit)

    def extend(self, units: Iterable[Unit]) -> None:
        self._tail.extend(units)

    def remaining(self) -> int:
        """Requests not sent (drains what was not drawn yet: call it once sending has ended)."""
        queued = [*self._front, *self._fresh, *self._tail]
        return sum(len(u) for u in queued)


# ---- helpers of the dispatcher -------------------------------------------------------------
class RateLimits:
    """Optional RPM and TPM buckets; a call takes one request and its token estimate."""

    def __init__(self, cfg: TeacherConfig, call_tokens: int):
        self.rpm = per_minute_bucket(cfg.rpm) if cfg.rpm else None
        self.tpm = per_minute_bucket(cfg.tpm, call_tokens) if cfg.tpm else None

    async def acquire(self, tokens: int) -> None:
        if self.rpm is not None:
            await self.rpm.acquire(1)
        if self.tpm is not None:
            self.tpm.fit(tokens)  # the bucket holds the largest call so far (requests are built lazily)
            await self.tpm.acquire(tokens)


class LedgerWriter:
    """Ledger appends (a Parquet part and an fsync every flush) on one thread of their own, in
    order, so a flush never stalls the requests in flight on the event loop. Made inside the loop.

    Records are handed to the thread in batches: every record appended during one turn of the
    loop goes over in one hand-over, scheduled with `call_soon`. One executor job per record
    cost more loop time than the request itself at 1,024 in flight (bench/teacher_throughput.py,
    the sleeping backend). A record waits at most that one turn longer; what is not yet flushed
    is lost on a kill either way, and is sent again by the rerun."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self._loop = asyncio.get_running_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kpod-ledger")
        self._last: asyncio.Future | None = None
        self._pending: list[dict[str, Any]] = []  # appended this turn, not yet handed over
        self.queued = 0  # records appended and not yet written to the ledger's buffer
        self.errors: list[BaseException] = []

    def append(self, record: dict[str, Any]) -> None:
        """Queue one record; raises the first earlier write's error instead."""
        if self.errors:
            raise self.errors[0]
        if not self._pending:
            self._loop.call_soon(self._hand_over)
        self._pending.append(record)
        self.queued += 1

    def _hand_over(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        self._last = self._loop.run_in_executor(self._pool, self._write, batch)
        self._last.add_done_callback(functools.partial(self._done, len(batch)))

    def _write(self, batch: list[dict[str, Any]]) -> None:
        for record in batch:
            self.ledger.append(record)

    def _done(self, n: int, f: asyncio.Future) -> None:
        self.queued -= n
        if not f.cancelled() and f.exception():
            self.errors.append(f.exception())

    async def drain(self) -> None:
        """Wait for the thread to catch up when over MAX_QUEUED_RECORDS are queued: a fast
        backend (the scripted one) outruns Parquet writes and fsyncs, and every record queued
        stays in memory until written."""
        if self.queued > MAX_QUEUED_RECORDS:
            self._hand_over()
            if self._last is not None:
                await asyncio.wait([self._last])  # its error, if any, is kept in `errors`

    async def close(self) -> None:
        """Wait for every queued write, then flush the ledger."""
        self._hand_over()
        if self._last is not None:  # the writer runs in order: the last hand-over means all
            await asyncio.gather(self._last, return_exceptions=True)
        self._pool.shutdown(wait=True)
        self.ledger.flush()


# ---- the dispatcher ------------------------------------------------------------------------
class Dispatcher:
    """Sends one run's requests (all assumed missing from the ledger) and records each result.

    Its responsibilities, one method group each: the budget (`reserve` a call's estimated cost
    against `max_cost_usd` before it is sent, `release` it after), the call (`call_with_retries`:
    rate limits, then jittered exponential backoff honouring Retry-After), and the record
    (`record`: a ledger append, the statistics, the progress bar). `progress` is anything with
    `update(n)` and `set_postfix(**kw)` (tqdm).
    """

    def __init__(
        self,
        requests: Requests,
        backend: Backend,
        ledger: Ledger,
        cfg: TeacherConfig,
        progress: Any = None,
    ):
        self.backend, self.ledger, self.cfg, self.progress = backend, ledger, cfg, progress
        self.price = cfg.prices.get(cfg.model)
        grouped = cfg.use_n and cfg.samples > 1 and hasattr(backend, "complete_n")
        self.queue = UnitQueue(requests, grouped)
        # the TPM bucket starts sized for a call's completion and grows to each larger call
        self.limits = RateLimits(cfg, cfg.max_tokens * (cfg.samples if grouped else 1))
        self.stats = RunStats(total=len(requests))
        self.reserved = 0.0  # estimated cost of calls in flight
        self.stopped = False  # the budget stopped new calls
        self._jitter = random.Random()
        self._writer: LedgerWriter | None = None
        self._t_start = time.monotonic()

    async def run(self) -> RunStats:
        """Send everything the budget allows; the ledger is flushed before returning or raising.

        `stats.budget_stopped` says the budget left some unsent. Raises `FatalTeacherError` at
        the first request that can never succeed (after flushing what finished).
        """
        self._writer = LedgerWriter(self.ledger)
        self._t_start = time.monotonic()
        try:
            await self._run_workers()
        finally:
            await self._writer.close()
            self.stats.seconds = time.monotonic() - self._t_start
        if self._writer.errors:
            raise self._writer.errors[0]
        self.stats.not_sent = self.queue.remaining()
        return self.stats

    async def _run_workers(self) -> None:
        n_workers = max(1, min(self.cfg.concurrency, self.stats.total))
        tasks = [asyncio.create_task(self._worker()) for _ in range(n_workers)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _worker(self) -> None:
        while not self.stopped and (unit := self.queue.pop()) is not None:
            estimate = self.reserve(unit)
            if estimate is None:
                self.stopped = True  # no new requests; those in flight finish and are recorded
                self.queue.push_front(unit)
                self.stats.budget_stopped = True
                return
            try:
                results = await self.call_with_retries(unit)
            finally:
                self.release(estimate)
            self.record(unit[: len(results)], results)
            await self._writer.drain()  # a ledger that lags holds every record queued for it
            if len(results) < len(unit):  # the server ignored `n`: the rest go one by one
                self.queue.extend([r] for r in unit[len(results) :])

    # ---- budget
    def reserve(self, unit: Unit) -> float | None:
        """Reserve the unit's estimated cost; None when it would pass `max_cost_usd`, counting
        what was spent and what the calls in flight may still cost."""
        estimate = request_cost(self.price, estimate_prompt_tokens(unit[0]), self.cfg.max_tokens * len(unit))
        cap = self.cfg.max_cost_usd
        if cap is not None and self.stats.cost_usd + self.reserved + estimate > cap:
            return None
        self.reserved += estimate
        return estimate

    def release(self, estimate: float) -> None:
        self.reserved -= estimate

    # ---- calls
    async def call_with_retries(self, unit: Unit) -> list[TeacherResult]:
        """The unit's results; after `max_retries` transient failures, failed results saying so."""
        tokens = estimate_prompt_tokens(unit[0]) + self.cfg.max_tokens * len(unit)
        attempt = 0
        while True:
            await self.limits.acquire(tokens)
            self.stats.calls += 1
            try:
                return await self._call(unit)
            except RetryableTeacherError as exc:
                if attempt == self.cfg.max_retries:
                    msg = f"gave up after {attempt + 1} attempts: {exc}"
                    return [TeacherResult(None, error=msg) for _ in unit]
                self.stats.retries += 1
                cfg = self.cfg
                delay = 0.0 if exc.failover else backoff_delay(
                    attempt, cfg.backoff_s, cfg.backoff_max_s, exc.retry_after, self._jitter.random()
                )  # failover: another endpoint takes it now (the failed one is backed off)
                log.debug("teacher: %s retry %d in %.2fs: %s", unit[0].request_id, attempt + 1, delay, exc)
                await _sleep(delay)
                attempt += 1

    async def _call(self, unit: Unit) -> list[TeacherResult]:
        t0 = time.monotonic()
        if len(unit) > 1:
            results = list(await self.backend.complete_n(unit[0], len(unit)))[: len(unit)]  # type: ignore[attr-defined]
            if not results:
                raise RetryableTeacherError("the server returned no choices")
        else:
            results = [await self.backend.complete(unit[0])]
        took = time.monotonic() - t0
        for res in results:
            if not res.latency_s:
                res.latency_s = took
        return results

    # ---- record
    def record(self, unit: Sequence[TeacherRequest], results: Sequence[TeacherResult]) -> None:
        """Append each result to the ledger and count it."""
        assert self._writer is not None
        n = len(results)
        for req, res in zip(unit, results):
            # one n-call bills its prompt once: each choice carries an equal share of it
            cost = request_cost(self.price, res.tokens_in / n, res.tokens_out)
            self._writer.append(ledger_record(req, res, cost))
            self.stats.add(res, cost, n)
        if self.progress is not None:
            elapsed = max(time.monotonic() - self._t_start, 1e-9)
            self.progress.update(n)
            self.progress.set_postfix(
                req_s=f"{self.stats.done / elapsed:.1f}",
                tok=self.stats.tokens_in + self.stats.tokens_out,
                cost=f"${self.stats.cost_usd:.4f}",
                err=self.stats.failed,
            )


async def run_requests(
    requests: Requests, backend: Backend, ledger: Ledger, cfg: TeacherConfig, progress: Any = None
) -> RunStats:
    """Send `requests` (all assumed missing from the ledger) and append each result as it ends;
    see `Dispatcher`."""
    return await Dispatcher(requests, backend, ledger, cfg, progress).run()


async def run_and_close(
    todo: Requests, backend: Backend, ledger: Ledger, cfg: TeacherConfig, bar: Any
) -> RunStats:
    """`run_requests`, then `aclose`: the backend's connections belong to this run's event loop,
    which ends with it. A backend stays usable after `aclose` (`Backend`), so one the caller
    passed in is released too, and works again in the caller's next run."""
    try:
        return await run_requests(todo, backend, ledger, cfg, bar)
    finally:
        await backend.aclose()


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, even where a loop is already running
    (a Prefect task or a notebook): then it runs on a fresh loop in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
