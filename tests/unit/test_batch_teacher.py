"""The Batch API teacher (`teacher.backend: openai_batch`) through the real `openai` client
against the test server's `/v1/files` and `/v1/batches` on 127.0.0.1.

The server answers each batch line through its online endpoint, so `server.count(match=...)`
counts how often a question was really answered, and `server.batch.submitted()` lists the
request ids of every `POST /v1/batches`: a rerun that reattaches adds none, one that resends
failures adds exactly them. Kills are simulated in process by an exception injected at the
step in question; the records on disk are what a kill -9 would leave (each is fsynced)."""

from __future__ import annotations

import re
import secrets

import pyarrow as pa
import pytest

from storage.store import StageIncomplete, Store
from tasks.config.teacher import Price, TeacherConfig
from tasks.stages.teacher import TeacherInputs
from tasks.teacher_backends import openai_batch
from tasks.teacher_backends.base import FatalTeacherError
from tasks.teacher_backends.dispatcher import estimate_prompt_tokens
from tasks.teacher_backends.openai_batch import BatchRecords, jsonl_line, pack
from tasks.teacher_backends.requests import build_requests
from tasks.teacher_backends.teach import open_ledger, teach
from tests.support.openai_server import item_questions, openai_server, serve  # noqa: F401

KEY_ENV = "KPOD_TEST_KEY"
COLUMNS = ["request_id", "question_id", "sample", "prompt", "completion", "model", "finish_reason",
           "tokens_in", "tokens_out", "error", "part"]


class Killed(BaseException):
    """Stands for a kill: nothing after the injection point runs (not an Exception, so no
    handler of the code under test can swallow it)."""


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-0000")


def _cfg(server, **kw) -> TeacherConfig:
    base = dict(backend="openai_batch", model="scripted", base_url=server.base_url, api_key_env=KEY_ENV,
                seed=0, batch_poll_s=0.001, max_retries=1, backoff_s=0.001, backoff_max_s=0.01)
    return TeacherConfig(**{**base, **kw})


def _ids(qs: pa.Table, cfg: TeacherConfig, picks=None) -> list[str]:
    reqs = build_requests(qs, cfg)
    return [r.request_id for i, r in enumerate(reqs) if picks is None or i in picks]


def _rows(table: pa.Table) -> dict[str, dict]:
    return {r["question_id"]: r for r in table.to_pylist()}


def _records(store: Store) -> list[dict]:
    return BatchRecords(store).ledger.read(ok_column=None).to_pylist()


# ---- the same requests as online ----------------------------------------------------------
def test_a_batch_run_gives_the_online_rows_and_shares_their_ledger_and_key(openai_server, tmp_path):
    qs = item_questions(5)
    online = teach(qs, _cfg(openai_server, backend="openai"), Store(tmp_path / "online"))[0]
    online_params = [r.params for r in openai_server.received]
    openai_server.reset()
    store = Store(tmp_path / "batch")
    table, stats, summary = teach(qs, _cfg(openai_server), store)
    assert table.select(COLUMNS).to_pylist() == online.select(COLUMNS).to_pylist()
    assert summary["sent"] == 5 and summary["errors"] == 0 and stats.calls == 5
    assert openai_server.batch.submitted() == [_ids(qs, _cfg(openai_server))]
    # each line carried what the online request carried, and each question was answered once
    assert [r.params for r in openai_server.received] == online_params
    assert all(openai_server.count(match=f"Item-{i}:") == 1 for i in range(5))
    assert [r["status"] for r in _records(store)] == ["collected"]
    # the stage key and the ledger are shared: the batch config run over the online store
    # finds everything there and submits nothing
    assert (TeacherInputs(teacher=_cfg(openai_server), source={}).hashable()
            == TeacherInputs(teacher=_cfg(openai_server, backend="openai"), source={}).hashable())
    again = teach(qs, _cfg(openai_server), Store(tmp_path / "online"))[2]
    assert again["from_ledger"] == 5 and len(openai_server.batch.created) == 1


