"""Mentor-KD's soft-label term (tasks/core/kd.py) against naive per-token loops, and the train-side
wrapper (tasks/training/mentor_kd.py): cached top-k with k = V equals the online KL."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.core.forward import IGNORE
from tasks.core.kd import kd_kl, kd_kl_topk, mix, topk_logprobs
from tasks.training.mentor_kd import MentorKD, TopkCache, cache_offset


def _naive_kl(student, mentor, labels, tau):
    """Loop over tokens; softmax and KL written out in float64."""
    total, count = 0.0, 0
    B, T, V = student.shape
    for b in range(B):
        for t in range(T):
            if labels[b, t].item() == IGNORE:
                continue
            s = [student[b, t, v].item() / tau for v in range(V)]
            m = [mentor[b, t, v].item() / tau for v in range(V)]
            zs = math.log(sum(math.exp(x) for x in s))
            zm = math.log(sum(math.exp(x) for x in m))
            total += sum(math.exp(m[v] - zm) * ((m[v] - zm) - (s[v] - zs)) for v in range(V))
            count += 1
    return total / max(count, 1)


def _naive_topk_kl(student, ids, logps, labels, tau):
    total, count = 0.0, 0
    B, T, V = student.shape
    for b in range(B):
        for t in range(T):
            if labels[b, t].item() == IGNORE:
                continue
            s = [student[b, t, v].item() / tau for v in range(V)]
            zs = math.log(sum(math.exp(x) for x in s))
            q = [logps[b, t, j].item() / tau for j in range(ids.shape[-1])]
            zq = math.log(sum(math.exp(x) for x in q))
            total += sum(
                math.exp(q[j] - zq) * ((q[j] - zq) - (s[ids[b, t, j].item()] - zs))
                for j in range(len(q))
            )
            count += 1
    return total / count


def _case(seed=0, B=3, T=5, V=7):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 2
    mentor = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = IGNORE  # a prompt
    labels[2, 3:] = IGNORE  # padding
    return student, mentor, labels


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_kd_kl_matches_naive_with_temperature_and_mask(tau):
    student, mentor, labels = _case()
    got = kd_kl(student, mentor, labels, tau).item()
    assert got == pytest.approx(_naive_kl(student, mentor, labels, tau), rel=1e-5, abs=1e-6)


def test_kd_kl_ignores_masked_positions_and_padding_values():
    student, mentor, labels = _case()
    ref = kd_kl(student, mentor, labels, 2.0)
    s2, m2 = student.clone(), mentor.clone()
    s2[labels == IGNORE] = 50.0  # garbage where there is no target
    m2[labels == IGNORE] = -50.0
    assert torch.allclose(kd_kl(s2, m2, labels, 2.0), ref)
    # averaged over real targets: duplicating a batch row leaves a row-mean unchanged
    one = labels.clone()
    one[:] = IGNORE
    one[1] = labels[1]
    per_row = kd_kl(student, mentor, one, 2.0)
    assert per_row.item() == pytest.approx(_naive_kl(student[1:2], mentor[1:2], labels[1:2], 2.0), rel=1e-5)


def test_kd_kl_is_zero_for_equal_models_and_all_masked_batches():
    student, _, labels = _case()
    assert kd_kl(student, student.clone(), labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(student, torch.randn_like(student), torch.full_like(labels, IGNORE), 2.0).item() == 0.0


def test_kd_kl_gradient_reaches_the_student_only():
    student, mentor, labels = _case()
    student.requires_grad_(True)
    mentor.requires_grad_(True)
    kd_kl(student, mentor, labels, 2.0).backward()
    assert student.grad.abs().sum() > 0
    assert mentor.grad is None
    assert torch.all(student.grad[labels == IGNORE] == 0)


def test_kd_kl_refuses_mismatched_vocabularies():
    student, mentor, labels = _case()
    with pytest.raises(ValueError, match="share one vocabulary"):
        kd_kl(student, mentor[..., :-1], labels, 2.0)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_with_k_equal_vocab_is_the_full_kl(tau):
    student, mentor, labels = _case(seed=1)
    B, T, V = student.shape
    ids, lps = topk_logprobs(mentor.reshape(-1, V), V)
    got = kd_kl_topk(student, ids.view(B, T, V), lps.view(B, T, V), labels, tau)
    assert torch.allclose(got, kd_kl(student, mentor, labels, tau), atol=1e-6)


def test_topk_matches_naive_renormalised_topk():
    student, mentor, labels = _case(seed=2)
    B, T, V = student.shape
    ids, lps = topk_logprobs(mentor.reshape(-1, V), 3)
    ids, lps = ids.view(B, T, 3), lps.view(B, T, 3)
    got = kd_kl_topk(student, ids, lps, labels, 2.0).item()
    assert got == pytest.approx(_naive_topk_kl(student, ids, lps, labels, 2.0), rel=1e-5)
    # the cache holds the largest log-probs, sorted, at temperature 1
    full = torch.log_softmax(mentor.reshape(-1, V), -1)
    assert torch.allclose(lps.reshape(-1, 3), full.sort(-1, descending=True).values[:, :3])


def test_mix():
    ce, kl = torch.tensor(2.0), torch.tensor(0.5)
    assert mix(ce, kl, 0.3).item() == pytest.approx(0.7 * 2.0 + 0.3 * 0.5)
    with pytest.raises(ValueError):
        mix(ce, kl, 1.5)


# ---- the train-side wrapper -------------------------------------------------------------------
def test_cache_offset_places_progressive_and_refuses_mismatch():
    full = [5, 6, 7, 8, 9, 2]
    assert cache_offset("r", full, full, 0, 6) == 0
    assert cache_offset("r", [5, 6], full, 0, 6) == 0  # the full rationale, cut at max_len
    assert cache_offset("r", [8, 9, 2], full, 2, 3) == 3
    assert cache_offset("r", [7, 8], full, 1, 4) == 2  # cut: placed by its whole length
    # a cut run that occurs twice in the full target is still placed where it belongs
    rep = [4, 7, 4, 7, 4, 7, 2]
    assert cache_offset("r", [4, 7], rep, 1, 5) == 2
    with pytest.raises(ValueError, match="source=online"):
        cache_offset("r", [8, 4, 2], full, 2, 3)
    with pytest.raises(ValueError, match="source=online"):
        cache_offset("r", [7, 8], full, 1, 3)  # a wrong whole length does not line up


class _Base:
    """A stand-in base method: fixed examples, weighted-CE passthrough."""

    curriculum_epochs = 0

    def __init__(self, examples, pad_id):
        from tasks.training.data import TrainMethod

        self.inner = TrainMethod(examples, pad_id)
        self.pad_id = pad_id

    def examples_for_epoch(self, epoch):
        return self.inner.examples

    def stage_for_epoch(self, epoch):
        return 0

    def collate(self, examples):
        return self.inner.collate(examples)

    per_token = ("weights",)

    def loss(self, nll, parts, batch, aligned):
        return nll, parts


def test_cached_topk_with_full_k_equals_online_kd_through_the_wrapper():
    """Online mentor vs cache built by mentor_augment's code, with a KPOD-style split example."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pyarrow import Table
    from tasks.core.formatting import Example
    from tasks.core.forward import aligned_logits
    from tasks.core.losses import weighted_token_nll
    from tasks.config.mentor import KdSettings
    from tasks.training.data import collate_examples

    torch.manual_seed(0)
    V = 19
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64)
    mentor, student = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg)
    # full example of rationale "a": prompt [1, 3, 4], target [5, 6, 7, 8, 2]; "b" target [9, 10, 2]
    full = {
        "a": Example([1, 3, 4, 5, 6, 7, 8, 2], [IGNORE, IGNORE, IGNORE, 5, 6, 7, 8, 2], [0, 0, 0, 1, 1, 1, 1, 1], rationale_id="a"),
        "b": Example([1, 3, 9, 10, 2], [IGNORE, IGNORE, 9, 10, 2], [0, 0, 1, 1, 1], rationale_id="b"),
    }
    # cache rows exactly as mentor_logits_table computes them (shifted, labelled positions)
    rows = {"rationale_id": [], "pos": [], "token_ids": [], "logprobs": []}
    batch = collate_examples(list(full.values()), 0)
    with torch.no_grad():
        logits = mentor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    for b, ex in enumerate(full.values()):
        sel = batch["labels"][b, 1:] != IGNORE
        ids, lps = topk_logprobs(logits[b][sel], V)
        for p in range(ids.shape[0]):
            rows["rationale_id"].append(ex.rationale_id)
            rows["pos"].append(p)
            rows["token_ids"].append(ids[p].tolist())
            rows["logprobs"].append(lps[p].tolist())
    targets = {rid: [t for t in ex.labels if t != IGNORE] for rid, ex in full.items()}
    cache = TopkCache(Table.from_pydict(rows), targets)
    # a KPOD example: the first target token of "a" moved into the prompt (same token sequence)
    split = Example([1, 3, 4, 5, 6, 7, 8, 2], [IGNORE] * 4 + [6, 7, 8, 2], [0] * 4 + [1] * 4,
                    rationale_id="a", input_steps=1)
    train = [split, full["b"]]
    kd = KdSettings(tau=2.0, lam=0.3)
    online = MentorKD(_Base(train, 0), kd, mentor=mentor)
    cached = MentorKD(_Base(train, 0), kd, cache=cache)
    out = []
    for method in (online, cached):
        b = method.collate(train)
        aligned = aligned_logits(student, b, extra=method.per_token)
        nll, parts = weighted_token_nll(aligned.logits, aligned.labels, aligned.extras["weights"])
        loss, parts = method.loss(nll, parts, b, aligned)
        out.append((loss, parts["kd"], nll))
    (l_on, kd_on, nll), (l_ca, kd_ca, _) = out
    assert kd_on.item() > 0
    assert torch.allclose(kd_on, kd_ca, atol=1e-5)
    assert torch.allclose(l_on, 0.7 * nll + 0.3 * kd_on, atol=1e-6)
    assert torch.allclose(l_ca, l_on, atol=1e-5)
