"""Mentor-KD's soft-label term (METHODS.md §3.4): pure functions of tensors.

    loss = (1 - lambda) * CE + lambda * KL(p_mentor^tau || p_student^tau)

token-level, both models teacher-forced on the same target, tau = 2, lambda = 0.3, no tau^2
factor (Mentor-KD's code has none), the KL averaged over real target tokens only (labels !=
IGNORE; the public code also averages over padding, which dilutes the term).

Shapes: B batch, T target positions, V vocabulary, K cached top-k. Inputs are *aligned* as in
`tasks.core.losses`: `logits[b, t]` is the prediction for `labels[b, t]` (as
`tasks.core.forward.aligned_logits` returns them). Everything is computed in float32 whatever the logits' dtype.

The cached variant stores the mentor's top-k log-probabilities (at temperature 1) once per
target token, so rerunning the student does not rerun the mentor. Its approximation: the
mentor's tempered distribution is restricted to its top-k tokens and renormalised,
    q_i = softmax(logp_topk / tau)_i  for i in top-k, 0 elsewhere
(temperature commutes with the restriction: softmax(z / tau) over a subset only needs log-probs
up to a constant, so tau is applied at training time and changing it needs no new cache). The
term is KL(q || p_student^tau) with the student's FULL tempered softmax; the mass the mentor puts
outside its top-k is dropped. With k = V it is exactly the online KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.core.forward import IGNORE


def _check_aligned(name: str, student: torch.Tensor, labels: torch.Tensor) -> None:
    if student.dim() != 3 or labels.shape != student.shape[:2]:
        raise ValueError(
            f"{name}: expected student logits [B,T,V] and labels [B,T]; got "
            f"{tuple(student.shape)} and {tuple(labels.shape)}"
        )


def _masked_mean(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of per_token [B, T] over positions with labels != IGNORE (0 for none, not NaN)."""
    mask = labels != IGNORE
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    return total / mask.sum().clamp(min=1).to(per_token.dtype)


def kd_kl(
    student_logits: torch.Tensor, mentor_logits: torch.Tensor, labels: torch.Tensor, tau: float
) -> torch.Tensor:
    """KL(p_mentor^tau || p_student^tau) per target token, averaged over real targets.

    student_logits [B, T, V] (carries the gradient), mentor_logits [B, T, V] (treated as a
    constant: detached here), labels [B, T] (only `labels != IGNORE` selects positions; the
    label values do not enter the KL). p^tau = softmax(logits / tau). Returns a scalar.
    """
    _check_aligned("kd_kl", student_logits, labels)
    if mentor_logits.shape != student_logits.shape:
        raise ValueError(
            f"kd_kl: mentor logits {tuple(mentor_logits.shape)} differ from the student's "
            f"{tuple(student_logits.shape)}: the two models must share one vocabulary"
        )
    if tau <= 0:
        raise ValueError(f"kd_kl: tau must be > 0, got {tau}")
    log_p = F.log_softmax(student_logits.float() / tau, dim=-1)  # [B, T, V]
    log_q = F.log_softmax(mentor_logits.detach().float() / tau, dim=-1)  # [B, T, V]
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)  # [B, T]
    return _masked_mean(per_token, labels)


def kd_kl_topk(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """KL(q || p_student^tau) against the mentor's cached top-k (see the module docstring).

    student_logits [B, T, V]; topk_ids [B, T, K] long, the mentor's top-k token ids;
    topk_logprobs [B, T, K], their log-probabilities at temperature 1 (any per-position
    constant offset cancels); labels [B, T]. q = softmax(topk_logprobs / tau) over the K ids.
    Positions with labels == IGNORE may hold any ids/values (padding). Returns a scalar.
    """
    _check_aligned("kd_kl_topk", student_logits, labels)
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:2] != labels.shape:
        raise ValueError(
            f"kd_kl_topk: expected topk_ids and topk_logprobs [B,T,K] matching labels [B,T]; "
            f"got {tuple(topk_ids.shape)}, {tuple(topk_logprobs.shape)}, {tuple(labels.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"kd_kl_topk: tau must be > 0, got {tau}")
    V = student_logits.size(-1)
    mask = labels != IGNORE
    ids = torch.where(mask.unsqueeze(-1), topk_ids.long(), torch.zeros_like(topk_ids, dtype=torch.long))
    if mask.any() and (ids.max() >= V or ids.min() < 0):
        raise ValueError(f"kd_kl_topk: cached token id outside the student's vocabulary [0, {V})")
    log_p = F.log_softmax(student_logits.float() / tau, dim=-1).gather(-1, ids)  # [B, T, K]
    log_q = F.log_softmax(topk_logprobs.float() / tau, dim=-1)  # [B, T, K]
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)  # [B, T]
    return _masked_mean(per_token, labels)


def mix(ce: torch.Tensor, kl: torch.Tensor, lam: float) -> torch.Tensor:
    """(1 - lambda) * CE + lambda * KL; CE is the (possibly KPOD-weighted) token NLL."""
    if not 0 <= lam <= 1:
        raise ValueError(f"kd mix: lambda must be in [0, 1], got {lam}")
    return (1 - lam) * ce + lam * kl


def topk_logprobs(mentor_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache entries of a mentor's logits [N, V]: (ids [N, k] long, logprobs [N, k] float32).

    Log-probabilities are at temperature 1 (log_softmax over the full vocabulary), sorted
    descending; k is capped at V.
    """
    if mentor_logits.dim() != 2:
        raise ValueError(f"topk_logprobs: expected logits [N, V], got {tuple(mentor_logits.shape)}")
    logp = F.log_softmax(mentor_logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.size(-1)), dim=-1)
    return ids, values
