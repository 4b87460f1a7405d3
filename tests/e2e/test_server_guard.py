"""A `kpod run` killed with SIGKILL leaves no Prefect server behind (issue 14): the watchdog of
flows/server_guard.py stops the temporary server its parent started."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flows.server_guard import ENV, alive, carriers, watch

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the watchdog reads /proc (Linux)"),
]
REPO = Path(__file__).resolve().parents[2]
# a parent that starts a long-lived child (it inherits the parent's environment) and exits
PARENT = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep({})"


def _server_of(pid: int, timeout: float) -> int:
    """The uvicorn child (Prefect's temporary server) of `pid`, once it has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid and b"uvicorn" in (stat.parent / "cmdline").read_bytes():
                    return int(stat.parent.name)
            except (OSError, IndexError, ValueError):
                continue
        time.sleep(0.2)
    raise AssertionError("no uvicorn child appeared")


def test_kill_9_of_kpod_run_stops_its_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), OMP_NUM_THREADS="1")
    kpod = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--store", str(tmp_path / "store"), "run", "smoke"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        server = _server_of(kpod.pid, timeout=180)  # killed while it may still be starting up
    finally:
        kpod.kill()  # SIGKILL: no atexit, no handler
        kpod.wait(30)
    deadline = time.monotonic() + 30
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(server), f"server {server} outlived kpod run"


def test_watch_stops_what_a_dead_parent_left() -> None:
    token = uuid.uuid4().hex
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(1.0)], env=dict(os.environ, **{ENV: token}))
    deadline = time.monotonic() + 20
    while len(carriers(token)) < 2 and time.monotonic() < deadline:  # parent and child
        time.sleep(0.1)
    child = [p for p in carriers(token) if p != parent.pid]
    assert len(child) == 1
    assert watch(parent.pid, token, poll_s=0.05) == child  # returns once the parent has exited
    assert not alive(child[0])
    parent.wait(10)


def test_watch_touches_nothing_without_its_token() -> None:
    """Processes that carry another token (another kpod's) are not stopped."""
    other = uuid.uuid4().hex
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(0.5)], env=dict(os.environ, **{ENV: other}))
    try:
        assert watch(parent.pid, uuid.uuid4().hex, poll_s=0.05) == []
        assert len(carriers(other)) == 1  # the child lives on
    finally:
        parent.wait(10)
        for pid in carriers(other):
            os.kill(pid, 9)
