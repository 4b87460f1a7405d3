"""`train.processes`: the train stage in 2 CPU ranks under `accelerate launch` (no Prefect).

The smoke config's stages up to the student run in-process; the train stage then launches its
ranks through `tasks.stages.ranks`. Checked: the stage commits what rank 0 wrote; with the
same global batch its losses follow one process's; a launch killed with SIGKILL after its
first checkpoint resumes from that checkpoint on rerun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.smoke_store import SMOKE

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ("dataset", "teacher", "rationales", "student")


def _config(*sets: str):
    from tasks.config.pipeline import load_config

    return load_config(SMOKE, ["train.select_every=0", *sets])


def _run(store, cfg, stage="train"):
    from tasks.stages.contract import execute, plan
    from tasks.stages.registry import BY_NAME, STAGES

    keys = {p.name: p.key for p in plan(cfg, STAGES)}
    for name in UPSTREAM:
        execute(BY_NAME[name], cfg, keys, store, show_progress=False)
    return execute(BY_NAME[stage], cfg, keys, store, show_progress=False), keys


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from storage.store import Store

    return Store(tmp_path_factory.mktemp("ranks") / "store")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on a 2-core box


def test_two_ranks_commit_rank0_outputs_and_follow_one_process(store):
    from tasks.core.models import load_model

    two, keys = _run(store, _config("train.processes=2", "train.batch_size=4", "train.epochs=3"))
    one, _ = _run(store, _config("train.batch_size=8", "train.epochs=3"))
    assert two.status == one.status == "computed"
    assert two.summary["processes"] == 2 and "processes" not in one.summary
    # the same global batch (2 x 4 = 8): the same optimiser steps up to the last batch of an
    # epoch (ranks drop an odd batch of 4 that one process trains as a batch of 8, or less),
    # and losses within tolerance
    assert abs(two.summary["steps"] - one.summary["steps"]) <= 3 and two.summary["steps"] > 0
    log2 = store.read_table("train", keys["train"], "train_log").to_pylist()
    assert len(log2) == two.rows["train_log"] and log2[-1]["step"] == two.summary["steps"]
    assert two.summary["final_loss"] == pytest.approx(one.summary["final_loss"], rel=0.15)
    model, _ = load_model(store.file_path("train", keys["train"], "model"))
    assert sum(p.numel() for p in model.parameters()) > 0


KILLED_RUN = """
import sys
sys.path.insert(0, {root!r})
from storage.store import Store
from tests.unit.test_train_processes import _config, _run
_run(Store({store!r}), _config(*{sets!r}))
"""


def _ranks_alive(work: Path) -> list[int]:
    """Pids whose command line names this work dir's ranks spec."""
    spec, pids = str(work / "ranks.json"), []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and spec in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_killed_launch_resumes_from_its_checkpoint(store):
    sets = ["train.processes=2", "train.batch_size=4", "train.epochs=12", "train.checkpoint_every=4"]
    _run(store, _config(*sets), stage="student")  # upstream in place before the clock matters
    from tasks.stages.contract import plan
    from tasks.stages.registry import STAGES

    key = {p.name: p.key for p in plan(_config(*sets), STAGES)}["train"]
    work = store.work_dir("train", key)
    script = KILLED_RUN.format(root=str(ROOT), store=str(store.root), sets=sets)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list(work.glob("ckpt-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(work.glob("ckpt-*")), "the launched ranks wrote no checkpoint"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage process and both ranks
        proc.wait()
    # torchrun puts each rank in a session of its own; they watch the stage process and exit
    deadline = time.monotonic() + 30
    while _ranks_alive(work) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _ranks_alive(work), "a rank outlived the killed stage process"
    assert not store.is_complete("train", key)
    out, _ = _run(store, _config(*sets))
    assert out.status == "computed"
    assert out.summary["resumed_from"] is not None and out.summary["resumed_from"] > 0
    assert out.summary["steps"] > out.summary["resumed_from"]


def test_the_mentor_trains_in_two_ranks(store):
    out, keys = _run(store, _config("train.method=mentor_kd", "mentor.training.processes=2"), stage="mentor_train")
    assert out.status == "computed" and out.summary["processes"] == 2
    assert out.summary["steps"] > 0 and 0.0 <= out.summary["val_accuracy"] <= 1.0  # rank 0 scored val
    assert out.rows["mentor_train_log"] == len(store.read_table("mentor_train", keys["mentor_train"], "mentor_train_log"))
    assert store.file_path("mentor_train", keys["mentor_train"], "model").is_dir()
