"""The teacher stage against a real OpenAI-compatible server on 127.0.0.1, with injected faults.

Everything goes through the real `openai` client (the `openai` backend) and the stage's async
orchestration (`tasks.teacher_backends.teach.teach`). The server records every request it receives, so each
test asserts exact request counts per question, and the 429 test compares the server-side
arrival times of a request and its retry instead of timing the client.
"""

from __future__ import annotations

import logging
import random
import secrets

import pyarrow as pa
import pytest

from storage.store import StageIncomplete, Store
from tasks.teacher_backends.teach import teach
from tasks.config.teacher import TeacherConfig
from tasks.teacher_backends.base import FatalTeacherError
from tests.support.openai_server import (  # noqa: F401
    FakeOpenAI, item_questions, lookup_responder, openai_server, serve, sum_responder,
)

KEY_ENV = "KPOD_TEST_KEY"
HTTP_CLIENT = "aiohttp"  # teacher.http_client of `_cfg`; every test runs with each transport


@pytest.fixture(autouse=True, params=["aiohttp", "httpx"])
def _api_key(monkeypatch, request):
    monkeypatch.setenv(KEY_ENV, "sk-test-0000")
    monkeypatch.setitem(globals(), "HTTP_CLIENT", request.param)


def _questions(n: int = 4) -> pa.Table:
    return item_questions(n)


def _cfg(server: FakeOpenAI, **kw) -> TeacherConfig:
    base = dict(
        backend="openai",
        model="scripted",
        base_url=server.base_url,
        api_key_env=KEY_ENV,
        concurrency=4,
        max_retries=3,
        backoff_s=0.01,  # so that a 1 s gap can only come from Retry-After
        backoff_max_s=0.05,
        request_timeout_s=5.0,
        seed=0,
        http_client=HTTP_CLIENT,
    )
    base.update(kw)
    return TeacherConfig(**base)


def _rows(table: pa.Table) -> dict[str, dict]:
    return {r["question_id"]: r for r in table.to_pylist()}


def _user_text(question: str) -> str:
    return f"Q: {question}\nA: Let's think step by step."  # the zero-shot template's message


def test_clean_run_one_request_per_question_with_usage(openai_server, tmp_path):
    qs = _questions(4)
    table, stats, summary = teach(qs, _cfg(openai_server), Store(tmp_path))
    assert openai_server.count() == 4 and stats.retries == 0
    for q in qs.column("question").to_pylist():
        assert openai_server.count(match=q) == 1
    rows = _rows(table)
    for i, q in enumerate(qs.column("question").to_pylist()):
        row = rows[f"q{i}"]
        assert row["completion"] == sum_responder(_user_text(q), 0)
        assert row["error"] is None and row["finish_reason"] == "stop"
        assert row["tokens_out"] == len(row["completion"].split()) and row["tokens_in"] > 0
    assert {r.path for r in openai_server.received} == {"/v1/chat/completions"}
    # the config's sampling parameters are what went over the wire (sample 0: seed + 0)
    for r in openai_server.received:
        assert (r.model, r.n) == ("scripted", 1)
        assert {k: r.params.get(k) for k in ("temperature", "top_p", "max_tokens", "seed")} == {
            "temperature": 0.7, "top_p": 1.0, "max_tokens": 512, "seed": 0
        }


def test_429_waits_for_retry_after_measured_on_the_server(openai_server, tmp_path):
    openai_server.add_fault("429", retry_after=1, match="Item-1:")
    table, stats, _ = teach(_questions(3), _cfg(openai_server), Store(tmp_path))
    attempts = [r for r in openai_server.received if "Item-1:" in r.text]
    assert [r.outcome for r in attempts] == ["429", "ok"]
    # the retry reached the server at least Retry-After after the first attempt did
    assert attempts[1].at - attempts[0].at >= 1.0
    assert openai_server.count(match="Item-0:") == 1 and openai_server.count(match="Item-2:") == 1
    assert stats.retries == 1 and _rows(table)["q1"]["error"] is None


@pytest.mark.parametrize("kind", ["500", "503", "drop", "malformed"])
def test_transient_faults_are_retried_until_success(openai_server, tmp_path, kind):
    openai_server.add_fault(kind, times=2, match="Item-2:")
    table, stats, _ = teach(_questions(3), _cfg(openai_server), Store(tmp_path))
    assert [r.outcome for r in openai_server.received if "Item-2:" in r.text] == [kind, kind, "ok"]
    assert openai_server.count() == 5 and stats.retries == 2
    row = _rows(table)["q2"]
    assert row["error"] is None and row["completion"] == sum_responder(_user_text(_questions(3)["question"][2].as_py()), 0)


def test_a_response_slower_than_the_timeout_is_retried(openai_server, tmp_path):
    openai_server.add_fault("slow", delay_s=10.0, match="Item-0:")
    table, stats, _ = teach(_questions(2), _cfg(openai_server, request_timeout_s=1.0), Store(tmp_path))
    assert [r.outcome for r in openai_server.received if "Item-0:" in r.text] == ["slow", "ok"]
    assert _rows(table)["q0"]["error"] is None and stats.retries == 1


