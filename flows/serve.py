"""`kpod serve` / `make serve`: a local Prefect server, the deployments, and a process worker.

Everything binds to 127.0.0.1 with analytics off. The command stays in the foreground; Ctrl-C
or SIGTERM stops the worker (SIGTERM, then SIGINT: an idle worker ignores the first) and then
the server. The pids are written to `<store>/serve.json` so a test or a script can stop it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from storage.store import Store, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
POOL = "kpod-local"


def prefect_bin() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def serve_env(host: str, port: int, store: Store, home: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=f"http://{host}:{port}/api",
        # the UI asks /ui-settings where the API is; without this it may look on another port
        PREFECT_UI_API_URL=f"http://{host}:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_HOST=host,
        PREFECT_SERVER_API_PORT=str(port),
        KPOD_ROOT=str(REPO_ROOT),  # prefect.yaml's pull step: `{{ $KPOD_ROOT }}`
        KPOD_STORE=str(store.root),
    )
    if home:
        env["PREFECT_HOME"] = home
    return env


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout:.0f}s")


def stop(proc: subprocess.Popen, name: str, grace: float = 15.0) -> None:
    """SIGTERM, then SIGINT (an idle worker needs both), then SIGKILL, to the process group."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace if sig != signal.SIGKILL else 5)
            return
        except subprocess.TimeoutExpired:
            print(f"kpod serve: {name} still running after {sig.name}", file=sys.stderr)


def serve(host: str = "127.0.0.1", port: int = 4200, store: Store | None = None, home: str | None = None) -> int:
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"kpod serve binds to loopback only, not {host!r}")
    store = store or Store()
    env = serve_env(host, port, store, home)
    prefect = prefect_bin()
    procs: list[tuple[str, subprocess.Popen]] = []

    def shutdown(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, shutdown)
    try:
        server = subprocess.Popen(
            [prefect, "server", "start", "--host", host, "--port", str(port)],
            env=env, start_new_session=True,
        )
        procs.append(("server", server))
        wait_healthy(env["PREFECT_API_URL"], 120, server)
        subprocess.run(
            [prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"],
            env=env, check=True, stdout=subprocess.DEVNULL,
        )
        subprocess.run([prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO_ROOT, check=True)
        worker = subprocess.Popen(
            [prefect, "worker", "start", "--pool", POOL, "--type", "process"],
            env=env, cwd=REPO_ROOT, start_new_session=True,
        )
        procs.append(("worker", worker))
        write_json_atomic(
            store.serve_record_path(),
            {"api_url": env["PREFECT_API_URL"], "server_pid": server.pid, "worker_pid": worker.pid, "ready": True},
        )
        print(f"kpod serve: ready at http://{host}:{port} (Ctrl-C to stop)", flush=True)
        while all(p.poll() is None for _, p in procs):
            time.sleep(1)
        dead = [n for n, p in procs if p.poll() is not None]
        print(f"kpod serve: {', '.join(dead)} exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for name, proc in reversed(procs):
            stop(proc, name)
        store.serve_record_path().unlink(missing_ok=True)


def read_serve_record(store: Store) -> dict:
    return json.loads(store.serve_record_path().read_text())
