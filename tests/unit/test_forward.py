"""tasks.core.forward: the aligned teacher-forced pass, checked against naive one-prefix loops.

Tiny models are built from configs (no download). The naive references run the model on one
unpadded prefix at a time, so they share no shifting or masking logic with the code under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from tasks.core.forward import IGNORE, Aligned, aligned_logits, is_seq2seq, resolve_device, token_nll

ATOL = 1e-5
V = 50


@pytest.fixture(scope="module")
def causal():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.5,  # large weights: a one-position shift changes logits visibly
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def seq2seq():
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0,
    )
    return T5ForConditionalGeneration(cfg).eval()


def causal_batch():
    """Right-padded decoder-only batch: lengths 7 and 4, prompt lengths 3 and 2."""
    g = torch.Generator().manual_seed(1)
    lengths, prompts = [7, 4], [3, 2]
    S = max(lengths)
    input_ids = torch.zeros(2, S, dtype=torch.long)
    attention_mask = torch.zeros(2, S, dtype=torch.long)
    labels = torch.full((2, S), IGNORE, dtype=torch.long)
    for b, (n, p) in enumerate(zip(lengths, prompts)):
        ids = torch.randint(1, V, (n,), generator=g)
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
        labels[b, p:n] = ids[p:]  # loss only on the target tokens
    weights = torch.rand(2, S, generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "weights": weights, "lengths": lengths}


def seq2seq_batch():
    """Encoder inputs of lengths 6 and 3, targets of lengths 5 and 2, all right-padded."""
    g = torch.Generator().manual_seed(2)
    in_lens, out_lens = [6, 3], [5, 2]
    input_ids = torch.zeros(2, max(in_lens), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((2, max(out_lens)), IGNORE, dtype=torch.long)
    for b, (n, m) in enumerate(zip(in_lens, out_lens)):
        input_ids[b, :n] = torch.randint(1, V, (n,), generator=g)
        attention_mask[b, :n] = 1
        labels[b, :m] = torch.randint(1, V, (m,), generator=g)
    weights = torch.rand(labels.shape, generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "weights": weights, "lengths": in_lens}


@torch.no_grad()
def test_causal_matches_prefix_loop(causal):
    batch = causal_batch()
    out = aligned_logits(causal, batch)
    B, S = batch["input_ids"].shape
    assert isinstance(out, Aligned)
    assert out.logits.shape == (B, S - 1, V) and out.labels.shape == (B, S - 1)
    checked = 0
    for b in range(B):
        for t in range(1, S):
            target = batch["labels"][b, t].item()
            if target == IGNORE:
                assert out.labels[b, t - 1] == IGNORE
                continue
            # the model alone on the unpadded prefix that precedes token t
            ref = causal(input_ids=batch["input_ids"][b : b + 1, :t]).logits[0, -1]
            assert out.labels[b, t - 1].item() == target
            torch.testing.assert_close(
                F.log_softmax(out.logits[b, t - 1], -1), F.log_softmax(ref, -1), atol=ATOL, rtol=0
            )
            checked += 1
    assert checked == (7 - 3) + (4 - 2)


@torch.no_grad()
def test_seq2seq_matches_prefix_loop(seq2seq):
    batch = seq2seq_batch()
    out = aligned_logits(seq2seq, batch)
    B, T = batch["labels"].shape
    assert out.logits.shape == (B, T, V)
    assert torch.equal(out.labels, batch["labels"])
    start = seq2seq.config.decoder_start_token_id
    checked = 0
    for b in range(B):
        enc = batch["input_ids"][b : b + 1, : batch["lengths"][b]]
        for t in range(T):
            if batch["labels"][b, t] == IGNORE:
                continue
            dec = torch.cat([torch.tensor([start]), batch["labels"][b, :t]]).unsqueeze(0)
            ref = seq2seq(input_ids=enc, decoder_input_ids=dec).logits[0, -1]
            torch.testing.assert_close(
                F.log_softmax(out.logits[b, t], -1), F.log_softmax(ref, -1), atol=ATOL, rtol=0
            )
            checked += 1
    assert checked == 5 + 2


class _Wrapper(torch.nn.Module):
    """Stands in for DDP / accelerate: no config, the real model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


@torch.no_grad()
def test_wrapped_model_is_unwrapped(seq2seq, causal):
    assert is_seq2seq(_Wrapper(seq2seq)) and is_seq2seq(seq2seq)
    assert not is_seq2seq(_Wrapper(causal)) and not is_seq2seq(causal)
    batch = seq2seq_batch()
    torch.testing.assert_close(
        aligned_logits(_Wrapper(seq2seq), batch).logits, aligned_logits(seq2seq, batch).logits
    )


@torch.no_grad()
def test_extras_shift_like_labels(causal, seq2seq):
    batch = causal_batch()
    out = aligned_logits(causal, batch, extra=("weights",))
    assert set(out.extras) == {"weights"}
    assert torch.equal(out.extras["weights"], batch["weights"][:, 1:])
    assert torch.equal(out.labels, batch["labels"][:, 1:])
    assert aligned_logits(causal, batch).extras == {}
    # per-token data with trailing dims (a mentor's cached top-k) shifts along the same axis
    batch["topk"] = torch.arange(2 * 7 * 3).view(2, 7, 3)
    out = aligned_logits(causal, batch, extra=("weights", "topk"))
    assert torch.equal(out.extras["topk"], batch["topk"][:, 1:])

    batch = seq2seq_batch()
    out = aligned_logits(seq2seq, batch, extra=("weights",))
    assert torch.equal(out.extras["weights"], batch["weights"])

    batch["weights"] = batch["weights"][:, :-1]
    with pytest.raises(ValueError, match="weights"):
        aligned_logits(seq2seq, batch, extra=("weights",))


def test_token_nll():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, V, generator=g) * 3
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, :2] = IGNORE
    labels[1, 4] = IGNORE
    nll = token_nll(logits, labels)
    assert nll.shape == (2, 5) and nll.dtype == torch.float32
    logp = F.log_softmax(logits, -1)
    for b in range(2):
        for t in range(5):
            if labels[b, t] == IGNORE:
                assert nll[b, t].item() == 0.0
            else:
                assert abs(nll[b, t].item() + logp[b, t, labels[b, t]].item()) < 1e-5
    # half-precision logits are scored in float32
    assert token_nll(logits.bfloat16(), labels).dtype == torch.float32
    with pytest.raises(ValueError):
        token_nll(logits, labels[:, :-1])


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("mps") == torch.device("mps")  # named only; moving to it is the caller's
    for bad in ("tpu", "cuda:", "cuda:x", "cpu:0", ""):
        with pytest.raises(ValueError):
            resolve_device(bad)


@pytest.mark.parametrize("available", [True, False])
@pytest.mark.parametrize("choice", ["cuda", "cuda:0", "cuda:1"])
def test_resolve_device_cuda(monkeypatch, available, choice):
    """With CUDA (simulated: torch.device needs no GPU to be named) the choice is kept; without
    it an explicit cuda choice is a one-line error naming it, never a silent CPU run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    if available:
        assert resolve_device(choice) == torch.device(choice)
        assert resolve_device("auto").type == "cuda"
        return
    with pytest.raises(RuntimeError, match="cuda") as info:
        resolve_device(choice)
    assert "\n" not in str(info.value) and repr(choice) in str(info.value)
    assert resolve_device("auto").type == "cpu"
