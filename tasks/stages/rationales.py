"""The `rationales` stage: teacher completions -> graded, step-segmented rationales.

Each completion is graded and segmented by `tasks.core.rationale_rows.build_rows` (the same
function Mentor-KD applies to the mentor's samples).
Calls that failed (`error` set) or returned an empty completion are skipped and counted. With
`teacher.protocol: two_stage` a reasoning call is graded on its answer-extraction call's
completion (the teacher's answer), and skipped when that call failed.
Incorrect rationales are stored with `correct = false` (they are not trained on) unless
`keep_incorrect` is off. `correct` is kpod's own grade, or, for a released file that flags its
rationales (replay) and `source_labels: trust`, the file's flag; `own_correct`, `source_correct`
and `correct_from` keep both, so `WHERE own_correct <> source_correct` lists where they differ.

Tables: `rationales`, `steps`, and, when the dataset wrote `keypoint_terms` (synthetic data),
`word_labels`: every word of every rationale with its keypoint truth (`tasks.core.synthetic`).
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
from pydantic import Field

from storage.schemas import schema_for
from tasks.config.base import KpodModel
from tasks.config.rationales import RationalesConfig
from tasks.core.rationale_rows import RationaleRows, build_rows, rows_to_tables
from tasks.stages.contract import StageContext, StageSpec


def word_label_table(rationales: pa.Table, keypoint_terms: pa.Table) -> pa.Table:
    """`word_labels`: every word of every rationale whose question has keypoint terms, with its
    keypoint truth and role (core, context, filler)."""
    from tasks.core.synthetic import word_roles  # synthetic data only

    kinds: dict[str, dict[str, str]] = defaultdict(dict)
    for qid, term, kind in zip(*(keypoint_terms.column(c).to_pylist() for c in ("question_id", "term", "kind"))):
        kinds[qid][term] = kind
    out = []
    for rid, qid, text in zip(*(rationales.column(c).to_pylist() for c in ("rationale_id", "question_id", "text"))):
        if qid not in kinds:
            continue
        for i, (s, e, word, key, role) in enumerate(word_roles(text, kinds[qid])):
            out.append(dict(rationale_id=rid, word=i, char_start=s, char_end=e, text=word, keypoint=key, role=role))
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
    c = dict(calls=calls.num_rows, answer_calls=0, skipped_error=0, skipped_empty=0, graded=0, correct=0, own_correct=0,
             source_flagged=0, source_disagree=0, no_pred=0, dropped_incorrect=0, dropped_short=0)
    rows = _teacher_rows(calls, gold, cfg, c)
    rows.sort(key=lambda r: (r.rationale["question_id"], r.rationale["sample"]))
    tables = rows_to_tables(rows)
    if keypoint_terms is not None:
        tables["word_labels"] = word_label_table(tables["rationales"], keypoint_terms)
    if counts is not None:
        counts.update(c)
        counts["teacher_accuracy"] = c["correct"] / c["graded"] if c["graded"] else None
        counts.update({t: tables[t].num_rows for t in tables})
    return tables


def _teacher_rows(
    calls: pa.Table, gold: dict[str, tuple[str, str]], cfg: RationalesConfig, c: dict
) -> list[RationaleRows]:
    """The kept rows of the successful calls, in call order; counts what happened into `c`.

    gold: question_id -> (gold answer, answer type).
    """
    seen: set[tuple[str, int]] = set()
    rows: list[RationaleRows] = []
    cols = ["question_id", "sample", "completion", "error", "teacher_answer", "source_correct", "part"]
    table = calls.select(cols).to_pylist()
    # two-stage: each reasoning's teacher answer is its answer-extraction call's completion
    second = {(r["question_id"], r["sample"]): r["completion"] for r in table
              if r["part"] == "answer" and r["error"] is None}
    for call in table:
        qid, sample = call["question_id"], call["sample"]
        if call["part"] == "answer":
            c["answer_calls"] += 1
            continue
        if call["part"] == "reasoning":  # no answer call succeeded: no teacher answer to grade
            if (qid, sample) not in second:
                c["skipped_error"] += 1
                continue
            call["teacher_answer"] = second[(qid, sample)]
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
        r = build_rows(qid, "teacher", sample, call["completion"], ans, kind, cfg.strip_answer_sentence,
                       call["teacher_answer"], call["source_correct"], cfg.source_labels)
        c["graded"] += 1
        c["correct"] += r.rationale["correct"]
        c["own_correct"] += r.rationale["own_correct"]
        if call["source_correct"] is not None:
            c["source_flagged"] += 1
            c["source_disagree"] += call["source_correct"] != r.rationale["own_correct"]
        c["no_pred"] += r.rationale["pred"] is None
        if not r.rationale["correct"] and not cfg.keep_incorrect:
            c["dropped_incorrect"] += 1
        elif r.rationale["n_steps"] < cfg.min_steps:
            c["dropped_short"] += 1
        else:
            rows.append(r)
    return rows


def run(ctx: StageContext) -> None:
    cfg: RationalesConfig = ctx.inputs.rationales
    questions = ctx.table("dataset", "questions")
    # not the log-probs column (teacher.top_logprobs): the largest, and not read here
    calls = ctx.table("teacher", "teacher_calls", columns=[c for c in schema_for("teacher_calls").names if c != "logprobs"])
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
