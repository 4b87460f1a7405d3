"""The openai backend's requests sent through the Batch API (`teacher.backend: openai_batch`).

Same requests, ids and ledger rows as the online `openai` backend, so a batch run and an online
run of one config share the ledger: each pending request becomes one JSONL line (`custom_id` =
its request id, `body` = what the online backend would send), the lines are packed into input
files within `teacher.batch_max_requests` / `batch_max_bytes`, uploaded with the files API and
run as batches; their output and error files are read back into the ledger as online results
are. The price is `teacher.prices` times `teacher.batch_discount`.

Reattach, not resubmit. Every submission is recorded in a side ledger (`teacher_batches`, one
fsynced Parquet part per record, never the key) in two steps:
1. `uploaded`: the input file id and the request ids it holds, written *before* the batch is
   created, so no batch can exist whose input file is not on record;
2. `submitted`: the batch id, once `batches.create` answered.
A rerun polls the open records' batches instead of sending their requests again. A record
killed between the two steps is resolved by listing the endpoint's batches for its input file
(the batch was created) or by creating the batch from the recorded file (it was not): either
way no request is paid twice. When its batch has ended and its results are in the ledger, a
record is closed (`collected`, or `failed`/`lost`), and its failed or expired requests are then
pending like any failed online request: the next run sends only them.

The run does not hold its requests. It reads them once for their ids, then packs input files as
it reads them again (only the file being filled is held), and writes each submission's requests
to a file beside its record (`teacher_batches/requests/<chunk>.jsonl`, fsynced before the record
names it), from which they are read back when the batch's results come in, this run or a later
one; a closed record's file is removed.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import openai

from storage.ledger import Ledger
from storage.store import StageIncomplete, Store
from tasks.config.teacher import Price, TeacherConfig
from tasks.teacher_backends.base import (
    FatalTeacherError,
    TeacherInputError,
    TeacherRequest,
    TeacherResult,
)
from tasks.teacher_backends.dispatcher import (
    RunStats,
    backoff_delay,
    estimate_prompt_tokens,
    ledger_record,
    request_cost,
)
from tasks.teacher_backends.logprobs import parse as parse_logprobs
from tasks.teacher_backends.openai_backend import (
    NO_KEY,
    RETRYABLE_STATUS,
    api_key_for,
    choice_error,
    request_body,  # one choice per line: the online backend's body (samples are lines of their own)
    retry_after_seconds,
    scrub_secret,
)
from tasks.teacher_backends.request_files import read_requests, write_requests

log = logging.getLogger("kpod.teacher")

RECORDS = "teacher_batches"  # the side ledger (and its table) of submitted batches
OPEN = ("uploaded", "submitted")  # a record whose batch may still hold unledgered results
TERMINAL = ("completed", "failed", "expired", "cancelled")
COMPLETION_WINDOW = "24h"  # the only window the API offers
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

_sleep = time.sleep  # poll and retry waits; tests may replace it


# ---- pure parts: lines, packing, budget, parsing ------------------------------------------
def batch_price(cfg: TeacherConfig) -> Price | None:
    """The configured price of `cfg.model` at the batch discount (None: no price configured)."""
    price = cfg.prices.get(cfg.model)
    if price is None:
        return None
    d = cfg.batch_discount
    return Price(input_per_1k=price.input_per_1k * d, output_per_1k=price.output_per_1k * d)


def jsonl_line(req: TeacherRequest, api: str) -> bytes:
    line = {"custom_id": req.request_id, "method": "POST", "url": ENDPOINTS[api], "body": request_body(req, api)}
    return (json.dumps(line, ensure_ascii=False) + "\n").encode()


def pack(
    requests: Iterable[TeacherRequest], api: str, max_requests: int, max_bytes: int
) -> Iterator[tuple[list[TeacherRequest], bytes]]:
    """The requests as input files, in order, each within both caps; drawn lazily, so only the
    file being filled is held."""
    reqs: list[TeacherRequest] = []
    lines: list[bytes] = []
    size = 0
    for req in requests:
        line = jsonl_line(req, api)
        if len(line) > max_bytes:
            raise TeacherInputError(
                f"teacher: request {req.request_id} (question {req.question_id!r}) is {len(line)} bytes as a "
                f"batch line, more than teacher.batch_max_bytes={max_bytes}"
            )
        if reqs and (len(reqs) >= max_requests or size + len(line) > max_bytes):
            yield reqs, b"".join(lines)
            reqs, lines, size = [], [], 0
        reqs.append(req)
        lines.append(line)
        size += len(line)
    if reqs:
        yield reqs, b"".join(lines)


def estimated_cost(req: TeacherRequest, price: Price | None, cfg: TeacherConfig) -> float:
    """The dispatcher's estimate: the prompt guess plus the whole completion cap."""
    return request_cost(price, estimate_prompt_tokens(req), req.params.get("max_tokens", cfg.max_tokens))


