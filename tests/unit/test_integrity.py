"""What is committed is what is served (DESIGN.md invariant 8): manifests record every file's
size and sha256; a stage whose files changed is corrupt, never served, reported and recomputed."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from storage.catalog import query, write_catalog_file
from storage.store import Store
from tasks.config.base import KpodModel
from tasks.stages.contract import StageSpec, execute

ROOT = Path(__file__).resolve().parents[2]


def _clusters(n: int) -> pa.Table:
    return pa.table({"rationale_id": [f"r{i}" for i in range(n)], "question_id": ["q"] * n, "cluster": [0] * n})


def _commit(store: Store, stage: str = "schedule", key: str = "k1", n: int = 50) -> Path:
    """A committed stage with one table and one file; returns the table's path."""
    with store.writing(stage, key, {}) as w:
        w.write_table("clusters", _clusters(n))
        w.path("model/weights.bin").write_bytes(b"w" * 100)
    return store.stage_dir(stage, key) / "tables" / "clusters.parquet"


def _same_size_garbage(path: Path) -> None:
    path.write_bytes(b"x" * path.stat().st_size)


def _spec(calls: list[int]) -> StageSpec:
    def run(ctx) -> None:
        calls.append(1)
        ctx.write_table("clusters", _clusters(3))

    return StageSpec("schedule", run, lambda c: KpodModel(), lambda c: ())


def test_manifest_records_size_and_sha256_of_every_file(tmp_path: Path) -> None:
    import hashlib

    store = Store(tmp_path)
    table = _commit(store)
    sums = store.manifest("schedule", "k1")["checksums"]
    assert set(sums) == {"tables/clusters.parquet", "files/model/weights.bin"}
    assert sums["tables/clusters.parquet"] == {
        "bytes": table.stat().st_size, "sha256": hashlib.sha256(table.read_bytes()).hexdigest()
    }
    assert store.integrity("schedule", "k1").state == "ok"


def test_a_truncated_table_is_corrupt_and_never_read(tmp_path: Path) -> None:
    store = Store(tmp_path)
    table = _commit(store)
    size = table.stat().st_size
    os.truncate(table, 100)
    check = store.integrity("schedule", "k1")
    assert check.state == "corrupt" and "tables/clusters.parquet has 100 bytes" in check.problem
    assert not store.is_complete("schedule", "k1") and store.complete_keys("schedule") == []
    with pytest.raises(FileNotFoundError, match="corrupt"):
        store.read_table("schedule", "k1", "clusters")
    (store.stage_dir("schedule", "k1") / "files" / "model" / "weights.bin").unlink()
    os.truncate(table, size)  # the sizes match again, but a missing file is corrupt too
    assert store.integrity("schedule", "k1").problem == "files/model/weights.bin is missing"


def test_same_size_change_is_found_by_the_deep_check_only(tmp_path: Path) -> None:
    store = Store(tmp_path)
    weights = store.stage_dir("schedule", "k1") / "files" / "model" / "weights.bin"
    _commit(store)
    weights.write_bytes(b"v" * 100)
    assert store.integrity("schedule", "k1").state == "ok"  # the cheap check: sizes
    deep = store.integrity("schedule", "k1", deep=True)
    assert deep.state == "corrupt" and "files/model/weights.bin does not match the sha256" in deep.problem


def test_execute_recomputes_a_corrupt_stage_and_says_so(tmp_path: Path, caplog) -> None:
    store, calls = Store(tmp_path), []
    spec = _spec(calls)
    assert execute(spec, object(), {"schedule": "k1"}, store, show_progress=False).status == "computed"
    assert execute(spec, object(), {"schedule": "k1"}, store, show_progress=False).status == "cached"
    os.truncate(store.stage_dir("schedule", "k1") / "tables" / "clusters.parquet", 10)
    with caplog.at_level(logging.WARNING, logger="kpod"):
        again = execute(spec, object(), {"schedule": "k1"}, store, show_progress=False)
    assert again.status == "computed" and calls == [1, 1]
    lines = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(lines) == 1 and "stage schedule (k1) is corrupt" in lines[0] and "recomputing" in lines[0]
    assert store.integrity("schedule", "k1").state == "ok"
    assert store.read_table("schedule", "k1", "clusters").num_rows == 3


