"""KPOD token weighting module (METHODS §2.1): mask, prefixes and losses vs naive references."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.core.forward import IGNORE
from tasks.core.mask_model import (
    WeightGenerator,
    answer_hits,
    answer_prefix_loss,
    apply_mask,
    auroc,
    bernoulli_mask,
    binary_concrete_st,
    build_packed_batch,
    build_prefix_batch,
    kpod_mask_objective,
    mask_log_prob,
    mask_loss,
    predictor_logits,
    rationale_answer_loss,
    rloo_advantages,
    score_function_surrogate,
    select_boundaries,
    step_boundaries,
)

VOCAB, DIM = 40, 16


def tiny_predictor(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def toy_batch():
    prompts = [[1, 5, 6], [1, 7]]
    rationales = [[10, 11, 12, 13, 14], [20, 21, 22]]
    steps = [[1, 1, 2, 2, 3], [1, 2, 2]]
    ends = [step_boundaries(s) for s in steps]
    answers = [[30, 31], [32]]
    suffix = [8, 9]
    return prompts, rationales, steps, ends, answers, suffix


def generator_for(pred: LlamaForCausalLM, seed: int = 0) -> WeightGenerator:
    torch.manual_seed(seed)
    return WeightGenerator(pred.get_input_embeddings().weight, n_heads=2, mlp_hidden=8)


def padded(rationales):
    L = max(len(r) for r in rationales)
    ids = torch.zeros(len(rationales), L, dtype=torch.long)
    valid = torch.zeros(len(rationales), L, dtype=torch.bool)
    for i, r in enumerate(rationales):
        ids[i, : len(r)] = torch.tensor(r)
        valid[i, : len(r)] = True
    return ids, valid


def test_embedding_is_a_copy_of_the_students():
    pred = tiny_predictor()
    gen = generator_for(pred)
    src = pred.get_input_embeddings().weight
    assert torch.equal(gen.emb.weight, src)
    with torch.no_grad():
        gen.emb.weight.add_(1.0)
    assert not torch.equal(gen.emb.weight, src)  # a copy, not shared storage


def test_weights_in_open_unit_interval_and_one_per_token():
    pred = tiny_predictor()
    gen = generator_for(pred)
    _, rationales, *_ = toy_batch()
    ids, valid = padded(rationales)
    w = gen(ids, valid)
    assert w.shape == ids.shape
    real = w[valid]
    assert real.numel() == sum(len(r) for r in rationales)
    assert bool(((real > 0) & (real < 1)).all())
    assert bool((w[~valid] == 0).all())


def test_straight_through_mask_is_exactly_binary_with_soft_gradient():
    torch.manual_seed(0)
    w = torch.rand(6, 9).clamp(0.05, 0.95).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    m = binary_concrete_st(w, tau=0.5, generator=g)
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    assert bool(((m == 0) | (m == 1)).all())
    # gradient = d soft / d w with soft = sigmoid((logit(w) + noise) / tau)
    (m * torch.arange(54.0).view(6, 9)).sum().backward()
    g2 = torch.Generator().manual_seed(1)
    wr = w.detach().clone().requires_grad_(True)
    u = torch.rand(w.shape, generator=g2).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((torch.log(wr) - torch.log1p(-wr) + torch.log(u) - torch.log1p(-u)) / 0.5)
    (soft * torch.arange(54.0).view(6, 9)).sum().backward()
    assert torch.allclose(w.grad, wr.grad, atol=1e-5)
    assert bool((w.grad.abs() > 0).any())


def test_binary_concrete_matches_two_class_gumbel_softmax_in_distribution():
    # P(m = 1) of a binary concrete sample is w, whatever tau is
    w = torch.full((20000,), 0.3)
    g = torch.Generator().manual_seed(3)
    m = binary_concrete_st(w, tau=0.5, generator=g)
    assert abs(m.mean().item() - 0.3) < 0.015


def test_step_boundaries_and_selection():
    assert step_boundaries([1, 1, 2, 2, 2, 3]) == [2, 5, 6]
    assert step_boundaries([4]) == [1]
    with pytest.raises(ValueError):
        step_boundaries([2, 1])
    ends = [3, 7, 9, 12, 15]
    assert select_boundaries(ends, "all", 2) == ends
    g = torch.Generator().manual_seed(0)
    s = select_boundaries(ends, "sampled", 3, g)
    assert len(s) == 3 and s[-1] == 15 and set(s) <= set(ends) and s == sorted(s)


def test_prefix_rows_end_at_step_boundaries():
    prompts, rationales, steps, ends, answers, suffix = toy_batch()
    b = build_prefix_batch(prompts, rationales, ends, suffix, answers, pad_id=0)
    assert ends == [[2, 4, 5], [1, 3]]
    assert b.input_ids.shape[0] == 5
    assert b.row_src.tolist() == [0, 0, 0, 1, 1]
    assert b.prefix_end.tolist() == [2, 4, 5, 1, 3]
    # row 1: prompt + first 4 rationale tokens (steps 1-2) + suffix + answer
    expected = [1, 5, 6, 10, 11, 12, 13, 8, 9, 30, 31]
    n = int(b.attention_mask[1].sum())
    assert b.input_ids[1, :n].tolist() == expected
    assert b.labels[1, :n].tolist() == [IGNORE] * 9 + [30, 31]
    assert b.rat_pos[1, :n].tolist() == [-1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1]
    # each prefix's last rationale token is the last token of a step
    for row in range(5):
        pos = b.rat_pos[row][b.rat_pos[row] >= 0]
        src = int(b.row_src[row])
        last = int(pos.max())
        st = steps[src]
        assert last == len(st) - 1 or st[last + 1] != st[last]
    # padding is ignored and unlabelled
    assert b.labels[3, int(b.attention_mask[3].sum()):].eq(IGNORE).all()


def test_apply_mask_scales_only_rationale_embeddings():
    prompts, rationales, _, ends, answers, suffix = toy_batch()
    b = build_prefix_batch(prompts, rationales, ends, suffix, answers, pad_id=0)
    emb = torch.randn(*b.input_ids.shape, 4)
    m = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0, 0.0]])
    out = apply_mask(emb, m, b.rat_pos, b.row_src)
    for row in range(b.input_ids.shape[0]):
        for t in range(b.input_ids.shape[1]):
            p = int(b.rat_pos[row, t])
            scale = m[int(b.row_src[row]), p].item() if p >= 0 else 1.0
            assert torch.equal(out[row, t], emb[row, t] * scale)


def test_mask_loss_is_normalised_per_rationale_token():
    m = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    # naive: rationale 0 keeps 3/4, rationale 1 keeps 2/2
    assert mask_loss(m, valid).item() == pytest.approx((3 / 4 + 2 / 2) / 2)
    # doubling a rationale's length with the same keep ratio does not change Lm
    m2 = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]])
    assert mask_loss(m2, torch.ones_like(m2, dtype=torch.bool)).item() == pytest.approx(0.75)
    assert kpod_mask_objective(torch.tensor(2.0), torch.tensor(0.5), 0.5).item() == pytest.approx(2.25)


def test_answer_prefix_loss_matches_naive_loop_over_prefixes_and_tokens():
    prompts, rationales, _, ends, answers, suffix = toy_batch()
    pred = tiny_predictor(1)
    pred.eval()
    b = build_prefix_batch(prompts, rationales, ends, suffix, answers, pad_id=0)
    m = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    with torch.no_grad():
        lp = answer_prefix_loss(predictor_logits(pred, b, m), b.labels, b.n_rationales)
        # naive: one unpadded forward per (rationale, prefix), one log-prob per answer token
        total = 0.0
        emb = pred.get_input_embeddings()
        for i in range(len(rationales)):
            for end in ends[i]:
                ids = torch.tensor(prompts[i] + rationales[i][:end] + suffix + answers[i])
                x = emb(ids).clone()
                for p in range(end):
                    x[len(prompts[i]) + p] *= m[i, p]
                logp = torch.log_softmax(pred(inputs_embeds=x[None]).logits[0], -1)
                start = len(ids) - len(answers[i])
                for j, tok in enumerate(answers[i]):
                    total -= logp[start + j - 1, tok].item()
    assert lp.item() == pytest.approx(total / 2, rel=1e-4)


def test_answer_loss_alone_reaches_the_mlp():
    """The key test: Lp must train the generator (token-id swapping made this gradient 0)."""
    prompts, rationales, _, ends, answers, suffix = toy_batch()
    pred = tiny_predictor(2)
    gen = generator_for(pred, 3)
    ids, valid = padded(rationales)
    b = build_prefix_batch(prompts, rationales, ends, suffix, answers, pad_id=0)
    w = gen(ids, valid)
    m = binary_concrete_st(w, 0.5, torch.Generator().manual_seed(0))
    lp = answer_prefix_loss(predictor_logits(pred, b, m), b.labels, b.n_rationales)
    lp.backward()
    for name, p in gen.mlp.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum().item() > 0, name
    assert gen.emb.weight.grad.abs().sum().item() > 0
    assert gen.attn.in_proj_weight.grad.abs().sum().item() > 0


def test_same_seed_same_weights():
    _, rationales, *_ = toy_batch()
    ids, valid = padded(rationales)
    w1 = generator_for(tiny_predictor(0), 5)(ids, valid)
    w2 = generator_for(tiny_predictor(0), 5)(ids, valid)
    w3 = generator_for(tiny_predictor(0), 6)(ids, valid)
    assert torch.equal(w1, w2)
    assert not torch.equal(w1, w3)


def test_auroc_matches_pairwise_definition():
    torch.manual_seed(0)
    scores = torch.randint(0, 5, (60,)).float().tolist()  # many ties
    truth = (torch.rand(60) > 0.4).tolist()
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    naive = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    assert auroc(scores, truth) == pytest.approx(naive)
    assert auroc([0.1, 0.9], [False, True]) == 1.0
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [True, True])
    assert not math.isnan(auroc([0.5, 0.5], [True, False]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_prefixes_give_the_same_answer_loss(attn):
    prompts, rationales, _, ends, answers, suffix = toy_batch()
    pred = tiny_predictor(4)
    pred.config._attn_implementation = attn
    pred.eval()
    m = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0, 0.0]])
    rows = build_prefix_batch(prompts, rationales, ends, suffix, answers, pad_id=0)
    packed = build_packed_batch(prompts, rationales, ends, suffix, answers, pad_id=0)
    assert packed.input_ids.shape[0] == 2  # one row per rationale
    with torch.no_grad():
        a = answer_prefix_loss(predictor_logits(pred, rows, m), rows.labels, rows.n_rationales)
        b = answer_prefix_loss(predictor_logits(pred, packed, m), packed.labels, packed.n_rationales)
    assert b.item() == pytest.approx(a.item(), rel=1e-5)
    # block k of rationale 0 sees rationale tokens < end_k and no other block
    plen, rlen = len(prompts[0]), len(rationales[0])
    blk = len(suffix) + len(answers[0])
    for k, end in enumerate(ends[0]):
        q = plen + rlen + k * blk + blk - 1  # the block's last token
        seen_rat = [p for p in range(rlen) if packed.allowed[0, q, plen + p]]
        assert seen_rat == list(range(end))
        others = [j for j in range(plen + rlen, plen + rlen + len(ends[0]) * blk)
                  if packed.allowed[0, q, j] and not (plen + rlen + k * blk <= j <= q)]
        assert others == []
        assert int(packed.position_ids[0, q]) == plen + end + blk - 1


def test_packed_answer_loss_reaches_the_mlp():
    prompts, rationales, _, ends, answers, suffix = toy_batch()
    pred = tiny_predictor(2)
    gen = generator_for(pred, 3)
    ids, valid = padded(rationales)
    b = build_packed_batch(prompts, rationales, ends, suffix, answers, pad_id=0)
    m = binary_concrete_st(gen(ids, valid), 0.5, torch.Generator().manual_seed(0))
    answer_prefix_loss(predictor_logits(pred, b, m), b.labels, b.n_rationales).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.mlp.parameters())


def test_mask_loss_sum_is_the_papers_eq6():
    """norm 'sum': Lm = sum_j m_j per rationale (Eq. 6), averaged over the batch's rationales."""
    torch.manual_seed(3)
    m = (torch.rand(4, 9) > 0.4).float()
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[1, 6:] = False
    valid[3, 2:] = False
    naive = sum(sum(float(m[r, j]) for j in range(9) if valid[r, j]) for r in range(4)) / 4
    assert mask_loss(m, valid, "sum").item() == pytest.approx(naive)
    # unlike per_token, the plain sum grows with the rationale's length
    long = torch.ones(1, 8)
    assert mask_loss(long, long.bool(), "sum").item() == pytest.approx(8.0)
    assert mask_loss(long, long.bool(), "per_token").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mask norm"):
        mask_loss(m, valid, "mean")