def test_requests_are_split_into_several_batches_within_the_caps(openai_server, tmp_path):
    qs = item_questions(5)
    cfg = _cfg(openai_server, batch_max_requests=2)
    table, _, summary = teach(qs, cfg, Store(tmp_path / "a"))
    ids = _ids(qs, cfg)
    assert openai_server.batch.submitted() == [ids[:2], ids[2:4], ids[4:]]
    assert summary["errors"] == 0 and table.num_rows == 5
    # a byte cap just above the longest line gives one line per file
    longest = max(len(jsonl_line(r, "chat")) for r in build_requests(qs, cfg))
    assert [len(reqs) for reqs, _ in pack(build_requests(qs, cfg), "chat", 50_000, longest + 1)] == [1] * 5
    assert [len(reqs) for reqs, _ in pack(build_requests(qs, cfg), "chat", 50_000, 2 * longest)] == [2, 2, 1]
    with pytest.raises(Exception, match="batch_max_bytes=10"):
        list(pack(build_requests(qs, cfg), "chat", 50_000, 10))


def test_progress_reports_lines_done_and_batch_states(openai_server, tmp_path):
    class Bar:
        def __init__(self, total):
            self.total, self.n, self.postfixes = total, 0, []

        def update(self, n):
            self.n += n

        def set_postfix(self, **kw):
            self.postfixes.append(kw)

    bars = []
    teach(item_questions(4), _cfg(openai_server), Store(tmp_path),
          progress=lambda total: bars.append(Bar(total)) or bars[-1])
    (bar,) = bars
    assert bar.total == 4 and bar.n == 4
    states = [p["batches"] for p in bar.postfixes]
    seen = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    # the server answers 2 lines a poll: in progress over two polls, finalizing, completed, collected
    assert seen == ["in_progress:1", "finalizing:1", "completed:1", "none running"]
    assert bar.postfixes[-1]["ok"] == 4 and bar.postfixes[-1]["err"] == 0


# ---- failures: only the failed and expired requests go again ------------------------------
def test_failed_and_expired_lines_are_ledgered_and_only_they_are_resubmitted(openai_server, tmp_path):
    qs, store = item_questions(5), Store(tmp_path)
    cfg = _cfg(openai_server)
    openai_server.add_fault("500", times=None, match="Item-1:")  # that line fails (error file)
    openai_server.batch.expire_after = 3  # lines 3 and 4 are never run: batch_expired
    with pytest.raises(StageIncomplete, match="3 of 5 requests failed"):
        teach(qs, cfg, store)
    rows = _rows(open_ledger(store, cfg).read())
    assert re.match(r"batch batch_0001: HTTP 500: The server had an error", rows["q1"]["error"])
    assert rows["q3"]["error"].startswith("batch batch_0001: batch_expired") and rows["q4"]["completion"] is None
    assert rows["q0"]["error"] is None and rows["q2"]["error"] is None
    openai_server.clear_faults()
    openai_server.batch.expire_after = None
    _, _, summary = teach(qs, cfg, store)
    ids = _ids(qs, cfg)
    assert openai_server.batch.submitted()[1:] == [[ids[1], ids[3], ids[4]]]
    assert openai_server.count(match="Item-0:") == 1 and openai_server.count(match="Item-3:") == 1
    assert summary["errors"] == 0 and summary["from_ledger"] == 2 and summary["sent"] == 3
    assert [r["status"] for r in _records(store)] == ["collected", "collected"]


def test_tolerated_line_errors_commit_like_online_ones(openai_server, tmp_path):
    openai_server.add_fault("empty", match="Item-0:")
    openai_server.add_fault("length", match="Item-1:")
    table, _, summary = teach(item_questions(3), _cfg(openai_server, max_error_fraction=1.0), Store(tmp_path))
    rows = _rows(table)
    assert rows["q0"]["error"] == "empty completion (finish_reason=stop)"
    assert rows["q1"]["finish_reason"] == "length" and rows["q1"]["error"] is None
    assert summary["errors"] == 1


