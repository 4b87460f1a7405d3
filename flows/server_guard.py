"""No orphan Prefect server: a watchdog that stops what a `kpod` process that died left running.

Without a server address (`PREFECT_API_URL`), Prefect starts a temporary API server as a child
process (uvicorn) and stops it at exit (atexit). A `kpod run` killed with SIGKILL, or with
SIGTERM (whose default action skips atexit), left that server running, ~200 MB each. So before
a flow starts, `guard_temporary_server` puts a random token into this process's environment,
which every process it starts from then on inherits (the server, stage worker processes), and
launches this module as a watchdog, in a session of its own so that the signal that kills kpod
does not kill the watchdog too:

    python -m flows.server_guard PARENT_PID TOKEN

Once the parent has gone, the watchdog stops every process that carries the token (SIGTERM,
then SIGKILL after 5 s) and exits. After a normal exit Prefect has already stopped the server
and there is nothing left to stop. The token, not a pid, names what to stop: a pid reused by an
unrelated process is never touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

POLL_S = 1.0
TERM_GRACE_S = 5.0
ENV = "KPOD_GUARD"  # the token every process a guarded kpod starts inherits


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Exited, not yet reaped by its parent: gone for our purposes."""
    info = _ppid_and_state(pid)
    return info is not None and info[1] == "Z"


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0]


def carriers(token: str) -> list[int]:
    """Live processes (other than this one) whose environment holds KPOD_GUARD=token."""
    marker, me, found = f"{ENV}={token}".encode(), os.getpid(), []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        pid = int(environ.parent.name)
        try:
            if pid != me and marker in environ.read_bytes().split(b"\0") and alive(pid):
                found.append(pid)
        except OSError:  # gone, or not ours to read
            continue
    return found


def stop(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL what is still up after TERM_GRACE_S."""
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_S
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def watch(parent: int, token: str, poll_s: float = POLL_S) -> list[int]:
    """Block until `parent` has gone; then stop what carries `token`; returns those pids."""
    while alive(parent):
        time.sleep(poll_s)
    left = carriers(token)
    stop(left)
    return left


def guard_temporary_server() -> bool:
    """When this process would use Prefect's temporary server, mark it and start a watchdog
    first; False when a server address is configured (a real server, a test harness: nothing
    of ours to leak) or there is no /proc to watch with."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or not Path("/proc/self/environ").exists():
        return False
    # a fresh token even under another guarded kpod: this watchdog must stop only this
    # process's own subtree, never its parent or siblings
    token = os.environ[ENV] = uuid.uuid4().hex
    subprocess.Popen(
        [sys.executable, "-m", "flows.server_guard", str(os.getpid()), token],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent),
    )
    return True


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
