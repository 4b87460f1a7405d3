"""The teacher's shards as Prefect tasks on a real Dask cluster (2 worker processes on 127.0.0.1).

The teacher is the openai backend against the test server (tests/support/openai_server.py), so
the server's record of what it received says what was paid for. Shards write their ledger parts
from the workers' processes; the stage reads the merged ledger.
"""

from __future__ import annotations

import importlib
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from storage.store import Store
from tasks.core.synthetic import generate
from tasks.teacher_backends.requests import build_requests
from tasks.teacher_backends.teach import LEDGER_NAME, open_ledger
from tests.support.openai_server import FakeOpenAI, serve
from tests.unit.test_teacher_shards import ledger_rows, split_requests

pytestmark = pytest.mark.e2e

KEY_ENV = "KPOD_DASK_TEST_KEY"  # the workers read the key from their own environment


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    os.environ[KEY_ENV] = "sk-dask-test"  # before the workers start: they inherit it
    c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0")
    try:
        from distributed import Client

        with Client(c.scheduler_address, set_as_default=False) as client:  # import once, in setup
            client.run(importlib.import_module, "flows.shards")
        yield c
    finally:
        c.close()
        os.environ.pop(KEY_ENV, None)


def worker_pids(cluster) -> list[int]:
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as client:
        return sorted(client.run(os.getpid).values())


def teacher_config(smoke_config, server: FakeOpenAI):
    teacher = smoke_config.teacher.model_copy(update=dict(
        backend="openai", base_url=server.base_url, api_key_env=KEY_ENV, samples=1, shards=2,
        concurrency=2, flush_every=1, max_retries=0,  # one request at a time per shard
    ))
    dataset = smoke_config.dataset.model_copy(deep=True)
    dataset.synthetic.n_train = 24
    return smoke_config.model_copy(update={"teacher": teacher, "dataset": dataset})


def shards_of(cfg) -> list[list]:
    """The split the stage makes (every request is pending on a fresh store)."""
    import pyarrow as pa

    problems = generate(cfg.dataset.synthetic)
    q = pa.table({"question_id": [p.question_id for p in problems], "split": [p.split for p in problems],
                  "question": [p.question for p in problems], "meta": [p.meta_json() for p in problems]})
    with tempfile.TemporaryDirectory() as where:
        return split_requests(build_requests(q, cfg.teacher), cfg.teacher.shards, Path(where))


def ledger_part_pids(store: Store) -> list[int]:
    """The writing process of each record, in `ledger_rows` order."""
    import pyarrow.parquet as pq

    parts = sorted(store.ledger_dir(LEDGER_NAME).glob("part-*.parquet"))
    return [int(p.name.split("-")[2]) for p in parts for _ in range(pq.read_metadata(p).num_rows)]


def part_pids(store: Store) -> Counter:
    return Counter(int(p.name.split("-")[2]) for p in store.ledger_dir(LEDGER_NAME).glob("part-*.parquet"))


def kill_when(store: Store, parts: int, pid: int) -> None:
    """Kill worker `pid` once it has ledgered `parts` records (flush_every=1: a part file each),
    so it dies mid-shard whichever worker started first."""
    deadline = time.monotonic() + 60
    while part_pids(store)[pid] < parts and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)


def test_shards_on_dask_merge_and_a_killed_worker_pays_nothing_twice(prefect_harness, smoke_config, cluster, tmp_path):
    from flows.kpod import kpod

    store = Store(tmp_path / "store")
    pids = worker_pids(cluster)
    with serve(FakeOpenAI(latency_s=0.05)) as server:
        cfg = teacher_config(smoke_config, server)
        # a worker dies mid-shard: Dask runs its shard again elsewhere, which skips what it ledgered
        killer = threading.Thread(target=kill_when, args=(store, 3, pids[0]), daemon=True)
        killer.start()
        out = kpod(config=cfg, store=str(store.root), stages=["teacher"], dask=cluster.scheduler_address, parallel=1)
        killer.join(5)
        texts = Counter(r.text for r in server.received if r.outcome == "ok")
    shards = shards_of(cfg)
    n = sum(map(len, shards))
    assert {o["stage"]: (o["status"], o["rows"]) for o in out}["teacher"] == ("computed", {"teacher_calls": n})
    raw = ledger_rows(store)
    assert raw.num_rows == n and len(set(raw["request_id"].to_pylist())) == n  # no loss, no duplicate
    written = part_pids(store)
    assert written[pids[0]] >= 3 and set(written) <= set(pids) | set(worker_pids(cluster))  # all from workers
    # paid twice only for what the dead worker had sent but not yet ledgered (a kill loses the
    # records waiting for the writer thread): never for a record it had ledgered, never elsewhere
    by_text = {r.messages[-1]["content"]: r for s in shards for r in s}
    ledgered_by_dead = {rid for rid, part in zip(raw["request_id"].to_pylist(), ledger_part_pids(store)) if part == pids[0]}
    twice = {by_text[t].request_id for t, c in texts.items() if c > 1}
    dead_shard = next({r.request_id for r in s} for s in shards if ledgered_by_dead <= {r.request_id for r in s})
    assert len(texts) == n and max(texts.values()) <= 2, texts.most_common(3)
    assert twice <= dead_shard - ledgered_by_dead, (twice, ledgered_by_dead)


