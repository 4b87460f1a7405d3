"""One graded, step-segmented rationale from one completion (teacher or mentor): pure.

Per completion (`build_rows`; the rationales stage calls it for the teacher's calls, Mentor-KD's
augment stage for the mentor's samples):
- `pred` is extracted by `tasks.core.answers` from the teacher's separate answer when there is one
  (two-stage zero-shot-CoT's second call, or the field a released file keeps it in), else from
  the FULL completion; `own_correct` is its grade against the question's gold answer (the same
  module scores the student later). `correct`, the verdict trained on, is `own_correct`, or the
  released file's own flag when it has one and `rationales.source_labels` is "trust".
- `text` is the rationale part. The student format (METHODS.md §0) is
  `{rationale} Therefore, the answer is {answer}.`, so with `strip_answer_sentence` the stored
  text ends before the completion's final answer sentence (see `rationale_text`); otherwise
  the completion is stored as written (whitespace-trimmed).
- `steps` are character spans into `text` (`tasks.core.steps.segment`).
`rows_to_tables` turns the rows into the `rationales` and `steps` tables.
"""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple

import pyarrow as pa

from storage.schemas import schema_for
from tasks.core import answers, steps, zero_shot_cot


class RationaleRows(NamedTuple):
    rationale: dict  # one row of the `rationales` table
    steps: list[dict]  # its rows of the `steps` table


# A step that holds nothing but a connective before the answer phrase ("Therefore, the answer
# is 8.", "So, the correct answer is (C)") is dropped whole; otherwise the step is cut at the
# phrase ("5 + 3 = 8, so the answer is 8." keeps "5 + 3 = 8.").
_CONNECTIVE_ONLY = re.compile(
    r"^[\W_]*(?:(?:so|thus|therefore|hence|and|finally|overall|in\s+conclusion|in\s+summary)[\W_]*)?$",
    re.IGNORECASE,
)
_TRAILING_CONNECTIVE = re.compile(
    r"(?:[\s,;:\-]+(?:so|thus|therefore|hence|and|which\s+means))?[\s,;:\-]*$", re.IGNORECASE
)


def rationale_text(completion: str, answer_type: str) -> str:
    """The completion without its final answer sentence, whitespace-trimmed.

    The final answer sentence is the step holding the last answer phrase (`answers.answer_phrases`),
    when that step is the last or the second to last (a trailer such as "(D) 05/01/2020" on its own
    line, or Fine-tune-CoT's "END", may follow it); it and everything after it are cut. An answer
    phrase earlier in the text is left alone. When the whole completion is the answer sentence,
    the result is "" (no rationale).
    """
    text = completion.strip()
    phrases = answers.answer_phrases(text, answer_type)
    if not phrases:
        return text
    at = phrases[-1].start()
    spans = steps.segment(text)
    k = next(i for i, (_, end) in enumerate(spans) if end > at)
    if k < len(spans) - 2:
        return text
    start = spans[k][0]
    if _CONNECTIVE_ONLY.match(text[start:at]):
        return text[:start].rstrip()
    kept = _TRAILING_CONNECTIVE.sub("", text[:at])
    return kept if kept.endswith((".", "!", "?")) else kept + "."


def teacher_prediction(completion: str, teacher_answer: str | None, answer_type: str) -> str | None:
    """The teacher's answer, two-stage aware: read from `teacher_answer` (Kojima et al.'s second
    call, or the field a released file keeps it in) when there is one and it holds an answer of
    the type, else from the completion."""
    if teacher_answer is not None and teacher_answer.strip():
        pred = answers.extract(teacher_answer, answer_type)
        if pred is not None:
            return pred
    return answers.extract(completion, answer_type)


class TeacherGrading(NamedTuple):
    """How a teacher's answer call is graded (`rationales.teacher_grading`): `kpod`, kpod's
    reader; `zero_shot_cot`, Kojima et al.'s cleansing of it (tasks/core/zero_shot_cot.py), which
    reads a choice question's letters from its text (`question`)."""

    rule: str = "kpod"
    question: str = ""


def teacher_grade(completion: str, teacher_answer: str | None, gold: str, answer_type: str,
                  grading: TeacherGrading) -> tuple[str | None, bool]:
    """(prediction, correct) of a teacher's output: its answer call (when it has one) read by
    `grading`, else its completion read by kpod."""
    if grading.rule == "zero_shot_cot" and teacher_answer is not None and teacher_answer.strip():
        pred = zero_shot_cot.cleanse(teacher_answer, answer_type, grading.question)
        return pred, zero_shot_cot.same_answer(pred, gold, answer_type)
    pred = teacher_prediction(completion, teacher_answer, answer_type)
    return pred, answers.grade(pred, gold, answer_type)


def build_rows(
    question_id: str,
    source: str,
    sample: int,
    completion: str,
    gold: str,
    answer_type: str,
    strip_answer_sentence: bool = True,
    teacher_answer: str | None = None,
    source_correct: bool | None = None,
    source_labels: str = "trust",
    grading: TeacherGrading = TeacherGrading(),
) -> RationaleRows:
    """The `rationales` row and `steps` rows of one completion (teacher or mentor).

    rationale_id = f"{question_id}:{source}:{sample}". `own_correct` is kpod's grade of the
    teacher's answer (`teacher_grade` with `grading`); `correct` is the released flag `source_correct`
    when there is one and `source_labels` is "trust", else `own_correct`. Raises ValueError for
    a gold answer that is not of `answer_type` (naming the question).
    """
    rid = f"{question_id}:{source}:{sample}"
    try:
        pred, own = teacher_grade(completion, teacher_answer, gold, answer_type, grading)
    except ValueError as exc:
        raise ValueError(f"dataset.questions row {question_id!r}: {exc}") from None
    trusted = source_labels == "trust" and source_correct is not None
    text = rationale_text(completion, answer_type) if strip_answer_sentence else completion.strip()
    spans = steps.segment(text)
    rationale = dict(
        rationale_id=rid,
        question_id=question_id,
        source=source,
        sample=int(sample),
        text=text,
        pred=pred,
        correct=bool(source_correct) if trusted else own,
        n_steps=len(spans),
        own_correct=own,
        source_correct=source_correct,
        correct_from="source" if trusted else "kpod",
    )
    step_rows = [
        dict(rationale_id=rid, step=i, char_start=s, char_end=e, text=text[s:e])
        for i, (s, e) in enumerate(spans)
    ]
    return RationaleRows(rationale, step_rows)


def rows_to_tables(rows: Iterable[RationaleRows]) -> dict[str, pa.Table]:
    """`rationales` and `steps` tables (declared schemas) from `build_rows` results."""
    rows = list(rows)
    return {
        "rationales": pa.Table.from_pylist([r.rationale for r in rows], schema=schema_for("rationales")),
        "steps": pa.Table.from_pylist(
            [s for r in rows for s in r.steps], schema=schema_for("steps")
        ),
    }
