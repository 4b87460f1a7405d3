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

import contextlib
import tempfile
from pathlib import Path

import pyarrow as pa
from pydantic import Field

from storage.schemas import schema_for
from storage.stream import BATCH_ROWS, BUCKET_ROWS, Buckets, duckdb_session, query_batches
from tasks.config.base import KpodModel
from tasks.config.rationales import RationalesConfig
from tasks.core.rationale_rows import RationaleRows, TeacherGrading, build_rows, rows_to_tables
from tasks.stages.contract import StageContext, StageSpec


# Each call's position in the tables' order (question_id, sample), sorted narrow: the wide rows
# are put in that order by an external bucket sort (storage.stream), as DuckDB's ORDER BY of a
# million completions ran past its memory limit.
_ORDER_SQL = """
CREATE TEMP TABLE _ord AS
SELECT file_row_number AS r, question_id,
       row_number() OVER (ORDER BY question_id, sample, part, file_row_number) - 1 AS pos
FROM calls
"""
# every call with what grading it needs: the gold answer and a two-stage reasoning's
# answer-extraction completion (and the question's text, which zero-shot-CoT grading reads its
# choice letters from), tagged with its position and bucket
_CALLS_SQL = """
SELECT o.pos, o.pos // {rows} AS _bucket, c.question_id, c.sample, c.completion, c.error, c.teacher_answer,
       c.source_correct, c.part, a.completion AS answer_completion, q.question_id IS NOT NULL AS known,
       q.answer, q.answer_type, {question} AS question
FROM calls c
JOIN _ord o ON o.r = c.file_row_number
LEFT JOIN (SELECT question_id, sample, completion FROM calls WHERE part = 'answer' AND error IS NULL) a
       ON c.part = 'reasoning' AND a.question_id = c.question_id AND a.sample = c.sample
LEFT JOIN questions q ON q.question_id = c.question_id
"""
# the keypoint terms of each bucket's questions (synthetic data), to label its rationales' words
_TERMS_SQL = """
SELECT t.question_id, t.term, t.kind, b._bucket
FROM keypoint_terms t JOIN (SELECT DISTINCT question_id, pos // {rows} AS _bucket FROM _ord) b
     ON b.question_id = t.question_id
"""


def _counts(calls: int = 0) -> dict:
    return dict(calls=calls, answer_calls=0, skipped_error=0, skipped_empty=0, graded=0, correct=0, own_correct=0,
                source_flagged=0, source_disagree=0, no_pred=0, dropped_incorrect=0, dropped_short=0)


class _Grader:
    """Grades the ordered calls batch by batch; `c` counts what happened to them."""

    def __init__(self, cfg: RationalesConfig):
        self.cfg, self.c = cfg, _counts()
        self.last_key: tuple[str, int] | None = None  # rows arrive sorted: a repeat is adjacent

    def batch(self, batch: pa.RecordBatch, terms: dict[str, dict[str, str]]
              ) -> tuple[list[RationaleRows], list[dict | None]]:
        """The kept rows of a batch of `_CALLS_SQL` rows, with each one's keypoint kinds
        (`terms`: question -> term -> kind; None for a question without)."""
        kept, kinds = [], []
        for call in batch.to_pylist():
            self.c["calls"] += 1
            r = self._grade(call)
            if r is not None:
                kept.append(r)
                kinds.append(terms.get(call["question_id"]))
        return kept, kinds

    def _grade(self, call: dict) -> RationaleRows | None:
        c, cfg = self.c, self.cfg
        qid, sample = call["question_id"], call["sample"]
        if call["part"] == "answer":
            c["answer_calls"] += 1
            return None
        if call["part"] == "reasoning":  # no answer call succeeded: no teacher answer to grade
            if call["answer_completion"] is None:
                c["skipped_error"] += 1
                return None
            call["teacher_answer"] = call["answer_completion"]
        if call["error"] is not None:
            c["skipped_error"] += 1
            return None
        if not (call["completion"] or "").strip():
            c["skipped_empty"] += 1
            return None
        if not call["known"]:
            raise ValueError(f"teacher.teacher_calls: question_id {qid!r} is not in dataset.questions")
        if (qid, sample) == self.last_key:
            raise ValueError(f"teacher.teacher_calls: two successful calls for question {qid!r} sample {sample}")
        self.last_key = (qid, sample)
        r = build_rows(qid, "teacher", sample, call["completion"], call["answer"], call["answer_type"],
                       cfg.strip_answer_sentence, call["teacher_answer"], call["source_correct"], cfg.source_labels,
                       TeacherGrading(cfg.teacher_grading, call["question"] or ""))
        self._count(r, call["source_correct"])
        if not r.rationale["correct"] and not cfg.keep_incorrect:
            c["dropped_incorrect"] += 1
        elif r.rationale["n_steps"] < cfg.min_steps:
            c["dropped_short"] += 1
        else:
            return r
        return None

    def _count(self, r: RationaleRows, source_correct: bool | None) -> None:
        c = self.c
        c["graded"] += 1
        c["correct"] += r.rationale["correct"]
        c["own_correct"] += r.rationale["own_correct"]
        if source_correct is not None:
            c["source_flagged"] += 1
            c["source_disagree"] += source_correct != r.rationale["own_correct"]
        c["no_pred"] += r.rationale["pred"] is None


