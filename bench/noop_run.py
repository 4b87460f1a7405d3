"""Wall time of a `kpod run` whose every stage is already cached (issue: slow no-ops).

Runs the smoke preset once into a fresh store (computing, through Prefect), then times N more
runs of the same config: each finds every stage complete and is recorded from the manifests
without starting Prefect. Writes bench/out/noop_run.json; docs/benchmarks.md records it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/noop_run.py [--repeat 3] [--preset smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smoke", help="config preset or YAML (default smoke)")
    ap.add_argument("--repeat", type=int, default=3, help="cached runs to time (default 3)")
    args = ap.parse_args(argv)
    kpod = str(Path(sys.executable).with_name("kpod"))
    with tempfile.TemporaryDirectory(prefix="kpod-noop-") as store:
        cmd = [kpod, "--store", store, "run", args.preset]
        first, _ = timed(cmd)
        cached = []
        for _ in range(args.repeat):
            seconds, out = timed(cmd)
            if "without starting Prefect" not in out:
                raise SystemExit("a cached run started Prefect: the fast path did not apply")
            cached.append(seconds)
    result = {
        "preset": args.preset, "first_run_s": round(first, 2), "cached_runs_s": [round(s, 2) for s in cached],
        "cached_median_s": round(statistics.median(cached), 2), "load_1min": os.getloadavg()[0],
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }
    out = ROOT / "bench" / "out" / "noop_run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