def test_a_response_that_trickles_past_the_timeout_is_retried(openai_server, tmp_path):
    """teacher.request_timeout_s bounds the whole request: a body that arrives a few bytes at a
    time over 4 s, no read waiting more than 0.2 s, is given up after 1 s and asked again.
    Both clients' own timeouts bound each read only, so without kpod's bound it was accepted."""
    openai_server.add_fault("trickle", delay_s=4.0, match="Item-0:")
    table, stats, _ = teach(_questions(2), _cfg(openai_server, request_timeout_s=1.0), Store(tmp_path))
    assert [r.outcome for r in openai_server.received if "Item-0:" in r.text] == ["trickle", "ok"]
    assert _rows(table)["q0"]["error"] is None and stats.retries == 1


def test_slow_responses_within_the_timeout_run_concurrently_up_to_the_limit(openai_server, tmp_path):
    openai_server.latency_s = 0.05
    table, stats, _ = teach(_questions(12), _cfg(openai_server, concurrency=4), Store(tmp_path))
    assert openai_server.count() == 12 and stats.retries == 0 and table.num_rows == 12
    assert 2 <= openai_server.peak_in_flight <= 4  # overlapped, never past `concurrency`


def test_requests_in_flight_reuse_kept_alive_connections(openai_server, tmp_path):
    # two rounds of 128 requests in flight come on at most 128 connections: none is closed after
    # its response (a client opening a connection per request would show 256)
    openai_server.gather = 128  # the first 128 requests are answered only once all are in flight
    # header_limits off: with them the first call goes alone (it learns the server's limits)
    cfg = _cfg(openai_server, concurrency=128, request_timeout_s=60.0, header_limits=False)
    table, stats, _ = teach(_questions(256), cfg, Store(tmp_path))
    assert openai_server.count() == 256 and stats.retries == 0 and table.num_rows == 256
    assert openai_server.peak_in_flight == 128
    assert openai_server.connections() <= 128


def test_persistent_failure_is_recorded_and_only_it_is_resent(openai_server, tmp_path):
    store = Store(tmp_path)
    openai_server.add_fault("500", times=None, match="Item-1:")
    cfg = _cfg(openai_server, max_retries=2, max_error_fraction=0.0)
    with pytest.raises(StageIncomplete, match="1 of 3 requests failed after retries"):
        teach(_questions(3), cfg, store)
    assert openai_server.count(match="Item-1:") == 3  # 1 + max_retries
    openai_server.reset()
    table, _, summary = teach(_questions(3), cfg, store)  # the fault is gone: only q1 is resent
    assert openai_server.count() == 1 and openai_server.count(match="Item-1:") == 1
    assert summary["errors"] == 0 and summary["from_ledger"] == 2


def test_recorded_failure_row_says_why(openai_server, tmp_path):
    openai_server.add_fault("500", times=None, match="Item-0:")
    table, _, summary = teach(_questions(2), _cfg(openai_server, max_retries=1, max_error_fraction=1.0), Store(tmp_path))
    row = _rows(table)["q0"]
    assert row["completion"] is None and row["error"].startswith("gave up after 2 attempts: HTTP 500")
    assert summary["errors"] == 1


def test_empty_and_filtered_completions_are_errors_without_retries(openai_server, tmp_path):
    openai_server.add_fault("empty", match="Item-0:")
    openai_server.add_fault("content_filter", match="Item-1:")
    table, stats, summary = teach(_questions(3), _cfg(openai_server, max_error_fraction=1.0), Store(tmp_path))
    rows = _rows(table)
    assert openai_server.count(match="Item-0:") == 1 and openai_server.count(match="Item-1:") == 1
    assert rows["q0"]["completion"] is None and "empty completion" in rows["q0"]["error"]
    assert rows["q1"]["finish_reason"] == "content_filter" and "content_filter" in rows["q1"]["error"]
    assert rows["q2"]["error"] is None and summary["errors"] == 2


