"""Announced rate limits (`x-ratelimit-*` headers): the reset parser against hand-computed values,
and the waiting arithmetic on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from tasks.core.server_limits import Announced, ServerLimits, parse_reset, read_headers
from tests.support.fake_clock import FakeClock


# ---- the reset parser -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, seconds",
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1m30.5s", 90.5),
        ("1h2m3s", 3723.0),
        ("0s", 0.0),
        ("250us", 0.00025),
        ("7ns", 7e-9),
        ("2.5", 2.5),  # a bare number is seconds (some gateways send that)
        (" 3s ", 3.0),
        ("59.999s", 59.999),
    ],
)
def test_parse_reset_matches_hand_computed_values(value, seconds):
    assert parse_reset(value) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("value", ["", "s", "abc", "1x", "-1s", "1s garbage", "1..5s", "1.5.3s", "inf", "nan", "-2", None, 5])
def test_parse_reset_ignores_malformed_values(value):
    assert parse_reset(value) is None


def _naive_duration(text: str) -> float:
    """The reference: split by hand at each unit, longest unit name first."""
    units = [("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9), ("h", 3600.0), ("m", 60.0), ("s", 1.0)]
    total, number = 0.0, ""
    i = 0
    while i < len(text):
        for name, scale in units:
            if text.startswith(name, i):
                total += float(number) * scale
                number, i = "", i + len(name)
                break
        else:
            number += text[i]
            i += 1
    return total


@pytest.mark.parametrize("h, m, s, ms", [(0, 0, 1, 0), (0, 6, 0, 0), (1, 59, 59, 0), (0, 0, 0, 999), (2, 0, 30, 500)])
def test_parse_reset_agrees_with_naive_reference(h, m, s, ms):
    parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s else "", f"{ms}ms" if ms else ""]
    text = "".join(parts)
    assert parse_reset(text) == pytest.approx(_naive_duration(text)) == pytest.approx(h * 3600 + m * 60 + s + ms / 1000)


def test_read_headers_takes_each_dimension_and_skips_bad_values():
    said = read_headers({
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "lots", "x-ratelimit-remaining-tokens": "150000",
        "x-ratelimit-reset-tokens": "6m0s?",
    })
    assert said["requests"] == Announced(60.0, 0.0, 60.0)
    assert said["tokens"] == Announced(None, 150000.0, None)
    assert read_headers({"content-type": "application/json"}) == {} and read_headers(None) == {}


# ---- waiting on a fake clock ----------------------------------------------------------------
def _limits():
    clock = FakeClock()
    return clock, ServerLimits(clock, clock.sleep)


def _headers(remaining, reset, limit=None, dim="requests"):
    h = {f"x-ratelimit-remaining-{dim}": str(remaining), f"x-ratelimit-reset-{dim}": reset}
    if limit is not None:
        h[f"x-ratelimit-limit-{dim}"] = str(limit)
    return h


def test_remaining_zero_waits_until_the_announced_reset_then_the_limit_is_whole():
    clock, lim = _limits()

    async def go():
        probe = await lim.acquire(10)
        clock.t = 0.2
        lim.observe(probe, _headers(1, "800ms", limit=2))  # reset at 1.0 on our clock
        a = await lim.acquire(10)  # one left: goes at 0.2
        times = [clock.t]
        b = await lim.acquire(10)  # none left: waits for 1.0; the window is whole again (2) less a
        times.append(clock.t)
        lim.observe(a, {})
        # nothing left and this window's reset not announced yet: wait for b's answer
        c = asyncio.create_task(lim.acquire(10))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not c.done()
        clock.t = 1.1
        lim.observe(b, _headers(0, "1s", limit=2))
        await c
        times.append(clock.t)
        return times

    assert asyncio.run(go()) == [pytest.approx(0.2), pytest.approx(1.0), pytest.approx(2.1)]
    assert clock.sleeps == [pytest.approx(0.8), pytest.approx(1.0)]


def test_after_a_reset_the_calls_still_in_flight_count_against_the_new_window():
    clock, lim = _limits()

    async def go():
        probe = await lim.acquire(1)
        lim.observe(probe, _headers(3, "1s", limit=3))
        flying = [await lim.acquire(1) for _ in range(3)]
        lim.observe(flying[0], {})
        lim.observe(flying[1], {})
        await lim.acquire(1)  # waits for the reset, when one of the three is still unanswered
        return clock.t, lim.windows["requests"].remaining

    at, remaining = asyncio.run(go())
    assert at == pytest.approx(1.0) and remaining == pytest.approx(3 - 1 - 1)


def test_exhausted_with_nothing_in_flight_and_no_reset_goes_rather_than_hang():
    clock, lim = _limits()

    async def go():
        probe = await lim.acquire(1)
        lim.observe(probe, {"x-ratelimit-remaining-requests": "0"})  # no reset said
        await lim.acquire(1)
        return clock.t

    assert asyncio.run(go()) == 0.0


def test_calls_sent_after_the_announced_one_are_counted_against_its_remaining():
    clock, lim = _limits()

    async def go():
        first = await lim.acquire(1)
        lim.observe(first, {})  # the probe's answer without headers opens the gate
        tickets = [await lim.acquire(1) for _ in range(3)]  # three more in flight
        # the answer to the first of those three says 3 remain: the two sent after it are
        # not counted by the server yet, so only one is left
        lim.observe(tickets[0], _headers(3, "2s"))
        assert lim.windows["requests"].remaining == pytest.approx(1)
        await lim.acquire(1)
        before = clock.t
        await lim.acquire(1)
        return before, clock.t

    before, after = asyncio.run(go())
    assert before == 0.0 and after == pytest.approx(2.0)


def test_tokens_gate_on_what_the_next_call_needs():
    clock, lim = _limits()

    async def go():
        t = await lim.acquire(100)
        lim.observe(t, _headers(500, "3s", limit=1000, dim="tokens"))
        await lim.acquire(400)  # 500 left: goes at once
        at_small = clock.t
        await lim.acquire(400)  # 100 left < 400: waits for the reset
        return at_small, clock.t

    assert asyncio.run(go()) == (0.0, pytest.approx(3.0))


def test_a_call_larger_than_the_whole_limit_goes_once_the_window_is_whole():
    clock, lim = _limits()

    async def go():
        t = await lim.acquire(1)
        lim.observe(t, _headers(50, "1s", limit=100, dim="tokens"))
        await lim.acquire(250)  # more than the limit: waits for a whole window, not forever
        return clock.t

    assert asyncio.run(go()) == pytest.approx(1.0)


def test_missing_or_malformed_reset_never_blocks():
    clock, lim = _limits()

    async def go():
        t = await lim.acquire(1)
        lim.observe(t, _headers(0, "soon"))
        await lim.acquire(1)
        return clock.t

    assert asyncio.run(go()) == 0.0 and clock.sleeps == []


def test_a_later_answer_moves_the_reset_while_a_call_waits():
    clock, lim = _limits()

    async def go():
        probe = await lim.acquire(1)
        lim.observe(probe, {})
        first, straggler = await lim.acquire(1), await lim.acquire(1)
        lim.observe(first, _headers(0, "1s"))

        async def late_answer():
            # the straggler answers while the caller sleeps: remaining 0, reset 2 s from t=0.5
            clock.t = 0.5
            lim.observe(straggler, _headers(0, "2s"))

        task = asyncio.create_task(late_answer())
        await lim.acquire(1)
        await task
        return clock.t

    assert asyncio.run(go()) == pytest.approx(2.5)


def test_only_one_probe_before_the_first_answer():
    clock, lim = _limits()
    order: list[str] = []

    async def caller(name):
        t = await lim.acquire(1)
        order.append(f"go {name}")
        return t

    async def go():
        probe = await caller("probe")
        waiting = [asyncio.create_task(caller(i)) for i in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        order.append("answer")
        lim.observe(probe, None)  # a failed call (no response) also ends the probe
        await asyncio.gather(*waiting)

    asyncio.run(go())
    assert order == ["go probe", "answer", "go 0", "go 1", "go 2"]
