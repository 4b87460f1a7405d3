"""KPOD's progressive schedule (METHODS.md §2.3, Eq. 9-13): pure numpy, no I/O.

A rationale i with n_i steps is trained at stage t on `question + steps 1..c_i(t)` as input and
steps c_i(t)+1..n_i (plus the answer) as output. Its output difficulty is
`h_i = sum_{k > c_i} d_{i,k}` (Eq. 9); the total of all h_i grows along the budget D(t)
(Eq. 10). At each stage a set S of rationales moves one more step from input to output,
chosen to maximise

    F(S) = -(DeltaD(t) - DeltaH(S)) + beta * sum_k sqrt(|C_k ∩ S|)   s.t.  DeltaH(S) <= DeltaD(t)

(Eq. 12-13), with C_k the K-means clusters of the question embeddings. Up to the constant
-DeltaD(t), F is `G(S) = DeltaH(S) + beta * sum_k sqrt(|C_k ∩ S|)`: a modular term plus a
concave function of per-cluster counts, so G is monotone submodular and the problem is a
submodular knapsack.

Decisions (each documented where it is implemented):
- stage 0 is the start c_i = n_i - 1 (every rationale outputs only its last step; the
  paper's reading) or, with start = answer_only, c_i = n_i (only the answer is output); no
  selection happens at stage 0;
- a selected rationale moves Delta_s steps (default 1, the paper's), fewer when fewer are left;
- stages 1..T-1 select with the greedy below; DeltaD(t) = D(t) - H(t-1), so budget a stage
  did not use carries over to the next;
- stage T sets every c_i = 0: D(T) = B is exactly the total of all steps, i.e. every full
  rationale, and moving one step per stage could not reach it from an arbitrary c_i(T-1);
- the solver is "Greedy+Max" (Yaroslavtsev, Zhou, Avdiukhin 2020): the cost-benefit greedy
  and, at every prefix of it, that prefix plus the best single element that still fits; the
  best of these candidates is returned. It contains the classical "greedy or best singleton"
  (the empty prefix plus its best element is the best singleton) and is a 1/2-approximation
  of the optimum of G for a monotone submodular G under a knapsack constraint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-12


def budget(t: float, T: int, B: float, c0_frac: float = 0.3, p: float = 0.5) -> float:
    """Eq. 10: D(t) = C0 + (B - C0) * (t / T)^(p + 1), with C0 = c0_frac * B.

    D(0) = C0 and D(T) = B; T >= 1 stages, 0 <= t <= T.
    """
    if T < 1:
        raise ValueError(f"budget: T must be >= 1, got {T}")
    if not 0 <= t <= T:
        raise ValueError(f"budget: t must be in [0, {T}], got {t}")
    c0 = c0_frac * B
    return c0 + (B - c0) * (t / T) ** (p + 1)


def diversity(clusters: np.ndarray, selected: np.ndarray, n_clusters: int) -> float:
    """sum_k sqrt(|C_k ∩ S|) for the boolean mask `selected` [n] over `clusters` [n] (ints)."""
    counts = np.bincount(clusters[selected], minlength=n_clusters)
    return float(np.sqrt(counts).sum())


def objective(
    costs: np.ndarray, clusters: np.ndarray, selected: np.ndarray, delta_d: float,
    beta: float, n_clusters: int,
) -> float:
    """Eq. 12: F(S) = -(DeltaD - DeltaH(S)) + beta * sum_k sqrt(|C_k ∩ S|).

    costs [n] (difficulty of the step each candidate would move), clusters [n] ints,
    selected [n] bool (the set S).
    """
    delta_h = float(costs[selected].sum())
    return -(delta_d - delta_h) + beta * diversity(clusters, selected, n_clusters)


def select(
    costs: np.ndarray, clusters: np.ndarray, capacity: float, beta: float, n_clusters: int
) -> np.ndarray:
    """Approximately maximise G(S) = sum_{i in S} costs_i + beta * sum_k sqrt(|C_k ∩ S|)
    subject to sum_{i in S} costs_i <= capacity (Eq. 12-13 without the constant -DeltaD).

    costs [n] >= 0, clusters [n] ints in [0, n_clusters). Returns a bool mask [n].

    Greedy+Max: the cost-benefit greedy adds, among the candidates that still fit, the one
    with the largest marginal gain per unit cost (ties: larger gain, then lower index; a
    zero-cost candidate has infinite ratio). Before each greedy addition, the current prefix
    plus the single fitting candidate with the largest marginal gain is a candidate answer;
    the best candidate answer (by G) is returned. This is a 1/2-approximation.
    """
    costs = np.asarray(costs, dtype=np.float64)
    clusters = np.asarray(clusters, dtype=np.int64)
    n = len(costs)
    if (costs < 0).any():
        raise ValueError("select: step difficulties (costs) must be >= 0")
    chosen = np.zeros(n, dtype=bool)
    if n == 0 or capacity < 0:
        return chosen
    counts = np.zeros(n_clusters, dtype=np.float64)
    used = 0.0
    value = 0.0  # G of the greedy prefix
    best_value, best_set = 0.0, chosen.copy()
    while True:
        remaining = capacity - used
        fits = (~chosen) & (costs <= remaining + _EPS)
        if not fits.any():
            break
        # marginal gain of each candidate given the prefix [n]
        c = counts[clusters]
        gain = costs + beta * (np.sqrt(c + 1.0) - np.sqrt(c))
        # "+Max": the prefix plus its best single fitting element
        g_fit = np.where(fits, gain, -np.inf)
        j = int(np.argmax(g_fit))
        if value + g_fit[j] > best_value + _EPS:
            best_value = value + g_fit[j]
            best_set = chosen.copy()
            best_set[j] = True
        # the cost-benefit greedy step
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(costs > _EPS, gain / np.maximum(costs, _EPS), np.inf)
        ratio = np.where(fits, ratio, -np.inf)
        tied = np.flatnonzero(np.isclose(ratio, ratio.max(), rtol=1e-12, atol=0.0))
        i = int(tied[np.argmax(gain[tied])])  # argmax returns the lowest index among equal gains
        chosen[i] = True
        used += costs[i]
        counts[clusters[i]] += 1.0
        value += gain[i]
        if value > best_value + _EPS:
            best_value, best_set = value, chosen.copy()
    return best_set


@dataclass
class StageRecord:
    """What one stage of the schedule did (a row of `schedule_stages`)."""

    stage: int
    budget: float  # D(t)
    used: float  # H(t): total output difficulty after the stage
    selected: int  # rationales that moved (Delta_s steps, or what was left) this stage
    cluster_counts: dict[int, int]  # selected rationales per cluster


START_READINGS = ("last_step", "answer_only")


def start_steps(n_steps: np.ndarray, start: str) -> np.ndarray:
    """c_i(0) per rationale [N] from step counts [N]: `last_step` (the paper's reading, n_i - 1:
    every rationale outputs its last step) or `answer_only` (n_i: the whole rationale is input
    and only the answer is output)."""
    if start == "last_step":
        return n_steps - 1
    if start == "answer_only":
        return n_steps.copy()
    raise ValueError(f"progressive_schedule: start must be one of {START_READINGS}, got {start!r}")


def _stage_move(
    difficulties: list[np.ndarray], prev: np.ndarray, clusters: np.ndarray, capacity: float,
    beta: float, n_clusters: int, delta_s: int,
) -> np.ndarray:
    """Steps each rationale moves from input to output at one stage [N] (0 or up to delta_s).

    prev [N] is c_i(t-1); a selected rationale moves its last min(delta_s, c_i) input steps,
    and its cost is their summed difficulty (steps c_i - m + 1 .. c_i, 1-based)."""
    movable = np.flatnonzero(prev > 0)
    m = np.minimum(prev[movable], delta_s)
    cost = np.array([difficulties[i][prev[i] - k : prev[i]].sum() for i, k in zip(movable, m)], dtype=np.float64)
    pick = select(cost, clusters[movable], capacity, beta, n_clusters)
    moved = np.zeros(len(prev), dtype=np.int64)
    moved[movable[pick]] = m[pick]
    return moved


def progressive_schedule(
    difficulties: list[np.ndarray], clusters: np.ndarray, T: int, beta: float,
    n_clusters: int, c0_frac: float = 0.3, p: float = 0.5, start: str = "last_step", delta_s: int = 1,
) -> tuple[np.ndarray, list[StageRecord]]:
    """The whole schedule, stages 0..T.

    difficulties: one array [n_i] per rationale (d_{i,1..n_i}, step order, each >= 0);
    clusters [N] ints. Returns (c [T+1, N] input steps per stage and rationale, records [T+1]).
    Stage 0: c_i = `start_steps(n_i, start)`. Stages 1..T-1: the greedy moves each selected
    rationale delta_s steps (fewer when fewer are left; the paper's Delta_s = 1), within
    DeltaD(t) = D(t) - H(t-1) (unused budget carries over; if H(t-1) already exceeds D(t),
    nothing moves). Stage T: c_i = 0 for all (D(T) = B, the full rationales).
    """
    N = len(difficulties)
    clusters = np.asarray(clusters, dtype=np.int64)
    if clusters.shape != (N,):
        raise ValueError(f"progressive_schedule: clusters has shape {clusters.shape}, want ({N},)")
    if T < 1:
        raise ValueError(f"progressive_schedule: T must be >= 1, got {T}")
    if delta_s < 1:
        raise ValueError(f"progressive_schedule: delta_s must be >= 1, got {delta_s}")
    n_steps = np.array([len(d) for d in difficulties], dtype=np.int64)
    if (n_steps < 1).any():
        raise ValueError(f"progressive_schedule: rationale {int(np.argmin(n_steps))} has no steps")
    difficulties = [np.asarray(d, dtype=np.float64) for d in difficulties]
    # suffix sums: tail[i][c] = h_i when c_i = c, i.e. the sum of d_{i,k} for k > c (Eq. 9)
    tails = [np.concatenate([np.cumsum(d[::-1])[::-1], [0.0]]) for d in difficulties]
    B = float(sum(t[0] for t in tails))
    c = np.zeros((T + 1, N), dtype=np.int64)
    c[0] = start_steps(n_steps, start)
    H = float(sum(tails[i][c[0, i]] for i in range(N)))
    records = [StageRecord(0, budget(0, T, B, c0_frac, p), H, 0, {})]
    for t in range(1, T + 1):
        prev = c[t - 1]
        D = budget(t, T, B, c0_frac, p)
        if t == T:
            moved = prev
        else:
            moved = _stage_move(difficulties, prev, clusters, D - H, beta, n_clusters, delta_s)
        c[t] = prev - moved
        H = float(sum(tails[i][c[t, i]] for i in range(N)))
        counts = np.bincount(clusters[moved > 0], minlength=n_clusters)
        records.append(
            StageRecord(t, D, H, int((moved > 0).sum()), {k: int(v) for k, v in enumerate(counts) if v})
        )
    return c, records


def output_difficulty(difficulties: np.ndarray, input_steps: int) -> float:
    """h_i (Eq. 9): the summed difficulty of the steps after the first `input_steps`."""
    return float(np.asarray(difficulties, dtype=np.float64)[input_steps:].sum())
