"""The learning-rate multiplier of the recipe: linear warm-up, an optional hold, then decay.

One pure function of the optimiser step. With no hold it is the schedule transformers'
`get_scheduler` builds for "cosine", "linear" and "constant_with_warmup" (a test checks it step
by step); `hold_until` keeps the peak through KPOD's curriculum epochs, so the decay runs over
the whole-rationale epochs after it (`train.curriculum_lr = hold`).
"""

from __future__ import annotations

import math
from typing import Callable

KINDS = ("cosine", "linear", "constant")


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, kind: str, hold_until: int = 0) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based).

    Steps [0, warmup_steps): linear from 0 up; then 1 until `hold_until`; then, over the steps
    left to `total_steps`, a cosine half-wave to 0 (cosine), a straight line to 0 (linear), or
    1 (constant).
    """
    if kind not in KINDS:
        raise ValueError(f"lr_multiplier: kind must be one of {KINDS}, got {kind!r}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    start = max(warmup_steps, hold_until)
    if kind == "constant" or step < start:
        return 1.0
    progress = (step - start) / max(1, total_steps - start)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


def lr_lambda(warmup_steps: int, total_steps: int, kind: str, hold_until: int = 0) -> Callable[[int], float]:
    """`lr_multiplier` with the schedule fixed, for `torch.optim.lr_scheduler.LambdaLR`."""
    return lambda step: lr_multiplier(step, warmup_steps, total_steps, kind, hold_until)