def test_length_is_a_success_that_keeps_its_finish_reason(openai_server, tmp_path):
    openai_server.add_fault("length", match="Item-0:")
    table, _, summary = teach(_questions(2), _cfg(openai_server), Store(tmp_path))
    row = _rows(table)["q0"]
    full = sum_responder(_user_text(_questions(2)["question"][0].as_py()), 0).split()
    assert row["finish_reason"] == "length" and row["error"] is None
    assert row["completion"] == " ".join(full[: len(full) // 2])
    assert openai_server.count(match="Item-0:") == 1 and summary["errors"] == 0


@pytest.mark.parametrize(
    "kind, expect", [("401", "HTTP 401.*api_key_env"), ("400", "HTTP 400"), ("404", "HTTP 404.*teacher.model")]
)
def test_client_errors_fail_fast_without_retries(openai_server, tmp_path, kind, expect):
    openai_server.add_fault(kind, times=None)
    with pytest.raises(FatalTeacherError, match=expect):
        teach(_questions(3), _cfg(openai_server, concurrency=1), Store(tmp_path))
    assert openai_server.count() == 1


def test_unknown_model_fails_fast(openai_server, tmp_path):
    with pytest.raises(FatalTeacherError, match="'no-such-model' with HTTP 404"):
        teach(_questions(2), _cfg(openai_server, model="no-such-model", concurrency=1), Store(tmp_path))
    assert [r.outcome for r in openai_server.received] == ["unknown_model"]


def test_n_samples_in_one_call_and_fallback_when_the_server_ignores_n(tmp_path):
    qs = _questions(2)
    with serve() as server:
        table, stats, _ = teach(qs, _cfg(server, samples=3, use_n=True), Store(tmp_path / "a"))
        assert server.count() == 2 and {r.n for r in server.received} == {3}
        with_n = {(r["question_id"], r["sample"]): r["completion"] for r in table.to_pylist()}
    with serve(FakeOpenAI(max_n=1)) as server:  # like a server that answers one choice only
        table, stats, _ = teach(qs, _cfg(server, samples=3, use_n=True), Store(tmp_path / "b"))
        assert server.count(match="Item-0:") == 3 and server.count(match="Item-1:") == 3
        fallback = {(r["question_id"], r["sample"]): r["completion"] for r in table.to_pylist()}
    assert len(with_n) == 6 and len(set(with_n.values())) == 6
    # sample i is sent seed + i, so both routes give each sample the same text
    assert fallback == with_n
    for (qid, sample), text in with_n.items():
        assert text == sum_responder(_user_text(qs["question"][int(qid[1:])].as_py()), sample)


def test_legacy_completions_endpoint(openai_server, tmp_path):
    qs = _questions(2)
    table, _, _ = teach(qs, _cfg(openai_server, api="completions"), Store(tmp_path))
    assert {r.path for r in openai_server.received} == {"/v1/completions"}
    for i, row in _rows(table).items():
        assert row["error"] is None and row["completion"] == sum_responder(_user_text(qs["question"][int(i[1:])].as_py()), 0)


def test_secret_sentinel_never_reaches_the_store_or_the_logs(tmp_path, monkeypatch, caplog, capsys):
    from tasks.config.pipeline import PipelineConfig
    from tasks.stages.registry import BY_NAME, STAGES
    from tasks.stages.contract import execute, plan
    from tasks.core.synthetic import problem_from_meta, render_rationale

    sentinel = f"sk-SENTINEL-{secrets.token_hex(12)}"
    monkeypatch.setenv(KEY_ENV, sentinel)
    caplog.set_level(logging.DEBUG)  # every logger, the openai client's and httpx's included
    store = Store(tmp_path / "store")
    cfg = PipelineConfig.model_validate(
        {
            "dataset": {"synthetic": {"n_train": 6, "n_val": 2, "n_test": 2}},
            "teacher": {
                "backend": "openai",
                "model": "scripted",
                "api_key_env": KEY_ENV,
                "base_url": "http://127.0.0.1:1/v1",  # replaced below once the server listens
                "samples": 2,
                "seed": 0,
                "backoff_s": 0.01,
                "max_error_fraction": 1.0,
                "http_client": HTTP_CLIENT,
            },
        }
    )
    keys = {p.name: p.key for p in plan(cfg, STAGES)}
    execute(BY_NAME["dataset"], cfg, keys, store, show_progress=False)
    questions = store.read_table("dataset", keys["dataset"], "questions").to_pylist()
    # the scripted teacher's rationales, looked up by question text (the meta is not sent)
    table = {
        q["question"]: [render_rationale(problem_from_meta(q["meta"]), random.Random(k)) for k in range(2)]
        for q in questions
    }
    with serve(FakeOpenAI(responder=lookup_responder(table))) as server:
        server.add_fault("429", retry_after=0, times=1)  # retries and error rows log messages too
        server.add_fault("500", times=1)
        server.add_fault("empty", times=1)
        cfg.teacher.base_url = server.base_url
        keys = {p.name: p.key for p in plan(cfg, STAGES)}  # base_url is not in the key...
        outcome = execute(BY_NAME["teacher"], cfg, keys, store, show_progress=True)
        assert server.authorizations() == {f"Bearer {sentinel}"}  # ...the server did get the key
    assert outcome.rows["teacher_calls"] == 12 and outcome.summary["retries"] >= 2
    needle = sentinel.encode()
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.name == "manifest.json" for p in files)
    leaked = [str(p) for p in files if needle in p.read_bytes()]
    assert leaked == []
    out = capsys.readouterr()
    assert sentinel not in out.out and sentinel not in out.err
    assert caplog.records and sentinel not in caplog.text
    assert all(sentinel not in r.getMessage() for r in caplog.records)
