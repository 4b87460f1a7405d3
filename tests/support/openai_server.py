"""A real OpenAI-compatible HTTP server for tests, with faults a test injects per request.

It is a FastAPI app served by uvicorn on 127.0.0.1 only, in a background thread with its own
event loop, so the code under test talks to it through the real `openai` client over real
sockets. It serves `POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models` in
the OpenAI response format (`choices`, `finish_reason`, `usage`, `n`).

What it answers comes from a `responder(text, k)`: `text` is the last user message (chat) or
the prompt (completions), `k` is `seed + choice index` so several samples of one question
differ. The meta of a synthetic question is not in an HTTP request, so a test that wants the
scripted teacher's rationales builds a `lookup_responder` from its questions; the default
`sum_responder` is a stand-in whose answer (the sum of the numbers in the question) a test can
predict.

Faults are rules on the shared `FakeOpenAI` object, which the test mutates while the server
runs: `server.add_fault("429", retry_after=1, match="Ann has")` makes the next request whose
text contains "Ann has" get a 429. Every request is recorded (arrival time on the server's
monotonic clock, text, Authorization header, what was served), so tests assert exact counts
and server-side gaps between a request and its retry instead of timing the client.

    with serve() as server:            # or the `openai_server` pytest fixture
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-test")

A `Budget` (`FakeOpenAI(budget=Budget(requests=3, window_s=1.0))`) makes the server announce
and enforce rate limits as OpenAI does: `x-ratelimit-limit/remaining/reset-requests` (and
`-tokens`) on every completion response, and a 429 with Retry-After for a request past the
window's allowance (recorded with outcome "429").
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

HOST = "127.0.0.1"  # never another address: the test server must not be reachable from outside

Responder = Callable[[str, int], str]

# every fault a rule can inject, and what the server does for it
FAULT_KINDS = {
    "429": "status 429 with a Retry-After header (seconds)",
    "500": "status 500 with an OpenAI error body",
    "503": "status 503 with an OpenAI error body",
    "400": "status 400 (a malformed request): must not be retried",
    "401": "status 401 (bad key): must not be retried",
    "404": "status 404 (unknown model): must not be retried",
    "drop": "close the socket without sending a byte of response",
    "malformed": "status 200 with a body that is not valid JSON",
    "empty": "status 200, finish_reason 'stop', content ''",
    "length": "status 200, finish_reason 'length', the text cut in half",
    "content_filter": "status 200, finish_reason 'content_filter', content null",
    "slow": "answer normally after an extra delay_s",
    "trickle": "status 200 at once, then the body a few bytes at a time over delay_s: no single "
               "read waits long, the whole response does",
}


# ---- responders --------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def sum_responder(text: str, k: int) -> str:
    """A deterministic stand-in rationale: it adds up the numbers in the text.

    Sample `k` words the first step differently so samples of one question are distinct.
    """
    nums = [float(x) for x in _NUMBER.findall(text)]
    total = sum(nums)
    shown = int(total) if total == int(total) else round(total, 4)
    terms = " + ".join(_fmt(x) for x in nums) or "0"
    opener = ("We add the numbers.", "Let us add every number.", "Adding all the numbers.")[k % 3]
    return f"{opener} {terms} = {shown}.\nTherefore, the answer is {shown}."


def item_questions(n: int) -> Any:
    """`n` questions for `sum_responder`, as the dataset stage writes them. "Item-i:" makes each
    text unique, so a fault (`add_fault(match=...)`) or a count can target one question."""
    import pyarrow as pa

    texts = [f"Item-{i}: Ann has {i + 2} apples and buys {i + 3} more. How many apples?" for i in range(n)]
    return pa.table({
        "question_id": [f"q{i}" for i in range(n)], "split": ["train"] * n, "question": texts,
        "answer": [str(2 * i + 5) for i in range(n)], "answer_type": ["numeric"] * n, "meta": ["{}"] * n,
    })


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def lookup_responder(table: Mapping[str, str | Sequence[str]], default: Responder | None = None) -> Responder:
    """Answer from a table {question text: completion or completions} (the k-th, cyclically).

    The question is found as a substring of the request text (templates wrap it); the longest
    matching key wins. A text matching no key goes to `default`, or raises, which the server
    turns into a 500 the test will notice.
    """
    keys = sorted(table, key=len, reverse=True)

    def respond(text: str, k: int) -> str:
        for q in keys:
            if q in text:
                value = table[q]
                if isinstance(value, str):
                    return value
                return value[k % len(value)]
        if default is None:
            raise LookupError(f"lookup_responder: no question of the table in {text[:80]!r}")
        return default(text, k)

    return respond


# ---- the shared state a test mutates -----------------------------------------------------
@dataclass
class Fault:
    kind: str
    times: int | None = 1  # how many matching requests get it; None: every one
    match: str | None = None  # only requests whose text contains this substring
    retry_after: float = 1.0  # 429: the Retry-After header, seconds
    delay_s: float = 0.05  # slow: the extra delay; trickle: the time the body takes; seconds

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; known: {sorted(FAULT_KINDS)}")


@dataclass
class Budget:
    """A fixed-window allowance: `requests` calls and/or `tokens` (prompt words + max_tokens * n)
    per `window_s`, the window opening at its first request. Mutated on the server's loop only."""

    requests: int | None = None
    tokens: int | None = None
    window_s: float = 1.0
    start: float | None = None
    used_requests: int = 0
    used_tokens: int = 0

    def _roll(self, now: float) -> None:
        if self.start is None or now >= self.start + self.window_s:
            self.start, self.used_requests, self.used_tokens = now, 0, 0

    def admit(self, now: float, tokens: int) -> bool:
        """Count a request in the window; False (and nothing counted) when it does not fit."""
        self._roll(now)
        if self.requests is not None and self.used_requests + 1 > self.requests:
            return False
        if self.tokens is not None and self.used_tokens + tokens > self.tokens:
            return False
        self.used_requests += 1
        self.used_tokens += tokens
        return True

    def reset_s(self, now: float) -> float:
        return max(0.0, (self.start or now) + self.window_s - now)

    def headers(self, now: float) -> dict[str, str]:
        """The OpenAI-style rate-limit headers as of `now`."""
        if self.start is not None:
            self._roll(now)  # a window that ended while the request was served is whole again
        reset = go_duration(self.reset_s(now))
        out = {}
        for dim, limit, used in (("requests", self.requests, self.used_requests), ("tokens", self.tokens, self.used_tokens)):
            if limit is not None:
                out[f"x-ratelimit-limit-{dim}"] = str(limit)
                out[f"x-ratelimit-remaining-{dim}"] = str(max(0, limit - used))
                out[f"x-ratelimit-reset-{dim}"] = reset
        return out