def test_a_corrupt_upstream_is_never_read(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _commit(store, "schedule", "up")
    os.truncate(store.stage_dir("schedule", "up") / "tables" / "clusters.parquet", 10)
    spec = StageSpec("train", lambda ctx: None, lambda c: KpodModel(), lambda c: ("schedule",))
    with pytest.raises(RuntimeError, match="needs stage 'schedule'"):
        execute(spec, object(), {"schedule": "up", "train": "k"}, store, show_progress=False)


def _verify(store: Store, capsys, *extra: str) -> tuple[int, str]:
    from flows.cli import main

    rc = main(["--store", str(store.root), "verify", *extra])
    return rc, capsys.readouterr().out


def test_kpod_verify_sizes_then_hashes_and_old_manifests(tmp_path: Path, capsys) -> None:
    store = Store(tmp_path)
    _commit(store, "schedule", "k1")
    table = _commit(store, "schedule", "k2")
    rc, out = _verify(store, capsys)
    assert rc == 0 and "2 ok, 0 corrupt" in out
    _same_size_garbage(table)
    assert _verify(store, capsys)[0] == 0  # sizes still match
    rc, out = _verify(store, capsys, "--deep")
    bad = [line for line in out.splitlines() if line.startswith("corrupt")]
    assert rc == 1 and bad == ["corrupt schedule k2: tables/clusters.parquet does not match the sha256 in its manifest"]
    # a manifest written before checksums existed: unverifiable, not bad
    path = store.stage_dir("schedule", "k2") / "manifest.json"
    old = json.loads(path.read_text())
    del old["checksums"]
    path.write_text(json.dumps(old))
    rc, out = _verify(store, capsys, "--deep")
    assert rc == 0 and "1 ok, 0 corrupt, 1 unverifiable" in out
    assert store.is_complete("schedule", "k2")


def test_verify_imports_neither_prefect_nor_torch(tmp_path: Path) -> None:
    _commit(Store(tmp_path))
    code = (
        "import sys; from flows.cli import main; rc = main(['--store', sys.argv[1], 'verify', '--deep']); "
        "print(rc, 'prefect' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "0 False False"


def test_catalog_survives_a_bad_file_and_names_it(tmp_path: Path, caplog) -> None:
    store = Store(tmp_path)
    good = _commit(store, "schedule", "k1")
    bad = _commit(store, "schedule", "k2")
    store.save_run("r1", {"run_id": "r1", "started_at": "1", "status": "completed", "stages": {"schedule": "k1"}})
    store.save_run("r2", {"run_id": "r2", "started_at": "2", "status": "completed", "stages": {"schedule": "k2"}})
    _same_size_garbage(bad)  # only --deep would tell: DuckDB meets it
    with caplog.at_level(logging.WARNING, logger="kpod"):
        problems = write_catalog_file(store)
    assert len(problems) == 1 and str(bad) in problems[0] and "left out" in problems[0]
    assert [r.getMessage() for r in caplog.records] == [f"kpod: catalog: {problems[0]}"]
    # every other run stays queryable
    _, rows = query(store, "select count(*) from run_r1.clusters")
    assert rows == [(50,)] and good.is_file()
    os.truncate(bad, 10)  # the cheap check catches this one: the stage is called corrupt
    problems = write_catalog_file(store)
    assert len(problems) == 1 and problems[0].startswith("stage schedule (k2) is corrupt") and "tables/clusters.parquet has 10 bytes" in problems[0]


def _cached_run_args(store: Store) -> argparse.Namespace:
    return argparse.Namespace(store=str(store.root), stages=["dataset"], force=None, parallel=1)


def _questions() -> pa.Table:
    return pa.table({k: ["x"] for k in ("question_id", "split", "question", "answer", "answer_type", "meta")})


def test_run_and_status_see_a_corrupt_stage(tmp_path: Path, capsys) -> None:
    """`kpod run` does not call a corrupt stage cached (the flow recomputes it); `kpod status`
    says corrupt, and calls a stage this method does not use unused, not missing."""
    from flows.cli import cached_run, main
    from tasks.config.pipeline import load_config
    from tasks.stages.contract import plan
    from tasks.stages.registry import STAGES

    cfg, store = load_config(ROOT / "configs" / "smoke.yaml"), Store(tmp_path)
    key = {p.name: p.key for p in plan(cfg, STAGES)}["dataset"]
    with store.writing("dataset", key, {}) as w:
        w.write_table("questions", _questions())
    assert cached_run(cfg, _cached_run_args(store)) is not None
    capsys.readouterr()
    os.truncate(store.stage_dir("dataset", key) / "tables" / "questions.parquet", 10)
    assert cached_run(cfg, _cached_run_args(store)) is None  # not served: the flow computes it
    assert main(["--store", str(store.root), "status", "smoke"]) == 0
    out = capsys.readouterr().out
    states = {line.split()[0]: line.split()[2] for line in out.splitlines()[2:] if len(line.split()) == 4}
    assert states["dataset"] == "corrupt" and states["teacher"] == "missing" and states["weights"] == "unused"
    assert "corrupt dataset: tables/questions.parquet has 10 bytes" in out


def _checkpointing(resumed: list[bool]) -> StageSpec:
    """A stage that resumes from a checkpoint in its work dir if one is there, as training does."""

    def run(ctx) -> None:
        ckpt = ctx.work_dir / "ckpt-00000001"
        resumed.append(ckpt.is_dir())
        ckpt.mkdir(exist_ok=True)
        ctx.write_table("clusters", _clusters(2))

    return StageSpec("train", run, lambda c: KpodModel(), lambda c: ())


def test_force_starts_from_nothing(tmp_path: Path) -> None:
    """--force does not resume from a checkpoint left in the work dir (issue 14: the train
    stage's manifest said `resumed_from: 480`)."""
    store, resumed = Store(tmp_path), []
    spec, keys = _checkpointing(resumed), {"train": "k"}
    execute(spec, object(), keys, store, show_progress=False)
    (store.work_dir("train", "k") / "ckpt-00000001").mkdir(exist_ok=True)  # a killed run's, or an older kpod's
    execute(spec, object(), keys, store, force=True, show_progress=False)
    assert resumed == [False, False]


def test_a_commit_prunes_checkpoints_unless_kept(tmp_path: Path) -> None:
    store, resumed = Store(tmp_path), []
    spec = _checkpointing(resumed)
    execute(spec, object(), {"train": "k1"}, store, show_progress=False)
    assert not (tmp_path / "work" / "train" / "k1").exists()
    execute(spec, object(), {"train": "k2"}, store, show_progress=False, keep_work=True)
    assert (tmp_path / "work" / "train" / "k2" / "ckpt-00000001").is_dir()


def test_dead_runs_temp_dirs_are_removed_live_ones_kept(tmp_path: Path) -> None:
    store = Store(tmp_path)
    parent = tmp_path / "stages" / "train"
    dead, young, locked = (parent / f".tmp-{k}-host-1-abc" for k in ("dead", "young", "busy"))
    old_swap = parent / ".old-k-123456"
    for d in (dead, young, locked, old_swap):
        (d / "tables").mkdir(parents=True)
    past = time.time() - 3600
    for d in (dead, locked, old_swap):
        os.utime(d, (past, past))
    with store.lock("train", "busy"):  # a live process still computes that key
        gone = store.remove_dead_temps()
    assert sorted(gone) == ["train/.old-k-123456", "train/.tmp-dead-host-1-abc"]
    assert not dead.exists() and not old_swap.exists() and young.exists() and locked.exists()


def test_an_unwritable_store_is_named_as_such(tmp_path: Path) -> None:
    """mkdir under /proc fails with ENOENT: `kpod run` said "No such file or directory"."""
    from flows.errors import user_error
    from storage.store import StoreNotWritable

    Store(tmp_path / "fine").ensure_writable()
    assert (tmp_path / "fine").is_dir() and list((tmp_path / "fine").iterdir()) == []
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for root in ("/proc/kpod-no-store", a_file / "store"):
        with pytest.raises(StoreNotWritable) as err:
            Store(root).ensure_writable()
        line = user_error(err.value)
        assert line is not None and line.startswith(f"the store {root} is not writable (") and "\n" not in line