def test_final_prefix_is_the_full_rationale_only():
    assert select_boundaries([2, 5, 9], "final", 2) == [9]
    assert select_boundaries([2, 5, 9], "all", 2) == [2, 5, 9]
    assert select_boundaries([4], "final", 1) == [4]


def test_answer_hits_counts_rows_with_every_answer_token_right():
    # 2 rows, T = 4, V = 3; answer tokens at unshifted positions 2 and 3
    labels = torch.tensor([[IGNORE, IGNORE, 1, 2], [IGNORE, IGNORE, 1, 2]])
    logits = torch.zeros(2, 4, 3)
    logits[0, 1, 1] = logits[0, 2, 2] = 5.0  # row 0: both answer tokens argmax-right
    logits[1, 1, 1] = logits[1, 2, 0] = 5.0  # row 1: second answer token wrong
    hit, nll = answer_hits(logits, labels)
    assert hit.tolist() == [True, False]
    naive = -(torch.log_softmax(logits[1, 1], -1)[1] + torch.log_softmax(logits[1, 2], -1)[2])
    assert nll[1].item() == pytest.approx(naive.item(), rel=1e-6)


# ---- the score-function estimator (weights.estimator = score_function) ---------------------
def test_rationale_answer_loss_splits_eq5_by_rationale():
    """Per rationale: the naive sum over its prefix rows; the mean is answer_prefix_loss."""
    prompts, rationales, _, ends, answers, suffix = toy_batch()
    pred = tiny_predictor(5)
    m = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0, 0.0]])
    rows = build_prefix_batch(prompts, rationales, ends, suffix, answers, pad_id=0)
    with torch.no_grad():
        logits = predictor_logits(pred, rows, m)
        per = rationale_answer_loss(logits, rows.labels, rows.row_src, rows.n_rationales)
        whole = answer_prefix_loss(logits, rows.labels, rows.n_rationales)
    naive = [0.0, 0.0]
    for n in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            if rows.labels[n, t] != IGNORE:
                naive[int(rows.row_src[n])] -= torch.log_softmax(logits[n, t - 1], -1)[rows.labels[n, t]].item()
    assert per.tolist() == pytest.approx(naive, rel=1e-5)
    assert per.mean().item() == pytest.approx(whole.item(), rel=1e-6)


