"""The method table: every distillation method x several seeds on one preset, test mean +- std.

Each (method, seed) is one `kpod run <preset> --set train.method=M --set train.seed=S` into a
shared store, so stages that do not depend on the method or the seed (dataset, teacher,
rationales, student, token weights, difficulty, schedule, the mentor) are computed once and
reused by every run that reads them; the seed changes the training data order (and any
sampling in training), not the data, the teacher or the initial weights. Two runs that need
the same stage at the same moment wait on its lock instead of computing it twice.

Selection is on val only: the preset turns on `train.select_every`, so each run keeps the
epoch with the best val accuracy, and test is read once, for the report. Nothing here is
tuned: every method runs the preset's settings with equal epochs.

Runs go through `--workers` processes (one torch thread each when more than one). After the
last, the figures are read back from the store with SQL over `kpod_metrics` (every evaluation
in the store, one row per split, with method and seed), then summarised per method into
bench/out/methods-<preset>.json and a markdown table on stdout (docs/benchmarks.md records it).

    .venv/bin/python bench/methods.py                       # bench-arith, 9 methods x 3 seeds, 2 workers
    .venv/bin/python bench/methods.py --methods std_cot kpod --seeds 0 --workers 1
    .venv/bin/kpod --store bench/out/store-bench-arith sql "select method, seed, split, accuracy from kpod_metrics"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
METHODS = (
    "std_cot", "kpod", "kpod_no_weights", "kpod_no_weight_in_difficulty", "kpod_no_progressive",
    "kpod_no_diversity", "mentor_kd", "mentor_augment_only", "kpod_mentor",
)


def kpod_exe() -> str:
    exe = Path(sys.executable).with_name("kpod")
    return str(exe) if exe.exists() else "kpod"


def run_one(store: Path, preset: str, method: str, seed: int, sets: list[str], threads: int | None,
            logs: Path) -> dict:
    cmd = [kpod_exe(), "--store", str(store), "run", preset,
           "--set", f"train.method={method}", "--set", f"train.seed={seed}"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    log = logs / f"{method}-{seed}.log"
    t0 = time.perf_counter()
    with log.open("a") as fh:  # a rerun (cached or resumed) keeps the earlier log
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    wall = time.perf_counter() - t0
    print(f"  {method:30s} seed {seed}: exit {rc}, {wall:7.1f} s  ({log})", flush=True)
    return {"method": method, "seed": seed, "rc": rc, "wall_s": round(wall, 1), "log": str(log)}


def job_order(methods: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """Seed by seed, the methods that build the most shared stages first.

    kpod builds weights, difficulty and schedule; mentor_kd the mentor. Starting them together
    keeps both workers busy on different shared stages instead of one waiting on the other's lock.
    """
    first = [m for m in ("kpod", "mentor_kd") if m in methods]
    rest = [m for m in methods if m not in first]
    return [(m, s) for s in seeds for m in first + rest]


def summarise(rows: list[tuple]) -> dict[str, dict]:
    """rows: (method, seed, split, accuracy) -> per method: seeds, mean and std per split."""
    out: dict[str, dict] = {}
    for method, seed, split, acc in rows:
        m = out.setdefault(method, {"seeds": {}, "splits": {}})
        m["seeds"].setdefault(seed, {})[split] = acc
    for m in out.values():
        for split in ("val", "test"):
            accs = [v[split] for v in m["seeds"].values() if split in v]
            if accs:
                m["splits"][split] = {
                    "n_seeds": len(accs),
                    "mean": statistics.fmean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,  # sample std (n - 1)
                }
    return out


def mean_by(rows: list[tuple], key_cols: int = 2) -> dict[tuple, float]:
    """rows (method, x, value) over seeds -> {(method, x): mean value}: the per-step table and
    the per-epoch curve average the seeds of a method."""
    acc: dict[tuple, list[float]] = {}
    for *key, value in rows:
        acc.setdefault(tuple(key[:key_cols]), []).append(value)
    return {k: statistics.fmean(v) for k, v in acc.items()}


def run_detail(query, store, runs: dict[tuple[str, int], str]) -> tuple[list[tuple], list[tuple]]:
    """From each (method, seed)'s run: test accuracy by the question's number of steps (the
    synthetic generator's `n_steps`), and val accuracy per scored epoch (`val_selection`)."""
    from storage.catalog import CatalogError, schema_name

    steps, curves = [], []
    for (method, _seed), run_id in runs.items():
        sch = schema_name(run_id)
        try:
            _, rows = query(store, f"select cast(json_extract(q.meta, '$.n_steps') as int) n, avg(p.correct::int) "
                                   f"from {sch}.predictions p join {sch}.questions q using (question_id) "
                                   f"where p.split = 'test' group by n", run_id)
            steps += [(method, n, a) for n, a in rows if n is not None]
            _, rows = query(store, f"select epoch + 1, accuracy from {sch}.val_selection", run_id)
            curves += [(method, e, a) for e, a in rows]
        except CatalogError as exc:  # a run without val_selection (no selection) or predictions
            print(f"  no detail for {method} ({run_id}): {str(exc).splitlines()[0]}", flush=True)
    return steps, curves


def plot_curves(curves: dict[tuple, float], methods: list[str], out: Path) -> None:
    """One figure: mean val accuracy per scored epoch, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in methods:
        pts = sorted((e, a) for (m, e), a in curves.items() if m == method)
        if pts:
            ax.plot([e for e, _ in pts], [a for _, a in pts], marker="o", label=method)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def print_means(means: dict[tuple, float], methods: list[str], column: str) -> None:
    """A markdown table of {(method, x): mean}: one row per method, one column per x."""
    xs = sorted({x for _, x in means})
    print("\n| method | " + " | ".join(column.format(x) for x in xs) + " |")
    print("|---|" + "---:|" * len(xs))
    for m in methods:
        if any(k[0] == m for k in means):
            print(f"| {m} | " + " | ".join(f"{means[(m, x)]:.3f}" if (m, x) in means else "-" for x in xs) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-arith", help="config preset or YAML (default: bench-arith)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                    help=f"methods to run (default: all of {', '.join(METHODS)})")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.seed values (default: 0 1 2)")
    ap.add_argument("--workers", type=int, default=2, help="runs at once (default 2; each gets 1 torch thread when > 1)")
    ap.add_argument("--store", type=Path, default=None, help="store (default: bench/out/store-<preset>)")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: summarise the (method, seed) runs already in the store")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every run (repeatable)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    name = Path(args.preset).stem
    store = (args.store or OUT / f"store-{name}").resolve()
    logs = OUT / f"methods-{name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.workers > 1 else None

    jobs = job_order(args.methods, args.seeds)
    t0 = time.perf_counter()
    runs: list[dict] = []
    if not args.report_only:
        print(f"{len(jobs)} runs of {args.preset} into {store}, {args.workers} at a time", flush=True)
        with ThreadPoolExecutor(args.workers) as pool:
            runs = list(pool.map(lambda j: run_one(store, args.preset, j[0], j[1], args.sets, threads, logs), jobs))
    total = time.perf_counter() - t0

    sys.path.insert(0, str(ROOT))
    from storage.catalog import query
    from storage.store import Store

    wanted = {(m, s) for m, s in jobs}
    _, rows = query(Store(store), "select method, seed, split, accuracy, run_id from kpod_metrics "
                                  "where split in ('val', 'test') order by run_id")
    latest = {(m, s, sp): a for m, s, sp, a, _ in rows if (m, s) in wanted}  # the newest run wins
    run_of = {(m, s): r for m, s, _, _, r in rows if (m, s) in wanted}
    summary = summarise([(m, s, sp, a) for (m, s, sp), a in latest.items()])
    result = {
        "preset": args.preset,
        "store": str(store),
        "workers": args.workers,
        "wall_s": round(total, 1),
        "runs": runs,
        "methods": summary,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    out = OUT / f"methods-{name}{'-report' if args.report_only else ''}.json"
    out.write_text(json.dumps(result, indent=2, default=str))

    print("\n| method | seeds | val mean +- std | test mean +- std | test per seed |")
    print("|---|---:|---:|---:|---|")
    for method in args.methods:
        m = summary.get(method)
        if not m or "test" not in m["splits"]:
            print(f"| {method} | 0 | - | - | no finished run |")
            continue
        v, t = m["splits"].get("val"), m["splits"]["test"]
        per_seed = ", ".join(f"{m['seeds'][s]['test']:.3f}" for s in sorted(m["seeds"]))
        vtxt = f"{v['mean']:.3f} +- {v['std']:.3f}" if v else "-"
        print(f"| {method} | {t['n_seeds']} | {vtxt} | {t['mean']:.3f} +- {t['std']:.3f} | {per_seed} |")
    steps, curves = run_detail(query, Store(store), run_of)
    steps_m, curves_m = mean_by(steps), mean_by(curves)
    print_means(steps_m, args.methods, "test, {} steps")
    print_means(curves_m, args.methods, "val @{}")
    figure = OUT / f"methods-{name}-val.png"
    if curves_m:
        plot_curves(curves_m, args.methods, figure)
    result["test_by_steps"] = [list(k) + [v] for k, v in sorted(steps_m.items())]
    result["val_by_epoch"] = [list(k) + [v] for k, v in sorted(curves_m.items())]
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwall {total:.0f} s; figures in {out}, val curves in {figure}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
