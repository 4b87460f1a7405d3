"""Teacher shards without Prefect: the split, the shards' ledger parts, limits, a killed shard.

The flow-level test (shards as Prefect tasks on a 2-worker Dask LocalCluster) is
tests/e2e/test_teacher_dask.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import pickle
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.store import StageIncomplete, Store
from tasks.config.teacher import TeacherConfig
from tasks.teacher_backends.base import TeacherRequest, TeacherResult
from tasks.teacher_backends.requests import build_requests
from tasks.teacher_backends.request_files import request_from_dict
from tasks.teacher_backends.shards import (
    ShardRequests,
    run_shard,
    shard_config,
    shard_job,
    write_shards,
)
from tasks.teacher_backends.teach import LEDGER_NAME, open_ledger, teach
from tests.unit.test_teacher import Scripted, synthetic_questions


def ledger_rows(store: Store) -> pa.Table:
    """Every record of every part file, duplicates included (Ledger.read keeps one per id)."""
    parts = sorted(store.ledger_dir(LEDGER_NAME).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def split_requests(requests, n, where):
    """The shards' requests, read back from the files `write_shards` wrote (none skipped)."""
    return [list(ShardRequests(f.path, set())) for f in write_shards(iter(requests), n, where)]


def test_split_keeps_questions_together_balanced_and_deterministic(tmp_path):
    requests = build_requests(synthetic_questions(n_train=11), TeacherConfig(samples=3))
    for n in (1, 2, 3, 4, 7, 11, 50):
        shards = split_requests(requests, n, tmp_path / f"a{n}")
        assert len(shards) == min(n, 11) and all(shards)
        ids = [r.request_id for s in shards for r in s]
        assert sorted(ids) == sorted(r.request_id for r in requests)  # each in exactly one shard
        owner = {r.question_id: i for i, s in enumerate(shards) for r in s}
        assert all(owner[r.question_id] == i for i, s in enumerate(shards) for r in s)  # samples together
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 3  # within one question's requests
        assert sorted(p.name for p in (tmp_path / f"a{n}").iterdir()) == [f"shard-{i:04d}.jsonl" for i in range(len(shards))]
        assert [[r.request_id for r in s] for s in split_requests(requests, n, tmp_path / f"b{n}")] == [
            [r.request_id for r in s] for s in shards
        ]


def test_shard_config_divides_stage_limits():
    cfg = TeacherConfig(concurrency=16, rpm=600, tpm=90_000, max_cost_usd=3.0, shards=4,
                        prices={"scripted": {"input_per_1k": 1.0, "output_per_1k": 1.0}})
    one = shard_config(cfg, 4)
    assert (one.shards, one.concurrency, one.rpm, one.tpm, one.max_cost_usd) == (1, 4, 150, 22_500, 0.75)
    assert shard_config(TeacherConfig(concurrency=2), 3).concurrency == 1
    assert one.hashable() == cfg.hashable()  # sharding is runtime: the stage key does not move


def test_shards_are_runtime_and_refused_for_the_batch_api():
    assert TeacherConfig(shards=8).hashable() == TeacherConfig().hashable()
    with pytest.raises(ValueError, match="openai_batch"):
        TeacherConfig(backend="openai_batch", model="m", shards=2)


def test_a_job_is_small_plain_data_naming_a_file_that_rebuilds_its_requests(tmp_path):
    requests = build_requests(synthetic_questions(n_train=40), TeacherConfig(samples=2))
    (part,) = write_shards(iter(requests), 1, tmp_path / "shards")
    job = pickle.loads(pickle.dumps(shard_job(0, part, TeacherConfig(), Store(tmp_path))))
    assert job["requests"] == len(requests) == 80
    assert list(ShardRequests(Path(job["requests_file"]), set())) == requests
    assert request_from_dict(json.loads(json.dumps(dataclasses.asdict(requests[0])))) == requests[0]
    assert TeacherConfig.model_validate(job["config"]) == TeacherConfig()
    # what travels to a worker does not grow with the shard: a path and a count, not the requests
    assert len(json.dumps(job)) < 2000 < sum(len(r.prompt) for r in requests)
    skip = {r.request_id for r in requests[::2]}
    pending = ShardRequests(Path(job["requests_file"]), skip)
    assert len(pending) == 40 and list(pending) == requests[1::2]


def test_requests_are_streamed_into_the_shard_files_not_held(tmp_path, monkeypatch):
    """`write_shards` writes each question's requests before it draws past the next question's
    first: never more than one question's requests (+1) drawn and not yet written."""
    from tasks.teacher_backends import shards

    requests = build_requests(synthetic_questions(n_train=30), TeacherConfig(samples=3))
    written, unwritten = [0], []
    line = shards.request_line

    def counted(r):
        written[0] += 1
        return line(r)

    monkeypatch.setattr(shards, "request_line", counted)

    def lazily():
        for i, r in enumerate(requests):
            unwritten.append(i + 1 - written[0])  # drawn (this one included) minus written
            yield r

    parts = write_shards(lazily(), 4, tmp_path / "s")
    assert written[0] == 90 and sum(p.count for p in parts) == 90
    assert max(unwritten) == 3 + 1  # one question's 3 samples, and the request that ends them
    assert [sum(1 for _ in ShardRequests(p.path, set())) for p in parts] == [p.count for p in parts]