def go_duration(seconds: float) -> str:
    """Seconds as OpenAI writes a reset ("350ms", "1.5s", "6m0s"), rounded up to the millisecond
    so a client that trusts it never comes back early."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = f"{rest / 1000:g}s"
    return f"{minutes}m{secs}" if minutes else secs


@dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() on arrival (same clock for every request)
    path: str
    text: str  # last user message, or the prompt
    authorization: str | None
    model: str
    n: int
    params: dict[str, Any]  # the request body minus messages/prompt
    outcome: str  # "ok", the fault kind served, or "unknown_model" (answered 404)
    peer: tuple[str, int] | None = None  # the client's (host, port): one per TCP connection


@dataclass
class FakeOpenAI:
    """What the server answers, which faults it injects, and what it has received."""

    responder: Responder = sum_responder
    latency_s: float = 0.0  # added to every request (the benchmark's 200 ms)
    models: tuple[str, ...] = ("scripted",)
    max_n: int | None = None  # answer at most this many choices (like servers that ignore n)
    logprobs: bool = True  # answer a request for log-probs (False: ignore it, like some servers)
    base_url: str = ""  # set once the server listens
    budget: Budget | None = None  # announce (headers) and enforce (429) rate limits
    faults: list[Fault] = field(default_factory=list)
    in_flight: int = 0  # requests being answered now
    peak_in_flight: int = 0  # the most ever answered at once (a concurrency check without clocks)
    batch: "FakeBatches" = field(default_factory=lambda: FakeBatches())  # the Batch API side
    # hold requests until this many are in flight at once (the first time only), or gather_s
    # passed: a test then knows its requests overlapped without timing the client
    gather: int = 0
    gather_s: float = 10.0
    _gathered: asyncio.Event | None = None
    _received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- configuring faults (from the test's thread) --
    def add_fault(self, kind: str, **kw: Any) -> Fault:
        fault = Fault(kind, **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take_fault(self, text: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.match is not None and fault.match not in text:
                    continue
                if fault.times is not None:
                    if fault.times <= 0:
                        continue
                    fault.times -= 1
                return fault
        return None

    # -- what was received --
    def _record(self, rec: Received) -> None:
        with self._lock:
            self._received.append(rec)

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def count(self, match: str | None = None, outcome: str | None = None) -> int:
        return sum(
            1
            for r in self.received
            if (match is None or match in r.text) and (outcome is None or r.outcome == outcome)
        )

    def arrivals(self, match: str) -> list[float]:
        """Server-side arrival times of every request whose text contains `match`."""
        return [r.at for r in self.received if match in r.text]

    def connections(self) -> int:
        """How many TCP connections the requests came on (a kept-alive one counts once)."""
        return len({r.peer for r in self.received})

    def authorizations(self) -> set[str | None]:
        return {r.authorization for r in self.received}

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def reset(self) -> None:
        with self._lock:
            self._received.clear()
            self.faults.clear()
            self.peak_in_flight = self.in_flight


# ---- the app -----------------------------------------------------------------------------
def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


# ---- log-probs (a request with logprobs / top_logprobs) -----------------------------------
def fake_tokens(text: str) -> list[str]:
    """The fake teacher's tokens of `text`: each run of non-space characters with the whitespace
    before it (trailing whitespace is a token of its own); they concatenate to `text`."""
    return re.findall(r"\s*\S+|\s+", text)


def fake_top(tokens: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Per position i: k (token, logprob) pairs, the generated token first, then the text's other
    distinct tokens in order after it; logprob -(rank + 1) - 0.01 * (i % 7), so they are
    deterministic, descending and a valid distribution's (their mass stays below 1)."""
    vocab = list(dict.fromkeys(tokens))
    out = []
    for i, tok in enumerate(tokens):
        at = vocab.index(tok)
        ranked = [vocab[(at + j) % len(vocab)] for j in range(min(k, len(vocab)))]
        out.append([(t, -(r + 1) - 0.01 * (i % 7)) for r, t in enumerate(ranked)])
    return out


