"""The rate limits a server announces in its `x-ratelimit-*` headers, honoured before each call.

OpenAI (and vLLM behind gateways such as LiteLLM) send, on every response:
    x-ratelimit-limit-requests / -tokens       the window's allowance
    x-ratelimit-remaining-requests / -tokens   what is left of it now
    x-ratelimit-reset-requests / -tokens       when it is whole again: "1s", "6m0s", "20ms", "1m30.5s"
`ServerLimits` keeps, per dimension (requests, tokens), the last announced remaining allowance
minus what this process sent after the announced request, and the announced reset time. A call
that needs more than is left waits until that reset; once it passes the allowance is the
announced limit again, less the calls still in flight (unknown without a limit header: then
nothing waits until the server speaks again). A call that does not fit a window whose reset is
not announced yet waits for the next answer. These waits come on top of the configured RPM/TPM buckets: the stricter wins.

Until the first response arrives nothing is known, so only one call goes out (a probe); the
others wait for its answer, with or without headers. The clock and the sleep are injectable
(as in `TokenBucket`) so tests run the arithmetic on a fake clock.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

# one Go-style duration term: a number and its unit ("1m30.5s" is two terms)
_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
DIMENSIONS = ("requests", "tokens")


def parse_reset(value: Any) -> float | None:
    """Seconds in a reset value: a Go-style duration ("6m0s", "20ms", "1m30.5s", "1h2m") or a
    bare number of seconds ("0.5"); None for anything else (a malformed header is ignored)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = _parse_duration(text)
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _parse_duration(text: str) -> float | None:
    total, at = 0.0, 0
    for m in _TERM.finditer(text):
        if m.start() != at:  # something between terms that is not a term
            return None
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        at = m.end()
    return total if text and at == len(text) else None


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x >= 0 else None


@dataclass(frozen=True)
class Announced:
    """What one response's headers say about one dimension (None: not said, or unreadable)."""

    limit: float | None
    remaining: float | None
    reset_s: float | None


def read_headers(headers: Mapping[str, str] | None) -> dict[str, Announced]:
    """The announced limits per dimension present in `headers` (case-insensitive mappings, as
    httpx gives them; a plain dict must use lower-case names)."""
    out: dict[str, Announced] = {}
    if not headers:
        return out
    for dim in DIMENSIONS:
        got = Announced(
            _number(headers.get(f"x-ratelimit-limit-{dim}")),
            _number(headers.get(f"x-ratelimit-remaining-{dim}")),
            parse_reset(headers.get(f"x-ratelimit-reset-{dim}")),
        )
        if got != Announced(None, None, None):
            out[dim] = got
    return out


@dataclass
class Window:
    """One dimension's allowance as this process knows it."""

    limit: float | None = None
    remaining: float | None = None  # None: unknown, nothing waits
    reset_at: float | None = None  # on the limits' clock; None: not announced for this window
    sent: float = 0.0  # units this process has taken, ever (tickets count from it)
    outstanding: float = 0.0  # units of calls not answered yet

    def roll(self, now: float) -> None:
        """Past the announced reset the window is whole again, less what is still in flight
        (those calls may reach the server after its reset and count in the new window)."""
        if self.reset_at is not None and now >= self.reset_at:
            self.reset_at = None
            self.remaining = None if self.limit is None else self.limit - self.outstanding

    def delay(self, now: float, amount: float) -> float | None:
        """Seconds until `amount` fits (0: now); None: it does not fit and the reset of this
        window is not announced yet (an answer to a call in flight will say)."""
        self.roll(now)
        if self.remaining is None:
            return 0.0
        # a call larger than the whole window goes once it is whole, or it would never go
        need = min(amount, self.limit) if self.limit is not None else amount
        if self.remaining >= need:
            return 0.0
        return None if self.reset_at is None else self.reset_at - now

    def take(self, amount: float) -> float:
        self.sent += amount
        self.outstanding += amount
        if self.remaining is not None:
            self.remaining -= amount
        return self.sent

    def observe(self, now: float, said: Announced | None, sent_then: float, amount: float) -> None:
        """Adopt an announcement made for the call whose ticket is `sent_then`: what was taken
        since then may not have been counted by the server yet, so it is taken off again."""
        self.outstanding -= amount
        if said is None:
            return
        if said.limit is not None:
            self.limit = said.limit
        if said.remaining is not None:
            self.remaining = said.remaining - (self.sent - sent_then)
        if said.reset_s is not None:
            self.reset_at = now + said.reset_s


Ticket = tuple[float, float, float]  # requests and tokens sent when a call went, and its tokens


class ServerLimits:
    """One endpoint's announced limits; `acquire` before a call, `observe` its response."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self._clock, self._sleep = clock, sleep
        self.windows = {dim: Window() for dim in DIMENSIONS}
        self._lock = asyncio.Lock()  # first come, first served, as in TokenBucket
        self._heard = asyncio.Event()  # set by the first response of any kind
        self._answered = asyncio.Event()  # set by every response
        self._probing = False
        self._in_flight = 0
        self.waited_s = 0.0  # total time calls slept here

    def _delay(self, tokens: float) -> float | None:
        now = self._clock()
        delays = [self.windows["requests"].delay(now, 1), self.windows["tokens"].delay(now, tokens)]
        return None if None in delays else max(delays)  # type: ignore[type-var]

    def wait_time(self, tokens: float) -> float:
        """Seconds until a call of `tokens` may go (0: now; inf: until an answer says)."""
        delay = self._delay(tokens)
        return math.inf if delay is None else delay

    async def acquire(self, tokens: float) -> Ticket:
        """Wait until one request of `tokens` fits what the server announced; take it."""
        async with self._lock:
            if not self._heard.is_set():
                if self._probing:
                    await self._heard.wait()
                else:
                    self._probing = True  # this call is the probe; the rest wait for its answer
            # loop: an answer arriving meanwhile may move the reset or the remaining allowance
            while (delay := self._delay(tokens)) != 0:
                if delay is None:
                    if self._in_flight == 0:
                        break  # nobody is left to tell us more: go (a 429 would say when)
                    self._answered.clear()
                    await self._answered.wait()
                else:
                    await self._sleep(delay)
                    self.waited_s += delay
            self._in_flight += 1
            return self.windows["requests"].take(1), self.windows["tokens"].take(tokens), tokens

    def observe(self, ticket: Ticket, headers: Mapping[str, str] | None) -> None:
        """Take in a call's response headers (None: the call got no response)."""
        now = self._clock()
        said = read_headers(headers)
        sent_requests, sent_tokens, tokens = ticket
        self.windows["requests"].observe(now, said.get("requests"), sent_requests, 1)
        self.windows["tokens"].observe(now, said.get("tokens"), sent_tokens, tokens)
        self._in_flight -= 1
        self._heard.set()
        self._answered.set()
