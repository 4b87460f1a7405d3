"""The `evaluate` stage: greedy answers of the trained student, graded like the teacher's.

For each configured split of `dataset.questions`, the student gets `Q: {question}\\nA:` (the
prompt part of the training format, tokenized by `tasks.core.formatting.encode_prompt`), generates greedily in length-sorted
batches (`tasks.core.generation`), and its completion is graded by `tasks.core.answers`, the same
extraction and comparison that filtered the teacher's rationales. Tables:
- `predictions`: one row per question (question_id, split, output, pred, answer, correct);
- `metrics`: one row per split (method, seed, split, n, correct, accuracy, 95% Wilson interval).
Model selection, if any, belongs on `val`; `test` is only reported.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import pyarrow as pa
from pydantic import Field, field_validator

from tasks.core import answers
from tasks.config.base import KpodModel, runtime_field
from tasks.stages.contract import StageContext, StageSpec

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal: a two-sided 95% interval


class EvaluateConfig(KpodModel):
    splits: list[str] = Field(
        default_factory=lambda: ["val", "test"],
        min_length=1,
        description="Splits of dataset.questions to evaluate on; each must have questions.",
    )
    max_new_tokens: int = Field(
        256, ge=1, le=8192, description="Most tokens the student may generate per question."
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Evaluate only the first N questions of each split (dataset order); none: all.",
    )
    batch_size: int = runtime_field(
        64, ge=1, le=4096, description="Questions generated together (memory vs speed only)."
    )
    device: str = runtime_field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
        description="Where the student generates: auto (cuda when available, else cpu), cpu, "
        "cuda, cuda:N or mps. Greedy tokens do not depend on it up to float rounding.",
    )

    @field_validator("splits")
    @classmethod
    def _unique_splits(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"splits must be distinct, got {v}")
        return v


# ---- the pure core ------------------------------------------------------------------------
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


def resolve_device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ---- the stage ----------------------------------------------------------------------------
def run(ctx: StageContext) -> None:
    from tasks.core.formatting import encode_prompt
    from tasks.core.generation import generate_ids
    from tasks.core.models import is_seq2seq, load_model

    cfg: EvaluateConfig = ctx.config.evaluate
    questions = select_questions(ctx.table("dataset", "questions"), cfg.splits, cfg.limit)
    model, tokenizer = load_model(ctx.file("train", "model"))
    model.to(resolve_device(cfg.device))
    seq2seq = is_seq2seq(model)
    # the very token ids a training example starts with (same BOS/EOS framing)
    prompts = [encode_prompt(tokenizer, q, seq2seq) for q in questions.column("question").to_pylist()]

    t0 = time.perf_counter()
    with ctx.progress(total=len(prompts), desc="evaluate", unit="q") as bar:
        outputs = generate_ids(
            model, tokenizer, prompts, cfg.batch_size, cfg.max_new_tokens, progress=bar.update
        )
    seconds = time.perf_counter() - t0

    predictions = ctx.write_table("predictions", grade_outputs(questions, outputs))
    train = ctx.config.train  # method and seed label the metrics rows for comparisons
    metrics = ctx.write_table("metrics", split_metrics(predictions, train.method, train.seed))
    ctx.summary["accuracy"] = {r["split"]: round(r["accuracy"], 4) for r in metrics.to_pylist()}
    ctx.summary["questions_per_s"] = round(len(prompts) / seconds, 2) if seconds > 0 else None


SPEC = StageSpec(
    name="evaluate",
    run=run,
    sections=("evaluate",),
    upstream=lambda cfg: ("dataset", "train"),
    code=("tasks.stages.evaluate", "tasks.core.generation", "tasks.core.answers", "tasks.core.formatting", "tasks.core.models"),
    description="Greedy answers of the trained student on val/test, graded; accuracy with 95% CI.",
)
