"""The artifact store: atomic commit, compute-once locking, manifests, ledgers."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from storage.ledger import Ledger
from storage.store import Store

STEPS = pa.table(
    {
        "rationale_id": ["q1:teacher:0", "q1:teacher:0"],
        "step": [0, 1],
        "char_start": [0, 10],
        "char_end": [9, 20],
        "text": ["first one", "second one"],
    }
)


def test_commit_writes_manifest_last_and_tables(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.writing("rationales", "k1", {"config": {"a": 1}}) as w:
        w.write_table("steps", STEPS)
        w.summary["note"] = "hi"
        # nothing visible before the commit
        assert not store.is_complete("rationales", "k1")
        assert not store.stage_dir("rationales", "k1").exists()
    assert store.is_complete("rationales", "k1")
    m = store.manifest("rationales", "k1")
    assert m["tables"]["steps"]["rows"] == 2
    assert m["config"] == {"a": 1} and m["summary"] == {"note": "hi"}
    assert store.read_table("rationales", "k1", "steps").num_rows == 2
    # no temp dirs left behind
    assert [p.name for p in (tmp_path / "stages" / "rationales").iterdir() if p.name.startswith(".tmp")] == []


def test_exception_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writing("rationales", "k1", {}) as w:
            w.write_table("steps", STEPS)
            raise RuntimeError("crash mid-stage")
    assert not store.is_complete("rationales", "k1")
    assert list((tmp_path / "stages" / "rationales").iterdir()) == []


def test_schema_mismatch_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        with store.writing("rationales", "k1", {}) as w:
            w.write_table("steps", STEPS.drop(["text"]))
    assert not store.is_complete("rationales", "k1")


def test_kill9_during_write_leaves_nothing_complete(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import time, pyarrow as pa
        from storage.store import Store
        store = Store({str(tmp_path)!r})
        with store.writing("rationales", "k1", {{}}) as w:
            w.write_table("steps", pa.table({{"rationale_id": ["a"], "step": [0], "char_start": [0], "char_end": [1], "text": ["x"]}}))
            print("written", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path)
    assert not store.is_complete("rationales", "k1")
    with pytest.raises(FileNotFoundError):
        store.read_table("rationales", "k1", "steps")


def _compute_once(root: str, counter: str, barrier) -> None:
    from tasks.config.base import KpodModel
    from tasks.stages.contract import StageSpec, execute

    def run(ctx) -> None:
        with open(counter, "a") as fh:
            fh.write("x")
        time.sleep(0.5)
        ctx.write_table("steps", STEPS)

    spec = StageSpec(name="rationales", run=run, inputs=lambda c: KpodModel(), upstream=lambda c: ())
    barrier.wait()
    execute(spec, object(), {"rationales": "k1"}, Store(root), show_progress=False)


def test_two_processes_compute_a_stage_once(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_compute_once, args=(str(tmp_path), str(counter), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert counter.read_text() == "x"
    assert Store(tmp_path).is_complete("rationales", "k1")


CALL = dict(
    question_id="q", sample=0, prompt="p", completion="c", model="m", finish_reason="stop",
    tokens_in=1, tokens_out=2, cost_usd=0.0, latency_s=0.1, finished_at="t",
)


def test_ledger_keeps_latest_and_success_over_failure(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with Ledger(store, "teacher", "teacher_calls", "request_id", flush_every=2) as led:
        led.append(CALL | {"request_id": "a", "error": "HTTP 500"})
        led.append(CALL | {"request_id": "b", "error": None, "completion": "b1"})
        led.append(CALL | {"request_id": "a", "error": None, "completion": "a-ok"})
        led.append(CALL | {"request_id": "b", "error": "HTTP 429"})  # a later failure
    assert len(led.parts()) == 2
    rows = {r["request_id"]: r for r in led.read().to_pylist()}
    assert rows["a"]["completion"] == "a-ok" and rows["a"]["error"] is None
    assert rows["b"]["completion"] == "b1" and rows["b"]["error"] is None
    assert led.read(ids=["a"]).num_rows == 1


def test_ledger_unflushed_records_are_lost_but_flushed_ones_survive_kill(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import time
        from storage.ledger import Ledger
        from storage.store import Store
        led = Ledger(Store({str(tmp_path)!r}), "teacher", "teacher_calls", "request_id", flush_every=3, flush_seconds=999)
        base = {CALL!r}
        for i in range(4):
            led.append(base | {{"request_id": str(i), "error": None}})
        print("appended", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "appended"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    led = Ledger(Store(tmp_path), "teacher", "teacher_calls", "request_id")
    assert sorted(led.read().column("request_id").to_pylist()) == ["0", "1", "2"]


def test_complete_keys_lists_committed_results_only(tmp_path: Path) -> None:
    s = Store(tmp_path)
    assert s.complete_keys("rationales") == []
    for key in ("k2", "k1"):
        with s.writing("rationales", key, {}) as w:
            w.write_table("steps", STEPS)
    s.stage_dir("rationales", "k3").mkdir(parents=True)  # no manifest: not complete
    assert s.complete_keys("rationales") == ["k1", "k2"]
