"""A fake monotonic clock whose `sleep` advances it, for rate-limit arithmetic without waiting."""

from __future__ import annotations

import asyncio


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, d: float) -> None:
        self.sleeps.append(d)
        await asyncio.sleep(0)  # let other tasks run "during" the sleep, as a real one would
        self.t += d
