"""Run a training stage in N processes under `accelerate launch` (DDP: gloo on CPU, NCCL on GPU).

The stage process does not train itself: `launch_ranks` writes what a rank needs to rebuild
the stage's context (the store, the key, the upstream keys, the typed inputs, the writer's
temp dir) into the stage's work dir and starts `accelerate launch -m tasks.stages.ranks`.
Every rank runs the stage's own `run(ctx)` (with KPOD_RANKS set, so it trains instead of
launching again); the recipe is rank-aware, so rank 0 alone writes the outputs into the
writer's temp dir and reports what it wrote, and the stage process then commits them as if it
had trained itself. Checkpoints go to the same work dir, so a killed launch resumes on rerun.

With accelerate 1.x, `--multi_gpu` starts the ranks through torchrun; on CPU the GPUs are
hidden and the recipe's `Accelerator(cpu=True)` runs them as MULTI_CPU over gloo
(tests/unit/test_accelerate.py says why `--cpu` alone would start one process).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.stages.contract import StageContext

RANKS_ENV = "KPOD_RANKS"  # set in every launched rank: the stage trains instead of launching
SPEC_FILE = "ranks.json"
STOP_FILE = "ranks.stop"  # the stage process gave up on the ranks (interrupted): they exit
REPORT_FILE = "rank0.json"
LOG_FILE = "ranks.log"
ROOT = Path(__file__).resolve().parents[2]


def launched() -> bool:
    """Whether this process is one of the ranks `launch_ranks` started."""
    return os.environ.get(RANKS_ENV) == "1"


def launch_command(processes: int, port: int, spec: Path) -> list[str]:
    """The `accelerate launch` command line of `processes` ranks on this machine."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "tasks.stages.ranks", str(spec),
    ]


def check_devices(processes: int, on_cpu: bool) -> None:
    """One clear line when N GPU ranks are asked for on a machine with fewer GPUs."""
    if on_cpu:
        return
    import torch

    have = torch.cuda.device_count()
    if processes > have:
        raise ValueError(f"train.processes={processes} needs {processes} GPUs; this machine has {have}")


def launch_ranks(ctx: "StageContext", processes: int, on_cpu: bool) -> None:
    """Train `ctx`'s stage in `processes` ranks and adopt what rank 0 wrote into ctx's writer."""
    check_devices(processes, on_cpu)
    work = ctx.work_dir
    work.mkdir(parents=True, exist_ok=True)
    for stale in (REPORT_FILE, STOP_FILE):  # an earlier launch's report or stop says nothing now
        (work / stale).unlink(missing_ok=True)
    spec = work / SPEC_FILE
    inputs = type(ctx.inputs)
    spec.write_text(json.dumps({
        "store": str(ctx.store.root), "stage_module": ctx.spec.run.__module__, "key": ctx.key,
        "upstream": ctx.upstream,
        "inputs_class": f"{inputs.__module__}:{inputs.__qualname__}",
        "inputs": ctx.inputs.model_dump(mode="json"), "writer_dir": str(ctx.writer.dir),
        "show_progress": ctx.show_progress, "owner_pid": os.getpid(),
    }))
    env = {**os.environ, RANKS_ENV: "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if on_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --multi_gpu on a GPU machine would take the GPUs
    try:
        rc = _run_forwarding(launch_command(processes, _free_port(), spec), env, work / LOG_FILE)
    except BaseException:
        (work / STOP_FILE).touch()  # the ranks are not our children (torchrun): tell them
        raise
    report = work / REPORT_FILE
    if rc != 0 or not report.is_file():
        raise RuntimeError(
            f"{ctx.name}: the {processes} ranks under accelerate launch failed (exit {rc}); their "
            f"output is in {work / LOG_FILE}: {_tail(work / LOG_FILE)}"
        )
    done = json.loads(report.read_text())
    ctx.writer.tables.update(done["tables"])
    ctx.writer.files.extend(f for f in done["files"] if f not in ctx.writer.files)
    ctx.summary.update(done["summary"], processes=processes)


def _run_forwarding(cmd: list[str], env: dict[str, str], log_path: Path) -> int:
    """Run `cmd` with its output copied to stderr (progress stays visible) and to `log_path`."""
    with open(log_path, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def pump() -> None:
            assert proc.stdout is not None
            for raw in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
                text = raw.decode("utf-8", "replace")
                sys.stderr.write(text)
                log.write(text)
            log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait()
        except BaseException:  # the stage is being stopped: do not leave ranks behind
            proc.kill()
            raise
        reader.join(timeout=10)
    return rc


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    except OSError:
        return "(no output)"
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(kept[-lines:]) or "(no output)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def watch_owner(owner_pid: int, stop: Path, every_s: float = 1.0) -> threading.Thread:
    """Exit this rank once the stage process is gone or has asked the ranks to stop.

    torchrun starts each rank in a session of its own, so a kill -9 of the stage process (or of
    kpod) would leave the ranks training and writing; they watch for it themselves."""

    def watch() -> None:
        while True:
            try:
                os.kill(owner_pid, 0)
            except ProcessLookupError:
                os._exit(137)
            except PermissionError:
                pass  # alive, someone else's pid: cannot happen for our own parent chain
            if stop.exists():
                os._exit(143)
            threading.Event().wait(every_s)

    thread = threading.Thread(target=watch, daemon=True, name="kpod-owner-watch")
    thread.start()
    return thread


def rank_main(spec_path: str) -> None:
    """One rank: rebuild the stage's context from the spec and run the stage; rank 0 reports
    the tables and files it wrote and the stage summary."""
    from storage.store import StageWriter, Store
    from tasks.stages.contract import StageContext

    spec = json.loads(Path(spec_path).read_text())
    watch_owner(spec["owner_pid"], Path(spec_path).parent / STOP_FILE)
    module, qualname = spec["inputs_class"].split(":")
    inputs = getattr(importlib.import_module(module), qualname).model_validate(spec["inputs"])
    stage = importlib.import_module(spec["stage_module"]).SPEC  # by module: no import of the registry
    writer = StageWriter(stage.name, spec["key"], Path(spec["writer_dir"]))
    store = Store(spec["store"])
    ctx = StageContext(store, stage, spec["key"], inputs, spec["upstream"], writer, spec["show_progress"])
    stage.run(ctx)
    if os.environ.get("RANK", "0") == "0":
        report = {"tables": writer.tables, "files": writer.files, "summary": ctx.summary}
        tmp = ctx.work_dir / f"{REPORT_FILE}.tmp"
        tmp.write_text(json.dumps(report, default=str))
        tmp.replace(ctx.work_dir / REPORT_FILE)


if __name__ == "__main__":
    rank_main(sys.argv[1])
