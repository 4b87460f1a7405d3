"""Control for `student.base_mix`: the same run with the pretrained base swapped for a second fresh init.

Mixing m * base + (1 - m) * fresh also shrinks the weights (two independent inits mixed have a
smaller spread than one), so a gain could come from the init's scale alone. This runs
`bench/stage_run.py` with the `pretrain` stage's base replaced, when the student stage loads
it, by a fresh init of the same shape (seed `--control-seed`): same scale, no pretrained
knowledge. Such a student is not what its stage key says, so the control never runs in the
source store: it copies the source store's dataset, teacher, rationales and pretrain stages
(and teacher ledgers) into a new store and runs there.

    OMP_NUM_THREADS=1 .venv/bin/python bench/base_mix_control.py SOURCE_STORE CONTROL_STORE \\
        configs/bench-arith-pretrained.yaml --set train.method=std_cot --set train.seed=1

With `--fresh-parts` only those parameter groups of the base are swapped for the fresh init's
(embeddings: the tied token embedding; attention; mlp; norms), the rest stays pretrained: where
in the base the help, or the harm, lies.
"""

from __future__ import annotations

import argparse
import runpy
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ("dataset", "teacher", "rationales", "pretrain")


def copy_upstream(source: Path, control: Path) -> None:
    """The complete stages a control run reuses, copied into a store of its own (paths from Store)."""
    from storage.store import Store

    if control.resolve() == source.resolve():
        raise SystemExit("base_mix_control: the control store must not be the source store")
    src, dst = Store(source), Store(control)
    for stage in SHARED:
        keys = src.complete_keys(stage)
        if not keys:
            raise SystemExit(f"base_mix_control: no complete {stage} stage in {source}: run the preset's pretrain stage there first")
        for key in keys:
            shutil.copytree(src.stage_dir(stage, key), dst.stage_dir(stage, key), dirs_exist_ok=True)
    if src.ledger_dir("teacher").is_dir():
        shutil.copytree(src.ledger_dir("teacher"), dst.ledger_dir("teacher"), dirs_exist_ok=True)


PARTS = {"embeddings": ("embed_tokens", "lm_head"), "attention": ("self_attn",), "mlp": ("mlp",), "norms": ("norm",)}


def swap_parts(base, fresh, parts: tuple[str, ...]):
    """`base` with the parameters of `parts` (PARTS names) copied from `fresh`; returns base."""
    import torch

    marks = tuple(m for part in parts for m in PARTS[part])
    fresh_params = dict(fresh.named_parameters())
    swapped = 0
    with torch.no_grad():
        for name, p in base.named_parameters():
            if any(m in name for m in marks):
                p.copy_(fresh_params[name])
                swapped += p.numel()
    print(f"control: {', '.join(parts)} of the base swapped for a fresh init ({swapped:,} parameters)", flush=True)
    return base


def swap_base_for_fresh(seed: int, parts: tuple[str, ...] = ()) -> None:
    """Make `load_model` return a fresh init (same shape and tokenizer) for the pretrain base,
    or, given `parts`, the base with only those parameter groups fresh."""
    import tasks.core.models as models

    real = models.load_model

    def load(path, *args, **kwargs):
        model, tok = real(path, *args, **kwargs)
        if Path(path).name != "base":  # the pretrain stage's output; the student and train read "model"
            return model, tok
        c = model.config
        shape = SimpleNamespace(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                                intermediate=c.intermediate_size, max_len=c.max_position_embeddings, seed=seed)
        fresh = models.embedded_llama(shape, tok)
        if parts:
            return swap_parts(model, fresh, parts), tok
        print(f"control: the base swapped for a fresh init (seed {seed})", flush=True)
        return fresh, tok

    models.load_model = load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="store holding the preset's dataset, teacher, rationales and pretrain stages")
    ap.add_argument("control", type=Path, help="a store for the control runs (created; never the source)")
    ap.add_argument("config", help="a YAML config with student.init base and student.base_mix < 1")
    ap.add_argument("--control-seed", type=int, default=1, help="seed of the fresh init standing in for the base (default 1)")
    ap.add_argument("--fresh-parts", nargs="+", choices=sorted(PARTS), default=[],
                    help="swap only these parameter groups of the base for the fresh init (default: all of it)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    copy_upstream(args.source, args.control)
    swap_base_for_fresh(args.control_seed, tuple(args.fresh_parts))
    sys.argv = ["stage_run.py", str(args.control), args.config, "evaluate"] + [f"--set={s}" for s in args.sets]
    runpy.run_path(str(ROOT / "bench" / "stage_run.py"), run_name="__main__")


if __name__ == "__main__":
    main()
