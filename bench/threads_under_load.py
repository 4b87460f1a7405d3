"""Seconds per training step of the demo's student with 1 and with 2 torch threads, on an idle
machine and beside a CPU hog: the measurement behind kpod's thread default (flows/threads.py).

Each (threads, hog) cell runs in a fresh process: the demo's student shape (configs/demo.yaml)
as a LLaMA of random weights, AdamW, batches of random token ids of the demo's batch size and
a typical length; the median of `--steps` timed steps after 3 warm-up steps. The hog is one
busy-looping process per core, started before the cell and stopped after it.

    .venv/bin/python bench/threads_under_load.py [--steps 20] [--threads 1 2] [--length 96]

Writes bench/out/threads_under_load.json. Other load on the machine counts too: record it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CELL = r"""
import sys, time, statistics, torch
sys.path.insert(0, sys.argv[1])
from transformers import LlamaConfig, LlamaForCausalLM
from tasks.config.pipeline import load_config
threads, steps, length = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
cfg = load_config(sys.argv[1] + "/configs/demo.yaml")
s, batch = cfg.student, cfg.train.batch_size
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=s.vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers,
    num_attention_heads=s.heads, intermediate_size=s.intermediate, max_position_embeddings=s.max_len))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, s.vocab_size, (batch, length))
times = []
for i in range(3 + steps):
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad()
    if i >= 3:
        times.append(time.perf_counter() - t0)
print(statistics.median(times), min(times), max(times), sum(p.numel() for p in model.parameters()))
"""


def _spin() -> None:
    while True:
        pass


def cell(threads: int, hog: bool, steps: int, length: int) -> dict:
    hogs = [mp.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 1)] if hog else []
    for h in hogs:
        h.start()
    try:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        out = subprocess.run([sys.executable, "-c", CELL, str(ROOT), str(threads), str(steps), str(length)],
                             env=env, capture_output=True, text=True, check=True).stdout.split()
    finally:
        for h in hogs:
            h.terminate()
            h.join()
    median, fastest, slowest, params = float(out[0]), float(out[1]), float(out[2]), int(out[3])
    return {"threads": threads, "hog": hog, "median_s": round(median, 4), "min_s": round(fastest, 4),
            "max_s": round(slowest, 4), "params": params}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per cell (default 20)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    ap.add_argument("--length", type=int, default=96, help="tokens per example (default 96)")
    args = ap.parse_args()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    cells = [cell(t, hog, args.steps, args.length) for hog in (False, True) for t in args.threads]
    for c in cells:
        print(f"threads {c['threads']}  hog {'yes' if c['hog'] else 'no ':3}  median {c['median_s']:.4f} s/step"
              f"  (min {c['min_s']:.4f}, max {c['max_s']:.4f})")
    result = {"cells": cells, "steps": args.steps, "length": args.length, "cpus": os.cpu_count(),
              "load_before": load_before, "wall_s": round(time.perf_counter() - t0, 1)}
    out = ROOT / "bench" / "out" / "threads_under_load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"load before {load_before}; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
