"""Step difficulty (Eq. 8) against a naive loop."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.core.difficulty import step_difficulty


def _naive(nll, w, step, n, uniform=False):
    out = []
    for k in range(n):
        idx = [j for j in range(len(nll)) if int(step[j]) == k]
        if not idx:
            out.append(0.0)
            continue
        ws = [0.0 if uniform else float(w[j]) for j in idx]
        z = sum(math.exp(x) for x in ws)
        out.append(-sum(math.exp(ws[m]) / z * -float(nll[j]) for m, j in enumerate(idx)))
    return out


@pytest.mark.parametrize("uniform", [False, True])
def test_eq8_matches_naive_loop(uniform):
    torch.manual_seed(0)
    for _ in range(20):
        L = int(torch.randint(1, 30, ()).item())
        n = int(torch.randint(1, 6, ()).item())
        step = torch.sort(torch.randint(0, n, (L,))).values
        nll = torch.rand(L) * 5
        w = torch.rand(L)
        got = step_difficulty(nll, w, step, n, uniform_within_step=uniform)
        assert got.shape == (n,)
        assert got.tolist() == pytest.approx(_naive(nll, w, step, n, uniform), rel=1e-9, abs=1e-12)


def test_uniform_is_the_step_mean_and_weights_shift_difficulty():
    nll = torch.tensor([1.0, 3.0, 2.0, 2.0, 8.0])
    step = torch.tensor([0, 0, 1, 1, 1])
    w = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.5])
    uni = step_difficulty(nll, w, step, 2, uniform_within_step=True)
    assert uni.tolist() == pytest.approx([2.0, 4.0])
    # a higher weight on the harder token of step 0 raises its difficulty above the mean;
    # equal weights within step 1 give the mean exactly
    weighted = step_difficulty(nll, w, step, 2)
    assert weighted[0] > 2.0
    assert weighted[1] == pytest.approx(4.0)


def test_softmax_is_within_step_and_stable():
    # large weights in another step must not change this step's softmax
    nll = torch.tensor([1.0, 2.0, 5.0])
    step = torch.tensor([0, 0, 1])
    a = step_difficulty(nll, torch.tensor([0.2, 0.9, 0.0]), step, 2)
    b = step_difficulty(nll, torch.tensor([0.2, 0.9, 900.0]), step, 2)
    assert a.tolist() == pytest.approx(b.tolist())


def test_empty_step_and_bad_input():
    d = step_difficulty(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([1]), 3)
    assert d.tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="same 1-D shape"):
        step_difficulty(torch.ones(3), torch.ones(2), torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="outside"):
        step_difficulty(torch.ones(2), torch.ones(2), torch.tensor([0, 2]), 2)


# ---- scoring and alignment ---------------------------------------------------------------------
QUESTION = "Ann has 2 pens and buys 3 more. How many pens?"
TEXT = "Ann has 2 pens.\nShe buys 3, so 2 + 3 = 5."


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.core.models import train_tokenizer

    tok = train_tokenizer([f"Q: {QUESTION}\nA: {TEXT} Therefore, the answer is 5."] * 2, 300)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tok


def test_target_token_nll_matches_naive_log_softmax(tiny):
    from tasks.core.difficulty import target_token_nll
    from tasks.core.formatting import build_example
    from tasks.core.forward import IGNORE
    from tasks.training.data import collate_examples

    model, tok = tiny
    exs = [
        build_example(tok, QUESTION, TEXT, "5", seq2seq=False, max_len=128),
        build_example(tok, "Q?", "Short one.", "1", seq2seq=False, max_len=128),
    ]
    got = target_token_nll(model, collate_examples(exs, tok.pad_token_id))
    for ex, nll in zip(exs, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ex.input_ids])).logits[0].double(), -1)
        want = [-logp[t - 1, ex.labels[t]].item() for t in range(1, len(ex.labels)) if ex.labels[t] != IGNORE]
        assert nll.tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)  # padding does not leak in


def test_difficulty_rows_align_with_token_weights(tiny):
    from tasks.core.difficulty import difficulty_rows
    from tasks.core.formatting import build_example
    from tasks.core.forward import IGNORE
    from tasks.core.steps import segment, token_steps

    model, tok = tiny
    enc = tok(" " + TEXT, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    offsets = [(max(s - 1, 0), max(e - 1, 0)) for s, e in enc["offset_mapping"]]
    steps = [max(i, 0) for i in token_steps(offsets, segment(TEXT))]
    weights = [0.1 * (j % 7) for j in range(len(ids))]
    ex = build_example(tok, QUESTION, TEXT, "5", seq2seq=False, max_len=128)
    target = [t for t in ex.labels if t != IGNORE]
    nll = torch.rand(len(target), dtype=torch.float64)
    rows = difficulty_rows("r", nll, target, ids, weights, steps, 2, uniform_within_step=False)
    want = _naive(nll[: len(ids)], weights, steps, 2)
    assert [r["step"] for r in rows] == [0, 1]
    assert [r["difficulty"] for r in rows] == pytest.approx(want)
    assert [r["tokens"] for r in rows] == [steps.count(0), steps.count(1)]
    assert sum(r["tokens"] for r in rows) == len(ids)
    # a target that does not start with the weighted tokens is an error, not a silent shift
    with pytest.raises(ValueError, match="differ from the tokens"):
        difficulty_rows("r", nll, target[1:] + [0], ids, weights, steps, 2, False)
