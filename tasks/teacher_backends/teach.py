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
from typing import Any, Callable, Sequence

import pyarrow as pa

from storage.ledger import Ledger
from storage.store import StageIncomplete, Store
from tasks.config.teacher import TeacherConfig
from tasks.teacher_backends import factory
from tasks.teacher_backends.base import Backend, TeacherInputError, TeacherRequest
from tasks.teacher_backends.dispatcher import (  # noqa: F401 - LEDGER_NAME, open_ledger: callers import them here
    LEDGER_NAME,
    RunStats,
    merge_stats,
    open_ledger,
    pending_requests,
    run_and_close,
    run_sync,
)
from tasks.teacher_backends.requests import build_answer_requests, build_requests, check_requests
from tasks.teacher_backends.shards import MapShards, run_sharded

log = logging.getLogger("kpod.teacher")

def dispatch(
    todo: Sequence[TeacherRequest],
    ledger: Ledger,
    cfg: TeacherConfig,
    backend: Backend | None,
    progress: Callable[[int], Any] | None,
    api_key: str | None,
    ledger_store: Store,
    map_shards: MapShards | None = None,
) -> RunStats:
    """Send `todo`; a backend made here (`backend` None) is closed here too. The openai_batch
    backend sends through the Batch API instead (its batch records live in `ledger_store`);
    with `teacher.shards` > 1 the requests go in shards (shards.py, through `map_shards`)."""
    if cfg.max_cost_usd is not None and cfg.model not in cfg.prices:
        raise TeacherInputError(f"teacher.max_cost_usd is set but teacher.prices has no entry for model {cfg.model!r}")
    if cfg.backend == "openai_batch":
        from tasks.teacher_backends import openai_batch  # imports the openai client only when chosen

        return openai_batch.run_batches(todo, ledger, ledger_store, cfg, progress, api_key)
    if cfg.shards > 1 and len(todo) > 1:
        return run_sharded(todo, cfg, ledger_store, backend, progress, api_key, map_shards)
    own = backend is None
    backend = factory.make_backend(cfg, api_key) if own else backend
    bar = progress(len(todo)) if progress is not None else None
    try:
        return run_sync(run_and_close(todo, backend, ledger, cfg, bar, own))
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()


def collect(requests: Sequence[TeacherRequest], ledger: Ledger) -> pa.Table:
    """The ledger rows of `requests`, in the dataset's question order (samples in order), each
    with the part its request plays in this run (a one-stage call is also a two-stage reasoning)."""
    ids = [r.request_id for r in requests]
    table = ledger.read(ids)
    position = {rid: i for i, rid in enumerate(ids)}
    got = table["request_id"].to_pylist()
    table = table.take(pa.array(sorted(range(len(got)), key=lambda k: position[got[k]]), type=pa.int64()))
    parts = {r.request_id: r.part for r in requests}
    at = table.schema.get_field_index("part")
    return table.set_column(at, "part", pa.array([parts[i] for i in table["request_id"].to_pylist()], pa.string()))


def answer_round(
    questions: pa.Table, cfg: TeacherConfig, reasoning: Sequence[TeacherRequest], ledger: Ledger
) -> list[TeacherRequest]:
    """Two-stage's answer requests for every reasoning the ledger holds a completion of."""
    table = ledger.read([r.request_id for r in reasoning])
    done = {
        rid: text
        for rid, text, err in zip(*(table.column(c).to_pylist() for c in ("request_id", "completion", "error")))
        if err is None and (text or "").strip()
    }
    return build_answer_requests(questions, cfg, reasoning, done)


def summarize(
    requests: Sequence[TeacherRequest], todo: Sequence[TeacherRequest], table: pa.Table, stats: RunStats
) -> dict[str, Any]:
    """The stage's summary: counts over the whole table, calls and cost of this run."""
    return {
        "requests": len(requests),
        "from_ledger": len(requests) - len(todo),
        "sent": stats.done,
        "calls": stats.calls,
        "retries": stats.retries,
        "errors": sum(1 for e in table.column("error").to_pylist() if e is not None),
        "tokens_in": sum(table.column("tokens_in").to_pylist()),
        "tokens_out": sum(table.column("tokens_out").to_pylist()),
        "cost_usd": round(sum(table.column("cost_usd").to_pylist()), 6),
        "cost_usd_this_run": round(stats.cost_usd, 6),
    }


def check_complete(cfg: TeacherConfig, table: pa.Table, stats: RunStats, summary: dict[str, Any]) -> None:
    """Raise `StageIncomplete` when the budget, a missing record or too many errors leave the
    table unfit to commit; warn about tolerated errors."""
    n, errors = summary["requests"], summary["errors"]
    if stats.budget_stopped:
        raise StageIncomplete(
            f"teacher: budget max_cost_usd={cfg.max_cost_usd} reached after ${summary['cost_usd']:.4f} "
            f"in total; {table.num_rows} of {n} requests recorded, {stats.not_sent} not "
            f"sent. Rerun with a larger teacher.max_cost_usd to continue."
        )
    if table.num_rows != n:
        raise StageIncomplete(f"teacher: {n - table.num_rows} of {n} requests have no record; rerun to continue")
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
    """Ask the teacher every missing request; return (teacher_calls, run stats, summary).

    `backend` defaults to `factory.make_backend(cfg, api_key)` (built only if something is
    missing); `progress(total)` makes a progress bar; `map_shards` runs `teacher.shards` shards
    where the orchestrator chose (shards.py; default: here, one after another). Raises
    `StageIncomplete` when the budget or the error threshold stops it (everything finished is in
    the ledger), `FatalTeacherError` on a request that can never succeed.
    """
    requests = build_requests(questions, cfg)
    check_requests(requests, cfg)
    ledger = open_ledger(store, cfg)
    todo = pending_requests(requests, ledger)
    stats = dispatch(todo, ledger, cfg, backend, progress, api_key, store, map_shards) if todo else RunStats()
    if cfg.protocol == "two_stage" and not stats.budget_stopped:
        # the second round is built from the first's ledgered reasoning, so a run killed between
        # the two resumes here with neither round's finished requests sent again
        answers = answer_round(questions, cfg, requests, ledger)
        todo2 = pending_requests(answers, ledger)
        round2 = dispatch(todo2, ledger, cfg, backend, progress, api_key, store, map_shards) if todo2 else RunStats()
        stats = merge_stats(stats, round2)
        requests, todo = [*requests, *answers], [*todo, *todo2]
    table = collect(requests, ledger)
    summary = summarize(requests, todo, table, stats)
    check_complete(cfg, table, stats, summary)
    return table, stats, summary
