"""The training recipe in 2 CPU processes under `accelerate launch` (DDP over gloo).

With accelerate 1.x, `accelerate launch --cpu --num_processes 2` starts ONE process (its simple
launcher only fans out through mpirun); `--multi_gpu` uses torchrun, which starts both, and
the recipe's `Accelerator(cpu=True)` then runs them as MULTI_CPU. CUDA is hidden so the same
holds on a GPU machine.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.unit.test_train import tiny_recipe
r = tiny_recipe({work!r}, epochs=2, checkpoint_every=2, device="cpu")
assert r.cfg.device == "cpu"
r.setup()
log = r.train()
weights = r.final_model().state_dict()["model.embed_tokens.weight"]
with open({out!r} + f".{{r.rank}}", "w") as fh:
    json.dump({{"world": r.world, "log": log, "checksum": float(weights.double().sum())}}, fh)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_in_step(tmp_path):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed next to this Python")
    script = tmp_path / "train_ddp.py"
    out = tmp_path / "result"
    script.write_text(SCRIPT.format(root=str(ROOT), work=str(tmp_path / "work"), out=str(out)))
    proc = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()), str(script)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert all(r["world"] == 2 for r in results)
    log = results[0]["log"]
    # 12 examples, batch 4 per process: 3 batches cut to 2 (one per process) = 1 step per epoch
    assert [r["step"] for r in log] == [1, 2] and [r["epoch"] for r in log] == [0, 1]
    assert all(r["loss"] > 0 and r["loss"] == r["loss"] for r in log)  # finite, not NaN
    # losses and token counts are reduced across processes: both log the same (timing aside)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(log) == strip(results[1]["log"])
    # DDP keeps the replicas identical
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-7)
    # a checkpoint was written once, with both processes' RNG states
    ckpt = tmp_path / "work" / "ckpt-00000002"
    assert (ckpt / "state.json").is_file()
    assert (ckpt / "rng-0.json").is_file() and (ckpt / "rng-1.json").is_file()