def asked_logprobs(state: "FakeOpenAI", body: dict[str, Any], content: str | None, chat: bool) -> Any:
    """The choice's `logprobs` in the OpenAI format when the request asked for them (chat:
    logprobs=true and top_logprobs=k; completions: logprobs=k) and the server answers them."""
    k = body.get("top_logprobs") if chat and body.get("logprobs") else (None if chat else body.get("logprobs"))
    if k is None or not state.logprobs or not content:
        return None
    tokens = fake_tokens(content)
    top = fake_top(tokens, max(int(k), 1))
    if chat:
        def entry(t: str, lp: float) -> dict[str, Any]:
            return {"token": t, "logprob": lp, "bytes": list(t.encode())}

        return {"content": [{**entry(t, p[0][1]), "top_logprobs": [entry(a, b) for a, b in p[: int(k)]]}
                            for t, p in zip(tokens, top)], "refusal": None}
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [p[0][1] for p in top],
            "top_logprobs": [dict(p[: int(k)]) for p in top], "text_offset": offsets}


async def _gather(state: FakeOpenAI) -> None:
    """Wait (on the server's loop) until `state.gather` requests were in flight at once."""
    if state._gathered is None:
        state._gathered = asyncio.Event()
    if state.in_flight >= state.gather:
        state._gathered.set()
    try:
        await asyncio.wait_for(state._gathered.wait(), state.gather_s)
    except asyncio.TimeoutError:
        pass


