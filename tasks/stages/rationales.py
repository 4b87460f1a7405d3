"""The `rationales` stage: teacher completions -> graded, step-segmented rationales.

Per completion (`build_rows`, also used by Mentor-KD for the mentor's samples):
- `pred` is extracted from the FULL completion by `tasks.core.answers`, and `correct` is its grade
  against the question's gold answer (the same module scores the student later).
- `text` is the rationale part. The student format (METHODS.md §0) is
  `{rationale} Therefore, the answer is {answer}.`, so with `strip_answer_sentence` the stored
  text ends before the completion's final answer sentence (see `rationale_text`); otherwise
  the completion is stored as written (whitespace-trimmed).
- `steps` are character spans into `text` (`tasks.core.steps.segment`).
Calls that failed (`error` set) or returned an empty completion are skipped and counted.
Incorrect rationales are stored with `correct = false` (they are not trained on) unless
`keep_incorrect` is off.

Tables: `rationales`, `steps`, and, when the dataset wrote `keypoint_terms` (synthetic data),
`word_labels`: every word of every rationale with its keypoint truth (`tasks.core.synthetic`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, NamedTuple

import pyarrow as pa

from storage.schemas import schema_for
from pydantic import Field

from tasks.config.base import KpodModel
from tasks.core import answers, steps
from tasks.stages.contract import StageContext, StageSpec
from tasks.config.rationales import RationalesConfig


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


def build_rows(
    question_id: str,
    source: str,
    sample: int,
    completion: str,
    gold: str,
    answer_type: str,
    strip_answer_sentence: bool = True,
) -> RationaleRows:
    """The `rationales` row and `steps` rows of one completion (teacher or mentor).

    rationale_id = f"{question_id}:{source}:{sample}". Raises ValueError for a gold answer
    that is not of `answer_type` (naming the question).
    """
    rid = f"{question_id}:{source}:{sample}"
    pred = answers.extract(completion, answer_type)
    try:
        correct = answers.grade(pred, gold, answer_type)
    except ValueError as exc:
        raise ValueError(f"dataset.questions row {question_id!r}: {exc}") from None
    text = rationale_text(completion, answer_type) if strip_answer_sentence else completion.strip()
    spans = steps.segment(text)
    rationale = dict(
        rationale_id=rid,
        question_id=question_id,
        source=source,
        sample=int(sample),
        text=text,
        pred=pred,
        correct=correct,
        n_steps=len(spans),
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


def word_label_table(rationales: pa.Table, keypoint_terms: pa.Table) -> pa.Table:
    """`word_labels`: every word of every rationale whose question has keypoint terms."""
    from tasks.core.synthetic import label_words  # synthetic data only

    terms: dict[str, set[str]] = defaultdict(set)
    for qid, term in zip(
        keypoint_terms.column("question_id").to_pylist(), keypoint_terms.column("term").to_pylist()
    ):
        terms[qid].add(term)
    out = []
    for rid, qid, text in zip(
        rationales.column("rationale_id").to_pylist(),
        rationales.column("question_id").to_pylist(),
        rationales.column("text").to_pylist(),
    ):
        if qid not in terms:
            continue
        for i, (s, e, word, key) in enumerate(label_words(text, terms[qid])):
            out.append(dict(rationale_id=rid, word=i, char_start=s, char_end=e, text=word, keypoint=key))
    return pa.Table.from_pylist(out, schema=schema_for("word_labels"))


def build(
    questions: pa.Table,
    calls: pa.Table,
    cfg: RationalesConfig,
    keypoint_terms: pa.Table | None = None,
    counts: dict | None = None,
) -> dict[str, pa.Table]:
    """Tables `rationales`, `steps` (and `word_labels` given `keypoint_terms`) from teacher calls.

    questions: the dataset's `questions` table; calls: the teacher's `teacher_calls`. When
    `counts` is given it is filled with what happened to the calls (for the stage summary).
    A call for an unknown question, or two successful calls for one (question, sample), is an
    error naming it.
    """
    gold = {
        qid: (ans, kind)
        for qid, ans, kind in zip(
            questions.column("question_id").to_pylist(),
            questions.column("answer").to_pylist(),
            questions.column("answer_type").to_pylist(),
        )
    }
    c = dict(calls=calls.num_rows, skipped_error=0, skipped_empty=0, graded=0, correct=0,
             no_pred=0, dropped_incorrect=0, dropped_short=0)
    seen: set[tuple[str, int]] = set()
    rows: list[RationaleRows] = []
    for call in calls.select(["question_id", "sample", "completion", "error"]).to_pylist():
        qid, sample = call["question_id"], call["sample"]
        if call["error"] is not None:
            c["skipped_error"] += 1
            continue
        if not (call["completion"] or "").strip():
            c["skipped_empty"] += 1
            continue
        if qid not in gold:
            raise ValueError(f"teacher.teacher_calls: question_id {qid!r} is not in dataset.questions")
        if (qid, sample) in seen:
            raise ValueError(
                f"teacher.teacher_calls: two successful calls for question {qid!r} sample {sample}"
            )
        seen.add((qid, sample))
        ans, kind = gold[qid]
        r = build_rows(qid, "teacher", sample, call["completion"], ans, kind, cfg.strip_answer_sentence)
        c["graded"] += 1
        c["correct"] += r.rationale["correct"]
        c["no_pred"] += r.rationale["pred"] is None
        if not r.rationale["correct"] and not cfg.keep_incorrect:
            c["dropped_incorrect"] += 1
        elif r.rationale["n_steps"] < cfg.min_steps:
            c["dropped_short"] += 1
        else:
            rows.append(r)
    rows.sort(key=lambda r: (r.rationale["question_id"], r.rationale["sample"]))
    tables = rows_to_tables(rows)
    if keypoint_terms is not None:
        tables["word_labels"] = word_label_table(tables["rationales"], keypoint_terms)
    if counts is not None:
        counts.update(c)
        counts["teacher_accuracy"] = c["correct"] / c["graded"] if c["graded"] else None
        counts.update({t: tables[t].num_rows for t in tables})
    return tables


def run(ctx: StageContext) -> None:
    cfg: RationalesConfig = ctx.inputs.rationales
    questions = ctx.table("dataset", "questions")
    calls = ctx.table("teacher", "teacher_calls")
    try:
        terms = ctx.table("dataset", "keypoint_terms")
    except FileNotFoundError:  # only the synthetic dataset knows keypoints
        terms = None
    counts: dict = {}
    for name, table in build(questions, calls, cfg, terms, counts).items():
        ctx.write_table(name, table)
    ctx.summary.update(counts)


class RationalesInputs(KpodModel):
    rationales: RationalesConfig = Field(description="The rationales section.")


SPEC = StageSpec(
    name="rationales",
    run=run,
    inputs=lambda cfg: RationalesInputs(rationales=cfg.rationales),
    upstream=lambda cfg: ("dataset", "teacher"),
    description="Grade teacher completions (answer extraction) and split rationales into steps.",
)
