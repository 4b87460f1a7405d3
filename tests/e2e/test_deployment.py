"""`make serve` then `prefect deployment run kpod/full --watch`, against a real Prefect server.

The test starts `kpod serve` (server on 127.0.0.1, the deployments of prefect.yaml, a process
worker) in its own process group, runs the deployments through the real `prefect` CLI with the
smoke config as the parameter, and stops everything by pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.catalog import query
from storage.store import Store

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_deployment_run_full_watch(tmp_path: Path, smoke_config) -> None:
    store = Store(tmp_path / "store")
    port = free_port()
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(
        [str(BIN / "kpod"), "--store", str(store.root), "serve", "--port", str(port),
         "--prefect-home", str(tmp_path / "prefect-home")],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    record_path = store.root / "serve.json"
    try:
        deadline = time.monotonic() + 300
        while not record_path.exists():
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "kpod serve did not become ready"
            time.sleep(1)
        record = json.loads(record_path.read_text())
        assert record["api_url"] == f"http://127.0.0.1:{port}/api"

        client_env = dict(env, PREFECT_API_URL=record["api_url"])
        params = json.dumps({"config": smoke_config.model_dump(mode="json")})
        for deployment in ("kpod/full", "kpod/rationales"):
            run = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", deployment, "--params", params, "--watch"],
                cwd=REPO, env=client_env, capture_output=True, text=True, timeout=600,
            )
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

        # the worker ran the flow against the store it was given
        _, rows = query(store, "select count(*) from steps")
        assert rows[0][0] > 0
        runs = store.list_runs()
        assert len(runs) == 2 and all(r["status"] == "completed" for r in runs)
        last = {o["stage"]: o["status"] for o in runs[-1]["outcomes"]}
        assert last == {"rationales": "cached"}
    finally:
        pids = []
        if record_path.exists():
            rec = json.loads(record_path.read_text())
            pids = [rec["server_pid"], rec["worker_pid"]]
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(10)
        log.close()
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(pid_alive(p) for p in pids), "server or worker still running after stop"