def test_sharded_run_merges_into_the_unsharded_table(tmp_path):
    q = synthetic_questions(n_train=10)
    plain, _, _ = teach(q, TeacherConfig(samples=2, error_rate=0.0), Store(tmp_path / "one"), backend=Scripted())
    store = Store(tmp_path / "sharded")
    sent = Scripted()
    cfg = TeacherConfig(samples=2, error_rate=0.0, shards=3, flush_every=2)
    table, stats, summary = teach(q, cfg, store, backend=sent)
    assert table["request_id"].to_pylist() == plain["request_id"].to_pylist()
    assert table["completion"].to_pylist() == plain["completion"].to_pylist()
    assert stats.done == summary["sent"] == 20 and len(sent.sent) == 20
    raw = ledger_rows(store)
    assert raw.num_rows == 20 and max(Counter(raw["request_id"].to_pylist()).values()) == 1  # no duplicate


def _pool_map(fn, jobs):
    """A map_shards whose shards run in other processes (what a Dask worker does, minus Dask)."""
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, jobs))


def test_shards_run_in_other_processes_through_map_shards(tmp_path):
    q = synthetic_questions(n_train=8)
    store = Store(tmp_path)
    cfg = TeacherConfig(samples=2, shards=2, flush_every=3)
    table, stats, _ = teach(q, cfg, store, map_shards=_pool_map)
    assert table.num_rows == 16 and stats.done == 16
    assert set(table["request_id"].to_pylist()) == {r.request_id for r in build_requests(q, cfg)}
    raw = ledger_rows(store)
    assert sorted(raw["request_id"].to_pylist()) == sorted(table["request_id"].to_pylist())
    pids = {p.name.split("-")[2] for p in store.ledger_dir(LEDGER_NAME).glob("part-*.parquet")}
    assert len(pids) == 2  # each shard wrote its own part files, from its own process


class DiesAt(Scripted):
    """A teacher whose process dies (an exception no retry catches) when asked about `question_id`."""

    def __init__(self, question_id: str):
        super().__init__()
        self.question_id = question_id

    async def complete(self, request: TeacherRequest) -> TeacherResult:
        if request.question_id == self.question_id:
            raise RuntimeError("worker killed")
        return await super().complete(request)


def test_a_killed_shard_leaves_its_finished_requests_and_the_rerun_sends_only_the_rest(tmp_path):
    q = synthetic_questions(n_train=9)
    store = Store(tmp_path)
    cfg = TeacherConfig(samples=1, shards=3, concurrency=3, flush_every=1)  # one request at a time per shard
    shards = split_requests(build_requests(q, cfg), 3, tmp_path / "split")
    doomed = shards[1]
    dying = DiesAt(doomed[2].question_id)
    with pytest.raises(RuntimeError, match="worker killed"):
        teach(q, cfg, store, backend=dying)
    kept = set(open_ledger(store, cfg).read()["request_id"].to_pylist())
    # the other shards finished; the killed one kept what it had sent before it died
    expected = {r.request_id for s in (shards[0], shards[2]) for r in s} | {r.request_id for r in doomed[:2]}
    assert kept == expected == set(dying.sent)
    rerun = Scripted()
    table, _, summary = teach(q, cfg, store, backend=rerun)
    assert sorted(rerun.sent) == sorted(r.request_id for r in doomed[2:])
    assert table.num_rows == 9 and summary["from_ledger"] == 9 - len(doomed[2:])
    assert max(Counter(ledger_rows(store)["request_id"].to_pylist()).values()) == 1


def test_the_budget_holds_over_all_shards(tmp_path):
    q = synthetic_questions()
    store = Store(tmp_path)
    prices = {"scripted": {"input_per_1k": 1.0, "output_per_1k": 1.0}}
    cfg = TeacherConfig(samples=2, max_tokens=100, prices=prices, max_cost_usd=1.0, concurrency=2, shards=2)
    with pytest.raises(StageIncomplete, match="max_cost_usd"):
        teach(q, cfg, store, backend=Scripted())
    done = open_ledger(store, cfg).read()
    assert 0 < done.num_rows < 12 and sum(done["cost_usd"].to_pylist()) <= 1.0


def test_a_shard_run_twice_sends_only_what_its_first_attempt_missed(tmp_path):
    q = synthetic_questions()
    store = Store(tmp_path)
    cfg = TeacherConfig(samples=2, flush_every=1)
    requests = build_requests(q, cfg)
    dying = DiesAt(requests[6].question_id)  # samples 0 and 1 of the fourth question
    (part,) = write_shards(iter(requests), 1, tmp_path / "shards")
    job = shard_job(0, part, cfg.model_copy(update={"concurrency": 1}), store)
    with pytest.raises(RuntimeError, match="worker killed"):
        run_shard(job, backend=dying)
    again = Scripted()
    assert run_shard(job, backend=again)["done"] == 6  # what Dask does when the worker died
    assert sorted(again.sent) == sorted(r.request_id for r in requests[6:])
