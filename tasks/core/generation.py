"""Batched greedy generation for evaluating a student (decoder-only or seq2seq).

One call generates for many prompts: prompts are sorted by token length so a batch holds
prompts of similar length (little padding), generated together with the KV cache, and the
outputs are put back in the caller's order. Greedy decoding with a correct attention mask
(and, for decoder-only models, position ids derived from it, which `model.generate` does) gives
the same tokens as generating each prompt alone; tests/unit/test_generation.py checks this.

- Decoder-only: prompts are padded on the LEFT, so every row's last prompt token sits in the
  last column and the new tokens are appended after it; the output is the tokens after the
  padded prompt.
- Seq2seq (T5): the prompt goes to the encoder (padded on the right, masked); the output is
  what the decoder writes after its start token.

Prompts are token ids framed exactly as in training (`formatting.encode_prompt`: `<bos> prompt`
for decoder-only, `prompt <eos>` for seq2seq); `generate` frames prompt texts the same way. The
tokenizer is never modified (its padding side stays as the caller set it): padding is done
here, on token ids.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from tasks.core.models import is_seq2seq


def eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a generation: the model's generation config may list several."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if value is None:
            continue
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("generation needs an end-of-sequence token: the tokenizer has no eos_token")
    return ids


def pad_id(tokenizer, eos: list[int]) -> int:
    """The id used for padding; a tokenizer without a pad token pads with EOS (masked anyway)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos[0]


def prompt_ids(tokenizer, text: str, seq2seq: bool) -> list[int]:
    """Token ids of a prompt text, framed as training frames it (`tasks.core.formatting`):
    decoder-only `<bos> prompt` (when the tokenizer has a BOS), seq2seq `prompt <eos>`.

    The tokenizer's own special-token template is not used, so the ids match training's
    exactly (tests check this against `formatting.encode_prompt`).
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if seq2seq:
        if tokenizer.eos_token_id is None:
            raise ValueError("a seq2seq prompt ends with EOS, and the tokenizer has no eos_token")
        return ids + [tokenizer.eos_token_id]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first.

    Longest first so a batch that does not fit in memory fails at once, not at the end.
    The sort is stable, so equal lengths keep their input order (deterministic batches).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(seqs: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) with `pad` on the left or right of each row."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols] = torch.tensor(s, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def cut_at_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """The tokens before the first EOS (generate pads finished rows after their EOS)."""
    for j, t in enumerate(tokens):
        if t in eos:
            return tokens[:j]
    return tokens


def generate(
    model,
    tokenizer,
    prompts: list[str],
    batch_size: int,
    max_new_tokens: int,
    progress: Callable[[int], object] | None = None,
) -> list[str]:
    """Greedy completions of `prompts` (texts), in their order; see `generate_ids`."""
    seq2seq = is_seq2seq(model)
    encoded = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise TypeError(f"prompt {i} is {type(text).__name__}, expected str")
        encoded.append(prompt_ids(tokenizer, text, seq2seq))
    return generate_ids(model, tokenizer, encoded, batch_size, max_new_tokens, progress)


def generate_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
    progress: Callable[[int], object] | None = None,
    processor_for: Callable[[list[int]], object] | None = None,
) -> list[str]:
    """Greedy completions of tokenized prompts, in their order, each <= `max_new_tokens` tokens.

    `processor_for(batch)` (the prompt indices of one batch) may return a logits processor
    that picks each next token instead (sampling, `tasks.core.sampling`); the batching, padding,
    EOS handling and decoding stay this function's.

    `prompts` are token ids with any BOS/EOS framing already in place (decoder-only: the
    model continues the last id; seq2seq: the encoder input). `progress(n)` is called after
    each batch with the number of prompts it finished (a tqdm bar's `update` fits). The
    completion stops before the first EOS, is decoded without special tokens and stripped of
    surrounding whitespace.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        return []
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} has no tokens")
    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    outputs = [""] * len(prompts)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
                processor = processor_for(batch) if processor_for is not None else None
                new = _generate_batch(model, [list(prompts[i]) for i in batch], pad, eos, max_new_tokens, processor)
                for row, i in enumerate(batch):
                    text = tokenizer.decode(cut_at_eos(new[row], eos), skip_special_tokens=True)
                    outputs[i] = text.strip()
                if progress is not None:
                    progress(len(batch))
    finally:
        model.train(was_training)
    return outputs


def _generate_batch(
    model, seqs: list[list[int]], pad: int, eos: list[int], max_new_tokens: int, processor: object | None
) -> list[list[int]]:
    """The new token ids of each prompt in `seqs` (EOS and what follows still in place).

    One `model.generate` call: decoder-only prompts padded on the left, seq2seq ones on the
    right; greedy unless a logits `processor` picks each next token.
    """
    seq2seq = is_seq2seq(model)
    ids, mask = pad_batch(seqs, pad, left=not seq2seq)
    extra = {}
    if processor is not None:
        from transformers import LogitsProcessorList

        extra["logits_processor"] = LogitsProcessorList([processor])
    device = next(model.parameters()).device
    generated = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=eos,
        # greedy ignores these; passing None keeps a sampling generation_config
        # saved with the model from warning on every call
        temperature=None,
        top_p=None,
        top_k=None,
        **extra,
    )
    # decoder-only: the prompt (all rows padded to the same width) comes first;
    # seq2seq: the decoder's start token comes first
    start = ids.shape[1] if not seq2seq else 1
    return generated[:, start:].tolist()
