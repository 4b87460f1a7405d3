"""Server-announced rate limits and several endpoints, through the real `openai` client against
real test servers on 127.0.0.1 (tests/support/openai_server.py), driven by the teacher stage.

Assertions are on what the servers recorded (arrival times on their clock, outcomes, counts),
never on the client's wall time.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from storage.store import Store
from tasks.config.teacher import TeacherConfig
from tasks.teacher_backends.base import FatalTeacherError, RetryableTeacherError, TeacherRequest, TeacherResult
from tasks.teacher_backends.endpoints import EndpointHealth, EndpointPool
from tasks.teacher_backends.teach import teach
from tests.support.openai_server import Budget, FakeOpenAI, go_duration, item_questions, serve

KEY_ENV = "KPOD_TEST_KEY"
HTTP_CLIENT = "aiohttp"  # teacher.http_client of `_cfg`; every test runs with each transport


@pytest.fixture(autouse=True, params=["aiohttp", "httpx"])
def _api_key(monkeypatch, request):
    monkeypatch.setenv(KEY_ENV, "sk-test-0000")
    monkeypatch.setitem(globals(), "HTTP_CLIENT", request.param)


def _cfg(**kw) -> TeacherConfig:
    base = dict(
        backend="openai", model="scripted", api_key_env=KEY_ENV, concurrency=4, max_retries=3,
        backoff_s=0.01, backoff_max_s=0.05, request_timeout_s=5.0, seed=0, max_error_fraction=0.0,
    )
    base.update(kw)
    return TeacherConfig(**base)


def _ok_arrivals(server: FakeOpenAI) -> list[float]:
    return sorted(r.at for r in server.received if r.outcome == "ok")


# ---- config -------------------------------------------------------------------------------
def test_base_url_and_base_urls_are_exclusive_and_checked():
    with pytest.raises(ValueError, match="exclusive"):
        TeacherConfig(base_url="http://a/v1", base_urls=["http://b/v1"])
    with pytest.raises(ValueError, match=r"base_urls\[1\] is not an http"):
        TeacherConfig(base_urls=["http://a/v1", "ftp://user:pw@b/v1"])
    with pytest.raises(ValueError, match="twice"):
        TeacherConfig(base_urls=["http://a/v1", "http://a/v1"])
    with pytest.raises(ValueError, match="openai_batch uses one teacher.base_url"):
        TeacherConfig(backend="openai_batch", base_urls=["http://a/v1", "http://b/v1"])
    from pydantic import ValidationError

    from tasks.config.pipeline import format_validation_error

    with pytest.raises(ValidationError) as err:  # the line kpod prints never echoes the URL
        TeacherConfig(base_urls=["http://a/v1", "ftp://user:secret-pw@b/v1"])
    line = format_validation_error(err.value, "cfg.yaml")
    assert "base_urls[1] is not an http(s) URL" in line and "secret-pw" not in line


def test_go_duration_round_trips_through_the_parser():
    from tasks.core.server_limits import parse_reset

    for seconds in (0.0004, 0.35, 1.0, 1.5, 59.9991, 90.5, 360.0):
        text = go_duration(seconds)
        assert seconds <= parse_reset(text) <= seconds + 0.001, text


# ---- item 3: limits from headers ------------------------------------------------------------
def test_headers_of_successes_and_errors_alike_reach_the_limits(monkeypatch):
    httpx2 = pytest.importorskip("httpx2")
    import openai

    from tasks.teacher_backends import openai_backend
    from tasks.teacher_backends.requests import build_requests

    replies = iter([
        (503, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m30.5s"}, {"error": {"message": "busy"}}),
        (200, {"x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "20ms",
               "x-ratelimit-limit-tokens": "1000"}, None),
    ])

    def handler(request):
        status, headers, body = next(replies)
        body = body or {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
        return httpx2.Response(status, json=body, headers=headers)

    cfg = _cfg(base_url="http://teacher.test/v1")
    backend = openai_backend.make_backend(cfg, http_client=openai.DefaultAsyncHttpxClient(transport=httpx2.MockTransport(handler)))
    q = item_questions(1)
    request = build_requests(q, cfg)[0]

    async def go():
        with pytest.raises(RetryableTeacherError, match="HTTP 503"):
            await backend.complete(request)
        reqs = backend.limits.windows["requests"]
        assert reqs.remaining == 0 and reqs.reset_at is not None
        reqs.reset_at = None  # let the next call through without waiting 90 s
        result = await backend.complete(request)
        toks = backend.limits.windows["tokens"]
        assert result.completion == "ok" and (toks.limit, toks.remaining) == (1000, 900)

    asyncio.run(go())


def test_urls_in_messages_lose_passwords_and_queries():
    from tasks.teacher_backends.openai_backend import redact_url

    assert redact_url("https://user:pw@example.test:8443/v1?api-key=k") == "https://example.test:8443/v1"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_remaining_zero_pauses_until_the_reset_instead_of_earning_429s(tmp_path):
    with serve(FakeOpenAI(budget=Budget(requests=3, window_s=1.0))) as server:
        table, stats, _ = teach(item_questions(8), _cfg(base_url=server.base_url), Store(tmp_path))
        assert server.count(outcome="429") == 0 and server.count() == 8 and stats.retries == 0
        ok = _ok_arrivals(server)
        # the first three fill the window the first one opened; the fourth waited for its reset
        assert ok[3] - ok[0] >= 1.0
    assert table.num_rows == 8 and table["error"].null_count == 8


def test_without_header_limits_the_same_run_earns_429s(tmp_path):
    # the control of the test above: the budget really bites when its headers are ignored
    with serve(FakeOpenAI(budget=Budget(requests=3, window_s=1.0))) as server:
        table, stats, _ = teach(item_questions(8), _cfg(base_url=server.base_url, header_limits=False), Store(tmp_path))
        assert server.count(outcome="429") >= 1 and stats.retries >= 1
    assert table["error"].null_count == 8  # retried after Retry-After, every request succeeded


def test_tokens_remaining_below_the_next_call_waits(tmp_path):
    # each call costs the server ~110 tokens (prompt words + max_tokens): two fit a window of 300
    with serve(FakeOpenAI(budget=Budget(tokens=300, window_s=0.5))) as server:
        teach(item_questions(5), _cfg(base_url=server.base_url, max_tokens=100), Store(tmp_path))
        assert server.count(outcome="429") == 0 and server.count() == 5
        ok = _ok_arrivals(server)
        assert ok[2] - ok[0] >= 0.5 and ok[4] - ok[2] >= 0.5


# ---- item 4: several endpoints -------------------------------------------------------------
def test_requests_are_spread_over_both_endpoints_and_a_rerun_sends_nothing(tmp_path):
    store = Store(tmp_path)
    with serve(FakeOpenAI(latency_s=0.02)) as a, serve(FakeOpenAI(latency_s=0.02)) as b:
        cfg = _cfg(base_urls=[a.base_url, b.base_url])
        table, stats, _ = teach(item_questions(16), cfg, store)
        assert a.count() + b.count() == 16 and stats.retries == 0
        assert a.count() >= 4 and b.count() >= 4  # a fair share each (least in flight, ties in turn)
        assert a.peak_in_flight <= 4 and b.peak_in_flight <= 4
        _, _, summary = teach(item_questions(16), cfg, store)
        assert a.count() + b.count() == 16 and summary["from_ledger"] == 16  # the ledger answered
    assert table.num_rows == 16 and table["error"].null_count == 16


def test_a_failing_endpoint_is_backed_off_while_the_other_completes_the_stage(tmp_path):
    with serve() as bad, serve() as good:
        bad.add_fault("503", times=None)
        # a long back-off: after its first failures the bad endpoint sees at most a probe or two
        cfg = _cfg(base_urls=[bad.base_url, good.base_url], backoff_s=1.0, backoff_max_s=5.0)
        table, stats, summary = teach(item_questions(12), cfg, Store(tmp_path))
        assert good.count(outcome="ok") == 12 and bad.count(outcome="ok") == 0
        assert 1 <= bad.count() <= 4
    assert summary["errors"] == 0 and table["error"].null_count == 12


def test_an_endpoint_that_refuses_connections_is_skipped(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with serve() as good:
        cfg = _cfg(base_urls=[dead, good.base_url], backoff_s=1.0, backoff_max_s=5.0)
        table, _, summary = teach(item_questions(6), cfg, Store(tmp_path))
        assert good.count(outcome="ok") == 6 and summary["errors"] == 0


def test_every_endpoint_failing_fails_the_requests_after_the_usual_retries(tmp_path):
    with serve() as a, serve() as b:
        a.add_fault("500", times=None)
        b.add_fault("500", times=None)
        cfg = _cfg(base_urls=[a.base_url, b.base_url], max_retries=2, max_error_fraction=1.0, concurrency=1)
        table, _, summary = teach(item_questions(2), cfg, Store(tmp_path))
        assert a.count() + b.count() == 2 * 3  # 1 + max_retries attempts per request, no more
    assert summary["errors"] == 2 and all(e.startswith("gave up after 3 attempts") for e in table["error"].to_pylist())


def test_a_fatal_error_at_one_endpoint_stays_fatal(tmp_path):
    with serve() as a, serve() as b:
        a.add_fault("401", times=None)
        b.add_fault("401", times=None)
        with pytest.raises(FatalTeacherError, match="HTTP 401"):
            teach(item_questions(3), _cfg(base_urls=[a.base_url, b.base_url], concurrency=1), Store(tmp_path))
        assert a.count() + b.count() == 1


def test_each_endpoint_keeps_its_own_header_limits(tmp_path):
    # two endpoints, three calls per second each: six per window in all, and no 429 anywhere
    with serve(FakeOpenAI(budget=Budget(requests=3, window_s=1.0))) as a, \
            serve(FakeOpenAI(budget=Budget(requests=3, window_s=1.0))) as b:
        teach(item_questions(10), _cfg(base_urls=[a.base_url, b.base_url]), Store(tmp_path))
        assert a.count(outcome="429") == 0 and b.count(outcome="429") == 0
        assert a.count() + b.count() == 10 and min(a.count(), b.count()) >= 3


# ---- the pool's arithmetic, without HTTP -----------------------------------------------------
def test_endpoint_health_backs_off_exponentially_capped_and_honours_retry_after():
    h = EndpointHealth()
    assert h.eligible(0.0, in_flight=5)  # healthy: any number in flight
    assert h.failed(10.0, 1.0, 8.0, None, 0.0) == pytest.approx(0.5)  # base * 2**0 * jitter 0.5
    assert not h.eligible(10.4, 0) and h.eligible(10.5, 0) and not h.eligible(10.5, 1)  # one probe at a time
    assert h.failed(10.5, 1.0, 8.0, None, 0.999999) == pytest.approx(2.0, rel=1e-5)  # 2**1
    assert h.failed(20.0, 1.0, 8.0, None, 0.0) == pytest.approx(2.0)  # 2**2 * 0.5
    assert h.failed(30.0, 1.0, 8.0, None, 0.0) == pytest.approx(4.0)  # capped at 8, times 0.5
    assert h.failed(40.0, 1.0, 8.0, 30.0, 0.0) == 30.0 and h.blocked_until == 70.0  # Retry-After wins
    h.succeeded()
    assert h.failures == 0 and h.eligible(0.0, 3)


class _Fake:
    """A backend that fails with a transient error while `down`, else answers at once."""

    def __init__(self, where: str, down: bool = False):
        self.where, self.down, self.calls = where, down, 0

    def limit_wait(self, request, n):
        return 0.0

    async def complete_n(self, request, n):
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise RetryableTeacherError("HTTP 503: down", retry_after=7.0)
        return [TeacherResult(f"from {self.where}")] * n

    async def aclose(self):
        pass


def test_pool_fails_over_at_once_and_keeps_the_failed_endpoint_off():
    req = TeacherRequest("r", "q", 0, (), "p", "m")
    a, b = _Fake("a", down=True), _Fake("b")
    clock = [0.0]
    pool = EndpointPool([a, b], 1.0, 60.0, clock=lambda: clock[0])

    async def go():
        first = await pool.complete(req)  # turn order sends the first call to b
        with pytest.raises(RetryableTeacherError) as err:
            await pool.complete(req)  # ... and the second to a, which is down
        assert err.value.failover and err.value.retry_after is None and "(at a)" in str(err.value)
        later = [await pool.complete(req) for _ in range(5)]
        clock[0] = 7.0  # a's Retry-After has passed: one probe goes to it
        with pytest.raises(RetryableTeacherError):
            await pool.complete(req)
        return [first, *later]

    results = asyncio.run(go())
    assert all(r.completion == "from b" for r in results)
    assert (a.calls, b.calls) == (2, 6) and pool.endpoints[0].health.failures == 2