class WithinBudget:
    """The leading part of `fresh` whose estimated cost, after `reserved` (what the batches in
    flight may still cost), fits `max_cost_usd`, drawn lazily; once drawn through, `not_sent`
    is how many were left out."""

    def __init__(self, fresh: Iterable[TeacherRequest], reserved: float, price: Price | None, cfg: TeacherConfig):
        self.fresh, self.reserved, self.price, self.cfg = fresh, reserved, price, cfg
        self.not_sent = 0

    def __iter__(self) -> Iterator[TeacherRequest]:
        it = iter(self.fresh)
        if self.cfg.max_cost_usd is None:
            yield from it
            return
        reserved = self.reserved
        for req in it:
            cost = estimated_cost(req, self.price, self.cfg)
            if reserved + cost > self.cfg.max_cost_usd:
                self.not_sent = 1 + sum(1 for _ in it)
                return
            reserved += cost
            yield req


def result_from_body(body: Any, req: TeacherRequest, api: str, latency: float) -> TeacherResult:
    """A 200 line's response body as the online backend reads a response (one choice)."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        return TeacherResult(None, latency_s=latency, error="malformed response: no choices")
    choice = min(choices, key=lambda c: c.get("index") or 0)
    text = (choice.get("message") or {}).get("content") if api == "chat" else choice.get("text")
    reason = choice.get("finish_reason")
    usage = body.get("usage") or {}
    tokens_in = usage.get("prompt_tokens")
    tokens_out = usage.get("completion_tokens")
    if tokens_in is None:  # as online: estimate, so cost and budget still work
        tokens_in = math.ceil(len(req.prompt) / 4)
    if tokens_out is None:
        tokens_out = math.ceil(len(text or "") / 4)
    error = choice_error(text, reason)
    logprobs = parse_logprobs(choice, api) if "top_logprobs" in req.params else None
    return TeacherResult(text if text else None, reason, int(tokens_in), int(tokens_out), latency, error,
                         logprobs=logprobs)


def line_error(line: dict[str, Any]) -> str:
    """Why an error-file line failed: its `error` (batch_expired, ...) or its non-200 response."""
    err = line.get("error")
    if err:
        return f"{err.get('code') or 'error'}: {err.get('message') or ''}".strip()
    resp = line.get("response") or {}
    body = resp.get("body")
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else body
    return f"HTTP {resp.get('status_code')}: {message}"


# ---- the submitted-batch record -----------------------------------------------------------
class BatchRecords:
    """The `teacher_batches` side ledger: one row per change of a submission, the last one
    counting; each row is its own fsynced part, written before the step it guards goes on."""

    def __init__(self, store: Store):
        self.ledger = Ledger(store, RECORDS, RECORDS, "chunk_id", flush_every=1, flush_seconds=0.0)
        self.requests_dir = store.ledger_dir(RECORDS) / "requests"  # a submission's requests, by chunk id

    def requests_path(self, record: dict[str, Any]) -> Path:
        return self.requests_dir / f"{record['chunk_id']}.jsonl"

    def new(self, where: str, url: str, requests: Sequence[TeacherRequest]) -> dict[str, Any]:
        return {"chunk_id": uuid.uuid4().hex, "endpoint": where, "url": url, "input_file_id": None,
                "batch_id": None, "status": "new", "request_ids": [r.request_id for r in requests],
                "recorded_at": None}

    def write(self, record: dict[str, Any], **changes: Any) -> dict[str, Any]:
        row = {**record, **changes, "recorded_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        self.ledger.append(row)  # flush_every=1: on disk before this returns
        if row["status"] not in OPEN and row["status"] != "new":  # closed: its requests are not needed again
            self.requests_path(row).unlink(missing_ok=True)
        return row

    def prune(self) -> None:
        """Remove the request files of chunks with no open record (a kill before the upload was
        recorded leaves one). A concurrent run whose file goes this way still collects its
        batch, from a pass over its requests (`BatchRun.requests_of`)."""
        rows = self.ledger.read(ok_column=None)
        keep = {c for c, st in zip(rows["chunk_id"].to_pylist(), rows["status"].to_pylist()) if st in OPEN}
        for path in self.requests_dir.glob("*.jsonl"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)

    def open_at(self, where: str) -> list[dict[str, Any]]:
        """The open records of batches at endpoint `where`, oldest first."""
        rows = self.ledger.read(ok_column=None).to_pylist()
        rows = [r for r in rows if r["status"] in OPEN and r["endpoint"] == where]
        return sorted(rows, key=lambda r: r["recorded_at"])


# ---- the run ------------------------------------------------------------------------------
class BatchRun:
    """One run's batches: reattach the recorded ones, submit the rest, wait, ledger the results.

    `todo`: the requests without a successful ledger record, a sized re-iterable (read once for
    their ids, then again as files are packed; never held whole); `bar`: anything with
    `update(n)` and `set_postfix(**kw)` (tqdm), or None. A submitted batch's requests are found
    again, when its results come back, from the file written beside its record."""

    def __init__(self, todo: Iterable[TeacherRequest], ledger: Ledger, records: BatchRecords, cfg: TeacherConfig,
                 client: Any, where: str, secret: str | None, bar: Any = None):
        self.todo = todo
        self.pending = {r.request_id for r in todo}  # ids only
        self.ledger, self.records, self.cfg, self.client = ledger, records, cfg, client
        self.where, self.secret, self.bar = where, secret, bar
        self.url = ENDPOINTS[cfg.api]
        self.price = batch_price(cfg)
        self.stats = RunStats(total=len(self.pending))
        self.live: dict[str, tuple[dict[str, Any], Any]] = {}  # batch id -> (record, last Batch seen)
        self.counted: dict[str, int] = {}  # batch id -> its lines that have ended
        self.shown = 0  # lines the bar shows done
        self._tried_create: set[str] = set()  # input files a create was sent for
        self._jitter = random.Random()

    def run(self) -> RunStats:
        t0 = time.monotonic()
        self.reattach()
        self.records.prune()
        in_flight = {rid for rec, _ in self.live.values() for rid in rec["request_ids"]}
        reserved = 0.0
        if self.cfg.max_cost_usd is not None:  # what the batches in flight may still cost
            reserved = sum(estimated_cost(r, self.price, self.cfg)
                           for rec, _ in self.live.values() for r in self.requests_of(rec).values())
        fresh = (r for r in self.todo if r.request_id not in in_flight)
        send = WithinBudget(fresh, reserved, self.price, self.cfg)
        for reqs, data in pack(send, self.cfg.api, self.cfg.batch_max_requests, self.cfg.batch_max_bytes):
            self.submit(reqs, data)
        self.stats.not_sent = send.not_sent
        self.stats.budget_stopped = send.not_sent > 0
        self.wait()
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def requests_of(self, record: dict[str, Any]) -> dict[str, TeacherRequest]:
        """This run's pending requests in a record's batch, by id: read from the file written at
        submission (a record from before those files: found by a pass over the run's requests)."""
        wanted = {rid for rid in record["request_ids"] if rid in self.pending}
        path = self.records.requests_path(record)
        source = read_requests(path) if path.exists() else iter(self.todo)
        return {r.request_id: r for r in source if r.request_id in wanted}

    # ---- the API, with the stage's retries
    def api(self, what: str, fn: Callable[..., Any], *args: Any, missing_ok: bool = False, **kw: Any) -> Any:
        """`fn(*args, **kw)`, retried like an online request; a 404 gives None when `missing_ok`.
        A refusal that retrying cannot fix is a `FatalTeacherError`; transient failures past
        `max_retries` end the stage incomplete (a rerun reattaches)."""
        cfg = self.cfg
        for attempt in range(cfg.max_retries + 1):
            retry_after = None
            try:
                return fn(*args, **kw)
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status == 404 and missing_ok:
                    return None
                last = f"HTTP {status}: {scrub_secret(str(exc.message), self.secret)[:300]}"
                if status not in RETRYABLE_STATUS and status < 500:
                    raise FatalTeacherError(f"teacher: {what} at {self.where} was refused with {last}") from None
                retry_after = retry_after_seconds(exc.response.headers)
            except openai.APIConnectionError as exc:
                last = f"{type(exc).__name__}: {scrub_secret(str(exc), self.secret)[:300]}"
            if attempt < cfg.max_retries:
                _sleep(backoff_delay(attempt, cfg.backoff_s, cfg.backoff_max_s, retry_after, self._jitter.random()))
        raise StageIncomplete(
            f"teacher: {what} at {self.where} still failed after {cfg.max_retries + 1} attempts ({last}); "
            "rerun to continue (submitted batches are reattached, not sent again)"
        )

    def _create(self, file_id: str) -> Any:
        # a create whose answer was lost (a timeout, a kill) may have made the batch: look first
        if file_id in self._tried_create:
            found = next((b for b in self.client.batches.list(limit=100) if b.input_file_id == file_id), None)
            if found is not None:
                return found
        self._tried_create.add(file_id)
        return self.client.batches.create(input_file_id=file_id, endpoint=self.url, completion_window=COMPLETION_WINDOW)

    # ---- submit and reattach
    def submit(self, reqs: list[TeacherRequest], data: bytes) -> None:
        """Upload one input file and create its batch, recording each step before the next."""
        record = self.records.new(self.where, self.url, reqs)
        write_requests(self.records.requests_path(record), reqs)  # on disk before the record names it
        name = f"kpod-{record['chunk_id']}.jsonl"
        f = self.api("uploading a batch input file", self.client.files.create, file=(name, data), purpose="batch")
        record = self.records.write(record, input_file_id=f.id, status="uploaded")
        batch = self.api("creating a batch", self._create, f.id)
        record = self.records.write(record, batch_id=batch.id, status="submitted")
        self.live[batch.id] = (record, batch)
        self.stats.calls += len(reqs)
        log.info("teacher: submitted batch %s (%d requests, input file %s)", batch.id, len(reqs), f.id)

    def reattach(self) -> None:
        """Follow every open record at this endpoint that holds a request of this run."""
        for record in self.records.open_at(self.where):
            if not any(rid in self.pending for rid in record["request_ids"]):
                continue  # another config's requests: its own run reattaches them
            batch = self.resolve(record)
            if batch is None:
                self.records.write(record, status="lost")
                log.warning("teacher: batch of input file %s is gone from %s; its requests are sent again",
                            record["input_file_id"], self.where)
                continue
            if record["batch_id"] != batch.id:
                record = self.records.write(record, batch_id=batch.id, status="submitted")
            self.live[batch.id] = (record, batch)
            log.info("teacher: reattached to batch %s (%s, %d requests)", batch.id, batch.status,
                     len(record["request_ids"]))

    def resolve(self, record: dict[str, Any]) -> Any:
        """The batch of an open record; None when the endpoint no longer has it (or its file)."""
        if record["batch_id"]:
            return self.api(f"retrieving batch {record['batch_id']}", self.client.batches.retrieve,
                            record["batch_id"], missing_ok=True)
        # killed after the upload was recorded and before the batch id was: the batch may exist
        self._tried_create.add(record["input_file_id"])
        return self.api("creating a batch", self._create, record["input_file_id"], missing_ok=True)

    # ---- wait and collect
    def wait(self) -> None:
        """Poll until every live batch has ended, ledgering each one's results as it ends."""
        wait_s = self.cfg.batch_wait_s
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while self.live:
            for bid in list(self.live):
                record, _ = self.live[bid]
                batch = self.api(f"retrieving batch {bid}", self.client.batches.retrieve, bid, missing_ok=True)
                if batch is None:
                    del self.live[bid]
                    self.records.write(record, status="lost")
                    log.warning("teacher: batch %s is gone from %s; rerun to send its requests again", bid, self.where)
                    continue
                if batch.status != self.live[bid][1].status:
                    counts = batch.request_counts
                    log.info("teacher: batch %s %s (%s of %s done, %s failed)", bid, batch.status,
                             counts.completed if counts else "?", counts.total if counts else "?",
                             counts.failed if counts else "?")
                self.live[bid] = (record, batch)
                self.show()
                if batch.status in TERMINAL:
                    del self.live[bid]
                    self.finish(record, batch)
            if self.live and deadline is not None and time.monotonic() > deadline:
                raise StageIncomplete(
                    f"teacher: {len(self.live)} batch(es) still running after teacher.batch_wait_s={wait_s}; "
                    "rerun to reattach to them (nothing is sent again)"
                )
            if self.live:
                _sleep(self.cfg.batch_poll_s)

    def finish(self, record: dict[str, Any], batch: Any) -> None:
        """Ledger an ended batch's results; a batch that failed as a whole stops the run."""
        if batch.status == "failed":
            self.records.write(record, status="failed")  # its requests are pending again
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            why = "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in errors[:3])
            why = scrub_secret(why or "no reason given", self.secret)
            raise FatalTeacherError(f"teacher: batch {batch.id} at {self.where} failed as a whole: {why}")
        n = self.collect(record, batch)
        self.ledger.flush()  # the results are on disk before the record says so
        self.records.write(record, status="collected")
        log.info("teacher: batch %s %s: %d results ledgered", batch.id, batch.status, n)

    def read_file(self, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        content = self.api(f"downloading file {file_id}", self.client.files.content, file_id)
        return [json.loads(line) for line in content.text.splitlines() if line.strip()]

    def collect(self, record: dict[str, Any], batch: Any) -> int:
        """Append a result for each of this run's pending requests in `batch`: its output line,
        its error line, or (neither) an error saying the batch ended without it."""
        ended = next((t for t in (batch.completed_at, batch.expired_at, batch.cancelled_at) if t), None)
        latency = float(max(0, (ended or time.time()) - batch.created_at))  # queue and run time
        results: dict[str, TeacherResult] = {}
        todo = self.requests_of(record)
        for line in self.read_file(batch.output_file_id) + self.read_file(batch.error_file_id):
            rid = str(line.get("custom_id"))
            req = todo.get(rid)
            if req is None or rid in results:
                continue  # not this run's (another config's, or already ledgered) or a repeat
            resp = line.get("response") or {}
            if not line.get("error") and resp.get("status_code") == 200:
                results[rid] = result_from_body(resp.get("body"), req, self.cfg.api, latency)
            else:
                error = scrub_secret(line_error(line), self.secret)[:300]
                results[rid] = TeacherResult(None, latency_s=latency, error=f"batch {batch.id}: {error}")
        for rid in record["request_ids"]:
            if rid in todo and rid not in results:
                results[rid] = TeacherResult(None, latency_s=latency,
                                             error=f"batch {batch.id} ended {batch.status} without a result")
        for rid, res in results.items():
            cost = request_cost(self.price, res.tokens_in, res.tokens_out)
            self.ledger.append(ledger_record(todo[rid], res, cost))
            self.stats.add(res, cost, 1)
        self.counted[batch.id] = len(results)
        self.show()
        return len(results)

    def show(self) -> None:
        """The bar: lines ended over all batches (request_counts), and how many batches are in
        each state."""
        if self.bar is None:
            return
        for bid, (_, batch) in self.live.items():
            counts = getattr(batch, "request_counts", None)
            self.counted[bid] = (counts.completed + counts.failed) if counts else 0
        done = min(sum(self.counted.values()), self.stats.total)
        self.bar.update(done - self.shown)
        self.shown = done
        states: dict[str, int] = {}
        for _, batch in self.live.values():
            states[batch.status] = states.get(batch.status, 0) + 1
        self.bar.set_postfix(
            batches=" ".join(f"{s}:{n}" for s, n in sorted(states.items())) or "none running",
            ok=self.stats.ok, err=self.stats.failed, cost=f"${self.stats.cost_usd:.4f}",
        )


def make_client(cfg: TeacherConfig, api_key: str | None = None) -> tuple[openai.OpenAI, str, str | None]:
    """The client, where it points (for records and messages), and the key (to scrub errors).
    The key is looked up as the online backend does: passed in, else `teacher.api_key_env`."""
    api_key = api_key_for(cfg, api_key)
    client = openai.OpenAI(
        api_key=api_key or NO_KEY, base_url=cfg.base_url, max_retries=0, timeout=cfg.request_timeout_s
    )
    return client, cfg.base_url or "api.openai.com", api_key


def run_batches(
    todo: Iterable[TeacherRequest],
    ledger: Ledger,
    store: Store,
    cfg: TeacherConfig,
    progress: Callable[[int], Any] | None = None,
    api_key: str | None = None,
) -> RunStats:
    """Send `todo` (requests without a successful ledger record) through the Batch API and
    ledger every result; see the module docstring. Raises `FatalTeacherError` when a batch fails
    as a whole, `StageIncomplete` when `batch_wait_s` runs out (a rerun reattaches)."""
    client, where, secret = make_client(cfg, api_key)
    run = None
    try:
        run = BatchRun(todo, ledger, BatchRecords(store), cfg, client, where, secret)
        run.bar = progress(run.stats.total) if progress is not None else None
        return run.run()
    finally:
        ledger.flush()
        client.close()
        if run is not None and run.bar is not None and hasattr(run.bar, "close"):
            run.bar.close()