def _error(status: int, message: str, etype: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": etype, "param": None, "code": str(status)}}
    return JSONResponse(body, status_code=status, headers=headers)


def trickled(answer: JSONResponse, seconds: float, pieces: int = 20) -> StreamingResponse:
    """`answer`'s body sent in `pieces` parts spread over `seconds` (the trickle fault)."""
    body = bytes(answer.body)
    size = max(1, -(-len(body) // pieces))

    async def parts() -> Any:
        for i in range(0, len(body), size):
            yield body[i:i + size]
            await asyncio.sleep(seconds / pieces)

    return StreamingResponse(parts(), media_type="application/json")


def build_app(state: FakeOpenAI, server_ref: list[uvicorn.Server]) -> FastAPI:
    app = FastAPI()

    async def drop(request: Request) -> None:
        """Abort the TCP connection this request came on, before any response byte."""
        client = request.scope.get("client")
        server = server_ref[0]
        for proto in list(server.server_state.connections):
            if getattr(proto, "client", None) == (tuple(client) if client else None):
                proto.transport.abort()
                # let connection_lost run, so uvicorn sees the disconnect and sends nothing
                for _ in range(10):
                    await asyncio.sleep(0)
                    if getattr(getattr(proto, "cycle", None), "disconnected", False):
                        return
                return
        raise RuntimeError(f"drop fault: no connection from {client} to abort")

    async def handle(request: Request, chat: bool) -> Response:
        arrived = time.monotonic()
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "request body is not JSON", "invalid_request_error")
        if chat:
            msgs = body.get("messages") or []
            users = [m.get("content") or "" for m in msgs if m.get("role") == "user"]
            text = users[-1] if users else ""
        else:
            prompt = body.get("prompt", "")
            text = prompt if isinstance(prompt, str) else "\n".join(prompt)
        n = int(body.get("n") or 1)
        model = str(body.get("model", ""))
        params = {k: v for k, v in body.items() if k not in ("messages", "prompt")}
        fault = state._take_fault(text)
        if fault is None and state.budget is not None:
            prompt_words = sum(_words(m.get("content")) for m in body.get("messages") or []) if chat else _words(text)
            if not state.budget.admit(arrived, prompt_words + int(body.get("max_tokens") or 0) * n):
                fault = Fault("429", retry_after=state.budget.reset_s(arrived))  # past the window's allowance
        outcome = fault.kind if fault else ("unknown_model" if model not in state.models else "ok")
        state._record(
            Received(arrived, request.url.path, text, request.headers.get("authorization"), model, n, params, outcome,
                     tuple(request.client) if request.client else None)
        )
        if state.latency_s:
            await asyncio.sleep(state.latency_s)
        kind = fault.kind if fault else None
        if kind == "slow":
            # in short naps, so a client that gave up (timed out) frees the handler at once
            end = time.monotonic() + fault.delay_s
            while (left := end - time.monotonic()) > 0:
                await asyncio.sleep(min(0.05, left))
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody is listening any more
        elif kind == "429":
            return _error(
                429, "Rate limit reached; retry later.", "rate_limit_error",
                headers={"Retry-After": _fmt(fault.retry_after)},
            )
        elif kind in ("500", "503"):
            return _error(int(kind), "The server had an error.", "server_error")
        elif kind == "400":
            return _error(400, "Invalid request (injected).", "invalid_request_error")
        elif kind == "401":
            return _error(401, "Incorrect API key provided.", "invalid_request_error")
        elif kind == "404":
            return _error(404, f"The model '{model}' does not exist.", "invalid_request_error")
        elif kind == "drop":
            await drop(request)
            return Response(status_code=499)  # never sent: the socket is gone
        elif kind == "malformed":
            return Response(b'{"id": "cmpl-broken", "choices": [{"mess', media_type="application/json")
        if model not in state.models:
            return _error(404, f"The model '{model}' does not exist.", "invalid_request_error")

        seed = int(body.get("seed") or 0)
        count = n if state.max_n is None else min(n, state.max_n)
        choices, out_words = [], 0
        for i in range(count):
            content: str | None = state.responder(text, seed + i)
            finish = "stop"
            if kind == "empty":
                content = ""
            elif kind == "length":
                words = content.split()
                content, finish = " ".join(words[: max(1, len(words) // 2)]), "length"
            elif kind == "content_filter":
                content, finish = None, "content_filter"
            out_words += _words(content)
            if chat:
                choices.append(
                    {"index": i, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish, "logprobs": asked_logprobs(state, body, content, chat)}
                )
            else:
                choices.append({"index": i, "text": content or "", "finish_reason": finish,
                                "logprobs": asked_logprobs(state, body, content, chat)})
        prompt_words = sum(_words(m.get("content")) for m in body.get("messages") or []) if chat else _words(text)
        answer = JSONResponse(
            {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{len(state.received)}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_words,
                    "completion_tokens": out_words,
                    "total_tokens": prompt_words + out_words,
                },
            }
        )
        return trickled(answer, fault.delay_s) if kind == "trickle" else answer

    async def counted(request: Request, chat: bool) -> Response:
        state._enter()
        try:
            if state.gather:
                await _gather(state)
            response = await handle(request, chat)
            if state.budget is not None:
                response.headers.update(state.budget.headers(time.monotonic()))
            return response
        finally:
            state._leave()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await counted(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await counted(request, chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "kpod-tests"} for m in state.models],
        }

    add_batch_routes(app, state)
    return app


# ---- running it --------------------------------------------------------------------------
@contextmanager
def serve(state: FakeOpenAI | None = None, start_timeout_s: float = 20.0) -> Iterator[FakeOpenAI]:
    """Run the server on 127.0.0.1 (a free port) in a background thread; stop it on exit."""
    state = state or FakeOpenAI()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    server_ref: list[uvicorn.Server] = []
    config = uvicorn.Config(
        build_app(state, server_ref),
        log_level="critical",  # injected faults make uvicorn log errors on purpose
        access_log=False,
        lifespan="off",
        http="h11",
        loop="asyncio",
        timeout_keep_alive=30,
        limit_concurrency=None,
        backlog=4096,
    )
    server = uvicorn.Server(config)
    server_ref.append(server)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="fake-openai")
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"fake OpenAI server did not start on {HOST}:{port}")
        time.sleep(0.01)
    state.base_url = f"http://{HOST}:{port}/v1"
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAI]:
    """A running server with the default responder and no faults; tests mutate it."""
    with serve() as state:
        yield state