def test_bernoulli_mask_is_binary_with_rate_w():
    w = torch.tensor([0.0, 0.2, 0.9, 1.0]).expand(20_000, 4)
    m = bernoulli_mask(w, torch.Generator().manual_seed(0))
    assert set(m.unique().tolist()) <= {0.0, 1.0} and not m.requires_grad
    assert m.mean(dim=0).tolist() == pytest.approx([0.0, 0.2, 0.9, 1.0], abs=0.01)


def test_mask_log_prob_and_rloo_match_naive():
    w = torch.tensor([[0.2, 0.7, 0.5], [0.9, 0.4, 0.3]])
    m = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    naive = [math.log(0.2) + math.log(0.3), math.log(0.9) + math.log(0.4) + math.log(0.7)]
    assert mask_log_prob(m, w, valid).tolist() == pytest.approx(naive)
    losses = torch.tensor([[1.0, 4.0], [2.0, 0.0], [6.0, 2.0]])  # (K=3, R=2)
    adv = rloo_advantages(losses)
    for k in range(3):
        for r in range(2):
            others = [losses[j, r].item() for j in range(3) if j != k]
            assert adv[k, r].item() == pytest.approx(losses[k, r].item() - sum(others) / 2)
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_advantages(losses[:1])


def test_score_function_gradient_is_unbiased_for_the_expected_loss():
    """Three tokens, an arbitrary loss per mask: the mean surrogate gradient over many sampled
    masks equals the exact gradient of E_m[f(m)] = sum over the 8 masks of P(m | w) f(m)."""
    table = torch.tensor([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0])  # f(m), m read as 3 bits

    def f(m):  # (..., 3) 0/1 -> (...)
        return table[(m * torch.tensor([4.0, 2.0, 1.0])).sum(-1).long()]

    logits = torch.tensor([0.3, -1.2, 0.8], requires_grad=True)
    w = torch.sigmoid(logits)
    masks = torch.tensor([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], dtype=torch.float32)
    exact = (torch.exp(mask_log_prob(masks, w.expand(8, 3), torch.ones(8, 3, dtype=torch.bool))) * table).sum()
    (g_exact,) = torch.autograd.grad(exact, logits)
    k, r = 4, 50_000  # r independent copies of the one rationale, k samples each
    wk = torch.sigmoid(logits).expand(k, r, 3)
    m = bernoulli_mask(wk, torch.Generator().manual_seed(1))
    logp = mask_log_prob(m.reshape(k * r, 3), wk.reshape(k * r, 3), torch.ones(k * r, 3, dtype=torch.bool)).reshape(k, r)
    (g_est,) = torch.autograd.grad(score_function_surrogate(f(m), logp), logits)
    # the surrogate averages over r, so its gradient estimates that of E[f] for one rationale
    assert g_est.tolist() == pytest.approx(g_exact.tolist(), abs=0.01)
    assert g_exact.abs().min().item() > 0.1  # a real gradient, not one near zero
