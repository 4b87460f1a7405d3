"""The teacher stage: ask a teacher model for chain-of-thought rationales, paying once per request.

Every (question, sample index) becomes one `TeacherRequest` whose id hashes exactly what changes
the answer: backend, model, the rendered prompt (template name, version and text), the sampling
parameters, the question id and the sample index. Never the API key, the endpoint's URL, the
concurrency or the budget. Finished requests go to an append-only ledger shared by every stage
key, so
- a killed run resumes with only the requests the ledger lacks (at most one flush is lost),
- a changed temperature sends only the requests whose id changed,
- re-parsing downstream never calls the teacher again.

All pending requests run as asyncio inside this one stage call: `concurrency` workers, optional
requests/tokens-per-minute buckets, retries with jittered exponential backoff that honour
Retry-After, a cost budget checked before every request. The table `teacher_calls` is the ledger
rows of this key's request ids, one per id.

A request that still fails after its retries is recorded with `error` set; the stage commits
with those rows (the rationales stage skips them) unless more than `max_error_fraction` failed,
in which case it ends incomplete so that the rerun retries them (a success in the ledger always
wins over an earlier failure).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import pyarrow as pa

from storage.keys import code_version, digest, file_fingerprint, import_closure
from storage.ledger import Ledger
from storage.store import StageIncomplete, Store
from tasks.core.prompts import Exemplar, chat_as_text, get_template
from tasks.core.rate_limit import per_minute_bucket
from tasks.stages.contract import StageContext, StageSpec
from pydantic import Field

from tasks.config.base import KpodModel
from tasks.config.teacher import Price, TeacherConfig
from tasks.teacher_backends.base import (
    Backend,
    RetryableTeacherError,
    TeacherRequest,
    TeacherResult,
)

log = logging.getLogger("kpod.teacher")

LEDGER_NAME = "teacher"
_sleep = asyncio.sleep  # retry waits; tests replace it to observe delays without waiting
REQUEST_ID_VERSION = 1  # bump only if the request-id recipe itself changes
# each backend's module; its code version covers what it imports (storage.keys.import_closure)
BACKEND_MODULES: dict[str, str] = {
    "scripted": "tasks.teacher_backends.scripted",
    "openai": "tasks.teacher_backends.openai_backend",
    "replay": "tasks.teacher_backends.replay",
    "hf": "tasks.teacher_backends.hf",
}


# ---- requests ----------------------------------------------------------------------------
def backend_source(cfg: TeacherConfig) -> dict[str, Any]:
    """What identifies the backend's output beyond model and params, hashed into request ids.

    Free backends (scripted, replay, hf) include their code version and data, so editing the
    generator or the recorded file yields new rows; the paid `openai` backend includes nothing
    more (the endpoint URL and our client code never justify paying again).
    """
    if cfg.backend == "openai":
        return {}
    source: dict[str, Any] = {"code": code_version(import_closure(BACKEND_MODULES[cfg.backend]))}
    if cfg.backend == "scripted":
        source["error_rate"] = cfg.error_rate
    elif cfg.backend == "replay":
        if not os.path.isfile(str(cfg.replay_path)):
            raise ValueError(f"teacher.replay_path: no such file {cfg.replay_path!r}")
        source.update(file=file_fingerprint(str(cfg.replay_path)), format=cfg.replay_format)
    elif cfg.backend == "hf":
        source["model_dir"] = cfg.hf_model
    return source


def sampling_params(cfg: TeacherConfig, sample: int) -> dict[str, Any]:
    """The parameters sent with sample `sample` (seeded samples get seed + sample)."""
    return {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": cfg.max_tokens,
        "seed": None if cfg.seed is None else cfg.seed + sample,
        "stop": list(cfg.stop),
    }


def build_requests(questions: pa.Table, cfg: TeacherConfig) -> list[TeacherRequest]:
    """One request per (question in `cfg.splits`, sample index), in question order."""
    template = get_template(cfg.template)
    exemplars = [Exemplar(e.question, e.rationale, e.answer) for e in cfg.exemplars]
    source = backend_source(cfg)
    cols = questions.select(["question_id", "split", "question", "meta"]).to_pydict()
    wanted = set(cfg.splits)
    out: list[TeacherRequest] = []
    for qid, split, text, meta in zip(cols["question_id"], cols["split"], cols["question"], cols["meta"]):
        if split not in wanted:
            continue
        if not text:
            raise ValueError(f"questions: row {qid!r} has an empty question")
        rendered = template.render(text, exemplars, cfg.system_prompt)
        body = {"messages": list(rendered.messages)} if cfg.api == "chat" else {"prompt": rendered.prompt}
        prompt = chat_as_text(rendered.messages) if cfg.api == "chat" else rendered.prompt
        for sample in range(cfg.samples):
            params = sampling_params(cfg, sample)
            rid = digest(
                {
                    "v": REQUEST_ID_VERSION,
                    "backend": cfg.backend,
                    "source": source,
                    "model": cfg.model,
                    "api": cfg.api,
                    "template": [template.name, template.version],
                    **body,
                    "params": params,
                    "n": cfg.samples if cfg.use_n else 1,
                    # two questions with the same text are still two rows of the table
                    "question_id": qid,
                    "sample": sample,
                },
                length=24,
            )
            out.append(
                TeacherRequest(rid, qid, sample, rendered.messages, prompt, cfg.model, params, meta or "{}")
            )
    return out


# ---- running requests --------------------------------------------------------------------
@dataclass
class RunStats:
    total: int = 0  # requests handed to run_requests
    done: int = 0  # recorded in the ledger (success or failure)
    ok: int = 0
    failed: int = 0
    calls: int = 0  # backend calls, retries and n-calls included
    retries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    budget_stopped: bool = False
    not_sent: int = 0  # left unsent by the budget stop
    seconds: float = 0.0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def estimate_prompt_tokens(request: TeacherRequest) -> int:
    """A provider-neutral upper-ish guess (4 characters a token, plus per-message overhead)."""
    return math.ceil(len(request.prompt) / 4) + 4 * len(request.messages)


def request_cost(price: Price | None, tokens_in: float, tokens_out: float) -> float:
    if price is None:
        return 0.0
    return (tokens_in * price.input_per_1k + tokens_out * price.output_per_1k) / 1000.0


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None, u: float) -> float:
    """Delay before retry number `attempt` (0-based): base * 2**attempt capped, times a jitter
    in [0.5, 1) drawn from `u` in [0, 1), and never shorter than the server's Retry-After."""
    delay = min(cap, base * (2.0**attempt)) * (0.5 + 0.5 * u)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _record(req: TeacherRequest, res: TeacherResult, cost: float) -> dict[str, Any]:
    return {
        "request_id": req.request_id,
        "question_id": req.question_id,
        "sample": req.sample,
        "prompt": req.prompt,
        "completion": res.completion,
        "model": req.model,
        "finish_reason": res.finish_reason,
        "tokens_in": int(res.tokens_in),
        "tokens_out": int(res.tokens_out),
        "cost_usd": float(cost),
        "latency_s": float(res.latency_s),
        "error": res.error,
        "finished_at": _utcnow(),
    }