# ---- the Batch API (files and batches) ---------------------------------------------------
# `POST /v1/files` (multipart, purpose "batch"), `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
# `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches`, `POST /v1/batches/{id}/cancel`.
# A batch advances only when it is polled (`GET /v1/batches/{id}`), so a test sees the states in
# order without clocks: validating -> in_progress -> (`lines_per_poll` lines answered per poll)
# -> finalizing -> completed. Each line is answered by the online endpoint itself (an in-process
# ASGI call), so the responder, the fault rules and `received` apply to batch lines as well. A
# non-200 line goes to the error file, as the real API does.
BATCH_TERMINAL = ("completed", "failed", "expired", "cancelled")
BATCH_MAX_LINES = 50_000  # the real API's cap on requests per input file


@dataclass
class FakeBatch:
    id: str
    input_file_id: str
    endpoint: str
    authorization: str | None  # the creator's header, sent with each line
    lines: list[dict[str, Any]]
    created_at: int
    expire_after: int | None  # lines answered before the batch expires (None: never)
    invalid: str | None  # why the whole batch fails at validation (None: it does not)
    status: str = "validating"
    answered: int = 0  # lines answered so far
    completed: int = 0
    failed: int = 0
    outputs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    stamps: dict[str, int] = field(default_factory=dict)  # in_progress_at, completed_at, ...

    @property
    def custom_ids(self) -> list[str]:
        return [str(line.get("custom_id")) for line in self.lines]


