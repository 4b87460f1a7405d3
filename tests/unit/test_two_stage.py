"""Two-stage zero-shot-CoT (`teacher.protocol: two_stage`, Kojima et al. 2022) through the real
`openai` client and the test server: a reasoning request, then an answer-extraction request that
continues it with the answer trigger; both ledgered, neither paid twice, resumable between them."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from storage.store import Store
from tasks.config.rationales import RationalesConfig
from tasks.config.teacher import TeacherConfig
from tasks.core.prompts import answer_trigger
from tasks.stages.rationales import build
from tasks.teacher_backends.base import FatalTeacherError
from tasks.teacher_backends.requests import build_answer_requests, build_requests
from tasks.teacher_backends.teach import teach
from tests.support.openai_server import item_questions, openai_server  # noqa: F401

KEY_ENV = "KPOD_TEST_KEY"
TRIGGER = "Therefore, the answer (arabic numerals) is"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-0000")


def _questions(n: int = 3) -> pa.Table:
    return item_questions(n)


def responder(text: str, k: int) -> str:
    """Reasoning that never states the answer as an answer phrase and computes on after the sum
    (the released chains' kind); the answer call answers the sum."""
    a, b = (int(x) for x in re.findall(r"has (\d+) apples and buys (\d+)", text)[0])
    if TRIGGER in text:
        return f" {a + b}."
    return f"She starts with {a} and buys {b}, so {a} + {b} = {a + b} apples. Half of them is {(a + b) / 2}."


def _cfg(server, **kw) -> TeacherConfig:
    base = dict(backend="openai", model="scripted", base_url=server.base_url, api_key_env=KEY_ENV,
                protocol="two_stage", concurrency=4, max_retries=0, seed=0)
    return TeacherConfig(**{**base, **kw})


def test_both_requests_are_ledgered_and_a_rerun_sends_nothing(openai_server, tmp_path):
    openai_server.responder = responder
    qs, store = _questions(), Store(tmp_path)
    table, stats, summary = teach(qs, _cfg(openai_server), store)
    assert openai_server.count() == 6 and openai_server.count(match=TRIGGER) == 3
    assert table.column("part").to_pylist() == ["reasoning"] * 3 + ["answer"] * 3
    assert summary["requests"] == 6 and summary["sent"] == 6 and summary["errors"] == 0
    answers = [r for r in openai_server.received if TRIGGER in r.text]
    for r in answers:  # the second request continues the first with its reasoning and the trigger
        reasoning = responder(r.text.split("\nA:")[0], 0)
        assert r.text.endswith(f"Let's think step by step. {reasoning}\n{TRIGGER}")
        assert r.params["max_tokens"] == 32
    # the rationale is the reasoning; the teacher's answer is the second call's, graded on gold
    out = build(qs, table, RationalesConfig())["rationales"].to_pylist()
    assert [r["text"] for r in out] == [responder(q, 0) for q in qs.column("question").to_pylist()]
    assert [r["pred"] for r in out] == ["5", "7", "9"] and all(r["correct"] for r in out)
    # one stage would grade the chain's last number (the half) and call every rationale wrong
    one = teach(qs, _cfg(openai_server, protocol="one_stage"), Store(tmp_path / "one"))[0]
    assert not any(r["correct"] for r in build(qs, one, RationalesConfig())["rationales"].to_pylist())
    before = openai_server.count()
    again, stats, summary = teach(qs, _cfg(openai_server), store)
    assert openai_server.count() == before and summary["sent"] == 0 and summary["from_ledger"] == 6
    assert again.column("request_id").to_pylist() == table.column("request_id").to_pylist()


def test_a_run_stopped_between_the_two_requests_resumes_with_neither_repeated(openai_server, tmp_path):
    openai_server.responder = responder
    qs, store = _questions(), Store(tmp_path)
    # the first answer request fails for good: the run stops after every reasoning is ledgered
    openai_server.add_fault("400", times=None, match=TRIGGER)
    with pytest.raises(FatalTeacherError):
        teach(qs, _cfg(openai_server), store)
    reasoning_sent = openai_server.count() - openai_server.count(match=TRIGGER)
    assert reasoning_sent == 3
    openai_server.clear_faults()
    openai_server.reset()
    table, _, summary = teach(qs, _cfg(openai_server), store)
    assert openai_server.count() == openai_server.count(match=TRIGGER) == 3  # only the answers
    assert summary["from_ledger"] == 3 and summary["sent"] == 3 and table.num_rows == 6


def test_the_answer_requests_id_covers_the_reasoning_and_the_trigger_names_the_choices():
    qs = _questions(1)
    cfg = TeacherConfig(backend="openai", model="m", protocol="two_stage")
    first = build_requests(qs, cfg)
    assert [r.part for r in first] == ["reasoning"]
    a = build_answer_requests(qs, cfg, first, {first[0].request_id: "2 + 3 = 5."})
    b = build_answer_requests(qs, cfg, first, {first[0].request_id: "2 + 3 = 6."})
    assert a[0].request_id != b[0].request_id and a[0].part == "answer"
    assert build_answer_requests(qs, cfg, first, {}) == []  # no reasoning yet: no answer request
    # the one-stage request is the reasoning request (paid once for both protocols)
    assert build_requests(qs, TeacherConfig(backend="openai", model="m"))[0].request_id == first[0].request_id
    q = "Which is true? Answer choices: (A) 1, (B) 2, (C) 3, (D) 4."
    assert answer_trigger("choice", q) == "Therefore, among A through D, the answer is"
    assert answer_trigger("numeric", q) == TRIGGER
    assert answer_trigger("yesno", q) == "Therefore, the answer (Yes or No) is"
    with pytest.raises(ValueError, match="two_stage"):
        TeacherConfig(backend="replay", replay_path="x.json", protocol="two_stage")


def test_the_scripted_teacher_emits_two_stage(tmp_path):
    from tasks.config.dataset import SyntheticConfig
    from tasks.stages.dataset import synthetic_tables

    qs, _ = synthetic_tables(SyntheticConfig(n_train=6, n_val=1, n_test=1))
    cfg = TeacherConfig(protocol="two_stage", error_rate=0.0)
    table, _, summary = teach(qs, cfg, Store(tmp_path))
    assert table.column("part").to_pylist().count("answer") == 6 and summary["errors"] == 0
    out = build(qs, table, RationalesConfig())["rationales"].to_pylist()
    assert len(out) == 6 and all(r["correct"] for r in out)


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_one_backend_serves_both_rounds_and_a_later_run(openai_server, tmp_path, client):
    """The two rounds run on two event loops; a backend the caller made and passed in keeps
    working across them (its connections are per loop), and again in a later run. Before, the
    second loop failed with 'Event loop is closed' (httpx) or a timer outside a task (aiohttp)."""
    import warnings

    from tasks.teacher_backends import openai_backend

    openai_server.responder = responder
    cfg = _cfg(openai_server, http_client=client)
    backend = openai_backend.make_backend(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # no connection left open by a round
        table, _, summary = teach(_questions(), cfg, Store(tmp_path), backend=backend)
        assert summary["sent"] == 6 and summary["errors"] == 0 and table.num_rows == 6
        again = teach(_questions(4), cfg, Store(tmp_path / "later"), backend=backend)[2]
    assert again["sent"] == 8 and again["errors"] == 0


def test_the_answer_round_is_built_a_question_batch_at_a_time(tmp_path, monkeypatch):
    """Questions in batches of 2: the answer requests are built from one batch at a time (the
    reasoning texts wait in DuckDB), and the table equals the run with every question in one batch."""
    from tasks.config.dataset import SyntheticConfig
    from tasks.stages.dataset import synthetic_tables
    from tasks.teacher_backends import teach as teach_module

    qs, _ = synthetic_tables(SyntheticConfig(n_train=7, n_val=0, n_test=0))
    cfg = TeacherConfig(protocol="two_stage", error_rate=0.0)
    whole = teach(qs, cfg, Store(tmp_path / "whole"))[0]
    seen: list[int] = []
    real = teach_module.build_answer_requests

    def spy(questions, *args):
        seen.append(questions.num_rows)
        return real(questions, *args)

    monkeypatch.setattr(teach_module, "build_answer_requests", spy)
    monkeypatch.setattr(teach_module, "REQUEST_BATCH", 2)
    batched, _, summary = teach(qs, cfg, Store(tmp_path / "batched"))
    assert seen and max(seen) == 2 and sum(seen) == 2 * 7  # two passes (count, send), 2 rows at most
    assert batched.column("part").to_pylist() == ["reasoning"] * 7 + ["answer"] * 7
    cols = ["request_id", "question_id", "part", "completion"]
    assert batched.select(cols).to_pylist() == whole.select(cols).to_pylist()
    assert summary["requests"] == 14 and summary["sent"] == 14


def test_both_rounds_in_shards_give_the_unsharded_table(openai_server, tmp_path):
    """`teacher.shards` streams each round's requests into shard files; the answer round's are
    built from the ledgered reasoning as they are written, and the table is an unsharded run's."""
    openai_server.responder = responder
    qs = _questions(5)
    plain, _, _ = teach(qs, _cfg(openai_server), Store(tmp_path / "one"))
    openai_server.reset()
    openai_server.responder = responder
    sharded, stats, summary = teach(qs, _cfg(openai_server, shards=3), Store(tmp_path / "sharded"))
    assert openai_server.count() == 10 and stats.done == summary["sent"] == 10
    for col in ("request_id", "part", "completion"):
        assert sharded.column(col).to_pylist() == plain.column(col).to_pylist()
