"""Teaching over a ledger: ask the teacher for every request the ledger lacks, paying once each.

Finished requests go to an append-only ledger shared by every stage key, so a killed run
resumes with only the requests the ledger lacks, and a changed temperature sends only the
requests whose id changed. The table `teacher_calls` is the ledger rows of this run's request
ids, one per id, in question order.

A request that still fails after its retries is recorded with `error` set; the stage commits
with those rows (the rationales stage skips them) unless more than `max_error_fraction` failed,
in which case it ends incomplete so that the rerun retries them (a success in the ledger always
wins over an earlier failure).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from storage.ledger import Ledger
from storage.schemas import conform, schema_for
from storage.store import StageIncomplete, Store
from storage.stream import as_table, duckdb_session
from tasks.config.teacher import TeacherConfig
from tasks.teacher_backends import factory
from tasks.teacher_backends.base import Backend, TeacherInputError, TeacherRequest
from tasks.teacher_backends.dispatcher import (  # noqa: F401 - LEDGER_NAME, open_ledger: callers import them here
    LEDGER_NAME,
    RunStats,
    merge_stats,
    open_ledger,
    run_and_close,
    run_sync,
)
from tasks.teacher_backends.requests import build_answer_requests, build_requests, check_requests
from tasks.teacher_backends.shards import MapShards, run_sharded

log = logging.getLogger("kpod.teacher")

REQUEST_BATCH = 1024  # questions whose requests are built at once (on the event loop: keep it short)
# the dataset's questions as record batches, read afresh on each call
QuestionBatches = Callable[[], Iterable[pa.RecordBatch]]

def dispatch(
    todo: Iterable[TeacherRequest],
    ledger: Ledger,
    cfg: TeacherConfig,
    backend: Backend | None,
    progress: Callable[[int], Any] | None,
    api_key: str | None,
    ledger_store: Store,
    scratch: Path,
    map_shards: MapShards | None = None,
) -> RunStats:
    """Send `todo`; a backend made here (`backend` None) is closed here too. The openai_batch
    backend sends through the Batch API instead (its batch records live in `ledger_store`);
    with `teacher.shards` > 1 the requests go in shards (shards.py, through `map_shards`, their
    request files in `scratch`)."""
    if cfg.max_cost_usd is not None and cfg.model not in cfg.prices:
        raise TeacherInputError(f"teacher.max_cost_usd is set but teacher.prices has no entry for model {cfg.model!r}")
    if cfg.backend == "openai_batch":
        from tasks.teacher_backends import openai_batch  # imports the openai client only when chosen

        return openai_batch.run_batches(todo, ledger, ledger_store, cfg, progress, api_key)
    if cfg.shards > 1 and len(todo) > 1:
        return run_sharded(todo, cfg, ledger_store, backend, progress, api_key, map_shards, scratch)
    backend = factory.make_backend(cfg, api_key) if backend is None else backend
    bar = progress(len(todo)) if progress is not None else None
    try:
        return run_sync(run_and_close(todo, backend, ledger, cfg, bar))
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()


class Totals:
    """What the stage summary counts over the collected `teacher_calls` rows, batch by batch."""

    def __init__(self) -> None:
        self.rows = self.errors = self.tokens_in = self.tokens_out = 0
        self.cost_usd = 0.0

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        self.errors += batch.num_rows - batch.column("error").null_count
        self.tokens_in += pc.sum(batch.column("tokens_in")).as_py() or 0
        self.tokens_out += pc.sum(batch.column("tokens_out")).as_py() or 0
        self.cost_usd += pc.sum(batch.column("cost_usd")).as_py() or 0.0


def summarize(n_requests: int, n_todo: int, totals: Totals, stats: RunStats) -> dict[str, Any]:
    """The stage's summary: counts over the whole table, calls and cost of this run."""
    return {
        "requests": n_requests,
        "from_ledger": n_requests - n_todo,
        "sent": stats.done,
        "calls": stats.calls,
        "retries": stats.retries,
        "errors": totals.errors,
        "tokens_in": totals.tokens_in,
        "tokens_out": totals.tokens_out,
        "cost_usd": round(totals.cost_usd, 6),
        "cost_usd_this_run": round(stats.cost_usd, 6),
    }


