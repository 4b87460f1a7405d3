"""A light OpenAI-compatible server for the throughput benchmark only: plain asyncio, no framework.

The test server (tests/support/openai_server.py: FastAPI + uvicorn + h11) costs ~1 CPU ms per
request, which on a 2-core box leaves too little for the client at hundreds of requests in
flight. This one speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) to answer
`POST /v1/chat/completions` and `POST /v1/completions` in the OpenAI format after the injected
latency, scheduled with `call_later` (no task per request). Real sockets on 127.0.0.1 only; no
faults, no checks: the fault tests use the test server.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

HOST = "127.0.0.1"
_END = b"\r\n\r\n"


class Counters:
    """What the benchmark reads back: requests answered and the most in flight at once."""

    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def completion_body(path: bytes, body: bytes, responder: Callable[[str, int], str], n_done: int) -> bytes:
    """The JSON answer to one request body (chat or legacy completions)."""
    req = json.loads(body)
    chat = path.endswith(b"/chat/completions")
    if chat:
        users = [m.get("content") or "" for m in req.get("messages") or [] if m.get("role") == "user"]
        text = users[-1] if users else ""
    else:
        text = str(req.get("prompt", ""))
    content = responder(text, int(req.get("seed") or 0))
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": content}} if chat else {"text": content})
    words_in, words_out = len(text.split()), len(content.split())
    return json.dumps({
        "id": f"cmpl-{n_done}", "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": req.get("model", ""), "choices": [choice],
        "usage": {"prompt_tokens": words_in, "completion_tokens": words_out, "total_tokens": words_in + words_out},
    }).encode()


class _Connection(asyncio.Protocol):
    def __init__(self, latency_s: float, responder: Callable[[str, int], str], counters: Counters):
        self.latency_s, self.responder, self.counters = latency_s, responder, counters
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(_END)) >= 0:
            head = bytes(self.buf[:end])
            size = end + len(_END) + _content_length(head)
            if len(self.buf) < size:
                return
            body = bytes(self.buf[end + len(_END) : size])
            del self.buf[:size]
            self.counters.in_flight += 1
            self.counters.peak_in_flight = max(self.counters.peak_in_flight, self.counters.in_flight)
            asyncio.get_running_loop().call_later(self.latency_s, self._answer, head.split(b" ", 2)[1], body)

    def _answer(self, path: bytes, body: bytes) -> None:
        self.counters.in_flight -= 1
        if self.transport is None or self.transport.is_closing():
            return
        self.counters.requests += 1
        try:
            payload, status = completion_body(path, body, self.responder, self.counters.requests), b"200 OK"
        except (ValueError, LookupError) as exc:
            payload, status = json.dumps({"error": {"message": str(exc), "type": "server_error"}}).encode(), b"500 Internal Server Error"
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def start(latency_s: float, responder: Callable[[str, int], str]) -> tuple[asyncio.Server, str, Counters]:
    """Listen on 127.0.0.1 (a free port); (server, base URL, counters)."""
    counters = Counters()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(latency_s, responder, counters), HOST, 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://{HOST}:{port}/v1", counters


@contextmanager
def serve(latency_s: float, responder: Callable[[str, int], str]) -> Iterator[tuple[str, Counters]]:
    """`start` on an event loop of a background thread; yields (base URL, counters)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="light-openai")
    thread.start()
    server, url, counters = asyncio.run_coroutine_threadsafe(start(latency_s, responder), loop).result(10)
    try:
        yield url, counters
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