def test_a_failed_shard_reruns_only_its_missing_requests(prefect_harness, smoke_config, cluster, tmp_path):
    from flows.kpod import kpod

    store = Store(tmp_path / "store")
    with serve() as server:
        cfg = teacher_config(smoke_config, server)
        shards = shards_of(cfg)
        doomed = shards[1][3]  # the fourth request of the second shard can never succeed
        server.add_fault("400", times=None, match=doomed.messages[-1]["content"])
        with pytest.raises(Exception, match="400"):
            kpod(config=cfg, store=str(store.root), stages=["teacher"], dask=cluster.scheduler_address, parallel=1)
        kept = set(open_ledger(store, cfg.teacher).read()["request_id"].to_pylist())
        assert kept == {r.request_id for r in shards[0] + shards[1][:3]}  # the other shard went on to its end
        server.reset()
        out = kpod(config=cfg, store=str(store.root), stages=["teacher"], dask=cluster.scheduler_address, parallel=1)
        resent = Counter(r.text for r in server.received)
    assert out[-1]["rows"] == {"teacher_calls": sum(map(len, shards))}
    assert sum(resent.values()) == len(shards[1]) - 3 == len(resent)  # the missing ones, once each
    assert max(Counter(ledger_rows(store)["request_id"].to_pylist()).values()) == 1


def test_shards_without_dask_are_prefect_tasks_on_threads(prefect_harness, smoke_config, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    from flows.kpod import kpod

    store = Store(tmp_path / "store")
    cfg = smoke_config.model_copy(update={"teacher": smoke_config.teacher.model_copy(update={"shards": 3})})
    out = kpod(config=cfg, store=str(store.root), stages=["teacher"], parallel=1)
    assert out[-1]["rows"] == {"teacher_calls": 80} and out[-1]["summary"]["sent"] == 80
    assert set(part_pids(store)) == {os.getpid()}  # threads of this process
    raw = ledger_rows(store)
    assert raw.num_rows == 80 == len(set(raw["request_id"].to_pylist()))
    with get_client(sync_client=True) as client:  # the flow run's task runs: its stages and one per shard
        flow_run = client.read_flow_runs(limit=1, sort=FlowRunSort.START_TIME_DESC)[0]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    assert {"teacher-shard-0", "teacher-shard-1", "teacher-shard-2"} <= {t.name for t in runs}


def test_cli_local_cluster_and_an_unreachable_scheduler(prefect_harness, tmp_path, capsys, monkeypatch):
    import flows.shards
    from flows.cli import main

    store = str(tmp_path / "store")
    argv = ["--store", store, "run", "smoke", "--set", "teacher.shards=2", "--stages", "teacher", "--parallel", "1"]
    monkeypatch.setattr(flows.shards, "CONNECT_TIMEOUT_S", 1.0)
    assert main([*argv, "--dask", "tcp://127.0.0.1:9"]) == 2  # nothing listens on port 9
    err = capsys.readouterr().err.strip()
    assert "cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'" in err and "\n" not in err
    assert main([*argv, "--dask", "local:2"]) == 0  # a cluster of 2 processes for this run only
    pids = set(part_pids(Store(store)))
    assert len(pids) == 2 and os.getpid() not in pids


def test_the_key_is_looked_up_where_the_shard_runs_never_shipped(monkeypatch):
    import flows.shards
    from tasks.config.pipeline import PipelineConfig

    cfg = PipelineConfig.model_validate({"teacher": {"backend": "openai", "model": "m", "api_key_block": "blk",
                                                     "shards": 2}})
    mapper = flows.shards.shard_runtime("teacher", cfg, None)["map_shards"]
    assert (mapper.address, mapper.key_block) == (None, "blk")
    assert flows.shards.shard_runtime("teacher", PipelineConfig(), None) == {}  # shards: 1
    assert flows.shards.shard_runtime("rationales", cfg, None) == {}
    monkeypatch.setattr(flows.shards, "secret_from_block", lambda name: f"key-of-{name}")
    got = flows.shards.teacher_shard.fn(lambda job, api_key: {"job": job, "key": api_key}, '{"index": 0}', "blk")
    assert got == {"job": {"index": 0}, "key": "key-of-blk"}