def check_complete(cfg: TeacherConfig, rows: int, stats: RunStats, summary: dict[str, Any]) -> None:
    """Raise `StageIncomplete` when the budget, a missing record or too many errors leave the
    table (of `rows` rows) unfit to commit; warn about tolerated errors."""
    n, errors = summary["requests"], summary["errors"]
    if stats.budget_stopped:
        raise StageIncomplete(
            f"teacher: budget max_cost_usd={cfg.max_cost_usd} reached after ${summary['cost_usd']:.4f} "
            f"in total; {rows} of {n} requests recorded, {stats.not_sent} not "
            f"sent. Rerun with a larger teacher.max_cost_usd to continue."
        )
    if rows != n:
        raise StageIncomplete(f"teacher: {n - rows} of {n} requests have no record; rerun to continue")
    if errors > cfg.max_error_fraction * n:
        last = stats.last_error or "see teacher_calls.error in the ledger"
        raise StageIncomplete(
            f"teacher: {errors} of {n} requests failed after retries (more than "
            f"max_error_fraction={cfg.max_error_fraction}); last error: {last}. Rerun to retry them."
        )
    if errors:
        log.warning(
            "teacher: %d of %d requests failed after retries; recorded with error set "
            "(rationales skips them; rerun the stage with --force teacher to retry them)",
            errors,
            n,
        )


def teach(
    questions: pa.Table,
    cfg: TeacherConfig,
    store: Store,
    backend: Backend | None = None,
    progress: Callable[[int], Any] | None = None,
    api_key: str | None = None,
    map_shards: MapShards | None = None,
) -> tuple[pa.Table, RunStats, dict[str, Any]]:
    """`teach_stream` over questions held in memory; returns (teacher_calls, run stats, summary)."""
    parts: list[pa.RecordBatch] = []
    with tempfile.TemporaryDirectory(prefix="kpod-teach-") as scratch:
        stats, summary = teach_stream(lambda: questions.to_batches(REQUEST_BATCH), cfg, store, parts.append,
                                      Path(scratch), backend, progress, api_key, map_shards)
    table = pa.Table.from_batches(parts) if parts else schema_for("teacher_calls").empty_table()
    return conform("teacher_calls", table), stats, summary


def teach_stream(
    questions: QuestionBatches,
    cfg: TeacherConfig,
    store: Store,
    sink: Callable[[pa.RecordBatch], Any],
    scratch: Path,
    backend: Backend | None = None,
    progress: Callable[[int], Any] | None = None,
    api_key: str | None = None,
    map_shards: MapShards | None = None,
) -> tuple[RunStats, dict[str, Any]]:
    """Ask the teacher every missing request; hand `teacher_calls` to `sink` batch by batch.

    `questions()` yields the dataset's questions in record batches, afresh on each call (read
    twice: once to check and count the requests, once to send the missing ones, which are
    built as they are sent). `backend` defaults to `factory.make_backend(cfg, api_key)`;
    `progress(total)` makes a progress bar; `map_shards` runs `teacher.shards` shards where the
    orchestrator chose (shards.py). DuckDB spills into `scratch`. Returns (run stats, summary);
    raises `StageIncomplete` when the budget or the error threshold stops it (everything
    finished is in the ledger; `sink` got the rows), `FatalTeacherError` on a request that can
    never succeed.
    """
    ledger = open_ledger(store, cfg)
    with duckdb_session(scratch) as con:
        requests = plan_requests(questions, cfg, ledger.ok_ids(), con)
        stats = (dispatch(requests, ledger, cfg, backend, progress, api_key, store, scratch, map_shards)
                 if len(requests) else RunStats())
        n_requests, n_todo = requests.total, len(requests)
        if cfg.protocol == "two_stage" and not stats.budget_stopped:
            round2, n2, todo2 = second_round(questions, cfg, ledger, con, requests, backend, progress,
                                             api_key, store, scratch, map_shards)
            stats, n_requests, n_todo = merge_stats(stats, round2), n_requests + n2, n_todo + todo2
        totals = Totals()
        for batch in ledger.latest_in_order(con, "wanted", scratch):
            totals.add(batch)
            sink(batch)
    summary = summarize(n_requests, n_todo, totals, stats)
    check_complete(cfg, totals.rows, stats, summary)
    return stats, summary


