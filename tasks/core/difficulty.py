"""KPOD's per-step difficulty (METHODS.md §2.2, Eq. 8): pure torch, no I/O.

    d_k = - sum_{j in step k} softmax_step(w)_j * log P(r_j | r_<j, x; reference)

`target_token_nll` scores the labelled tokens of a collated batch under the reference model
(through the one teacher-forced forward, `tasks.core.forward`); `difficulty_rows` checks that a
rationale's scored target begins with the tokens the weights stage weighted and turns NLL,
weights and steps into `step_difficulty` rows with `step_difficulty` (Eq. 8).
"""

from __future__ import annotations

from typing import Any

import torch

from tasks.core.forward import IGNORE, aligned_logits, token_nll


def step_difficulty(
    token_nll: torch.Tensor, weights: torch.Tensor, token_step: torch.Tensor, n_steps: int,
    uniform_within_step: bool = False,
) -> torch.Tensor:
    """Eq. 8: d_k = - sum_{j in step k} softmax_step(w)_j * log P(r_j | r_<j, x).

    token_nll [L]: -log P(r_j | r_<j, x) of each rationale token under the reference model;
    weights [L]: the token weights w_j; token_step [L] ints in [0, n_steps): the 0-based step
    of each token. Returns d [n_steps]. The softmax runs over the tokens of one step only.
    `uniform_within_step` replaces the softmax by 1/|step| (the no_weight_in_difficulty
    ablation), so d_k is the step's mean token NLL. A step without tokens has d_k = 0.
    """
    if not (token_nll.shape == weights.shape == token_step.shape) or token_nll.dim() != 1:
        raise ValueError(
            f"step_difficulty: token_nll {tuple(token_nll.shape)}, weights {tuple(weights.shape)} "
            f"and token_step {tuple(token_step.shape)} must be the same 1-D shape"
        )
    idx = token_step.long()
    if len(idx) and (idx.min() < 0 or idx.max() >= n_steps):
        raise ValueError(f"step_difficulty: token_step outside [0, {n_steps})")
    nll = token_nll.double()
    w = torch.zeros_like(nll) if uniform_within_step else weights.double()
    # softmax within each step: subtract the step's max before exp for stability
    step_max = torch.full((n_steps,), -torch.inf, dtype=w.dtype).scatter_reduce(
        0, idx, w, reduce="amax", include_self=True
    )
    e = torch.exp(w - step_max[idx])  # [L]
    denom = torch.zeros(n_steps, dtype=w.dtype).index_add(0, idx, e)  # [n]
    soft = e / denom[idx]  # [L], sums to 1 within each step
    return torch.zeros(n_steps, dtype=w.dtype).index_add(0, idx, soft * nll)


@torch.no_grad()
def target_token_nll(model: Any, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """-log P(label_t | ...) of every labelled position of each row of a collated batch.

    batch: input_ids, attention_mask, labels (as `tasks.training.data.collate_examples` builds
    them), on the model's device. Returns one float64 CPU tensor [T_b] per row, the NLL of its
    labelled tokens in order (padding and prompt positions left out). Teacher-forced, one
    forward pass, in eval mode.
    """
    model.eval()
    aligned = aligned_logits(model, batch)
    nll = token_nll(aligned.logits, aligned.labels)  # [B, T]
    return [nll[b][aligned.labels[b] != IGNORE].double().cpu() for b in range(nll.shape[0])]


def difficulty_rows(
    rationale_id: str, target_nll: torch.Tensor, target_ids: list[int], rationale_ids: list[int],
    weights: list[float], steps: list[int], n_steps: int, uniform_within_step: bool,
) -> list[dict[str, Any]]:
    """`step_difficulty` rows of one rationale.

    target_nll [T] / target_ids [T]: the NLL and ids of the example's labelled tokens; the
    first L of them must be `rationale_ids` [L] (the weights stage's tokens, `pos` order), with
    `weights` [L] and 0-based `steps` [L]. Tokens cut off by truncation (T < L) are not scored;
    a step with no scored token gets difficulty 0 and tokens 0.
    """
    L = len(rationale_ids)
    if not (len(weights) == len(steps) == L):
        raise ValueError(f"token_weights: rationale {rationale_id!r} has ragged weight/step rows")
    scored = min(L, len(target_ids))
    if list(target_ids[:scored]) != list(rationale_ids[:scored]):
        raise ValueError(
            f"rationale {rationale_id!r}: the training target's tokens differ from the tokens "
            "the weights stage weighted; both must tokenize ' ' + text with the student tokenizer"
        )
    if any(not 0 <= s < n_steps for s in steps):
        raise ValueError(f"token_weights: rationale {rationale_id!r} has a step outside 0..{n_steps - 1}")
    step_t = torch.tensor(steps[:scored], dtype=torch.long)
    d = step_difficulty(
        target_nll[:scored], torch.tensor(weights[:scored], dtype=torch.float64), step_t,
        n_steps, uniform_within_step=uniform_within_step,
    )
    counts = torch.bincount(step_t, minlength=n_steps)
    return [
        dict(rationale_id=rationale_id, step=k, difficulty=float(d[k]), tokens=int(counts[k]))
        for k in range(n_steps)
    ]


def weights_by_rationale(
    rationale_ids: list[str], steps: list[int], weights: list[float]
) -> dict[str, tuple[list[float], list[int]]]:
    """`token_weights` columns sorted by (rationale_id, pos) -> rationale_id -> (weights, steps),
    each in `pos` order."""
    per: dict[str, tuple[list[float], list[int]]] = {}
    for rid, step, w in zip(rationale_ids, steps, weights):
        ws, ss = per.setdefault(rid, ([], []))
        ws.append(w)
        ss.append(step)
    return per
