"""KPOD's progressive, token-weighted training data (METHODS.md §2.3, Eq. 14-15) and its ablations.

At epoch e (0-based) a scheduled rationale is trained at stage s = min(e, T): the input is the
question plus its first c_i(s) steps, the target the remaining steps plus the answer, and each
rationale token of the target carries its weight w_j in the loss (answer tokens and EOS weigh
1). Stage T is the full rationale, so epochs e >= T train on full rationales.

What each method changes (and nothing else):
- kpod: schedule + weighted loss;
- kpod_no_weights: w_j = 1 in the loss (the schedule is unchanged);
- kpod_no_progressive: the full rationale every epoch, weighted loss (no schedule read);
- kpod_no_weight_in_difficulty, kpod_no_diversity: their change is upstream (uniform
  within-step weights in `difficulty`, beta = 0 in `schedule`); training is kpod's;
- kpod_mentor: kpod on teacher + mentor rationales (the train stage adds Mentor-KD's KD term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tasks.config.methods import KPOD_METHODS, PROGRESSIVE, WEIGHTED
from tasks.core.formatting import Example, build_example, split_rationale
from tasks.core.losses import floored_weight
from tasks.training.data import TrainMethod


@dataclass
class Rationale:
    """What the progressive examples of one rationale are built from."""

    rationale_id: str
    question: str
    text: str
    answer: str
    step_spans: list[tuple[int, int]]  # (char_start, char_end) of each step, in order
    weight_spans: list[tuple[int, int, float]]  # (char_start, char_end, w_j) per token
    input_steps: list[int]  # c_i(s) for s = 0..T; empty when not progressive


class KpodMethod(TrainMethod):
    """Examples change with the curriculum stage; the loss is the weighted NLL (Eq. 15)."""

    def __init__(
        self, rationales: list[Rationale], tokenizer: Any, seq2seq: bool, max_len: int,
        pad_id: int, method: str, stages: int, weight_floor: float = 0.0, warmup_epochs: int = 0,
        input_weight: float = 0.0,
    ):
        """stages: T; each progressive rationale has input_steps for stages 0..T.
        weight_floor: f of w' = f + (1 - f) w (train.weight_floor; 0 is the paper's raw w).
        warmup_epochs: W epochs on whole rationales (stage T) before stage 0 (train.curriculum_warmup_epochs).
        input_weight: lambda (train.curriculum_input_weight); 0: the scheduled input steps are in
            the prompt (the paper); > 0: they stay in the target with their weights times lambda."""
        if method not in KPOD_METHODS:
            raise ValueError(f"KpodMethod: {method!r} is not a KPOD method ({sorted(KPOD_METHODS)})")
        self.name = method
        self.rationales = rationales
        self.tokenizer, self.seq2seq, self.max_len = tokenizer, seq2seq, max_len
        self.progressive = method in PROGRESSIVE
        self.weighted = method in WEIGHTED
        self.weight_floor = weight_floor
        if not 0.0 <= input_weight <= 1.0:
            raise ValueError(f"curriculum input weight must lie in [0, 1], got {input_weight}")
        self.input_weight = input_weight
        self.T, self.W = stages, warmup_epochs
        self.curriculum_epochs = warmup_epochs + stages if self.progressive else 0
        if self.progressive:
            for r in rationales:
                if len(r.input_steps) != stages + 1:
                    raise ValueError(
                        f"schedule: rationale {r.rationale_id!r} has {len(r.input_steps)} stages, want {stages + 1}"
                    )
        self._cache: tuple[int, list[Example]] | None = None
        super().__init__(self._build(self._stage(0)), pad_id)
        self._cache = (self._stage(0), self.examples)

    def _stage(self, epoch: int) -> int:
        """Epochs 0..W-1 whole rationales (stage T), then stages 0..T, then T to the end."""
        if not self.progressive:  # no curriculum without the schedule: stage 0, as Std-CoT logs it
            return 0
        return self.T if epoch < self.W else min(epoch - self.W, self.T)

    def stage_for_epoch(self, epoch: int) -> int:
        return self._stage(epoch)

    def examples_for_epoch(self, epoch: int) -> list[Example]:
        stage = self._stage(epoch)
        if self._cache is None or self._cache[0] != stage:
            self._cache = (stage, self._build(stage))
        return self._cache[1]

    def _weights(self, r: Rationale) -> list[tuple[int, int, float]]:
        if not self.weight_floor:
            return r.weight_spans
        return [(s, e, floored_weight(w, self.weight_floor)) for s, e, w in r.weight_spans]

    def _build(self, stage: int) -> list[Example]:
        out = []
        for r in self.rationales:
            c = r.input_steps[stage] if self.progressive else 0
            weights = self._weights(r) if self.weighted else None
            if c and self.input_weight:
                # the soft curriculum: the head stays in the target, down-weighted
                weights, c = head_weighted(r, c, weights, self.input_weight), 0
            out.append(
                build_example(
                    self.tokenizer, r.question, r.text, r.answer,
                    seq2seq=self.seq2seq, max_len=self.max_len, input_steps=c,
                    step_spans=r.step_spans, token_weights=weights, rationale_id=r.rationale_id,
                )
            )
        return out


def head_weighted(
    r: Rationale, input_steps: int, weights: list[tuple[int, int, float]] | None, lam: float
) -> list[tuple[int, int, float]]:
    """Weight spans of the whole rationale as a target when its first `input_steps` steps (the
    part the schedule would put in the prompt) weigh `lam` times their own weight.

    weights: the rationale's (char_start, char_end, w) token spans, or None (every token 1): then
    one span covers the head with weight lam and the rest gets the default 1 of uncovered text.
    """
    _, body_start, _ = split_rationale(r.text, input_steps, r.step_spans)
    if weights is None:
        lead = len(r.text) - len(r.text.lstrip())
        return [(lead, body_start, lam)] if body_start > lead else []
    return [(s, e, w * lam if s < body_start else w) for s, e, w in weights]


def load_rationales(
    questions: pa.Table, rationales: pa.Table, steps: pa.Table, token_weights: pa.Table,
    schedule: pa.Table | None, sources: tuple[str, ...] = ("teacher",),
) -> list[Rationale]:
    """Correct rationales from `sources` of training questions (as Std-CoT trains on), by
    rationale_id, with their step spans, token weight spans and (given `schedule`) input steps
    per stage."""
    qs = {
        r["question_id"]: r
        for r in questions.select(["question_id", "split", "question", "answer"]).to_pylist()
        if r["split"] == "train"
    }
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for r in steps.select(["rationale_id", "step", "char_start", "char_end"]).to_pylist():
        spans.setdefault(r["rationale_id"], []).append((r["step"], r["char_start"], r["char_end"]))
    weights: dict[str, list[tuple[int, int, float]]] = {}
    for r in token_weights.select(["rationale_id", "char_start", "char_end", "weight"]).to_pylist():
        weights.setdefault(r["rationale_id"], []).append((r["char_start"], r["char_end"], r["weight"]))
    plan: dict[str, list[int]] = {}
    if schedule is not None:
        rows = sorted(schedule.select(["stage", "rationale_id", "input_steps"]).to_pylist(), key=lambda r: r["stage"])
        for r in rows:
            plan.setdefault(r["rationale_id"], []).append(r["input_steps"])
    out = []
    rows = rationales.select(["rationale_id", "question_id", "source", "text", "correct"]).to_pylist()
    for r in sorted(rows, key=lambda r: r["rationale_id"]):
        q = qs.get(r["question_id"])
        if q is None or not r["correct"] or r["source"] not in sources:
            continue
        rid = r["rationale_id"]
        if rid not in weights:
            raise ValueError(f"token_weights: no rows for training rationale {rid!r}")
        if schedule is not None and rid not in plan:
            raise ValueError(f"schedule: no rows for training rationale {rid!r}")
        out.append(
            Rationale(
                rationale_id=rid, question=q["question"], text=r["text"], answer=q["answer"],
                step_spans=[(s, e) for _, s, e in sorted(spans.get(rid, []))],
                weight_spans=sorted(weights[rid]),
                input_steps=plan.get(rid, []),
            )
        )
    return out