def second_round(
    questions: QuestionBatches, cfg: TeacherConfig, ledger: Ledger, con: Any, first: PendingRequests,
    backend: Backend | None, progress: Callable[[int], Any] | None, api_key: str | None, store: Store,
    scratch: Path, map_shards: MapShards | None,
) -> tuple[RunStats, int, int]:
    """Two-stage's answer requests, sent: (stats, requests, sent). They join `wanted` after the
    `first` round's reasoning requests, so the table lists every reasoning, then every answer.
    The first round's ledger snapshot (`first.ok`) also says which answers are done: that round
    added reasoning records only, so the ledger is not scanned for ids again.

    Built from the first round's ledgered reasoning, so a run killed between the two resumes
    here with neither round's finished requests sent again. Like the first round, the requests
    are built a question batch at a time on each pass (the reasoning texts wait in DuckDB)."""
    ledger.ok_values(con, "_reasoning", "wanted", "completion")
    answers = plan_pass(questions, AnswerRequests(cfg, con, "_reasoning"), first.ok, con, first.total)
    stats = (dispatch(answers, ledger, cfg, backend, progress, api_key, store, scratch, map_shards)
             if len(answers) else RunStats())
    return stats, answers.total, len(answers)


class AnswerRequests:
    """A question batch's two-stage answer requests: one per reasoning request of the batch whose
    latest successful completion (DuckDB table `texts`: request_id, completion) is not blank."""

    def __init__(self, cfg: TeacherConfig, con: Any, texts: str):
        self.cfg, self.con, self.texts = cfg, con, texts

    def __call__(self, questions: pa.Table) -> list[TeacherRequest]:
        reasoning = build_requests(questions, self.cfg)
        self.con.register("_batch_ids", pa.table({"request_id": [r.request_id for r in reasoning]}))
        try:
            rows = self.con.execute(
                f"SELECT t.request_id, t.completion FROM {self.texts} t JOIN _batch_ids b USING (request_id)"
            ).fetchall()
        finally:
            self.con.unregister("_batch_ids")
        done = {rid: text for rid, text in rows if (text or "").strip()}
        return build_answer_requests(questions, self.cfg, reasoning, done)


class PendingRequests:
    """The run's requests that the ledger has no success for, built again from the questions on
    each pass (`build`: a question batch -> its requests), so that only the calls in flight are
    held; `len` is their number."""

    def __init__(self, questions: QuestionBatches, build: Callable[[pa.Table], list[TeacherRequest]],
                 ok: set[str], total: int, pending: int):
        self.questions, self.build, self.ok = questions, build, ok
        self.total, self.pending = total, pending  # every request of the run; those to send

    def __len__(self) -> int:
        return self.pending

    def __iter__(self) -> Iterator[TeacherRequest]:
        for batch in self.questions():
            for r in self.build(as_table(batch)):
                if r.request_id not in self.ok:
                    yield r


def plan_requests(questions: QuestionBatches, cfg: TeacherConfig, ok: set[str], con: Any) -> PendingRequests:
    """One pass over the questions before anything is sent: every request is built (a question
    without text raises), recorded in DuckDB table `wanted` (pos, request_id, question_id, part)
    and counted; no questions, or a question id twice, raises `TeacherInputError`."""
    con.execute("CREATE TEMP TABLE wanted (pos BIGINT, request_id VARCHAR, question_id VARCHAR, part VARCHAR)")
    requests = plan_pass(questions, lambda batch: build_requests(batch, cfg), ok, con, 0)
    if not requests.total:
        check_requests([], cfg)
    dup = con.execute("SELECT any_value(question_id) FROM wanted GROUP BY request_id HAVING count(*) > 1 LIMIT 1").fetchone()
    if dup is not None:
        raise TeacherInputError(f"questions: question_id {dup[0]!r} appears more than once")
    return requests


def plan_pass(questions: QuestionBatches, build: Callable[[pa.Table], list[TeacherRequest]], ok: set[str],
              con: Any, first: int) -> PendingRequests:
    """Build every request a batch at a time, append them to `wanted` from position `first` on,
    and count them and those without a success in `ok`."""
    total = pending = 0
    for batch in questions():
        requests = build(as_table(batch))
        add_wanted(con, requests, first + total)
        total += len(requests)
        pending += sum(r.request_id not in ok for r in requests)
    return PendingRequests(questions, build, ok, total, pending)


def add_wanted(con: Any, requests: Sequence[TeacherRequest], first: int) -> None:
    """Append requests to DuckDB table `wanted`, positions from `first` on."""
    if not requests:
        return
    chunk = pa.table({
        "pos": pa.array(range(first, first + len(requests)), pa.int64()),
        "request_id": [r.request_id for r in requests],
        "question_id": [r.question_id for r in requests],
        "part": [r.part for r in requests],
    })
    con.register("_wanted_chunk", chunk)
    con.execute("INSERT INTO wanted SELECT * FROM _wanted_chunk")
    con.unregister("_wanted_chunk")

