"""Run one stage of a config (and whatever it needs) in this process, without Prefect.

For experiments: the same stage code, keys and store as `kpod run`, but no server, no flow and
no run record, so a variant computed here (say `--set train.curriculum_lr=shared`) stays out of
`kpod_metrics` and the method table of the same store. Prints each stage's status and time, then
the target stage's summary (for `evaluate`: val and test accuracy) as JSON.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stage_run.py STORE CONFIG STAGE [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.selection import select_stages  # noqa: E402
from storage.store import Store  # noqa: E402
from tasks.config.pipeline import load_config  # noqa: E402
from tasks.stages.contract import execute, plan  # noqa: E402
from tasks.stages.registry import BY_NAME, STAGES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="the store (shared with kpod runs: cached stages are reused)")
    ap.add_argument("config", help="a YAML config")
    ap.add_argument("stage", choices=list(BY_NAME), help="the stage to run")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.sets)
    planned = plan(cfg, STAGES)
    keys = {p.name: p.key for p in planned}
    store = Store(args.store)
    # the stage and its incomplete upstream stages, in DAG order (what `kpod run --stages` runs)
    for name in [p.name for p in select_stages(planned, store, [args.stage], [])]:
        t0 = time.time()
        out = execute(BY_NAME[name], cfg, keys, store, show_progress=False)
        print(f"{name:15s} {out.status:9s} {time.time() - t0:7.1f}s", flush=True)
        if name == args.stage:
            print(json.dumps(out.summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
