"""The progressive schedule (Eq. 9-13) against naive references and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tasks.core.curriculum import (
    budget,
    diversity,
    objective,
    output_difficulty,
    progressive_schedule,
    select,
)


def test_budget_formula_and_endpoints():
    B, T = 37.5, 6
    assert budget(0, T, B) == pytest.approx(0.3 * B)  # D(0) = C0
    assert budget(T, T, B) == pytest.approx(B)  # D(T) = B
    for t in range(T + 1):
        want = 0.3 * B + (B - 0.3 * B) * (t / T) ** 1.5  # Eq. 10 with p = 0.5
        assert budget(t, T, B) == pytest.approx(want)
    assert budget(2, 4, 10.0, c0_frac=0.5, p=1.0) == pytest.approx(5 + 5 * 0.5**2)
    with pytest.raises(ValueError):
        budget(5, 4, 1.0)


def test_budget_is_increasing():
    values = [budget(t, 10, 3.0) for t in range(11)]
    assert all(b > a for a, b in zip(values, values[1:]))


def _random_instance(rng, n, k):
    costs = rng.uniform(0.05, 2.0, size=n)
    clusters = rng.integers(0, k, size=n)
    return costs, clusters


def _brute_force(costs, clusters, capacity, beta, k):
    n = len(costs)
    best = 0.0
    for mask_bits in itertools.product([False, True], repeat=n):
        mask = np.array(mask_bits)
        if costs[mask].sum() <= capacity + 1e-12:
            best = max(best, costs[mask].sum() + beta * diversity(clusters, mask, k))
    return best


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0, 12.0])
def test_greedy_reaches_half_of_brute_force(beta):
    rng = np.random.default_rng(0)
    for trial in range(25):
        n = int(rng.integers(1, 11))
        k = int(rng.integers(1, 5))
        costs, clusters = _random_instance(rng, n, k)
        capacity = float(rng.uniform(0.0, costs.sum()))
        mask = select(costs, clusters, capacity, beta, k)
        assert costs[mask].sum() <= capacity + 1e-9
        got = costs[mask].sum() + beta * diversity(clusters, mask, k)
        opt = _brute_force(costs, clusters, capacity, beta, k)
        assert got >= 0.5 * opt - 1e-9, (trial, got, opt)


def test_greedy_takes_everything_when_it_fits():
    costs = np.array([0.5, 1.0, 0.25, 0.0])
    mask = select(costs, np.array([0, 1, 1, 0]), capacity=10.0, beta=12.0, n_clusters=2)
    assert mask.all()


def test_greedy_prefers_spreading_over_clusters():
    # four equal-cost candidates, room for two: the diversity term picks two clusters
    costs = np.ones(4)
    clusters = np.array([0, 0, 1, 1])
    mask = select(costs, clusters, capacity=2.0, beta=1.0, n_clusters=2)
    assert mask.sum() == 2
    assert set(clusters[mask]) == {0, 1}


def test_objective_matches_eq_12_and_beta_changes_only_diversity():
    rng = np.random.default_rng(1)
    costs, clusters = _random_instance(rng, 9, 3)
    sel = rng.random(9) < 0.5
    delta_d = 4.0
    naive_div = sum(math.sqrt(sum(1 for i in range(9) if sel[i] and clusters[i] == k)) for k in range(3))
    naive = -(delta_d - sum(costs[i] for i in range(9) if sel[i])) + 12.0 * naive_div
    assert objective(costs, clusters, sel, delta_d, 12.0, 3) == pytest.approx(naive)
    # beta = 0 (no_diversity) removes exactly beta * sum_k sqrt(|C_k ∩ S|)
    diff = objective(costs, clusters, sel, delta_d, 12.0, 3) - objective(costs, clusters, sel, delta_d, 0.0, 3)
    assert diff == pytest.approx(12.0 * naive_div)


def _random_rationales(rng, n):
    return [rng.uniform(0.1, 3.0, size=int(rng.integers(1, 7))) for _ in range(n)]


@pytest.mark.parametrize("beta,T", [(12.0, 5), (0.0, 5), (1.0, 1), (12.0, 10)])
def test_schedule_invariants(beta, T):
    rng = np.random.default_rng(2)
    diffs = _random_rationales(rng, 40)
    clusters = rng.integers(0, 5, size=40)
    c, records = progressive_schedule(diffs, clusters, T=T, beta=beta, n_clusters=5)
    n = np.array([len(d) for d in diffs])
    B = sum(float(d.sum()) for d in diffs)
    assert c.shape == (T + 1, 40)
    assert (c[0] == n - 1).all()  # start: only the last step is output
    assert (c[T] == 0).all()  # after T: full rationales
    assert (np.diff(c, axis=0) <= 0).all()  # c_i only decreases ...
    assert (np.diff(c, axis=0)[:-1] >= -1).all()  # ... by at most one step before stage T
    H0 = records[0].used
    for t, rec in enumerate(records):
        h = sum(output_difficulty(diffs[i], c[t, i]) for i in range(40))  # Eq. 9, naive
        assert rec.used == pytest.approx(h)
        assert rec.budget == pytest.approx(budget(t, T, B))
        # never exceeds the budget (stage 0 is the fixed start, which may exceed C0)
        assert h <= max(rec.budget, H0) + 1e-9
        if t > 0:
            moved = c[t - 1] > c[t]
            assert rec.selected == int(moved.sum())
            assert rec.cluster_counts == {
                k: int(v) for k, v in enumerate(np.bincount(clusters[moved], minlength=5)) if v
            }
    assert records[T].used == pytest.approx(B)


def test_unused_budget_carries_over():
    # stage 0 leaves C0 - H(0) unused; at stage 1 the budget increment D(1) - D(0) is far
    # smaller than the 3.0 step, which still moves because DeltaD(1) = D(1) - H(0)
    diffs = [np.array([3.0, 0.5]), np.array([10.0, 0.5])]
    c, records = progressive_schedule(diffs, np.zeros(2, dtype=int), T=20, beta=0.0, n_clusters=1)
    assert records[1].budget - records[0].budget < 3.0
    assert c[1].tolist() == [0, 1]
    assert records[1].used == pytest.approx(3.5 + 0.5) and records[1].used <= records[1].budget
    # the 10.0 step never fits (D(t) - H(t-1) < 10 for t < T): only the forced stage T moves it
    assert (c[:20, 1] == 1).all() and c[20, 1] == 0


def test_schedule_is_deterministic():
    rng = np.random.default_rng(3)
    diffs = _random_rationales(rng, 30)
    clusters = rng.integers(0, 5, size=30)
    a, _ = progressive_schedule(diffs, clusters, T=6, beta=12.0, n_clusters=5)
    b, _ = progressive_schedule(diffs, clusters, T=6, beta=12.0, n_clusters=5)
    assert (a == b).all()


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="no steps"):
        progressive_schedule([np.array([1.0]), np.array([])], np.zeros(2, dtype=int), 3, 1.0, 1)
    with pytest.raises(ValueError, match="shape"):
        progressive_schedule([np.array([1.0])], np.zeros(2, dtype=int), 3, 1.0, 1)
    with pytest.raises(ValueError, match=">= 0"):
        select(np.array([-1.0]), np.array([0]), 1.0, 1.0, 1)


def _naive_schedule(diffs, clusters, T, beta, n_clusters, start, delta_s):
    """Plain loops: c(0) from the start reading, then each stage the selected rationales move
    their last min(delta_s, c) input steps, at the summed difficulty of those steps."""
    B = sum(float(sum(d)) for d in diffs)
    c = [[len(d) - (1 if start == "last_step" else 0) for d in diffs]]
    h = lambda cs: sum(float(sum(d[k] for k in range(ci, len(d)))) for d, ci in zip(diffs, cs))  # noqa: E731
    for t in range(1, T + 1):
        prev = c[-1]
        if t == T:
            c.append([0] * len(diffs))
            continue
        movable = [i for i, ci in enumerate(prev) if ci > 0]
        moves = {i: min(delta_s, prev[i]) for i in movable}
        costs = np.array([sum(diffs[i][prev[i] - moves[i] + k] for k in range(moves[i])) for i in movable])
        pick = select(costs, np.array([clusters[i] for i in movable]), budget(t, T, B) - h(prev), beta, n_clusters)
        nxt = list(prev)
        for i, chosen in zip(movable, pick):
            if chosen:
                nxt[i] -= moves[i]
        c.append(nxt)
    return np.array(c)


@pytest.mark.parametrize("start,delta_s", [("last_step", 1), ("answer_only", 1), ("last_step", 2), ("answer_only", 3)])
def test_start_reading_and_delta_s_match_a_naive_schedule(start, delta_s):
    rng = np.random.default_rng(5)
    diffs = _random_rationales(rng, 30)
    clusters = rng.integers(0, 4, size=30)
    c, records = progressive_schedule(diffs, clusters, T=6, beta=3.0, n_clusters=4, start=start, delta_s=delta_s)
    want = _naive_schedule(diffs, clusters, 6, 3.0, 4, start, delta_s)
    assert (c == want).all()
    n = np.array([len(d) for d in diffs])
    assert (c[0] == (n if start == "answer_only" else n - 1)).all()
    assert records[0].used == pytest.approx(0.0 if start == "answer_only" else sum(float(d[-1]) for d in diffs))
    assert (np.diff(c, axis=0)[:-1] >= -delta_s).all()  # at most delta_s steps a stage before T
    if delta_s > 1:  # the option is not a no-op: some rationale moves more than one step at once
        assert (np.diff(c, axis=0)[:-1] < -1).any()


def test_schedule_rejects_bad_options():
    with pytest.raises(ValueError, match="start"):
        progressive_schedule([np.array([1.0])], np.zeros(1, dtype=int), 3, 1.0, 1, start="first_step")
    with pytest.raises(ValueError, match="delta_s"):
        progressive_schedule([np.array([1.0])], np.zeros(1, dtype=int), 3, 1.0, 1, delta_s=0)
