"""Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama) via the official client.

The client's own retries are off (`max_retries=0`): the stage retries, so that backoff, the
rate-limit buckets and the budget see every attempt. This module only classifies outcomes:
- 429, 408, 409, 5xx, timeouts, dropped connections, malformed bodies -> `RetryableTeacherError`
  (with the server's Retry-After when it sent one);
- 400, 401, 403, 404, 422 and other 4xx -> `FatalTeacherError` (retrying cannot help);
- a 200 whose choice was cut by the content filter, or is empty -> a result with `error` set;
- `finish_reason="length"` -> a success that keeps its finish reason (rationales may drop it).

The API key is passed in (from a Prefect Secret) or read from the environment variable named by
`teacher.api_key_env`, here, once; it is never stored on anything that is logged or hashed, and
error texts are scrubbed of it.

With `teacher.header_limits` each backend keeps the `x-ratelimit-*` headers of every response
(success or error) in a `ServerLimits`, and waits there before a call the server announced it
would refuse. Several `teacher.base_urls` make one backend per endpoint, spread by
`tasks.teacher_backends.endpoints.EndpointPool`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit, urlunsplit

import httpx2
import openai

from tasks.core.server_limits import ServerLimits
from tasks.teacher_backends.logprobs import parse as parse_logprobs
from tasks.teacher_backends.base import (
    FatalTeacherError,
    RetryableTeacherError,
    TeacherRequest,
    TeacherResult,
)

if TYPE_CHECKING:
    from tasks.config.teacher import TeacherConfig

RETRYABLE_STATUS = {408, 409, 429}
NO_KEY = "no-key"  # local servers (vLLM, llama.cpp, Ollama) accept any key
_KEYISH = re.compile(r"(sk-|key-)[A-Za-z0-9_\-*.]{4,}")


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (a number or an HTTP date), else None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return max(0.0, email.utils.mktime_tz(parsed) - time.time())


def scrub_secret(text: str, secret: str | None) -> str:
    """`text` without the API key and without anything shaped like a key (error texts of the
    online and the batch backend pass through here before they are logged or ledgered)."""
    if secret and secret != NO_KEY:
        text = text.replace(secret, "***")
    return _KEYISH.sub(r"\1***", text)


def choice_error(text: str | None, finish_reason: str | None) -> str | None:
    """The error of a 200 response's choice that holds no usable completion, else None."""
    if finish_reason == "content_filter":
        return "content_filter: the endpoint filtered this completion"
    if not text or not text.strip():
        return f"empty completion (finish_reason={finish_reason})"
    return None


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` integers that differ by at most one and sum to `total`."""
    base, extra = divmod(int(total), parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def redact_url(url: str) -> str:
    """`url` fit for a message: no user:password and no query (either may hold a key)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def logprob_params(k: int | None, api: str) -> dict[str, Any]:
    """The body fields that ask for teacher.top_logprobs=k (none when k is None): chat takes
    `logprobs=True, top_logprobs=k`, legacy completions `logprobs=k`."""
    if k is None:
        return {}
    return {"logprobs": True, "top_logprobs": k} if api == "chat" else {"logprobs": k}


PATHS = {"chat": "/chat/completions", "completions": "/completions"}  # under the client's base_url


def request_body(request: TeacherRequest, api: str, n: int = 1) -> dict[str, Any]:
    """The JSON body of `request` for `api` (chat | completions), asking for `n` choices (the
    online backend's; the Batch API's lines hold the same body with one choice)."""
    p = request.params
    body: dict[str, Any] = {"model": request.model}
    if api == "chat":
        body["messages"] = list(request.messages)
    else:
        body["prompt"] = request.prompt
    for name in ("temperature", "top_p", "max_tokens", "seed"):
        if p.get(name) is not None:
            body[name] = p[name]
    if p.get("stop"):
        body["stop"] = list(p["stop"])
    if n > 1:
        body["n"] = n
    body.update(logprob_params(p.get("top_logprobs"), api))
    return body


def choice_text(choice: dict[str, Any], api: str) -> str | None:
    """A response choice's text: chat's message content, or legacy completions' text."""
    if api != "chat":
        return choice.get("text")
    message = choice.get("message")
    return message.get("content") if isinstance(message, dict) else None


def call_tokens(request: TeacherRequest, n: int) -> int:
    """What a call counts against a tokens limit: the prompt estimate and every choice's cap."""
    from tasks.teacher_backends.dispatcher import estimate_prompt_tokens  # the stage's own estimate

    return estimate_prompt_tokens(request) + int(request.params.get("max_tokens") or 0) * n


class OpenAIBackend:
    """One endpoint. Its openai client is made by `make_client` on first use in an event loop:
    the HTTP connections belong to the loop they were opened in (aiohttp and httpx both fail on
    a second `asyncio.run`), so a call from another loop makes a fresh client, and `aclose`
    releases the current one and leaves the backend usable (a two-stage run dispatches twice).
    `owns_http`: False when the caller supplied the HTTP client, which is then never closed here.
    """

    def __init__(
        self,
        make_client: Callable[[], openai.AsyncOpenAI],
        api: str,
        timeout_s: float,
        where: str,
        secret: str | None,
        limits: ServerLimits | None = None,
        owns_http: bool = True,
    ):
        self.api, self.timeout_s, self.where = api, timeout_s, where
        self._make_client, self._owns_http = make_client, owns_http
        self._client: openai.AsyncOpenAI | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the client's connections are on
        self._secret = secret
        self.limits = limits  # what the server announced in its headers (None: not honoured)

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The current openai client, made when there is none."""
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _loop_client(self) -> openai.AsyncOpenAI:
        """The client for the running loop: a fresh one when the last was used on another loop
        (that loop has ended, and its connections with it)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                self._client = None
            self._loop = loop
        return self.client

    def limit_wait(self, request: TeacherRequest, n: int) -> float:
        """Seconds this endpoint's announced limits would hold a call back now."""
        return self.limits.wait_time(call_tokens(request, n)) if self.limits is not None else 0.0

    def _scrub(self, text: str) -> str:
        return scrub_secret(text, self._secret)

    async def complete(self, request: TeacherRequest) -> TeacherResult:
        return (await self.complete_n(request, 1))[0]

    async def complete_n(self, request: TeacherRequest, n: int) -> list[TeacherResult]:
        ticket = await self.limits.acquire(call_tokens(request, n)) if self.limits is not None else None
        t0 = time.monotonic()
        headers = None  # the response's, when one came: success or error alike
        try:
            # the client's documented raw route (`post` with cast_to=Response): its auth, timeouts
            # and status errors, without the typed-params transform and the response models, which
            # cost more CPU than the HTTP round trip itself (bench/teacher_throughput.py)
            # the clients' own timeout bounds each read; this bounds the whole request, so a
            # body that trickles in still ends within teacher.request_timeout_s
            async with asyncio.timeout(self.timeout_s):
                raw = await self._loop_client().post(
                    PATHS[self.api], cast_to=httpx2.Response, body=request_body(request, self.api, n),
                    options={"timeout": self.timeout_s},
                )
            headers = raw.headers
            body = json.loads(raw.content)
        except openai.APIStatusError as exc:
            headers = exc.response.headers
            raise self._status_error(exc, request) from None
        except openai.APIConnectionError as exc:  # includes APITimeoutError
            raise RetryableTeacherError(f"{type(exc).__name__}: {self._scrub(str(exc))}") from None
        except TimeoutError:
            raise RetryableTeacherError(f"no whole response within {self.timeout_s:g} s (teacher.request_timeout_s)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # not JSON, or not UTF-8
            raise RetryableTeacherError(f"malformed response: {self._scrub(str(exc))[:200]}") from None
        finally:
            if ticket is not None:
                self.limits.observe(ticket, headers)  # type: ignore[union-attr]
        return self._results(body, request, n, time.monotonic() - t0)

    def _status_error(self, exc: openai.APIStatusError, request: TeacherRequest) -> Exception:
        status = exc.status_code
        text = self._scrub(str(exc.message))[:300]
        if status in RETRYABLE_STATUS or status >= 500:
            return RetryableTeacherError(f"HTTP {status}: {text}", retry_after_seconds(exc.response.headers))
        hint = {
            401: " (check the API key: teacher.api_key_env / teacher.api_key_block)",
            403: " (the key may lack access to this model)",
            404: " (check teacher.model and teacher.base_url)",
        }.get(status, " (check teacher.model and the sampling parameters)")
        return FatalTeacherError(
            f"teacher endpoint {self.where} rejected model {request.model!r} with HTTP {status}: {text}{hint}"
        )

    def _results(self, body: Any, request: TeacherRequest, n: int, latency: float) -> list[TeacherResult]:
        """The results of a 200 response's JSON `body` (its first `n` choices, by index)."""
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
            raise RetryableTeacherError("malformed response: no choices in the body")
        choices = sorted(choices, key=lambda c: c.get("index") or 0)[:n]
        texts = [choice_text(c, self.api) for c in choices]
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        tokens_in = usage.get("prompt_tokens")
        tokens_out = usage.get("completion_tokens")
        if tokens_in is None:  # some servers omit usage: estimate so cost and budget still work
            tokens_in = math.ceil(len(request.prompt) / 4)
        outs = (
            split_evenly(tokens_out, len(choices))
            if tokens_out is not None
            else [math.ceil(len(t or "") / 4) for t in texts]
        )
        results = []
        for choice, text, out in zip(choices, texts, outs):
            reason = choice.get("finish_reason")
            results.append(
                TeacherResult(
                    completion=text if text else None,
                    finish_reason=reason,
                    tokens_in=int(tokens_in),
                    tokens_out=int(out),
                    latency_s=latency,
                    error=choice_error(text, reason),
                    logprobs=parse_logprobs(choice, self.api) if "top_logprobs" in request.params else None,
                )
            )
        return results

    async def aclose(self) -> None:
        """Close this loop's connections; a later call opens new ones."""
        client, self._client, self._loop = self._client, None, None
        if client is not None and self._owns_http:
            await client.close()


def make_backend(cfg: "TeacherConfig", api_key: str | None = None, http_client: Any = None) -> Any:
    """Build the client(s). `api_key` (from a Secret block) wins; else the env var named in config.

    `http_client` (an `openai.DefaultAsyncHttpxClient`, say with a mock transport in tests)
    replaces the one `teacher.http_client` names (`make_http_client`). With several `base_urls` the
    result is an `EndpointPool` over one backend per endpoint, each with its own header limits.
    """
    api_key = api_key_for(cfg, api_key)
    urls: list[str | None] = list(cfg.base_urls) or [cfg.base_url]
    backends = [_endpoint_backend(cfg, url, api_key, http_client) for url in urls]
    if len(backends) == 1:
        return backends[0]
    from tasks.teacher_backends.endpoints import EndpointPool

    return EndpointPool(backends, cfg.backoff_s, cfg.backoff_max_s)


def api_key_for(cfg: "TeacherConfig", api_key: str | None) -> str | None:
    """The key: `api_key` (from a Secret block) when given, else the env var `teacher.api_key_env`
    names (one line when it is unset); None for a server without keys."""
    if api_key is None and cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise FatalTeacherError(
                f"teacher.api_key_env names {cfg.api_key_env!r}, which is not set in the environment "
                "(set it, or set teacher.api_key_env to null for a server without keys)"
            )
    return api_key


def make_http_client(kind: str, concurrency: int) -> Any:
    """The HTTP client under one endpoint's openai client (`teacher.http_client`), keeping a
    connection alive for each request in flight: the openai client's default keeps 100, so past
    that every request would open a connection and close it again."""
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if kind == "httpx":
        return openai.DefaultAsyncHttpxClient(limits=limits)
    if kind != "aiohttp":
        raise FatalTeacherError(f"teacher.http_client must be 'aiohttp' or 'httpx', not {kind!r}")
    try:
        return openai.DefaultAioHttpClient(limits=limits)
    except RuntimeError:  # openai's stand-in when aiohttp is not installed
        raise FatalTeacherError(
            "teacher.http_client 'aiohttp' needs the aiohttp package: pip install 'openai[aiohttp]' "
            "(or set teacher.http_client: httpx)"
        ) from None


def _endpoint_backend(cfg: "TeacherConfig", url: str | None, api_key: str | None, http_client: Any) -> OpenAIBackend:
    def make_client() -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=api_key or NO_KEY,
            base_url=url,
            max_retries=0,
            timeout=cfg.request_timeout_s,
            http_client=http_client if http_client is not None else make_http_client(cfg.http_client, cfg.concurrency),
        )

    where = redact_url(url) if url else "api.openai.com"
    limits = ServerLimits() if cfg.header_limits else None
    backend = OpenAIBackend(make_client, cfg.api, cfg.request_timeout_s, where, api_key, limits,
                            owns_http=http_client is None)
    backend.client  # made now, so that a missing HTTP package fails at set-up, not mid-run
    return backend
