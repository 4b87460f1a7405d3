"""Training checkpoints and model-selection files inside a stage's work dir: names and layout.

The recipe (tasks/training/recipe.py) decides what state a checkpoint holds; this module owns
where it goes and how it is committed, as torchtune's checkpointer does for its recipes:

    <work_dir>/ckpt-<step:08d>/          a complete checkpoint (it holds state.json)
        model.safetensors                the unwrapped model's weights
        optimizer.safetensors, optimizer.json, scheduler.json
        rng-<rank>.safetensors, rng-<rank>.json   each process's RNG streams
        state.json                       position and log; written last
    <work_dir>/.tmp-ckpt-<step:08d>/     a checkpoint being written; never read
    <work_dir>/selection.json            model selection's history (tasks/training/selection.py)
    <work_dir>/best-model.safetensors    the weights of the best epoch so far

A checkpoint is written into its temp dir and renamed into place with `state.json` written
last, so a kill at any moment leaves either a whole checkpoint or none; a directory without
`state.json` is not a checkpoint. The newest `KEEP` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

KEEP = 2  # complete checkpoints kept by `commit`, newest first

STATE = "state.json"
MODEL = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER = "optimizer.json"
SCHEDULER = "scheduler.json"

SELECTION_HISTORY = "selection.json"
BEST_WEIGHTS = "best-model.safetensors"

_PREFIX = "ckpt-"


# ---- checkpoint directories ------------------------------------------------------------------
def checkpoint_dir(work_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of optimiser step `step` lives once complete."""
    return Path(work_dir) / f"{_PREFIX}{step:08d}"


def temp_dir(work_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before `commit` renames it."""
    return Path(work_dir) / f".tmp-{_PREFIX}{step:08d}"


def rng_file(rank: int, suffix: str) -> str:
    """Name of process `rank`'s RNG file: suffix "safetensors" (torch) or "json" (python, numpy)."""
    return f"rng-{rank}.{suffix}"


def begin(work_dir: str | Path, step: int) -> Path:
    """A fresh, empty temp dir for the checkpoint of `step` (one process creates it)."""
    tmp = temp_dir(work_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save
    tmp.mkdir(parents=True)
    return tmp


def commit(work_dir: str | Path, step: int, state: dict[str, Any], keep: int = KEEP) -> Path:
    """Write `state` as state.json (last), rename the temp dir into place, keep the newest `keep`."""
    tmp, final = temp_dir(work_dir, step), checkpoint_dir(work_dir, step)
    write_json(tmp, STATE, state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    prune(work_dir, keep)
    return final


def complete(work_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temp dir or one without state.json is not one)."""
    found = Path(work_dir).glob(f"{_PREFIX}*")
    return sorted(p for p in found if (p / STATE).is_file())


def latest(work_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete(work_dir)
    return found[-1] if found else None


def prune(work_dir: str | Path, keep: int = KEEP) -> None:
    """Delete all complete checkpoints but the newest `keep`."""
    for old in complete(work_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---- files inside a checkpoint ---------------------------------------------------------------
def write_json(directory: Path, name: str, data: Any) -> None:
    """`data` as JSON in `directory/name`, flushed to disk before returning."""
    with open(directory / name, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())


def read_json(directory: Path, name: str) -> Any:
    return json.loads((directory / name).read_text())


def write_tensors(directory: Path, name: str, tensors: dict[str, Any]) -> None:
    """A flat dict of (contiguous) tensors as safetensors."""
    from safetensors.torch import save_file

    save_file(tensors, str(directory / name))


def read_tensors(directory: Path, name: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(directory / name))


def write_weights(directory: Path, model: Any, name: str = MODEL) -> None:
    """A model's weights (shared tensors handled by safetensors' save_model)."""
    from safetensors.torch import save_model

    save_model(model, str(directory / name))


def read_weights(directory: Path, model: Any, name: str = MODEL) -> None:
    """Load weights written by `write_weights` into `model`."""
    from safetensors.torch import load_model

    load_model(model, str(directory / name))


# ---- model selection's files -----------------------------------------------------------------
def read_selection_history(work_dir: str | Path) -> list[dict[str, Any]]:
    """The scored epochs recorded so far; [] before the first."""
    path = Path(work_dir) / SELECTION_HISTORY
    return json.loads(path.read_text()) if path.is_file() else []


def write_selection_history(work_dir: str | Path, history: list[dict[str, Any]]) -> None:
    """Replace the history atomically (temp file + rename)."""
    tmp = Path(work_dir) / f".tmp-{SELECTION_HISTORY}"
    tmp.write_text(json.dumps(history))
    os.replace(tmp, Path(work_dir) / SELECTION_HISTORY)


def write_best_weights(work_dir: str | Path, model: Any) -> None:
    """Replace the best epoch's weights atomically (temp file + rename)."""
    write_weights(Path(work_dir), model, f".tmp-{BEST_WEIGHTS}")
    os.replace(Path(work_dir) / f".tmp-{BEST_WEIGHTS}", Path(work_dir) / BEST_WEIGHTS)


def read_best_weights(work_dir: str | Path, model: Any) -> None:
    read_weights(Path(work_dir), model, BEST_WEIGHTS)
