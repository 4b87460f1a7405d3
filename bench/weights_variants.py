"""Run the `weights` stage for several joint-phase variants of one config, warming up once.

The weights stage spends most of its time warming up the answer predictor (on the pretrained
preset ~900 of ~1,000 s), and that warm-up does not depend on the joint phase's settings (alpha,
the estimator, its steps...). This runs each variant as the real stage, into the store under its
own key (so a later `kpod run` with the same `--set` values reuses it), but hands every variant
after the first the warmed-up predictor of the first through the stage's own resume file: the
same file a stage killed in its joint phase resumes from. The warm-up is the same computation
for every variant (the script refuses a variant that changes a warm-up setting), so the
weights are those a full run computes. No run record: variants stay out of the method table.

    OMP_NUM_THREADS=1 .venv/bin/python bench/weights_variants.py STORE CONFIG \\
        --variant "weights.estimator=score_function weights.alpha=0.06" --variant "..." [--set ...]

Prints each variant's headline figures and writes them all as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.selection import select_stages  # noqa: E402
from storage.keys import digest  # noqa: E402
from storage.store import Store  # noqa: E402
from tasks.config.pipeline import load_config  # noqa: E402
from tasks.stages.contract import execute, plan  # noqa: E402
from tasks.stages.registry import BY_NAME, STAGES  # noqa: E402

# weights fields read only after the warm-up (the generator, the joint phase, the scoring)
JOINT_FIELDS = frozenset({"alpha", "mask_norm", "tau", "estimator", "samples", "init_keep",
                          "joint_predictor", "steps", "lr", "heads", "mlp_hidden"})
SHOWN = ("auroc", "auroc_core_vs_filler", "auroc_core_vs_rest", "mean_weight_role_core", "mean_weight_role_filler",
         "probe_after_learned_kept", "probe_after_learned_accuracy", "probe_after_unmasked_accuracy",
         "final_lp", "final_kept_ratio", "mean_weight", "warmup_steps", "train_seconds")


def warm_identity(cfg, keys: dict[str, str], upstream: tuple[str, ...]) -> str:
    """What the warm-up depends on: the weights settings outside JOINT_FIELDS and the inputs."""
    return digest({"weights": cfg.weights.model_dump(exclude=set(JOINT_FIELDS) | {"device"}),
                   "upstream": {u: keys[u] for u in upstream}})


def run_variant(store: Store, config: str, sets: list[str], cache: Path) -> dict:
    """Run one variant's missing upstream stages, then its weights stage: resumed from the cached
    warm-up when there is one, else warming up and keeping that warm-up for the next variants."""
    cfg = load_config(config, sets)
    planned = plan(cfg, STAGES)
    keys = {p.name: p.key for p in planned}
    for name in [p.name for p in select_stages(planned, store, ["weights"], []) if p.name != "weights"]:
        t0 = time.time()
        out = execute(BY_NAME[name], cfg, keys, store, show_progress=False)
        print(f"  {name:15s} {out.status:9s} {time.time() - t0:7.1f}s", flush=True)
    warm = cache / f"warm-{warm_identity(cfg, keys, BY_NAME['weights'].upstream(cfg))}.pt"
    work = store.work_dir("weights", keys["weights"]) / "warm_predictor.pt"  # the stage's resume file
    if warm.exists() and not store.is_complete("weights", keys["weights"]):
        shutil.copy(warm, work)
    t0 = time.time()
    # keep_work: the stage's work dir (and so its warm-up) outlives the commit, to be cached here
    out = execute(BY_NAME["weights"], cfg, keys, store, show_progress=False, keep_work=True)
    print(f"  {'weights':15s} {out.status:9s} {time.time() - t0:7.1f}s", flush=True)
    if work.exists() and not warm.exists():
        shutil.copy(work, warm)
    store.clear_work_dir("weights", keys["weights"])
    return {"sets": sets, "weights_key": keys["weights"], **{k: out.summary.get(k) for k in SHOWN}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="the store (its upstream stages are reused)")
    ap.add_argument("config", help="a YAML config")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="for every variant")
    ap.add_argument("--variant", action="append", required=True,
                    help="space-separated KEY=VALUE settings of one variant (joint-phase weights fields only)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the figures")
    args = ap.parse_args(argv)
    store = Store(args.store)
    base = load_config(args.config, args.sets).weights.model_dump()
    for v in args.variant:
        changed = {k for k, x in load_config(args.config, args.sets + shlex.split(v)).weights.model_dump().items() if base[k] != x}
        if changed - JOINT_FIELDS:
            ap.error(f"variant {v!r} changes warm-up settings {sorted(changed - JOINT_FIELDS)}")
    cache = store.work_dir("weights", "warm-predictors")  # scratch of the stage, beside its keys' dirs
    results = []
    for v in args.variant:
        sets = args.sets + shlex.split(v)
        print(f"variant: {v}", flush=True)
        results.append(run_variant(store, args.config, sets, cache))
        print(json.dumps(results[-1], default=str), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