def test_a_batch_that_fails_as_a_whole_stops_in_one_line_and_a_rerun_sends_it_again(openai_server, tmp_path):
    qs, store = item_questions(3), Store(tmp_path)
    openai_server.batch.fail_batches = 1
    whole = r"batch batch_0001 .* failed as a whole: invalid_request: injected"
    with pytest.raises(FatalTeacherError, match=whole) as err:
        teach(qs, _cfg(openai_server), store)
    assert "\n" not in str(err.value) and openai_server.count() == 0
    table, _, summary = teach(qs, _cfg(openai_server), store)
    assert openai_server.batch.submitted() == [_ids(qs, _cfg(openai_server))] * 2
    assert summary["errors"] == 0 and table.num_rows == 3


# ---- kills: the rerun reattaches ----------------------------------------------------------
def test_a_run_killed_while_polling_reattaches_instead_of_resubmitting(openai_server, tmp_path, monkeypatch):
    qs, store = item_questions(5), Store(tmp_path)
    openai_server.batch.lines_per_poll = 1

    def killed(_seconds):
        raise Killed()

    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr(openai_batch, "_sleep", killed)  # dies at the first wait between polls
        teach(qs, _cfg(openai_server, batch_max_requests=3), store)
    assert [r["status"] for r in _records(store)] == ["submitted", "submitted"]
    assert open_ledger(store, _cfg(openai_server)).read().num_rows == 0
    _, _, summary = teach(qs, _cfg(openai_server, batch_max_requests=3), store)
    assert len(openai_server.batch.created) == 2 and openai_server.batch.uploads == 2
    assert all(openai_server.count(match=f"Item-{i}:") == 1 for i in range(5))
    assert summary["errors"] == 0 and summary["sent"] == 5
    assert sorted(r["status"] for r in _records(store)) == ["collected", "collected"]


def test_a_reattached_batch_finds_its_requests_in_the_file_written_at_submission(openai_server, tmp_path, monkeypatch):
    """Each submission's requests are written beside its record (the run does not hold them);
    the rerun that collects the batch reads them there, and the file goes once the record is
    closed. A record without a file (written before those files existed) still collects, from a
    pass over the run's requests."""
    qs, store = item_questions(5), Store(tmp_path)
    openai_server.batch.lines_per_poll = 1

    def killed(_seconds):
        raise Killed()

    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr(openai_batch, "_sleep", killed)
        teach(qs, _cfg(openai_server, batch_max_requests=3), store)
    records = BatchRecords(store)
    first, second = _records(store)
    ids = _ids(qs, _cfg(openai_server))
    assert [rec["request_ids"] for rec in (first, second)] == [ids[:3], ids[3:]]
    for rec in (first, second):
        assert [r.request_id for r in openai_batch.read_requests(records.requests_path(rec))] == rec["request_ids"]
    records.requests_path(second).unlink()  # as a record from before the files
    read, real = [], openai_batch.read_requests

    def noting(path):
        read.append(path.name)
        return real(path)

    with monkeypatch.context() as m:
        m.setattr(openai_batch, "read_requests", noting)
        table, _, summary = teach(qs, _cfg(openai_server, batch_max_requests=3), store)
    assert f"{first['chunk_id']}.jsonl" in read and f"{second['chunk_id']}.jsonl" not in read
    assert summary["errors"] == 0 and table.num_rows == 5 and len(openai_server.batch.created) == 2
    assert _rows(table)[qs["question_id"][4].as_py()]["completion"]  # the file-less batch's results too
    assert list(records.requests_dir.iterdir()) == []  # closed records keep no file


class Drawn:
    """A sized re-iterable of requests (what the teacher stage hands in) that notes, as each
    request is drawn, how many batches the server has been asked to create so far."""

    def __init__(self, requests, server):
        self.requests, self.server, self.passes = requests, server, []

    def __len__(self):
        return len(self.requests)

    def __iter__(self):
        seen = []
        self.passes.append(seen)
        for r in self.requests:
            seen.append(len(self.server.batch.created))
            yield r


