"""Peak memory of the dataset stage reading a data file (issue 16 item 7: file sources).

For each N, writes a GSM8K-shaped JSONL (or Parquet) file of N distinct questions whose rows
also carry a long `rationale` field (~1.5 KB, as released teacher files do, which kpod does not
read for the questions table), then runs the `dataset` stage on it (`dataset.source=file`,
`task=gsm8k`, no Prefect) in a fresh child process and reports its peak RSS (`ru_maxrss`) and
wall time. Writes bench/out/file_dataset_memory.json and prints a markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python bench/file_dataset_memory.py --rows 50000 200000 [--format parquet]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FILLER = "Let me work through this one step at a time, writing down each quantity as I go. " * 18


def write_file(path: Path, n: int, fmt: str) -> None:
    rows = ({"question": f"Question {i}: Mia has {i} apples and buys {i % 7 + 1} more. How many apples does she have?",
             "answer": f"{i} + {i % 7 + 1} = {2 * i}\n#### {i + i % 7 + 1}", "rationale": FILLER}
            for i in range(n))
    if fmt == "jsonl":
        with path.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        return
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    while chunk := list(itertools.islice(rows, 10_000)):
        t = pa.Table.from_pylist(chunk)
        writer = writer or pq.ParquetWriter(path, t.schema)
        writer.write_table(t)
    writer.close()


def child(path: str, store_dir: str) -> dict:
    from storage.store import Store
    from tasks.config.pipeline import load_config
    from tasks.stages.contract import execute, plan
    from tasks.stages.registry import BY_NAME, STAGES as ALL

    cfg = load_config(None, ["dataset.source=file", "dataset.task=gsm8k", f"dataset.path={path}"])
    keys = {p.name: p.key for p in plan(cfg, ALL)}
    t0 = time.perf_counter()
    outcome = execute(BY_NAME["dataset"], cfg, keys, Store(store_dir), show_progress=False)
    return {"seconds": round(time.perf_counter() - t0, 2), "rows": outcome.rows,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}


def measure(n: int, fmt: str) -> dict:
    where = Path(tempfile.mkdtemp(prefix=f"kpod-filemem-{n}-"))
    try:
        path = where / f"data.{fmt}"
        write_file(path, n, fmt)
        load = Path("/proc/loadavg").read_text().split()[:3]
        cmd = [sys.executable, __file__, "--child", str(path), "--store", str(where / "store")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"N={n}: child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out.update(rows_in_file=n, format=fmt, file_mb=round(path.stat().st_size / 2**20, 1), loadavg=" ".join(load))
        return out
    finally:
        shutil.rmtree(where, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "file_dataset_memory.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.store)))
        return 0
    results = [measure(n, args.format) for n in args.rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("| rows | format | file MB | peak RSS (MB) | seconds | load |\n|---:|---|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['rows_in_file']:,} | {r['format']} | {r['file_mb']} | {r['peak_rss_mb']:.0f} | {r['seconds']} | {r['loadavg']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
