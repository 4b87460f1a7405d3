"""The torch thread default: one intra-op thread for the small embedded models.

Measured on the 2-core dev box (docs/benchmarks.md, issue 14): a demo training step takes about
0.1 s with torch's default of one thread per core on an idle machine, and 3.6-4 s once anything
else runs, because the threads of one op wait on each other; with one thread it stays at about
0.1 s either way. The embedded models (well under a million to a few million parameters) gain
little from a second thread even when the machine is idle, so kpod runs them on one. A model
from a directory or the Hub (`kind: hf`) keeps torch's default. `OMP_NUM_THREADS`, when set,
always wins, and `kpod run --threads N` sets it.

Plain code: imports torch only to apply a choice.
"""

from __future__ import annotations

import os
from typing import Any

ENV = "OMP_NUM_THREADS"
# above this many parameters the student is no longer "small": torch's default applies
SMALL_PARAMS = 20_000_000


def embedded_params(shape: Any, vocab_size: int) -> int:
    """Parameters of an embedded LLaMA shape (embeddings and head untied, norms ignored)."""
    h, i = shape.hidden, shape.intermediate
    return 2 * vocab_size * h + shape.layers * (4 * h * h + 3 * h * i)


def thread_default(config: Any) -> int | None:
    """Threads per process for this config: OMP_NUM_THREADS when set (applied explicitly: torch
    may have been imported before it was set); None (torch's default) for an HF student or a
    large embedded one; else 1."""
    if (env := os.environ.get(ENV, "").strip()).isdigit() and int(env) > 0:
        return int(env)
    student = config.student
    if student.kind != "embedded" or embedded_params(student, student.vocab_size) > SMALL_PARAMS:
        return None
    return 1


def apply_threads(threads: int | None) -> None:
    """Use `threads` in this process and in every process it starts (stage workers)."""
    if threads is None:
        return
    os.environ[ENV] = str(threads)
    import torch

    torch.set_num_threads(threads)
