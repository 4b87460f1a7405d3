"""Token buckets for requests-per-minute and tokens-per-minute limits.

A bucket holds up to `capacity` units and refills continuously at `rate` units per second.
`acquire(n)` waits until the bucket holds min(n, capacity) units and then takes n; a request
larger than the whole bucket (a long prompt under a small TPM limit) therefore waits for a full
bucket and leaves it in debt, which the refill pays back before anyone else passes. Waiters are
served first come, first served (an asyncio lock), so a big request is never starved by small
ones. The clock and the sleep are injectable so tests run the arithmetic on a fake clock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable


class TokenBucket:
    def __init__(
        self,
        rate: float,
        capacity: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        if rate <= 0 or capacity <= 0:
            raise ValueError(f"token bucket needs rate > 0 and capacity > 0, got {rate}, {capacity}")
        self.rate, self.capacity = float(rate), float(capacity)
        self._clock, self._sleep = clock, sleep
        self._level = self.capacity  # start full: the first second's burst is allowed
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    def fit(self, amount: float) -> None:
        """Grow the capacity to hold `amount` at once (a request larger than any before it):
        sizing the bucket by the largest request seen so far, as requests come, instead of by a
        pass over every request before the first is sent."""
        if amount > self.capacity:
            self._refill()
            self.capacity = float(amount)

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` could be taken now (0 when it can be taken at once)."""
        self._refill()
        need = min(amount, self.capacity) - self._level
        return max(0.0, need / self.rate)

    async def acquire(self, amount: float = 1.0) -> float:
        """Wait for and take `amount` units; returns the seconds waited."""
        async with self._lock:
            delay = self.wait_time(amount)
            if delay > 0:
                # we hold the lock, so nobody takes units meanwhile: after `delay` the level is
                # there (up to rounding, which must not send us into ever tinier sleeps)
                await self._sleep(delay)
                self._refill()
            self._level -= amount
            return delay


def per_minute_bucket(
    per_minute: float,
    largest: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> TokenBucket:
    """A bucket for a per-minute limit that bursts at most one second's worth.

    Providers enforce minute limits on shorter windows too, so letting a whole minute's quota
    out at once would earn 429s; one second's worth (but at least `largest`, one request's size)
    keeps the flow smooth at the full average rate.
    """
    rate = per_minute / 60.0
    return TokenBucket(rate, max(rate, largest), clock, sleep)
