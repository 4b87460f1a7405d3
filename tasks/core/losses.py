"""Training losses: pure module-level functions of tensors, each tested against a naive loop.

Shapes: B batch, T target positions, V vocabulary. Inputs are *aligned*: `logits[b, t]` is the
prediction for `labels[b, t]`, as `tasks.core.forward.aligned_logits` returns them (it shifts a
decoder-only model's logits, labels and weights; a seq2seq decoder's are already aligned).
"""

from __future__ import annotations

import torch

from tasks.core.forward import IGNORE, token_nll


def weighted_token_nll(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token weighted negative log-likelihood (Std-CoT Eq. 1; KPOD Eq. 15 with w_j).

    logits:  [B, T, V] float, unnormalised scores.
    labels:  [B, T] long, target ids; IGNORE marks positions without a target.
    weights: [B, T] float, the loss weight of each target (1 for Std-CoT; KPOD's w_j on
             rationale tokens and 1 on answer tokens). Ignored where labels == IGNORE.

    Returns (loss, parts):
      loss = sum_t w_t * nll_t / N, N = number of real targets (labels != IGNORE).
        Dividing by the token count, not by sum(w), keeps KPOD's weights meaningful: a
        rationale whose tokens are judged unimportant contributes less in total, instead of
        being renormalised back to the same size as every other rationale.
      parts: "nll" (unweighted mean NLL over real targets, detached, for logging) and
        "tokens" (N, as a tensor).
    Computed in float32 whatever the logits' dtype (bf16 log-softmax loses digits).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or weights.shape != labels.shape:
        raise ValueError(
            f"weighted_token_nll: expected logits [B,T,V], labels and weights [B,T]; got "
            f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(weights.shape)}"
        )
    mask = labels != IGNORE
    nll = token_nll(logits, labels)  # [B, T] float32, 0 where ignored
    count = mask.sum()
    denom = count.clamp(min=1).to(nll.dtype)  # an all-ignored batch gives loss 0, not NaN
    w = torch.where(mask, weights.to(nll.dtype), torch.zeros_like(nll))
    loss = (w * nll).sum() / denom
    parts = {"nll": (nll.sum() / denom).detach(), "tokens": count.detach()}
    return loss, parts


def floored_weight(w: float, floor: float) -> float:
    """Eq. 15's token weight with a floor: w' = f + (1 - f) * w, so f = 0 is the paper's raw w
    and f = 1 is plain Std-CoT; every token keeps at least weight f."""
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"weight floor must lie in [0, 1], got {floor}")
    return floor + (1.0 - floor) * w
