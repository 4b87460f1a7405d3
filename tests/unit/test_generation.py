"""Batched greedy generation equals one-prompt-at-a-time generation, for LLaMA and T5."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from tasks.core import generation
from tasks.core.formatting import encode_prompt, prompt_text
from tasks.core.generation import cut_at_eos, generate, length_sorted_batches, pad_batch, prompt_ids
from tasks.core.models import train_tokenizer

CORPUS = [
    f"Q: Tom has {a} apples and buys {b} more. How many?\nA: {a} + {b} = {a + b}. "
    f"Therefore, the answer is {a + b}."
    for a in range(12)
    for b in range(4)
]
# different lengths, so batches need padding; more prompts than one batch
PROMPTS = [
    "Q: Tom has 3 apples and buys 4 more. How many?\nA:",
    "Q: 7\nA:",
    "Q: Tom has 11 apples and buys 2 more. How many apples does Tom have now?\nA:",
    "Q: apples 1 2 3\nA:",
    "Q: How many?\nA:",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


def tiny_llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        # a wide init makes logits peaked and outputs varied, so a wrong mask shows up
        initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_t5(tokenizer) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        initializer_factor=4.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(cfg).eval()


def one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    return [generate(model, tokenizer, [p], 1, max_new_tokens)[0] for p in prompts]


NEW = 8  # new tokens per prompt


@pytest.fixture(scope="module")
def llama_single(tokenizer):
    """The tiny LLaMA and its one-prompt-at-a-time outputs (the reference)."""
    model = tiny_llama(tokenizer)
    single = one_at_a_time(model, tokenizer, PROMPTS, NEW)
    assert len(set(single)) > 1, "a degenerate model makes the comparison meaningless"
    return model, single


def test_llama_batched_equals_one_at_a_time(tokenizer, llama_single):
    model, single = llama_single
    for batch_size in (2, 5):
        assert generate(model, tokenizer, PROMPTS, batch_size, NEW) == single


def test_equality_check_detects_right_padding(tokenizer, llama_single, monkeypatch):
    """The test above can fail: padding a decoder-only batch on the right changes outputs."""
    model, single = llama_single
    right = lambda seqs, pad, left: pad_batch(seqs, pad, left=False)  # noqa: E731
    monkeypatch.setattr(generation, "pad_batch", right)
    assert generate(model, tokenizer, PROMPTS, 5, NEW) != single


def test_t5_batched_equals_one_at_a_time(tokenizer):
    model = tiny_t5(tokenizer)
    single = one_at_a_time(model, tokenizer, PROMPTS, NEW)
    assert len(set(single)) > 1
    assert generate(model, tokenizer, PROMPTS, 2, NEW) == single


def test_tokenizer_without_pad_token_pads_with_eos(tokenizer, llama_single):
    model, single = llama_single
    no_pad = train_tokenizer(CORPUS, vocab_size=300)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    assert generate(model, no_pad, PROMPTS, 5, NEW) == single


def test_generate_leaves_tokenizer_and_model_mode_alone(tokenizer):
    model = tiny_llama(tokenizer).train()
    side = tokenizer.padding_side
    generate(model, tokenizer, PROMPTS[:2], 2, 3)
    assert tokenizer.padding_side == side
    assert model.training


class _FakeModel(torch.nn.Module):
    """Records what generate() receives and returns scripted tokens after the prompt."""

    def __init__(self, continuations: dict[int, list[int]], eos: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"is_encoder_decoder": False})()
        self.generation_config = type("G", (), {"eos_token_id": eos})()
        self.continuations = continuations  # first real prompt token -> new tokens
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kw):
        self.calls.append((input_ids.clone(), attention_mask.clone(), max_new_tokens, kw))
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            first = ids[mask.index(1)]
            new = self.continuations[first][:max_new_tokens]
            rows.append(ids + new + [pad_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


class _FakeTokenizer:
    eos_token_id, pad_token_id, bos_token_id = 2, 0, None
    padding_side = "right"

    def __call__(self, text, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens):
        assert skip_special_tokens
        return " " + " ".join(str(i) for i in ids) + " "


def test_slicing_eos_order_and_progress():
    # prompt "5 6 7" continues 8 9 EOS 9; prompt "4" continues 3; prompt "6 1" never stops
    model = _FakeModel({5: [8, 9, 2, 9], 4: [3, 2], 6: [7, 7, 7, 7, 7]}, eos=2)
    seen = []
    out = generate(model, _FakeTokenizer(), ["4", "5 6 7", "6 1"], 2, 4, progress=seen.append)
    assert out == ["3", "8 9", "7 7 7 7"]  # caller's order, cut at EOS, at most 4 tokens
    assert seen == [2, 1]
    ids, mask, max_new, kw = model.calls[0]
    # longest prompts first, padded on the left with the pad id, mask zero there
    assert ids.tolist() == [[5, 6, 7], [0, 6, 1]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert max_new == 4 and kw["do_sample"] is False and kw["use_cache"] is True
    assert kw["eos_token_id"] == [2]


@pytest.mark.parametrize("seq2seq", [False, True])
def test_prompt_ids_frame_prompts_as_training_does(tokenizer, seq2seq):
    question = "Tom has 3 apples and buys 4 more. How many?"
    ids = prompt_ids(tokenizer, prompt_text(question), seq2seq)
    assert ids == encode_prompt(tokenizer, question, seq2seq)
    assert ids[-1 if seq2seq else 0] == (tokenizer.eos_token_id if seq2seq else tokenizer.bos_token_id)


def test_length_sorted_batches_cover_every_index_once():
    lengths = [3, 9, 1, 9, 4, 2, 7]
    batches = length_sorted_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert batches[0][:2] == [1, 3]  # ties keep input order
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches(lengths, 0)


def test_pad_batch_and_cut_at_eos():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad=0, left=True)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[1, 2, 3], [4]], pad=0, left=False)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert cut_at_eos([5, 6, 2, 7], [2]) == [5, 6]
    assert cut_at_eos([5, 6], [2, 9]) == [5, 6]
    assert cut_at_eos([9, 6], [2, 9]) == []


def test_bad_arguments(tokenizer, llama_single):
    model, _ = llama_single
    assert generate(model, tokenizer, [], 4, 4) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokenizer, PROMPTS, 4, 0)
    with pytest.raises(TypeError, match="prompt 1"):
        generate(model, tokenizer, ["Q: a\nA:", None], 4, 4)
