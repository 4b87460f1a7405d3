"""The teacher stage: request ids, the ledger (resume, kill -9), budget, retries, backends."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from storage.store import StageIncomplete, Store
from tasks.config.dataset import SyntheticConfig
from tasks.config.teacher import TeacherConfig
from tasks.core.synthetic import generate
from tasks.stages.teacher import SPEC
from tasks.teacher_backends import dispatcher, factory
from tasks.teacher_backends.dispatcher import backoff_delay, run_requests
from tasks.teacher_backends.requests import build_requests
from tasks.teacher_backends.teach import LEDGER_NAME, open_ledger, teach
from tasks.teacher_backends.base import (
    FatalTeacherError,
    RetryableTeacherError,
    TeacherRequest,
    TeacherResult,
)
from tasks.teacher_backends.scripted import ScriptedBackend

ROOT = Path(__file__).resolve().parents[2]


def synthetic_questions(n_train: int = 6, n_other: int = 2) -> pa.Table:
    problems = generate(SyntheticConfig(seed=3, n_train=n_train, n_val=n_other, n_test=n_other))
    return pa.table(
        {
            "question_id": [p.question_id for p in problems],
            "split": [p.split for p in problems],
            "question": [p.question for p in problems],
            "meta": [p.meta_json() for p in problems],
        }
    )


def answers(questions: pa.Table) -> dict[str, int]:
    return {qid: json.loads(m)["answer"] for qid, m in zip(questions["question_id"].to_pylist(), questions["meta"].to_pylist())}


class Counting:
    """Wraps a backend and records the request ids it was asked for."""

    def __init__(self, inner):
        self.inner, self.sent = inner, []

    async def complete(self, request: TeacherRequest) -> TeacherResult:
        self.sent.append(request.request_id)
        return await self.inner.complete(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Scripted(Counting):
    def __init__(self, error_rate: float = 0.0):
        super().__init__(ScriptedBackend(error_rate))


# ---- config and request ids --------------------------------------------------------------
def test_key_excludes_runtime_fields_and_other_backends_settings():
    cfg = TeacherConfig()
    h = cfg.hashable()
    for runtime in ("api_key_env", "api_key_block", "concurrency", "prices", "max_cost_usd", "rpm", "flush_every"):
        assert runtime not in h
    assert "error_rate" in h and "base_url" not in h and "replay_path" not in h
    assert TeacherConfig(concurrency=99, max_cost_usd=3.0, api_key_env="X").hashable() == h
    assert TeacherConfig(temperature=0.2).hashable() != h
    assert TeacherConfig(base_url="http://elsewhere/v1").hashable() == h  # scripted ignores it
    o = TeacherConfig(backend="openai", model="m", base_url="http://a/v1").hashable()
    assert "base_url" not in o and "error_rate" not in o
    # where the model is served is runtime: one endpoint, another, or several replicas share a key
    assert TeacherConfig(backend="openai", model="m", base_url="http://b/v1").hashable() == o
    assert TeacherConfig(backend="openai", model="m", base_urls=["http://a/v1", "http://b/v1"]).hashable() == o
    assert TeacherConfig(backend="openai", model="m", header_limits=False).hashable() == o


def test_request_ids_hash_what_changes_the_answer_only():
    q = synthetic_questions()
    base = TeacherConfig(backend="openai", model="m", samples=2)
    ids = [r.request_id for r in build_requests(q, base)]
    assert len(ids) == 6 * 2 == len(set(ids))  # train split only, distinct per question x sample
    same = [
        base.model_copy(update=u)
        for u in (
            {"concurrency": 1},
            {"api_key_env": "OTHER"},
            {"max_cost_usd": 1.0},
            {"base_url": "http://127.0.0.1:9/v1"},
            {"error_rate": 0.9},
        )
    ]
    for cfg in same:
        assert [r.request_id for r in build_requests(q, cfg)] == ids
    for u in ({"temperature": 0.1}, {"model": "m2"}, {"top_p": 0.5}, {"max_tokens": 7}, {"stop": ["\n"]}, {"use_n": True}):
        assert set(r.request_id for r in build_requests(q, base.model_copy(update=u))).isdisjoint(ids)
    # scripted: the error rate changes the output, so it is part of the id
    s1 = build_requests(q, TeacherConfig(error_rate=0.1))
    s2 = build_requests(q, TeacherConfig(error_rate=0.2))
    assert {r.request_id for r in s1}.isdisjoint(r.request_id for r in s2)
    # seeded samples are sent with distinct seeds
    seeded = build_requests(q, base.model_copy(update={"seed": 5}))
    assert [r.params["seed"] for r in seeded[:2]] == [5, 6]


def test_backoff_delay_matches_formula():
    for attempt in range(8):
        for u in (0.0, 0.3, 0.999):
            want = min(10.0, 0.5 * 2**attempt) * (0.5 + 0.5 * u)
            assert backoff_delay(attempt, 0.5, 10.0, None, u) == pytest.approx(want)
    assert backoff_delay(0, 0.5, 10.0, 7.0, 0.9) == 7.0  # Retry-After is a floor
    assert backoff_delay(5, 0.5, 10.0, 1.0, 0.0) == pytest.approx(5.0)


# ---- the scripted teacher end to end ------------------------------------------------------
def test_scripted_rows_are_questions_times_samples_and_deterministic(tmp_path):
    q = synthetic_questions()
    cfg = TeacherConfig(samples=3, error_rate=0.5)
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.n, self.postfix, self.closed = total, 0, {}, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def set_postfix(self, **kw):
            self.postfix = kw

        def close(self):
            self.closed = True

    table, stats, summary = teach(q, cfg, Store(tmp_path / "a"), progress=Bar)
    assert table.num_rows == 6 * 3 == len(set(table["request_id"].to_pylist()))
    (bar,) = bars
    assert (bar.total, bar.n, bar.closed) == (18, 18, True)
    assert set(bar.postfix) == {"req_s", "tok", "cost", "err"}
    assert bar.postfix["tok"] == sum(table["tokens_in"].to_pylist()) + sum(table["tokens_out"].to_pylist())
    assert set(table["question_id"].to_pylist()) == {f"syn-train-{i}" for i in range(6)}
    assert summary["sent"] == 18 and summary["errors"] == 0
    again, _, _ = teach(q, cfg, Store(tmp_path / "b"))
    assert again["completion"].to_pylist() == table["completion"].to_pylist()
    # samples of one question differ in wording
    assert len(set(table["completion"].to_pylist()[:3])) == 3


@pytest.mark.parametrize("error_rate,expect_correct", [(0.0, True), (1.0, False)])
def test_scripted_error_rate(tmp_path, error_rate, expect_correct):
    q = synthetic_questions()
    gold = answers(q)
    table, _, _ = teach(q, TeacherConfig(samples=2, error_rate=error_rate), Store(tmp_path))
    for qid, text in zip(table["question_id"].to_pylist(), table["completion"].to_pylist()):
        assert text.endswith(".")
        said = int(text.rsplit("Therefore, the answer is ", 1)[1].rstrip("."))
        assert (said == gold[qid]) is expect_correct


def test_scripted_refuses_non_synthetic_questions(tmp_path):
    q = pa.table({"question_id": ["x"], "split": ["train"], "question": ["Why?"], "meta": ["{}"]})
    with pytest.raises(FatalTeacherError, match="not a synthetic question"):
        teach(q, TeacherConfig(), Store(tmp_path))


def test_changed_temperature_or_more_samples_send_only_new_requests(tmp_path):
    q = synthetic_questions()
    store = Store(tmp_path)
    first = Scripted()
    teach(q, TeacherConfig(samples=2, temperature=0.7), store, backend=first)
    assert len(first.sent) == 12
    hotter = Scripted()
    teach(q, TeacherConfig(samples=2, temperature=1.0), store, backend=hotter)
    assert len(hotter.sent) == 12 and set(hotter.sent).isdisjoint(first.sent)
    back = Scripted()
    table, _, _ = teach(q, TeacherConfig(samples=2, temperature=0.7), store, backend=back)
    assert back.sent == [] and table.num_rows == 12
    more = Scripted()
    table, _, _ = teach(q, TeacherConfig(samples=3, temperature=0.7), store, backend=more)
    assert len(more.sent) == 6 and table.num_rows == 18  # only sample index 2 is new
    assert set(table["request_id"].to_pylist()) >= set(first.sent)


def test_budget_stops_then_larger_budget_continues(tmp_path):
    q = synthetic_questions()
    store = Store(tmp_path)
    prices = {"scripted": {"input_per_1k": 1.0, "output_per_1k": 1.0}}
    cfg = TeacherConfig(samples=2, max_tokens=100, prices=prices, max_cost_usd=1.0, concurrency=1)
    first = Scripted()
    with pytest.raises(StageIncomplete, match="max_cost_usd"):
        teach(q, cfg, store, backend=first)
    done = open_ledger(store, cfg).read()
    assert 0 < done.num_rows < 12 and done.num_rows == len(first.sent)
    assert sum(done["cost_usd"].to_pylist()) <= 1.0
    # the cost column is the price table applied to the token counts
    for tin, tout, cost in zip(done["tokens_in"].to_pylist(), done["tokens_out"].to_pylist(), done["cost_usd"].to_pylist()):
        assert cost == pytest.approx((tin + tout) / 1000.0)
    rest = Scripted()
    table, _, _ = teach(q, cfg.model_copy(update={"max_cost_usd": 100.0}), store, backend=rest)
    assert table.num_rows == 12 and len(rest.sent) == 12 - done.num_rows
    assert set(rest.sent).isdisjoint(first.sent)


def test_budget_needs_a_price(tmp_path):
    with pytest.raises(ValueError, match="prices has no entry"):
        teach(synthetic_questions(), TeacherConfig(max_cost_usd=1.0), Store(tmp_path))


# ---- retries and failures -----------------------------------------------------------------
class Flaky:
    """Fails each request `fails` times with a retryable error, then answers."""

    def __init__(self, fails: int, retry_after: float | None = None, always_fail: set[str] = frozenset()):
        self.fails, self.retry_after, self.always_fail = fails, retry_after, always_fail
        self.attempts: dict[str, int] = {}

    async def complete(self, request: TeacherRequest) -> TeacherResult:
        k = self.attempts[request.request_id] = self.attempts.get(request.request_id, 0) + 1
        if request.question_id in self.always_fail or k <= self.fails:
            raise RetryableTeacherError("HTTP 429: slow down", self.retry_after)
        return TeacherResult(f"answer {request.sample}", "stop", 3, 2)

    async def aclose(self) -> None:
        return None


def test_retries_honour_retry_after(tmp_path, monkeypatch):
    slept: list[float] = []

    async def fake_sleep(d):
        slept.append(d)

    monkeypatch.setattr(dispatcher, "_sleep", fake_sleep)
    q = synthetic_questions(3)
    cfg = TeacherConfig(max_retries=3, backoff_s=0.01, backoff_max_s=0.02)
    requests = build_requests(q, cfg)
    stats = asyncio.run(run_requests(requests, Flaky(2, retry_after=7.0), open_ledger(Store(tmp_path), cfg), cfg))
    assert (stats.ok, stats.failed, stats.retries, stats.calls) == (3, 0, 6, 9)
    assert len(slept) == 6 and all(d == 7.0 for d in slept)


def test_exhausted_retries_are_recorded_and_a_rerun_retries_only_them(tmp_path, monkeypatch):
    async def no_sleep(d):
        return None

    monkeypatch.setattr(dispatcher, "_sleep", no_sleep)
    q = synthetic_questions(4)
    store = Store(tmp_path)
    cfg = TeacherConfig(samples=2, max_retries=1, max_error_fraction=0.0)
    bad = Flaky(0, always_fail={"syn-train-1"})
    with pytest.raises(StageIncomplete, match="2 of 8 requests failed"):
        teach(q, cfg, store, backend=bad)
    rows = open_ledger(store, cfg).read()
    failed = {r["request_id"] for r in rows.to_pylist() if r["error"]}
    assert len(failed) == 2 and all("gave up after 2 attempts" in e for e in rows["error"].to_pylist() if e)
    # tolerated errors: the stage commits with the failures recorded
    table, _, summary = teach(q, cfg.model_copy(update={"max_error_fraction": 0.5}), store, backend=Flaky(0, always_fail={"syn-train-1"}))
    assert table.num_rows == 8 and summary["errors"] == 2
    healthy = Counting(Flaky(0))
    table, _, summary = teach(q, cfg, store, backend=healthy)
    assert set(healthy.sent) == failed and summary["errors"] == 0
    assert table.num_rows == 8 and table["error"].null_count == 8


class FatalOn:
    def __init__(self, question_id: str):
        self.question_id = question_id

    async def complete(self, request: TeacherRequest) -> TeacherResult:
        if request.question_id == self.question_id:
            raise FatalTeacherError("teacher endpoint x rejected model 'm' with HTTP 401: bad key")
        return TeacherResult("ok", "stop", 1, 1)

    async def aclose(self) -> None:
        return None


def test_fatal_error_stops_and_keeps_what_finished(tmp_path):
    q = synthetic_questions(5)
    store = Store(tmp_path)
    cfg = TeacherConfig(concurrency=1, flush_every=1000)
    with pytest.raises(FatalTeacherError, match="HTTP 401"):
        teach(q, cfg, store, backend=FatalOn("syn-train-2"))
    rows = open_ledger(store, cfg).read()
    assert sorted(rows["question_id"].to_pylist()) == ["syn-train-0", "syn-train-1"]


class Multi:
    """Answers up to `cap` choices per call, like a server that caps `n`."""

    def __init__(self, cap: int):
        self.cap, self.calls = cap, []

    async def complete(self, request):
        return (await self.complete_n(request, 1))[0]

    async def complete_n(self, request, n):
        self.calls.append(n)
        return [TeacherResult(f"c{i}", "stop", 100, 10) for i in range(min(n, self.cap))]

    async def aclose(self) -> None:
        return None


def test_use_n_groups_samples_and_falls_back_when_the_server_caps_n(tmp_path):
    q = synthetic_questions(4)
    prices = {"scripted": {"input_per_1k": 1.0, "output_per_1k": 1.0}}
    cfg = TeacherConfig(samples=3, use_n=True, prices=prices)
    backend = Multi(cap=2)
    table, stats, _ = teach(q, cfg, Store(tmp_path), backend=backend)
    assert sorted(backend.calls) == [1] * 4 + [3] * 4  # one n=3 call per question, one single
    assert table.num_rows == 12 and table["error"].null_count == 12
    # the prompt is billed once per call: shared by the choices of an n-call
    per_question = (100 / 2 + 10) * 2 / 1000 + (100 + 10) / 1000
    assert sum(table["cost_usd"].to_pylist()) == pytest.approx(4 * per_question)


# ---- resume after kill -9 -----------------------------------------------------------------
CHILD = """
import sys
import pyarrow.parquet as pq
from storage.store import Store
from tasks.teacher_backends.teach import teach
from tasks.config.teacher import TeacherConfig
teach(pq.read_table(sys.argv[1]), TeacherConfig.model_validate_json(sys.argv[2]), Store(sys.argv[3]))
"""


def kill_after_two_ledger_parts(child_args: list[str], store: Store) -> None:
    """Run `python -c *child_args` and SIGKILL it once it has flushed two ledger parts."""
    parts_dir = store.ledger_dir(LEDGER_NAME)
    child = subprocess.Popen([sys.executable, "-c", *child_args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while len(list(parts_dir.glob("part-*.parquet"))) < 2:
            assert child.poll() is None, "the child ended before it could be killed"
            assert time.monotonic() < deadline, "the child wrote no ledger parts"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL


def test_kill9_resume_sends_only_missing_requests(tmp_path):
    q = synthetic_questions(30)
    qpath = tmp_path / "questions.parquet"
    pq.write_table(q, qpath)
    store = Store(tmp_path / "store")
    cfg = TeacherConfig(samples=3, error_rate=0.2, scripted_delay_s=0.05, concurrency=2, flush_every=4)
    kill_after_two_ledger_parts([CHILD, str(qpath), cfg.model_dump_json(), str(store.root)], store)
    ledger = open_ledger(store, cfg)
    before = set(ledger.read()["request_id"].to_pylist())
    all_ids = {r.request_id for r in build_requests(q, cfg)}
    assert 0 < len(before) < len(all_ids)

    rerun = Scripted(error_rate=0.2)
    table, _, summary = teach(q, cfg.model_copy(update={"scripted_delay_s": 0.0}), store, backend=rerun)
    assert len(rerun.sent) == len(set(rerun.sent)) == len(all_ids) - len(before)
    assert set(rerun.sent) == all_ids - before
    ids = table["request_id"].to_pylist()
    assert table.num_rows == len(set(ids)) == 30 * 3 == summary["requests"]
    # resumed output equals an uninterrupted run's
    fresh, _, _ = teach(q, cfg.model_copy(update={"scripted_delay_s": 0.0}), Store(tmp_path / "fresh"))
    assert fresh["completion"].to_pylist() == table["completion"].to_pylist()


# ---- the stage shell ----------------------------------------------------------------------
def _commit_dataset(store: Store, questions: pa.Table) -> None:
    with store.lock("dataset", "d0"), store.writing("dataset", "d0", {}) as w:
        w.write_table("questions", questions.append_column("answer", pa.array(["0"] * questions.num_rows))
                      .append_column("answer_type", pa.array(["numeric"] * questions.num_rows)))


STAGE_CHILD = """
import sys
from types import SimpleNamespace
from storage.store import Store
from tasks.config.teacher import TeacherConfig
from tasks.stages.contract import execute
from tasks.stages.teacher import SPEC
cfg = TeacherConfig.model_validate_json(sys.argv[1])
execute(SPEC, SimpleNamespace(teacher=cfg), {"dataset": "d0", "teacher": "t0"}, Store(sys.argv[2]), show_progress=False)
"""


def test_kill9_of_the_streaming_stage_commits_nothing_and_the_rerun_sends_only_the_rest(tmp_path, monkeypatch):
    """The stage streams questions -> requests -> its table (StageWriter.table_writer); killed
    mid-run it leaves no table, and its rerun sends only what the ledger lacks and commits
    every row once."""
    from tasks.stages.contract import execute

    store = Store(tmp_path / "store")
    q = synthetic_questions(30)
    _commit_dataset(store, q)
    cfg = TeacherConfig(samples=3, scripted_delay_s=0.05, concurrency=2, flush_every=4)
    kill_after_two_ledger_parts([STAGE_CHILD, cfg.model_dump_json(), str(store.root)], store)
    assert not store.is_complete("teacher", "t0")
    before = set(open_ledger(store, cfg).read()["request_id"].to_pylist())
    all_ids = {r.request_id for r in build_requests(q, cfg)}
    assert 0 < len(before) < len(all_ids)
    rerun = Scripted()
    monkeypatch.setattr(factory, "make_backend", lambda *a, **k: rerun)  # count what the rerun sends
    out = execute(SPEC, SimpleNamespace(teacher=cfg.model_copy(update={"scripted_delay_s": 0.0})),
                  {"dataset": "d0", "teacher": "t0"}, store, show_progress=False)
    assert sorted(rerun.sent) == sorted(all_ids - before)
    table = store.read_table("teacher", "t0", "teacher_calls")
    assert out.rows == {"teacher_calls": 90} and sorted(table["request_id"].to_pylist()) == sorted(all_ids)


def test_stage_commits_table_or_nothing(tmp_path):
    from tasks.stages.contract import execute

    store = Store(tmp_path)
    _commit_dataset(store, synthetic_questions(4))
    prices = {"scripted": {"input_per_1k": 1.0, "output_per_1k": 1.0}}
    cfg = TeacherConfig(samples=2, prices=prices, max_cost_usd=0.0)
    keys = {"dataset": "d0", "teacher": "t0"}
    with pytest.raises(StageIncomplete):
        execute(SPEC, SimpleNamespace(teacher=cfg), keys, store, show_progress=False)
    assert not store.is_complete("teacher", "t0")
    cfg = cfg.model_copy(update={"max_cost_usd": None})
    out = execute(SPEC, SimpleNamespace(teacher=cfg), keys, store, show_progress=False)
    assert out.rows == {"teacher_calls": 8} and out.summary["requests"] == 8
    assert store.read_table("teacher", "t0", "teacher_calls").num_rows == 8


# ---- the openai backend against a mock transport -----------------------------------------
httpx2 = pytest.importorskip("httpx2")
openai = pytest.importorskip("openai")
from tasks.teacher_backends import openai_backend  # noqa: E402

SENTINEL = "sk-SENTINEL-0123456789abcdef"


def _chat_body(choices, usage=(10, 7)):
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
    }


def _backend(handler, monkeypatch, **cfg):
    monkeypatch.setenv("KPOD_TEST_KEY", SENTINEL)
    c = TeacherConfig(backend="openai", model="m", base_url="http://teacher.test/v1", api_key_env="KPOD_TEST_KEY", **cfg)
    client = openai.DefaultAsyncHttpxClient(transport=httpx2.MockTransport(handler))
    return c, openai_backend.make_backend(c, http_client=client)


def _one_request(cfg):
    q = pa.table({"question_id": ["a"], "split": ["train"], "question": ["How many?"], "meta": ["{}"]})
    return build_requests(q, cfg)[0]


def test_openai_chat_request_and_n_choices(monkeypatch):
    seen = []

    def handler(request):
        seen.append((request.url.path, request.headers["authorization"], json.loads(request.content)))
        return httpx2.Response(200, json=_chat_body([("one", "stop"), ("two", "length")]))

    cfg, be = _backend(handler, monkeypatch, seed=4, stop=["\n\n"], max_tokens=33)
    results = asyncio.run(be.complete_n(_one_request(cfg), 2))
    path, auth, body = seen[0]
    assert path == "/v1/chat/completions" and auth == f"Bearer {SENTINEL}"
    assert body["n"] == 2 and body["seed"] == 4 and body["stop"] == ["\n\n"] and body["max_tokens"] == 33
    assert body["messages"] == [{"role": "user", "content": "Q: How many?\nA: Let's think step by step."}]
    assert [r.completion for r in results] == ["one", "two"]
    assert [r.finish_reason for r in results] == ["stop", "length"] and all(r.error is None for r in results)
    assert [r.tokens_out for r in results] == [4, 3] and all(r.tokens_in == 10 for r in results)


def test_openai_completions_api(monkeypatch):
    def handler(request):
        body = json.loads(request.content)
        assert request.url.path == "/v1/completions" and body["prompt"].endswith("step by step.")
        return httpx2.Response(200, json={"id": "x", "object": "text_completion", "created": 0, "model": "m",
                                          "choices": [{"index": 0, "text": " 2 + 2 = 4.", "finish_reason": "stop"}],
                                          "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}})

    cfg, be = _backend(handler, monkeypatch, api="completions")
    r = asyncio.run(be.complete(_one_request(cfg)))
    assert (r.completion, r.tokens_in, r.tokens_out, r.error) == (" 2 + 2 = 4.", 5, 6, None)


@pytest.mark.parametrize(
    "response,kind,detail",
    [
        (lambda: httpx2.Response(429, headers={"retry-after": "3"}, json={"error": {"message": "slow"}}), RetryableTeacherError, 3.0),
        (lambda: httpx2.Response(429, headers={"retry-after-ms": "250"}, json={"error": {"message": "slow"}}), RetryableTeacherError, 0.25),
        (lambda: httpx2.Response(503, json={"error": {"message": "busy"}}), RetryableTeacherError, None),
        (lambda: httpx2.Response(200, headers={"content-type": "application/json"}, content=b"{not json"), RetryableTeacherError, None),
        (lambda: httpx2.Response(200, json={"id": "x", "object": "chat.completion", "choices": []}), RetryableTeacherError, None),
        (lambda: httpx2.Response(401, json={"error": {"message": f"Incorrect API key provided: {SENTINEL}"}}), FatalTeacherError, "api_key_env"),
        (lambda: httpx2.Response(404, json={"error": {"message": "no such model"}}), FatalTeacherError, "teacher.model"),
        (lambda: httpx2.Response(400, json={"error": {"message": "bad param"}}), FatalTeacherError, "HTTP 400"),
    ],
)
def test_openai_error_classes(monkeypatch, response, kind, detail):
    cfg, be = _backend(lambda request: response(), monkeypatch)
    with pytest.raises(kind) as info:
        asyncio.run(be.complete(_one_request(cfg)))
    assert SENTINEL not in str(info.value)
    if kind is RetryableTeacherError:
        assert info.value.retry_after == detail
    else:
        assert detail in str(info.value)


def test_openai_dropped_connection_is_retryable(monkeypatch):
    def handler(request):
        raise httpx2.RemoteProtocolError("peer closed connection", request=request)

    cfg, be = _backend(handler, monkeypatch)
    with pytest.raises(RetryableTeacherError, match="APIConnectionError"):
        asyncio.run(be.complete(_one_request(cfg)))


@pytest.mark.parametrize("text,reason,error", [("", "stop", "empty completion"), ("bad", "content_filter", "content_filter")])
def test_openai_filtered_or_empty_is_a_recorded_error(monkeypatch, text, reason, error):
    cfg, be = _backend(lambda request: httpx2.Response(200, json=_chat_body([(text, reason)])), monkeypatch)
    r = asyncio.run(be.complete(_one_request(cfg)))
    assert error in r.error and r.finish_reason == reason


def test_secret_block_wins_over_env(monkeypatch):
    """The key the flow looked up in a Secret block (handed in as `api_key`) beats the env var."""
    monkeypatch.delenv("KPOD_NO_SUCH_KEY", raising=False)
    cfg = TeacherConfig(backend="openai", model="m", api_key_env="KPOD_NO_SUCH_KEY", api_key_block="blk")
    be = factory.make_backend(cfg, api_key=SENTINEL)
    assert be.client.api_key == SENTINEL
    asyncio.run(be.aclose())


def test_http_client_picks_the_transport_and_is_not_in_the_stage_key(monkeypatch):
    assert isinstance(openai_backend.make_http_client("aiohttp", 8), openai.DefaultAioHttpClient)
    assert isinstance(openai_backend.make_http_client("httpx", 8), openai.DefaultAsyncHttpxClient)
    assert not isinstance(openai_backend.make_http_client("httpx", 8), openai.DefaultAioHttpClient)
    base = TeacherConfig(backend="openai", model="m")
    assert base.http_client == "aiohttp"
    assert TeacherConfig(backend="openai", model="m", http_client="httpx").hashable() == base.hashable()
    with pytest.raises(ValueError, match="http_client"):
        TeacherConfig(backend="openai", model="m", http_client="requests")
    with pytest.raises(FatalTeacherError, match="must be 'aiohttp' or 'httpx'"):
        openai_backend.make_http_client("requests", 8)


def test_aiohttp_not_installed_is_one_line_naming_the_extra(monkeypatch):
    class Missing:  # what openai exports when its aiohttp extra is not installed
        def __init__(self, **kw):
            raise RuntimeError("To use the aiohttp client you must have installed the package with the `aiohttp` extra")

    monkeypatch.setattr(openai, "DefaultAioHttpClient", Missing)
    monkeypatch.setenv("KPOD_TEST_KEY", SENTINEL)
    cfg = TeacherConfig(backend="openai", model="m", api_key_env="KPOD_TEST_KEY")
    with pytest.raises(FatalTeacherError, match=r"pip install 'openai\[aiohttp\]'") as info:
        openai_backend.make_backend(cfg)
    assert "\n" not in str(info.value) and "teacher.http_client: httpx" in str(info.value)


def test_duplicate_question_ids_are_refused(tmp_path):
    q = synthetic_questions(2)
    q = pa.concat_tables([q, q.slice(0, 1)])
    with pytest.raises(ValueError, match="question_id 'syn-train-0' appears more than once"):
        teach(q, TeacherConfig(), Store(tmp_path))


def test_openai_missing_key_variable_is_fatal(monkeypatch):
    monkeypatch.delenv("KPOD_NO_SUCH_KEY", raising=False)
    cfg = TeacherConfig(backend="openai", model="m", api_key_env="KPOD_NO_SUCH_KEY")
    with pytest.raises(FatalTeacherError, match="KPOD_NO_SUCH_KEY"):
        openai_backend.make_backend(cfg)


def test_secret_never_reaches_store_or_logs(tmp_path, monkeypatch, caplog):
    caplog.set_level("DEBUG")
    calls = []
    questions = synthetic_questions(3)
    doomed = questions["question"][0].as_py()  # every request about it fails, echoing the key

    def handler(request):
        calls.append(request.headers["authorization"])
        if doomed in request.content.decode() or len(calls) % 3 == 0:
            return httpx2.Response(429, headers={"retry-after": "0"}, json={"error": {"message": f"key {SENTINEL} slow"}})
        return httpx2.Response(200, json=_chat_body([("2 + 2 = 4. Therefore, the answer is 4.", "stop")]))

    cfg, be = _backend(handler, monkeypatch, samples=2, max_retries=2, backoff_s=0.001, backoff_max_s=0.001, max_error_fraction=1.0)
    store = Store(tmp_path)
    _commit_dataset(store, questions)
    monkeypatch.setattr(factory, "make_backend", lambda c, api_key=None: be)
    from tasks.stages.contract import execute

    out = execute(SPEC, SimpleNamespace(teacher=cfg), {"dataset": "d0", "teacher": "t0"}, store, show_progress=False)
    assert calls and all(a == f"Bearer {SENTINEL}" for a in calls)
    table = store.read_table("teacher", "t0", "teacher_calls")
    assert table.num_rows == 6 and out.summary["errors"] == 2
    errors = [e for e in table["error"].to_pylist() if e]
    assert len(errors) == 2 and all("key *** slow" in e for e in errors)  # recorded, scrubbed
    assert SENTINEL not in cfg.model_dump_json() and SENTINEL not in json.dumps(cfg.hashable())
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), path
    assert SENTINEL not in caplog.text


def test_rows_follow_question_order_and_empty_splits_are_refused(tmp_path):
    q = synthetic_questions(12)
    table, _, _ = teach(q, TeacherConfig(samples=2), Store(tmp_path))
    want = [(f"syn-train-{i}", s) for i in range(12) for s in range(2)]
    assert list(zip(table["question_id"].to_pylist(), table["sample"].to_pylist())) == want
    with pytest.raises(ValueError, match="no questions in splits"):
        teach(q.filter(pc.equal(q["split"], "test")), TeacherConfig(), Store(tmp_path))


def test_a_tpm_limit_does_not_read_the_questions_a_third_time(tmp_path):
    """The TPM bucket grows to each larger call as requests are sent, instead of a pass that
    built every request once more to find the largest: questions are read to plan and to send."""
    from tasks.teacher_backends.teach import teach_stream

    q = synthetic_questions(n_train=5)
    reads = []

    def questions():
        reads.append(1)
        return q.to_batches(2)

    cfg = TeacherConfig(samples=2, tpm=10_000_000, error_rate=0.0)
    rows = []
    stats, summary = teach_stream(questions, cfg, Store(tmp_path / "s"), rows.append, tmp_path / "scratch",
                                  backend=Scripted())
    assert len(reads) == 2 and summary["sent"] == 10 == sum(b.num_rows for b in rows)