def word_label_batch(rows: list[RationaleRows], kinds: list[dict | None]) -> pa.Table:
    """`word_labels` rows of some rationales: every word of each one whose question has keypoint
    terms (`kinds`: term -> kind, None for none), with its keypoint truth and role."""
    from tasks.core.synthetic import word_roles  # synthetic data only

    rid, word, start, end, text, keypoint, role = ([] for _ in range(7))
    for r, k in zip(rows, kinds):
        if k is None:
            continue
        labels = word_roles(r.rationale["text"], k)
        rid += [r.rationale["rationale_id"]] * len(labels)
        word += range(len(labels))
        for s, e, w, key, ro in labels:
            start.append(s)
            end.append(e)
            text.append(w)
            keypoint.append(key)
            role.append(ro)
    cols = dict(rationale_id=rid, word=word, char_start=start, char_end=end, text=text, keypoint=keypoint, role=role)
    return pa.table(cols, schema=schema_for("word_labels"))


def stream(con, cfg: RationalesConfig, has_terms: bool, sinks: dict, scratch: Path, counts: dict | None = None) -> None:
    """Grade every call of the views `calls` (with `file_row_number`), `questions` (and
    `keypoint_terms` when `has_terms`) on DuckDB connection `con`, writing `rationales`,
    `steps` (and `word_labels`) batch by batch into `sinks` (name -> anything with
    `write(table)` and `rows`); `scratch` holds the sort's buckets. `counts` gets the summary.

    A call for an unknown question, or two successful calls for one (question, sample), is an
    error naming it."""
    con.execute(_ORDER_SQL)
    calls, terms = Buckets(scratch, "calls"), Buckets(scratch, "terms")
    try:
        question = "q.question" if cfg.teacher_grading == "zero_shot_cot" else "NULL::VARCHAR"
        for batch in query_batches(con, _CALLS_SQL.format(rows=BUCKET_ROWS, question=question)):
            calls.add(batch, "_bucket")
        if has_terms:
            for batch in query_batches(con, _TERMS_SQL.format(rows=BUCKET_ROWS)):
                terms.add(batch, "_bucket")
        terms.close()
        grader = _Grader(cfg)
        for b in calls.close():
            _grade_bucket(grader, calls.read(b).sort_by("pos"), _kinds(terms.read(b)), has_terms, sinks)
    finally:
        calls.remove()
        terms.remove()
    if counts is not None:
        c = grader.c
        counts.update(c)
        counts["teacher_accuracy"] = c["correct"] / c["graded"] if c["graded"] else None
        counts.update({name: sink.rows for name, sink in sinks.items()})


def _kinds(terms: pa.Table | None) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    if terms is not None:
        for qid, term, kind in zip(*(terms.column(c).to_pylist() for c in ("question_id", "term", "kind"))):
            out.setdefault(qid, {})[term] = kind
    return out


def _grade_bucket(grader: _Grader, calls: pa.Table, terms: dict, has_terms: bool, sinks: dict) -> None:
    """One bucket of calls, in order, graded and written BATCH_ROWS at a time."""
    for batch in calls.to_batches(BATCH_ROWS):
        rows, kinds = grader.batch(batch, terms)
        for name, table in rows_to_tables(rows).items():
            sinks[name].write(table)
        if has_terms:
            sinks["word_labels"].write(word_label_batch(rows, kinds))


class _ListSink:
    def __init__(self, name: str):
        self.name, self.parts, self.rows = name, [], 0

    def write(self, table: pa.Table) -> None:
        self.parts.append(table)
        self.rows += table.num_rows

    def table(self) -> pa.Table:
        return pa.concat_tables(self.parts) if self.parts else schema_for(self.name).empty_table()


def build(
    questions: pa.Table,
    calls: pa.Table,
    cfg: RationalesConfig,
    keypoint_terms: pa.Table | None = None,
    counts: dict | None = None,
) -> dict[str, pa.Table]:
    """Tables `rationales`, `steps` (and `word_labels` given `keypoint_terms`) from teacher calls
    held in memory: `stream` over them (the stage streams from its upstream tables instead)."""
    names = ["rationales", "steps"] + (["word_labels"] if keypoint_terms is not None else [])
    sinks = {n: _ListSink(n) for n in names}
    calls = calls.append_column("file_row_number", pa.array(range(calls.num_rows), pa.int64()))
    with tempfile.TemporaryDirectory(prefix="kpod-rationales-") as scratch, duckdb_session(Path(scratch)) as con:
        con.register("calls", calls)
        con.register("questions", questions)
        if keypoint_terms is not None:
            con.register("keypoint_terms", keypoint_terms)
        stream(con, cfg, keypoint_terms is not None, sinks, Path(scratch), counts)
    return {n: s.table() for n, s in sinks.items()}


def run(ctx: StageContext) -> None:
    cfg: RationalesConfig = ctx.inputs.rationales
    try:  # only the synthetic dataset knows keypoints
        ctx.table_path("dataset", "keypoint_terms")
        has_terms = True
    except FileNotFoundError:
        has_terms = False
    views = {"calls": ("teacher", "teacher_calls"), "questions": ("dataset", "questions")}
    if has_terms:
        views["keypoint_terms"] = ("dataset", "keypoint_terms")
    counts: dict = {}
    with contextlib.ExitStack() as stack:
        con = stack.enter_context(ctx.query(views))
        names = ["rationales", "steps"] + (["word_labels"] if has_terms else [])
        sinks = {n: stack.enter_context(ctx.table_writer(n)) for n in names}
        stream(con, cfg, has_terms, sinks, ctx.work_dir, counts)
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
