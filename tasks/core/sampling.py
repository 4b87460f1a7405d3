"""Seeded sampling (temperature + top-k) in batches, reproducible per completion.

Mentor-KD's augmentation (METHODS.md §3.3) samples n rationales per question at temperature
0.7, top-k 50. To make a stage key mean one output, each completion draws from its own
`torch.Generator` seeded by the caller (`completion_seed`), so a completion does not depend on
which other prompts share its batch or on the batch size (up to float rounding of padded
batches), nor on the global RNG.

The draw happens in a `LogitsProcessor` run under greedy decoding: it samples the next token of
each row from its own generator and leaves only that token finite, so greedy picks it.
`model.generate` keeps doing what it does well (KV cache, left padding and position ids,
encoder-decoder models, stopping at EOS); batching reuses `tasks.core.generation`.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch

from tasks.core.generation import generate_ids


def completion_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run's seed and a completion's identity (question id, sample)."""
    text = "\x1f".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def sample_next(
    scores: torch.Tensor, generators: Sequence[torch.Generator], temperature: float, top_k: int
) -> torch.Tensor:
    """One token per row: scores [B, V] -> ids [B], row b drawn with `generators[b]`.

    p = softmax(top-k of scores / temperature), the rest of the vocabulary 0.
    """
    if scores.dim() != 2 or scores.size(0) != len(generators):
        raise ValueError(f"sample_next: scores {tuple(scores.shape)} for {len(generators)} generators")
    k = min(top_k, scores.size(-1))
    values, ids = (scores.float() / temperature).topk(k, dim=-1)  # [B, k]
    probs = torch.softmax(values, dim=-1).cpu()
    picks = [torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)]
    return ids.gather(1, torch.stack(picks).to(ids.device)).squeeze(1)


class _RowSampler:
    """A LogitsProcessor: row b's next token is drawn by its own generator."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_k = temperature, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = sample_next(scores, self.generators, self.temperature, self.top_k)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen.unsqueeze(1), 0.0)
        return out


def sample_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    seeds: list[int],
    temperature: float,
    top_k: int,
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], object] | None = None,
) -> list[str]:
    """Sampled completions of tokenized prompts (framed as `formatting.encode_prompt` frames
    them), in their order; completion i uses `seeds[i]`. Stops before EOS, decoded without
    special tokens and stripped, like `tasks.core.generation.generate_ids`."""
    if len(seeds) != len(prompts):
        raise ValueError(f"sample_ids: {len(seeds)} seeds for {len(prompts)} prompts")
    if temperature <= 0:
        raise ValueError(f"sample_ids: temperature must be > 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"sample_ids: max_new_tokens must be >= 1, got {max_new_tokens}")
    return generate_ids(
        model, tokenizer, prompts, batch_size, max_new_tokens, progress,
        processor_for=lambda batch: _RowSampler([seeds[i] for i in batch], temperature, top_k),
    )