class _Limits:
    """Optional RPM and TPM buckets; a call takes one request and its token estimate."""

    def __init__(self, cfg: TeacherConfig, largest_tokens: int):
        self.rpm = per_minute_bucket(cfg.rpm) if cfg.rpm else None
        self.tpm = per_minute_bucket(cfg.tpm, largest_tokens) if cfg.tpm else None

    async def acquire(self, tokens: int) -> None:
        if self.rpm is not None:
            await self.rpm.acquire(1)
        if self.tpm is not None:
            await self.tpm.acquire(tokens)


async def run_requests(
    requests: Sequence[TeacherRequest],
    backend: Backend,
    ledger: Ledger,
    cfg: TeacherConfig,
    progress: Any | None = None,
) -> RunStats:
    """Send `requests` (all assumed missing from the ledger) and append each result as it ends.

    Returns the run's statistics; `stats.budget_stopped` says the budget left some unsent.
    Raises `FatalTeacherError` at the first request that can never succeed (after flushing
    what finished). `progress` is anything with `update(n)` and `set_postfix(**kw)` (tqdm).
    The ledger is flushed before returning or raising.
    """
    stats = RunStats(total=len(requests))
    price = cfg.prices.get(cfg.model)
    grouped = cfg.use_n and cfg.samples > 1 and hasattr(backend, "complete_n")
    queue: collections.deque[list[TeacherRequest]] = collections.deque()
    if grouped:
        by_q: dict[str, list[TeacherRequest]] = {}
        for r in requests:
            by_q.setdefault(r.question_id, []).append(r)
        queue.extend(by_q.values())
    else:
        queue.extend([r] for r in requests)
    largest = max((estimate_prompt_tokens(r) for r in requests), default=0) + cfg.max_tokens * (
        cfg.samples if grouped else 1
    )
    limits = _Limits(cfg, largest)
    jitter = random.Random()
    # Ledger writes (a Parquet part and an fsync every flush) run on one thread of their own,
    # in order, so a flush never stalls the requests in flight on the event loop.
    loop = asyncio.get_running_loop()
    writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kpod-ledger")
    last_write: asyncio.Future | None = None
    write_errors: list[BaseException] = []

    def append(record: dict[str, Any]) -> None:
        nonlocal last_write
        if write_errors:
            raise write_errors[0]
        last_write = loop.run_in_executor(writer, ledger.append, record)
        last_write.add_done_callback(
            lambda f: write_errors.append(f.exception()) if not f.cancelled() and f.exception() else None
        )
    reserved = 0.0  # estimated cost of calls in flight
    stop = False
    t_start = time.monotonic()

    def finish(unit: Sequence[TeacherRequest], results: Sequence[TeacherResult]) -> None:
        n = len(results)
        for req, res in zip(unit, results):
            # one n-call bills its prompt once: each choice carries an equal share of it
            cost = request_cost(price, res.tokens_in / n, res.tokens_out)
            append(_record(req, res, cost))
            stats.done += 1
            stats.tokens_in += int(res.tokens_in / n) if n > 1 else int(res.tokens_in)
            stats.tokens_out += int(res.tokens_out)
            stats.cost_usd += cost
            if res.error is None:
                stats.ok += 1
            else:
                stats.failed += 1
                stats.last_error = res.error
        if progress is not None:
            elapsed = max(time.monotonic() - t_start, 1e-9)
            progress.update(n)
            progress.set_postfix(
                req_s=f"{stats.done / elapsed:.1f}",
                tok=stats.tokens_in + stats.tokens_out,
                cost=f"${stats.cost_usd:.4f}",
                err=stats.failed,
            )

    async def call(unit: list[TeacherRequest]) -> list[TeacherResult]:
        t0 = time.monotonic()
        if len(unit) > 1:
            results = list(await backend.complete_n(unit[0], len(unit)))[: len(unit)]  # type: ignore[attr-defined]
            if not results:
                raise RetryableTeacherError("the server returned no choices")
        else:
            results = [await backend.complete(unit[0])]
        took = time.monotonic() - t0
        for res in results:
            if not res.latency_s:
                res.latency_s = took
        return results

    async def worker() -> None:
        nonlocal reserved, stop
        while queue and not stop:
            unit = queue.popleft()
            tokens = estimate_prompt_tokens(unit[0]) + cfg.max_tokens * len(unit)
            estimate = request_cost(price, estimate_prompt_tokens(unit[0]), cfg.max_tokens * len(unit))
            if cfg.max_cost_usd is not None and stats.cost_usd + reserved + estimate > cfg.max_cost_usd:
                stop = True  # no new requests; those in flight finish and are recorded
                queue.appendleft(unit)
                stats.budget_stopped = True
                return
            reserved += estimate
            try:
                results: list[TeacherResult] | None = None
                for attempt in range(cfg.max_retries + 1):
                    await limits.acquire(tokens)
                    stats.calls += 1
                    try:
                        results = await call(unit)
                        break
                    except RetryableTeacherError as exc:
                        if attempt == cfg.max_retries:
                            msg = f"gave up after {attempt + 1} attempts: {exc}"
                            results = [TeacherResult(None, error=msg) for _ in unit]
                            break
                        stats.retries += 1
                        delay = backoff_delay(attempt, cfg.backoff_s, cfg.backoff_max_s, exc.retry_after, jitter.random())
                        log.debug("teacher: %s retry %d in %.2fs: %s", unit[0].request_id, attempt + 1, delay, exc)
                        await _sleep(delay)
            finally:
                reserved -= estimate
            assert results is not None
            finish(unit[: len(results)], results)
            if len(results) < len(unit):  # the server ignored `n`: the rest go one by one
                queue.extend([r] for r in unit[len(results):])

    n_workers = max(1, min(cfg.concurrency, len(queue)))
    tasks = [asyncio.create_task(worker()) for _ in range(n_workers)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        if last_write is not None:  # the writer runs in order: the last append means all
            await asyncio.gather(last_write, return_exceptions=True)
        writer.shutdown(wait=True)
        ledger.flush()
        stats.seconds = time.monotonic() - t_start
    if write_errors:
        raise write_errors[0]
    stats.not_sent = sum(len(u) for u in queue)
    return stats


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, even where a loop is already running
    (a Prefect task or a notebook): then it runs on a fresh loop in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# ---- backends ----------------------------------------------------------------------------
def make_backend(cfg: TeacherConfig, api_key: str | None = None) -> Backend:
    """The configured backend; each backend module is imported only when chosen.

    `api_key`: a key the orchestrator looked up (a Prefect Secret block named by
    `teacher.api_key_block`, see flows/secrets.py); without it the openai backend reads the
    environment variable named by `teacher.api_key_env`."""
    if cfg.backend == "scripted":
        from tasks.teacher_backends import scripted

        return scripted.make_backend(cfg)
    if cfg.backend == "openai":
        from tasks.teacher_backends import openai_backend

        return openai_backend.make_backend(cfg, api_key=api_key)
    if cfg.backend == "replay":
        from tasks.teacher_backends import replay

        return replay.make_backend(cfg)
    if cfg.backend == "hf":
        from tasks.teacher_backends import hf

        return hf.make_backend(cfg)
    raise ValueError(f"teacher.backend: unknown backend {cfg.backend!r}")


# ---- the stage core ----------------------------------------------------------------------
def open_ledger(store: Store, cfg: TeacherConfig) -> Ledger:
    return Ledger(store, LEDGER_NAME, "teacher_calls", "request_id", cfg.flush_every, cfg.flush_seconds)


def pending_requests(requests: Sequence[TeacherRequest], ledger: Ledger) -> list[TeacherRequest]:
    """The requests without a successful ledger record (never sent, or failed before)."""
    have = ledger.read([r.request_id for r in requests])
    ok = {
        rid
        for rid, err in zip(have.column("request_id").to_pylist(), have.column("error").to_pylist())
        if err is None
    }
    return [r for r in requests if r.request_id not in ok]


def teach(
    questions: pa.Table,
    cfg: TeacherConfig,
    store: Store,
    backend: Backend | None = None,
    progress: Callable[[int], Any] | None = None,
    api_key: str | None = None,
) -> tuple[pa.Table, RunStats, dict[str, Any]]:
    """Ask the teacher every missing request; return (teacher_calls, run stats, summary).

    `backend` defaults to `make_backend(cfg, api_key)` (built only if something is missing);
    `progress(total)` makes a progress bar. Raises `StageIncomplete` when the budget or the
    error threshold stops it (everything finished is in the ledger), `FatalTeacherError` on a
    request that can never succeed.
    """
    requests = build_requests(questions, cfg)
    if not requests:
        raise ValueError(f"teacher: the dataset has no questions in splits {cfg.splits} (teacher.splits)")
    ids = [r.request_id for r in requests]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(r.question_id for r in requests if r.request_id in seen or seen.add(r.request_id))
        raise ValueError(f"questions: question_id {dup!r} appears more than once")
    ledger = open_ledger(store, cfg)
    todo = pending_requests(requests, ledger)
    stats = RunStats()
    if todo:
        if cfg.max_cost_usd is not None and cfg.model not in cfg.prices:
            raise ValueError(
                f"teacher.max_cost_usd is set but teacher.prices has no entry for model {cfg.model!r}"
            )
        own = backend is None
        backend = make_backend(cfg, api_key) if own else backend
        bar = progress(len(todo)) if progress is not None else None
        try:
            stats = run_sync(_run_and_close(todo, backend, ledger, cfg, bar, own))
        finally:
            if bar is not None and hasattr(bar, "close"):
                bar.close()
    table = ledger.read(ids)
    # rows in the dataset's question order, samples in order within a question
    position = {rid: i for i, rid in enumerate(ids)}
    got = table["request_id"].to_pylist()
    table = table.take(pa.array(sorted(range(len(got)), key=lambda k: position[got[k]]), type=pa.int64()))
    errors = sum(1 for e in table.column("error").to_pylist() if e is not None)
    summary = {
        "requests": len(requests),
        "from_ledger": len(requests) - len(todo),
        "sent": stats.done,
        "calls": stats.calls,
        "retries": stats.retries,
        "errors": errors,
        "tokens_in": sum(table.column("tokens_in").to_pylist()),
        "tokens_out": sum(table.column("tokens_out").to_pylist()),
        "cost_usd": round(sum(table.column("cost_usd").to_pylist()), 6),
        "cost_usd_this_run": round(stats.cost_usd, 6),
    }
    if stats.budget_stopped:
        raise StageIncomplete(
            f"teacher: budget max_cost_usd={cfg.max_cost_usd} reached after ${summary['cost_usd']:.4f} "
            f"in total; {table.num_rows} of {len(requests)} requests recorded, {stats.not_sent} not "
            f"sent. Rerun with a larger teacher.max_cost_usd to continue."
        )
    if table.num_rows != len(requests):
        raise StageIncomplete(
            f"teacher: {len(requests) - table.num_rows} of {len(requests)} requests have no record; rerun to continue"
        )
    if errors > cfg.max_error_fraction * len(requests):
        last = stats.last_error or "see teacher_calls.error in the ledger"
        raise StageIncomplete(
            f"teacher: {errors} of {len(requests)} requests failed after retries (more than "
            f"max_error_fraction={cfg.max_error_fraction}); last error: {last}. Rerun to retry them."
        )
    if errors:
        log.warning(
            "teacher: %d of %d requests failed after retries; recorded with error set "
            "(rationales skips them; rerun the stage with --force teacher to retry them)",
            errors,
            len(requests),
        )
    return table, stats, summary


async def _run_and_close(
    todo: Sequence[TeacherRequest], backend: Backend, ledger: Ledger, cfg: TeacherConfig, bar: Any, own: bool
) -> RunStats:
    try:
        return await run_requests(todo, backend, ledger, cfg, bar)
    finally:
        if own:
            await backend.aclose()


def run(ctx: StageContext) -> None:
    cfg: TeacherConfig = ctx.inputs.teacher
    questions = ctx.table("dataset", "questions", columns=["question_id", "split", "question", "meta"])
    table, _, summary = teach(
        questions,
        cfg,
        ctx.store,
        progress=lambda total: ctx.progress(total=total, desc="teacher", unit="req"),
        api_key=ctx.runtime.get("api_key"),
    )
    ctx.write_table("teacher_calls", table)
    ctx.summary.update(summary)


class TeacherInputs(KpodModel):
    teacher: TeacherConfig = Field(description="The teacher section (runtime fields excluded from the key).")
    source: dict[str, Any] = Field(
        description="What identifies a free backend's output: its code version and data (a replay file's sha256)."
    )


SPEC = StageSpec(
    name="teacher",
    run=run,
    inputs=lambda cfg: TeacherInputs(teacher=cfg.teacher, source=backend_source(cfg.teacher)),
    upstream=lambda cfg: ("dataset",),
    description="Ask the teacher for rationales (ledgered, resumable, budgeted).",
)
