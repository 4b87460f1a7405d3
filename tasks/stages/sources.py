"""Which rationales a run trains on: the teacher's, plus the mentor's for Mentor-KD methods.

Mentor-augmented rationales (stage `mentor_augment`, source = 'mentor') have the same
`rationales` / `steps` schemas as the teacher's (stage `rationales`). Every stage that turns
rationales into training data (weights, difficulty, schedule, train) reads them through this
module, so for `kpod_mentor` they get token weights, step difficulties and a schedule exactly
like teacher rationales (METHODS.md §3, "KPOD + Mentor-KD"), and for every other method nothing
changes (same upstream, same key).

A stage using it declares `upstream=lambda cfg: ("dataset", *rationale_stages(cfg), ...)`
(tasks.config.methods); what it reads follows from its upstream stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from tasks.config.methods import RATIONALE_STAGES
from tasks.core.formatting import prompt_text, serialize

if TYPE_CHECKING:
    from tasks.stages.contract import StageContext


def _concat(ctx: "StageContext", table: str, columns: list[str] | None) -> pa.Table:
    parts = [ctx.table(stage, table, columns=columns) for stage in RATIONALE_STAGES if ctx.reads(stage)]
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def training_rationales(ctx: "StageContext", columns: list[str] | None = None) -> pa.Table:
    """`rationales` rows of the teacher (and the mentor, for Mentor-KD methods), all columns
    or `columns`; incorrect ones included (callers filter on `correct`)."""
    return _concat(ctx, "rationales", columns)


def training_steps(ctx: "StageContext", columns: list[str] | None = None) -> pa.Table:
    """`steps` rows of the rationales `training_rationales` returns."""
    return _concat(ctx, "steps", columns)


# the student's tokenizer text; the pretrained miniature's tokenizer adds its corpus to it
def tokenizer_corpus(questions: pa.Table, rationales: pa.Table) -> list[str]:
    """Training-split text: every question's prompt, and every correct rationale serialized."""
    train = {
        r["question_id"]: r
        for r in questions.select(["question_id", "split", "question", "answer"]).to_pylist()
        if r["split"] == "train"
    }
    corpus = [prompt_text(q["question"]) for q in train.values()]
    for r in rationales.select(["question_id", "text", "correct"]).to_pylist():
        q = train.get(r["question_id"])
        if q is not None and r["correct"]:
            corpus.append(serialize(q["question"], r["text"], q["answer"]))
    return corpus
