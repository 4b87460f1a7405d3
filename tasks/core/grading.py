"""Grading a model's outputs against gold answers, and accuracy with its 95% interval.

One module for every place that scores generations: the `evaluate` stage, model selection on
val during training, and the mentor's val score. Extraction and comparison are
`tasks.core.answers`, the same that filter the teacher's rationales.
"""

from __future__ import annotations

import math
from typing import Sequence

import pyarrow as pa

from tasks.core import answers

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal: a two-sided 95% interval


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion `correct / n`.

    center = (p + z^2/2n) / (1 + z^2/n),  half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
    Unlike p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is not degenerate at p = 0 or 1,
    which matters for small validation splits and near-perfect synthetic accuracy.
    """
    if n < 1:
        raise ValueError(f"wilson_interval needs n >= 1, got n={n}")
    if not 0 <= correct <= n:
        raise ValueError(f"wilson_interval needs 0 <= correct <= n, got correct={correct}, n={n}")
    p = correct / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at p = 0 (p = 1) the lower (upper) bound is exactly 0 (1); rounding would leave ~1e-17
    low = 0.0 if correct == 0 else max(0.0, center - half)
    high = 1.0 if correct == n else min(1.0, center + half)
    return low, high


def select_questions(
    questions: pa.Table, splits: Sequence[str], limit: int | None
) -> pa.Table:
    """The questions to evaluate: the given splits in that order, each cut to `limit` rows."""
    present = questions.column("split").to_pylist()
    parts = []
    for split in splits:
        idx = [i for i, s in enumerate(present) if s == split]
        if not idx:
            have = sorted(set(present))
            raise ValueError(
                f"evaluate.splits: split {split!r} has no questions in dataset.questions "
                f"(splits present: {have})"
            )
        parts.append(questions.take(idx[:limit] if limit is not None else idx))
    return pa.concat_tables(parts)


def grade_outputs(questions: pa.Table, outputs: Sequence[str]) -> pa.Table:
    """The `predictions` table: each output's extracted answer and whether it is right."""
    qids = questions.column("question_id").to_pylist()
    golds = questions.column("answer").to_pylist()
    types = questions.column("answer_type").to_pylist()
    if len(outputs) != len(qids):
        raise ValueError(f"{len(outputs)} outputs for {len(qids)} questions")
    preds, correct = [], []
    for qid, out, gold, kind in zip(qids, outputs, golds, types):
        pred = answers.extract(out, kind)
        try:
            ok = answers.grade(pred, gold, kind)
        except ValueError as exc:
            raise ValueError(f"dataset.questions row {qid!r}: {exc}") from None
        preds.append(pred)
        correct.append(ok)
    return pa.table(
        {
            "question_id": qids,
            "split": questions.column("split"),
            "output": list(outputs),
            "pred": pa.array(preds, pa.string()),
            "answer": golds,
            "correct": correct,
        }
    )


def split_metrics(predictions: pa.Table, method: str, seed: int) -> pa.Table:
    """The `metrics` table: accuracy and its 95% Wilson interval per split (first-seen order)."""
    splits = predictions.column("split").to_pylist()
    correct = predictions.column("correct").to_pylist()
    rows: dict[str, list[int]] = {}
    for split, ok in zip(splits, correct):
        tally = rows.setdefault(split, [0, 0])
        tally[0] += 1
        tally[1] += int(ok)
    out = {k: [] for k in ("method", "seed", "split", "n", "correct", "accuracy", "ci_low", "ci_high")}
    for split, (n, k) in rows.items():
        lo, hi = wilson_interval(k, n)
        for col, val in zip(out, (method, seed, split, n, k, k / n, lo, hi)):
            out[col].append(val)
    return pa.table(out)
