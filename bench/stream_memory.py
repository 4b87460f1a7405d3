"""Peak memory of dataset -> teacher -> rationales against the number of questions (issue 16.7).

For each N, a fresh child process runs the three stages (the scripted teacher, no Prefect:
`tasks.stages.contract.execute`, as bench/stage_run.py does) on the default config with
`dataset.synthetic.n_train = N` (plus small val and test splits) into a store of its own, and
reports its peak RSS (`ru_maxrss`) after each stage and the wall time of each. One process per
N, so an earlier N's heap never inflates a later N's peak. Writes bench/out/stream_memory.json
and prints a markdown table; the goal is under 1 GB at N = 1,000,000, time linear in N.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/stream_memory.py --questions 10000 50000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("dataset", "teacher", "rationales")
HELD_OUT = 200  # val and test questions each: the teacher asks about train only


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(n: int, store_dir: str, sets: list[str]) -> dict:
    """Run the three stages for `n` train questions here; peak RSS and seconds per stage."""
    from storage.store import Store
    from tasks.config.pipeline import load_config
    from tasks.stages.contract import execute, plan
    from tasks.stages.registry import BY_NAME, STAGES as ALL

    overrides = [f"dataset.synthetic.n_train={n}", f"dataset.synthetic.n_val={HELD_OUT}",
                 f"dataset.synthetic.n_test={HELD_OUT}", "teacher.backend=scripted", *sets]
    cfg = load_config(None, overrides)
    keys = {p.name: p.key for p in plan(cfg, ALL)}
    store = Store(store_dir)
    out: dict = {"questions": n, "stages": {}}
    t_all = time.perf_counter()
    for name in STAGES:
        t0 = time.perf_counter()
        outcome = execute(BY_NAME[name], cfg, keys, store, show_progress=False)
        out["stages"][name] = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(_rss_mb(), 1),
                               "rows": outcome.rows}
    out["seconds"] = round(time.perf_counter() - t_all, 2)
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    return out


def measure(n: int, sets: list[str], keep: bool) -> dict:
    """One N in a child process (its own store in a temp dir, removed after unless `keep`)."""
    store_dir = tempfile.mkdtemp(prefix=f"kpod-stream-{n}-", dir=os.environ.get("KPOD_BENCH_TMP"))
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    cmd = [sys.executable, __file__, "--child", str(n), "--store", store_dir, *sum((["--set", s] for s in sets), [])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"N={n}: child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if not keep:
            shutil.rmtree(store_dir, ignore_errors=True)
    result["loadavg_before"] = " ".join(load_before)
    result["loadavg_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return result


def table(results: list[dict]) -> str:
    lines = ["| questions | peak RSS (MB) | seconds | s per 1k q | dataset / teacher / rationales (s) | "
             "RSS after each (MB) | load before -> after |", "|---|---|---|---|---|---|---|"]
    for r in results:
        st = r["stages"]
        secs = " / ".join(f"{st[s]['seconds']:.1f}" for s in STAGES)
        rss = " / ".join(f"{st[s]['peak_rss_mb']:.0f}" for s in STAGES)
        lines.append(f"| {r['questions']:,} | {r['peak_rss_mb']:.0f} | {r['seconds']:.1f} | "
                     f"{1000 * r['seconds'] / r['questions']:.2f} | {secs} | {rss} | "
                     f"{r['loadavg_before']} -> {r['loadavg_after']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every N (e.g. teacher.flush_every=1000)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "stream_memory.json"))
    ap.add_argument("--keep", action="store_true", help="keep each N's store (in $KPOD_BENCH_TMP or /tmp)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.store, args.sets)))
        return 0
    results = []
    for n in args.questions:
        results.append(measure(n, args.sets, args.keep))
        print(f"N={n:,}: {results[-1]['peak_rss_mb']:.0f} MB, {results[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"sets": args.sets, "results": results}, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