@dataclass
class FakeBatches:
    """The files and batches a test's server holds, and the knobs that make batches misbehave.

    `expire_after`: a batch created while it is set answers that many lines, then expires (the
    rest go to the error file as `batch_expired`). `fail_batches`: the next that many batches
    fail as a whole at validation. Failing single lines uses the server's fault rules."""

    lines_per_poll: int = 2
    expire_after: int | None = None
    fail_batches: int = 0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: dict[str, FakeBatch] = field(default_factory=dict)
    created: list[FakeBatch] = field(default_factory=list)  # every POST /v1/batches, in order
    uploads: int = 0

    def submitted(self) -> list[list[str]]:
        """The custom ids of every batch created, in creation order."""
        return [b.custom_ids for b in self.created]

    def add_file(self, data: bytes, purpose: str, filename: str) -> dict[str, Any]:
        fid = f"file-{len(self.files) + 1:04d}"
        self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                           "filename": filename, "purpose": purpose, "status": "processed", "data": data}
        return self.files[fid]


def _file_object(f: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in f.items() if k != "data"}


def _batch_object(b: FakeBatch) -> dict[str, Any]:
    errors = {"object": "list", "data": [{"code": "invalid_request", "message": b.invalid, "param": None,
                                          "line": None}]} if b.invalid and b.status == "failed" else None
    return {
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "errors": errors,
        "input_file_id": b.input_file_id, "completion_window": "24h", "status": b.status,
        "output_file_id": b.output_file_id, "error_file_id": b.error_file_id, "created_at": b.created_at,
        "request_counts": {"total": len(b.lines), "completed": b.completed, "failed": b.failed},
        "metadata": None, **{k: v for k, v in b.stamps.items()},
    }


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, bytes). The stdlib's MIME
    parser reads it, so the server needs no multipart package."""
    import email.parser
    import email.policy

    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    out: dict[str, tuple[str | None, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        out[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return out


def _check_lines(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], str | None]:
    """The input file's requests, and why the batch must fail as a whole (None: it is valid)."""
    lines, seen = [], set()
    for i, raw in enumerate(data.decode().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            return lines, f"line {i} is not JSON"
        if line.get("method") != "POST" or line.get("url") != endpoint:
            return lines, f"line {i}: method/url {line.get('method')} {line.get('url')} is not POST {endpoint}"
        if not line.get("custom_id") or line["custom_id"] in seen:
            return lines, f"line {i}: custom_id missing or repeated"
        seen.add(line["custom_id"])
        lines.append(line)
    if not lines or len(lines) > BATCH_MAX_LINES:
        return lines, f"the input file holds {len(lines)} requests (1 to {BATCH_MAX_LINES} allowed)"
    return lines, None


async def _answer_line(client: Any, b: FakeBatch, line: dict[str, Any]) -> None:
    """Answer one line through the online endpoint; file it as an output or an error line."""
    out: dict[str, Any] = {"id": f"batch_req_{b.id}_{b.answered}", "custom_id": line["custom_id"]}
    headers = {"authorization": b.authorization} if b.authorization else {}
    try:
        resp = await client.post(line["url"], json=line.get("body") or {}, headers=headers)
        body = resp.json()
    except Exception as exc:  # a dropped or malformed answer: the line fails, the batch goes on
        out.update(response=None, error={"code": "server_error", "message": f"{type(exc).__name__}"})
        b.errors.append(out)
        b.failed += 1
        return
    out.update(response={"status_code": resp.status_code, "request_id": out["id"], "body": body}, error=None)
    if resp.status_code == 200:
        b.outputs.append(out)
        b.completed += 1
    else:
        b.errors.append(out)
        b.failed += 1


def _close_batch(store: FakeBatches, b: FakeBatch, status: str, reason: str | None = None) -> None:
    """End `b` as `status`: lines never answered become `reason` errors; files are written."""
    if reason is not None:
        for line in b.lines[b.answered:]:
            b.errors.append({"id": f"batch_req_{b.id}_{b.answered}", "custom_id": line["custom_id"], "response": None,
                             "error": {"code": reason, "message": f"This request was not run ({reason})."}})
            b.failed += 1
    for attr, rows in (("output_file_id", b.outputs), ("error_file_id", b.errors)):
        if rows:
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            setattr(b, attr, store.add_file(data, "batch_output", f"{b.id}_{attr}.jsonl")["id"])
    b.status = status
    b.stamps[f"{status}_at"] = int(time.time())


async def _advance(store: FakeBatches, b: FakeBatch, client: Any) -> None:
    """One poll's worth of progress for `b`."""
    if b.status in BATCH_TERMINAL:
        return
    if b.status == "validating":
        if b.invalid:
            b.status = "failed"
            b.stamps["failed_at"] = int(time.time())
            return
        b.status, b.stamps["in_progress_at"] = "in_progress", int(time.time())
        return
    if b.status == "cancelling":
        _close_batch(store, b, "cancelled", "batch_cancelled")
        return
    if b.status == "finalizing":
        _close_batch(store, b, "completed")
        return
    for _ in range(store.lines_per_poll):
        if b.answered >= len(b.lines):
            break
        if b.expire_after is not None and b.answered >= b.expire_after:
            _close_batch(store, b, "expired", "batch_expired")
            return
        await _answer_line(client, b, b.lines[b.answered])
        b.answered += 1
    if b.answered >= len(b.lines):
        b.status, b.stamps["finalizing_at"] = "finalizing", int(time.time())


def add_batch_routes(app: FastAPI, state: FakeOpenAI) -> None:
    """The Batch API routes over `state.batch` (see the section comment above)."""
    import httpx

    store = state.batch
    lock = asyncio.Lock()  # one poll advances a batch at a time

    @app.post("/v1/files")
    async def upload(request: Request) -> Response:
        fields = _multipart(request.headers.get("content-type", ""), await request.body())
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if "file" not in fields or purpose != "batch":
            return _error(400, "a file and purpose=batch are required", "invalid_request_error")
        store.uploads += 1
        added = store.add_file(fields["file"][1], purpose, fields["file"][0] or "input.jsonl")
        return JSONResponse(_file_object(added))

    @app.get("/v1/files/{file_id}")
    async def file_info(file_id: str) -> Response:
        f = store.files.get(file_id)
        if f is None:
            return _error(404, f"No such File object: {file_id}", "invalid_request_error")
        return JSONResponse(_file_object(f))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        f = store.files.get(file_id)
        if f is None:
            return _error(404, f"No such File object: {file_id}", "invalid_request_error")
        return Response(f["data"], media_type="application/octet-stream")

    @app.post("/v1/batches")
    async def create(request: Request) -> Response:
        body = await request.json()
        f = store.files.get(str(body.get("input_file_id")))
        if f is None or f["purpose"] != "batch":
            return _error(400, f"invalid input_file_id {body.get('input_file_id')!r}", "invalid_request_error")
        lines, invalid = _check_lines(f["data"], str(body.get("endpoint")))
        if store.fail_batches > 0:
            store.fail_batches -= 1
            invalid = invalid or "injected: the batch failed validation"
        b = FakeBatch(f"batch_{len(store.created) + 1:04d}", f["id"], str(body.get("endpoint")),
                      request.headers.get("authorization"), lines, int(time.time()), store.expire_after, invalid)
        store.batches[b.id] = b
        store.created.append(b)
        return JSONResponse(_batch_object(b))

    @app.get("/v1/batches/{batch_id}")
    async def retrieve(batch_id: str) -> Response:
        b = store.batches.get(batch_id)
        if b is None:
            return _error(404, f"No such Batch object: {batch_id}", "invalid_request_error")
        # each line goes through the app's own online route, in process (no socket)
        transport = httpx.ASGITransport(app=app)
        async with lock, httpx.AsyncClient(transport=transport, base_url="http://batch-lines") as inner:
            await _advance(store, b, inner)
        return JSONResponse(_batch_object(b))

    @app.get("/v1/batches")
    async def list_batches() -> dict[str, Any]:
        data = [_batch_object(b) for b in reversed(store.created)]  # newest first, as the API lists
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": False}

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str) -> Response:
        b = store.batches.get(batch_id)
        if b is None:
            return _error(404, f"No such Batch object: {batch_id}", "invalid_request_error")
        if b.status not in BATCH_TERMINAL:
            b.status = "cancelling"
        return JSONResponse(_batch_object(b))
