"""The `rationales` section: grading and segmenting teacher output."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import KpodModel


class RationalesConfig(KpodModel):
    strip_answer_sentence: bool = Field(
        True,
        description=(
            "Store each rationale without its final answer sentence ('Therefore, the answer is "
            "X.'), since the student format appends its own; off: store the completion as written."
        ),
    )
    min_steps: int = Field(
        1, ge=0, le=1000,
        description="Rationales with fewer steps than this (after stripping) are not stored.",
    )
    keep_incorrect: bool = Field(
        True,
        description=(
            "Store rationales whose answer is wrong, with correct=false (they are never trained "
            "on); off: drop them."
        ),
    )
    source_labels: Literal["trust", "regrade"] = Field(
        "trust",
        description=(
            "Released teacher files (replay) that carry a correctness flag: trust: the flag is "
            "the verdict (`correct`), as the files' authors trained on it; regrade: kpod's own "
            "grade is. Both are kept in `rationales` (own_correct, source_correct, correct_from). "
            "A recorded answer field (a two-stage file's second call) is read by either."
        ),
    )
    teacher_grading: Literal["kpod", "zero_shot_cot"] = Field(
        "kpod",
        description=(
            "How a teacher's answer call (two-stage's second request, or the answer a released "
            "file keeps) is graded into own_correct: kpod: kpod's reader and comparison, the same "
            "that scores the student (README, 'What each answer type accepts'); zero_shot_cot: "
            "Kojima et al.'s answer cleansing, the rule the released files' flags were set with "
            "(first candidate of the type, e.g. the first capital letter of the choice range "
            "anywhere; exact string comparison, so 'l-a-h-y' is not 'lahy'). A rationale without "
            "an answer call is read by kpod either way. Student evaluation always uses kpod's."
        ),
    )
