"""The recipe's learning-rate multiplier against transformers' schedulers and a naive hold."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.training.lr_schedule import lr_lambda, lr_multiplier


def _transformers_lrs(name: str, warmup: int, total: int) -> list[float]:
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind,name", [("cosine", "cosine"), ("linear", "linear"), ("constant", "constant_with_warmup")])
def test_without_hold_it_is_the_transformers_schedule(kind, name):
    for warmup, total in [(5, 100), (0, 37), (12, 12)]:
        want = _transformers_lrs(name, warmup, total)
        got = [lr_multiplier(s, warmup, total, kind) for s in range(total)]
        assert got == pytest.approx(want, abs=1e-12), (kind, warmup, total)


def test_hold_keeps_the_peak_then_decays_over_the_rest():
    warmup, hold, total = 4, 30, 70
    for s in range(total):
        if s < warmup:
            want = s / warmup
        elif s < hold:
            want = 1.0
        else:  # a cosine half-wave over the 40 steps after the hold
            want = 0.5 * (1 + math.cos(math.pi * (s - hold) / (total - hold)))
        assert lr_multiplier(s, warmup, total, "cosine", hold) == pytest.approx(want)
        assert lr_multiplier(s, warmup, total, "linear", hold) == pytest.approx(
            want if s < hold else 1 - (s - hold) / (total - hold))
        assert lr_multiplier(s, warmup, total, "constant", hold) == pytest.approx(min(1.0, s / warmup))
    # a hold shorter than the warm-up changes nothing
    assert [lr_multiplier(s, 10, 50, "cosine", 3) for s in range(50)] == [lr_multiplier(s, 10, 50, "cosine") for s in range(50)]
    assert lr_lambda(4, 70, "cosine", 30)(50) == lr_multiplier(50, 4, 70, "cosine", 30)
    with pytest.raises(ValueError, match="kind"):
        lr_multiplier(0, 1, 2, "step")
