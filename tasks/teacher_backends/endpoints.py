"""Several endpoints serving one model (`teacher.base_urls`), spread by least requests in flight.

Each call goes to the healthy endpoint with the fewest calls in flight (ties in turn), one whose
announced header limits would hold the call back coming last. An endpoint that fails with a
transient error (connection refused or dropped, timeout, 5xx, 429) is backed off: no call goes
to it for `backoff_s * 2**(failures-1)` (jittered, capped at `backoff_max_s`) or its own
Retry-After, whichever is longer. Afterwards one call at a time probes it; the first success
makes it healthy again. The failed call is handed back to the stage's retry loop as a
`RetryableTeacherError`, marked `failover` when another endpoint can take it at once (the stage
then retries without waiting); so the stage fails only where every endpoint keeps failing past
`max_retries`. Fatal errors (401, 404, ...) stay fatal: a replica that rejects the key or the
model is a configuration error.

Which endpoint answered is not in the ledger: `teacher_calls` holds what a request returned, and
the endpoint is a runtime fact like the concurrency. Counts per endpoint are logged at the end.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tasks.teacher_backends.base import RetryableTeacherError, TeacherRequest, TeacherResult
from tasks.teacher_backends.dispatcher import backoff_delay

log = logging.getLogger("kpod.teacher")


@dataclass
class EndpointHealth:
    """An endpoint's back-off bookkeeping, on the pool's clock (pure: tested on a fake clock)."""

    failures: int = 0  # consecutive transient failures; 0 is healthy
    blocked_until: float = 0.0

    def failed(self, now: float, base: float, cap: float, retry_after: float | None, u: float) -> float:
        """Back off after one more failure; returns the delay."""
        delay = backoff_delay(self.failures, base, cap, retry_after, u)
        self.failures += 1
        self.blocked_until = max(self.blocked_until, now + delay)
        return delay

    def succeeded(self) -> None:
        self.failures, self.blocked_until = 0, 0.0

    def eligible(self, now: float, in_flight: int) -> bool:
        """Healthy, or out of its back-off with no probe in flight."""
        return now >= self.blocked_until and (self.failures == 0 or in_flight == 0)


@dataclass
class Endpoint:
    backend: Any  # an OpenAIBackend: complete_n, limit_wait, aclose, where
    index: int
    health: EndpointHealth = field(default_factory=EndpointHealth)
    in_flight: int = 0
    calls: int = 0
    failed: int = 0


class EndpointPool:
    """A backend over several backends of one model; see the module docstring."""

    def __init__(
        self,
        backends: Sequence[Any],
        backoff_s: float,
        backoff_max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not backends:
            raise ValueError("EndpointPool needs at least one backend")
        self.endpoints = [Endpoint(b, i) for i, b in enumerate(backends)]
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self._clock = clock
        self._jitter = random.Random()
        self._turn = 0
        self._cond: asyncio.Condition | None = None  # made on first use, inside the running loop

    async def complete(self, request: TeacherRequest) -> TeacherResult:
        return (await self.complete_n(request, 1))[0]

    async def complete_n(self, request: TeacherRequest, n: int) -> list[TeacherResult]:
        ep = await self._take(request, n)
        try:
            results = await ep.backend.complete_n(request, n)
        except RetryableTeacherError as exc:
            raise await self._failed(ep, exc) from None
        except BaseException:
            await self._give_back(ep)
            raise
        ep.health.succeeded()
        await self._give_back(ep)
        return results

    # ---- choosing
    def _choose(self, now: float, request: TeacherRequest, n: int) -> Endpoint | None:
        ok = [e for e in self.endpoints if e.health.eligible(now, e.in_flight)]
        if not ok:
            return None
        self._turn += 1
        k = len(self.endpoints)
        return min(ok, key=lambda e: (e.backend.limit_wait(request, n) > 0, e.in_flight, (e.index - self._turn) % k))

    async def _take(self, request: TeacherRequest, n: int) -> Endpoint:
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            while True:
                now = self._clock()
                ep = self._choose(now, request, n)
                if ep is not None:
                    ep.in_flight += 1
                    ep.calls += 1
                    return ep
                # every endpoint is backed off or probed: wake at the first back-off's end, or
                # when a call comes back (a probe's success reopens its endpoint)
                ends = [e.health.blocked_until for e in self.endpoints if e.health.blocked_until > now]
                try:
                    await asyncio.wait_for(self._cond.wait(), (min(ends) - now) if ends else None)
                except asyncio.TimeoutError:
                    pass

    async def _give_back(self, ep: Endpoint) -> None:
        assert self._cond is not None
        async with self._cond:
            ep.in_flight -= 1
            self._cond.notify_all()

    async def _failed(self, ep: Endpoint, exc: RetryableTeacherError) -> RetryableTeacherError:
        """Back `ep` off; the error to hand the stage (failover when another can take the call)."""
        now = self._clock()
        ep.failed += 1
        delay = ep.health.failed(now, self.backoff_s, self.backoff_max_s, exc.retry_after, self._jitter.random())
        log.debug("teacher: endpoint %s backed off %.2fs after: %s", ep.backend.where, delay, exc)
        await self._give_back(ep)
        other = any(e is not ep and e.health.eligible(now, e.in_flight) for e in self.endpoints)
        message = f"{exc} (at {ep.backend.where})"
        if other:
            return RetryableTeacherError(message, None, failover=True)
        return RetryableTeacherError(message, exc.retry_after)

    async def aclose(self) -> None:
        log.info(
            "teacher endpoints: %s",
            "; ".join(f"{e.backend.where}: {e.calls} calls, {e.failed} failed" for e in self.endpoints),
        )
        for e in self.endpoints:
            await e.backend.aclose()
