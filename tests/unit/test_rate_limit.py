"""Token-bucket arithmetic against a naive time-stepped simulation, on a fake clock."""

from __future__ import annotations

import asyncio
import random

import pytest

from tasks.core.rate_limit import TokenBucket, per_minute_bucket
from tests.support.fake_clock import FakeClock


def bucket_grants(rate, capacity, arrivals):
    """Grant times of sequential requests [(arrival_time, amount)] through TokenBucket."""
    clock = FakeClock()
    bucket = TokenBucket(rate, capacity, clock, clock.sleep)

    async def go():
        out = []
        for at, amount in arrivals:
            clock.t = max(clock.t, at)
            await bucket.acquire(amount)
            out.append(clock.t)
        return out

    return asyncio.run(go())


def naive_grants(rate, capacity, arrivals, dt=1e-4):
    """The same rule by brute force: step time by dt, refill, grant when the level allows."""
    level, t, out = capacity, 0.0, []
    for at, amount in arrivals:
        while t < at - 1e-12:
            t += dt
            level = min(capacity, level + rate * dt)
        while level < min(amount, capacity) - 1e-9:
            t += dt
            level = min(capacity, level + rate * dt)
        level -= amount
        out.append(t)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucket_matches_naive_simulation(seed):
    rng = random.Random(seed)
    rate, capacity = rng.uniform(2, 20), rng.uniform(3, 30)
    arrivals, t = [], 0.0
    for _ in range(60):
        t += rng.expovariate(rate * 1.5)  # arrivals faster than the rate: the bucket must bite
        arrivals.append((t, rng.choice([1, 1, 2, 5, capacity * 1.5])))  # incl. larger than the bucket
    got = bucket_grants(rate, capacity, arrivals)
    dt = 1e-4
    want = naive_grants(rate, capacity, arrivals, dt)
    # the stepped simulation grants on step boundaries: never earlier than the exact bucket,
    # and late by at most one step per grant so far (a lateness can carry over when the
    # bucket is full, but it cannot grow faster)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g - 1e-9 <= w <= g + dt * (i + 1) + 1e-9, (i, g, w)
    assert all(g >= a for g, (a, _) in zip(got, arrivals))


def test_bucket_never_exceeds_rate_over_any_window():
    rate, capacity = 5.0, 5.0
    grants = bucket_grants(rate, capacity, [(0.0, 1)] * 200)
    # over [g_i, g_j], at most capacity + rate * (g_j - g_i) units can have been taken
    for i in range(0, len(grants), 7):
        for j in range(i, len(grants)):
            assert (j - i + 1) <= capacity + rate * (grants[j] - grants[i]) + 1e-6
    # and the long-run rate is the configured one
    assert (len(grants) - capacity) / grants[-1] == pytest.approx(rate, rel=1e-6)


def test_full_bucket_grants_burst_without_waiting():
    clock = FakeClock()
    bucket = TokenBucket(1.0, 4.0, clock, clock.sleep)

    async def go():
        return [await bucket.acquire(1) for _ in range(4)] + [await bucket.acquire(1)]

    waits = asyncio.run(go())
    assert waits[:4] == [0.0] * 4
    assert waits[4] == pytest.approx(1.0)


def test_per_minute_bucket_bursts_one_second_or_one_request():
    b = per_minute_bucket(600)  # 10/s
    assert (b.rate, b.capacity) == (pytest.approx(10.0), pytest.approx(10.0))
    b = per_minute_bucket(6000, largest=700)  # 100 tokens/s, but a 700-token request must fit
    assert (b.rate, b.capacity) == (pytest.approx(100.0), pytest.approx(700.0))
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_fit_grows_the_bucket_to_a_larger_request_and_never_shrinks_it():
    """The teacher sizes its TPM bucket as calls come (requests are built lazily): a call larger
    than the bucket grows it, keeping the level, so that call waits for the level to reach it
    instead of leaving the bucket in debt."""
    clock = FakeClock()
    bucket = TokenBucket(10.0, 10.0, clock, clock.sleep)  # full: 10 units

    async def go():
        bucket.fit(5)  # smaller: no change
        assert bucket.capacity == 10.0
        bucket.fit(25)
        assert bucket.capacity == 25.0
        return await bucket.acquire(25)

    assert asyncio.run(go()) == pytest.approx(1.5)  # 10 held, 15 more at 10/s
    assert bucket.wait_time(25) == pytest.approx(2.5)  # empty again: the whole 25 to refill