def test_batches_are_submitted_as_their_requests_are_drawn_not_after_all_are_built(openai_server, tmp_path):
    store = Store(tmp_path)
    cfg = _cfg(openai_server, batch_max_requests=2)
    todo = Drawn(build_requests(item_questions(7), cfg), openai_server)
    stats = openai_batch.run_batches(todo, open_ledger(store, cfg), store, cfg)
    assert stats.done == 7 and len(openai_server.batch.created) == 4
    ids, packing = todo.passes  # one pass for the ids, one to pack and submit
    assert ids == [0] * 7
    # request i is drawn after the files before it were submitted (a file of 2 is sent when the
    # request after it arrives): only the file being filled is held
    assert packing == [max(0, (i - 1) // 2) for i in range(7)] == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("dies_before, uploads, left", [("submitted", 1, ["uploaded"]), ("uploaded", 2, [])])
def test_a_kill_between_a_submission_step_and_its_record(
    openai_server, tmp_path, monkeypatch, dies_before, uploads, left
):
    """dies_before='submitted': `batches.create` answered, the batch id never reached the record;
    the rerun finds the batch by its recorded input file. dies_before='uploaded': the file was
    uploaded, its id never recorded, so no batch was created; the rerun uploads again."""
    qs, store = item_questions(3), Store(tmp_path)
    write = BatchRecords.write

    def dying(self, record, **changes):
        if changes.get("status") == dies_before:
            raise Killed()
        return write(self, record, **changes)

    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr(BatchRecords, "write", dying)
        teach(qs, _cfg(openai_server), store)
    assert [r["status"] for r in _records(store)] == left
    table, _, summary = teach(qs, _cfg(openai_server), store)
    assert len(openai_server.batch.created) == 1 and openai_server.batch.uploads == uploads
    assert all(openai_server.count(match=f"Item-{i}:") == 1 for i in range(3))
    assert summary["errors"] == 0 and table.num_rows == 3
    (record,) = _records(store)
    assert record["status"] == "collected" and record["batch_id"] == "batch_0001"
    assert list(BatchRecords(store).requests_dir.iterdir()) == []  # the unrecorded chunk's file too


def test_a_batch_cancelled_while_kpod_was_away_gives_back_only_its_unrun_requests(openai_server, tmp_path):
    import openai

    qs, store = item_questions(4), Store(tmp_path)
    openai_server.batch.lines_per_poll = 1
    # the first run's one poll starts the batch; the second run's two (reattach, wait) answer two lines
    for _ in range(2):
        with pytest.raises(StageIncomplete, match="still running"):
            teach(qs, _cfg(openai_server, batch_wait_s=1e-9), store)
    assert len(openai_server.batch.created) == 1 and openai_server.count() == 2
    client = openai.OpenAI(base_url=openai_server.base_url, api_key="sk-test-0000", max_retries=0)
    client.batches.cancel("batch_0001")
    with pytest.raises(StageIncomplete, match="2 of 4 requests failed"):
        teach(qs, _cfg(openai_server), store)  # reattaches: the batch is cancelled with one result
    rows = _rows(open_ledger(store, _cfg(openai_server)).read())
    assert rows["q1"]["error"] is None and rows["q2"]["error"].startswith("batch batch_0001: batch_cancelled")
    teach(qs, _cfg(openai_server), store)
    assert openai_server.batch.submitted()[1:] == [_ids(qs, _cfg(openai_server))[2:]]
    assert all(openai_server.count(match=f"Item-{i}:") == 1 for i in range(4))


def test_batch_wait_s_ends_incomplete_and_the_rerun_reattaches(openai_server, tmp_path):
    qs, store = item_questions(3), Store(tmp_path)
    with pytest.raises(StageIncomplete, match="1 batch.* still running after teacher.batch_wait_s"):
        teach(qs, _cfg(openai_server, batch_wait_s=1e-9), store)
    table, _, summary = teach(qs, _cfg(openai_server), store)
    assert len(openai_server.batch.created) == 1 and summary["errors"] == 0 and table.num_rows == 3


# ---- price and budget ---------------------------------------------------------------------
def test_cost_is_at_the_batch_price_and_the_budget_holds(openai_server, tmp_path):
    qs, store = item_questions(5), Store(tmp_path)
    price = {"scripted": Price(input_per_1k=1.0, output_per_1k=2.0)}
    probe = _cfg(openai_server, prices=price, max_tokens=100)
    # the dispatcher's estimate at half price: room for exactly the first two requests
    est = [(estimate_prompt_tokens(r) * 1.0 + 100 * 2.0) / 1000 * 0.5 for r in build_requests(qs, probe)]
    cfg = _cfg(openai_server, prices=price, max_tokens=100, max_cost_usd=est[0] + est[1] + est[2] / 2)
    with pytest.raises(StageIncomplete, match="budget max_cost_usd=.* 3 not sent"):
        teach(qs, cfg, store)
    ids = _ids(qs, cfg)
    assert openai_server.batch.submitted() == [ids[:2]]
    for row in open_ledger(store, cfg).read().to_pylist():
        assert row["cost_usd"] == pytest.approx((row["tokens_in"] * 1.0 + row["tokens_out"] * 2.0) / 1000 * 0.5)
    _, _, summary = teach(qs, cfg.model_copy(update={"max_cost_usd": None}), store)
    assert openai_server.batch.submitted()[1:] == [ids[2:]] and summary["from_ledger"] == 2


# ---- two-stage ----------------------------------------------------------------------------
def test_two_stage_sends_a_reasoning_batch_then_an_answer_batch(openai_server, tmp_path):
    trigger = "Therefore, the answer (arabic numerals) is"

    def responder(text, k):
        a, b = (int(x) for x in re.findall(r"has (\d+) apples and buys (\d+)", text)[0])
        return f" {a + b}." if trigger in text else f"{a} + {b} = {a + b} apples."

    openai_server.responder = responder
    qs = item_questions(3)
    online = teach(qs, _cfg(openai_server, backend="openai", protocol="two_stage"), Store(tmp_path / "o"))[0]
    table, _, summary = teach(qs, _cfg(openai_server, protocol="two_stage"), Store(tmp_path / "b"))
    assert [len(ids) for ids in openai_server.batch.submitted()] == [3, 3]
    assert table.column("part").to_pylist() == ["reasoning"] * 3 + ["answer"] * 3
    assert table.select(COLUMNS).to_pylist() == online.select(COLUMNS).to_pylist()
    assert summary["sent"] == 6 and summary["errors"] == 0


# ---- the secret ---------------------------------------------------------------------------
def test_the_key_is_sent_but_never_written(tmp_path, monkeypatch):
    sentinel = f"sk-SENTINEL-{secrets.token_hex(12)}"
    monkeypatch.setenv(KEY_ENV, sentinel)
    store = Store(tmp_path)
    with serve() as server:
        server.add_fault("500", times=None, match="Item-0:")
        server.batch.expire_after = 2
        cfg = _cfg(server, max_error_fraction=1.0, batch_max_requests=2)
        teach(item_questions(4), cfg, store)
        server.clear_faults()
        server.batch.expire_after = None
        teach(item_questions(4), cfg.model_copy(update={"protocol": "two_stage"}), store)
        assert server.authorizations() == {f"Bearer {sentinel}"}
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert any("teacher_batches" in str(p) for p in files) and any("teacher" in p.parent.name for p in files)
    assert [str(p) for p in files if sentinel.encode() in p.read_bytes()] == []


# ---- config -------------------------------------------------------------------------------
def test_batch_config_hashes_as_openai_and_its_fields_are_runtime():
    from tasks.teacher_backends import factory

    qs = item_questions(3)
    online = TeacherConfig(backend="openai", model="m", base_url="http://a/v1", samples=2)
    batch = online.model_copy(update={"backend": "openai_batch"})
    assert [r.request_id for r in build_requests(qs, batch)] == [r.request_id for r in build_requests(qs, online)]
    # where the model is served is runtime for both (teacher.base_url): the ledger never held it
    assert batch.hashable() == online.hashable() and "base_url" not in batch.hashable()
    runtime = dict(batch_max_requests=7, batch_max_bytes=1000, batch_poll_s=1.0, batch_wait_s=5.0, batch_discount=0.2)
    assert TeacherConfig(**{**batch.model_dump(), **runtime}).hashable() == batch.hashable()
    assert TeacherConfig(backend="openai_batch", model="m", base_url="http://b/v1").hashable() != batch.hashable()
    with pytest.raises(ValueError, match="batch_max_requests"):
        TeacherConfig(backend="openai_batch", batch_max_requests=50_001)
    with pytest.raises(ValueError, match="per-request backend"):
        factory.make_backend(batch)
