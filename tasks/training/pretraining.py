"""Pretraining the base (issue 13): corpus documents as training examples, and the base's checks.

Training itself is the shared recipe (tasks/training/recipe.py) with Std-CoT's method over
whole documents, so pretraining gets checkpoints and resume after kill -9 for free.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

import torch

from tasks.config.pretrain import PretrainConfig
from tasks.config.train import TrainConfig
from tasks.core.corpus import FACT_FORMS, operation
from tasks.core.formatting import Example
from tasks.core.forward import IGNORE, aligned_logits, token_nll
from tasks.training.data import collate_examples


def document_example(tokenizer: Any, text: str, max_tokens: int) -> Example:
    """<s> doc </s>, every token but <s> a target (cut at `max_tokens`)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_tokens - 2]
    full = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return Example(input_ids=full, labels=[IGNORE, *full[1:]], weights=[0.0] + [1.0] * (len(full) - 1))


def packed_examples(tokenizer: Any, texts: Sequence[str], max_tokens: int, pack_tokens: int) -> list[Example]:
    """Documents as training examples: one each (`pack_tokens` 0), or packed back to back.

    Packed: <s> doc </s> doc </s> ... cut into sequences of `pack_tokens` tokens (each opens with
    <s>; a document may run over into the next sequence), so attention learns to reach as far
    back as the task's question-plus-rationale sequences need. Every token but <s> is a target.
    """
    if pack_tokens == 0:
        return [document_example(tokenizer, t, max_tokens) for t in texts]
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"][: max_tokens - 2] + [tokenizer.eos_token_id]
    body = pack_tokens - 1
    out = []
    for i in range(0, len(stream) - body + 1, body):
        ids = [tokenizer.bos_token_id, *stream[i : i + body]]
        out.append(Example(input_ids=ids, labels=[IGNORE, *ids[1:]], weights=[0.0] + [1.0] * body))
    return out


def probe_example(tokenizer: Any, prompt: str, target: str) -> Example:
    """<s> prompt target: only the target's tokens are labelled."""
    p = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    return Example(input_ids=p + t, labels=[IGNORE] * len(p) + t, weights=[0.0] * len(p) + [1.0] * len(t))


def operation_probes(seed: int, n: int, max_value: int) -> list[tuple[str, str]]:
    """(prompt, target) pairs "a op b =", " r" from their own seeded stream (held out)."""
    rng = random.Random(f"kpod-corpus-probe:{seed}")
    out = []
    for _ in range(n):
        a, op, b, r = operation(rng, max_value)
        out.append((FACT_FORMS[op][0].format(a=a, b=b, r="").rstrip(), f" {r}"))
    return out


def train_config(cfg: PretrainConfig) -> TrainConfig:
    """The recipe's settings for pretraining (a plain decay: there is no curriculum)."""
    return TrainConfig(
        method="std_cot", seed=cfg.seed, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        warmup_ratio=cfg.warmup_ratio, scheduler="cosine", curriculum_lr="shared",
        max_len=max(cfg.max_tokens, cfg.pack_tokens), checkpoint_every=cfg.checkpoint_every, device=cfg.device,
    )


@torch.no_grad()
def evaluate_base(model: Any, examples: Sequence[Example], pad_id: int, batch_size: int = 64) -> dict[str, float]:
    """Mean target NLL, perplexity and exact-match rate of `examples` (teacher-forced).

    An example is exact when the argmax at every labelled position is the label: greedy
    decoding from its prompt would then write the target.
    """
    model.eval()
    device = next(model.parameters()).device
    total_nll, tokens, exact = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_examples(list(examples[i : i + batch_size]), pad_id).items()}
        aligned = aligned_logits(model, batch)
        mask = aligned.labels != IGNORE
        total_nll += float(token_nll(aligned.logits, aligned.labels)[mask].sum())
        tokens += int(mask.sum())
        hit = (aligned.logits.argmax(-1) == aligned.labels) | ~mask
        exact += int(hit.all(dim=1).sum())
    mean = total_nll / max(tokens, 1)
    return {"nll": mean, "perplexity": math.exp(min(mean, 50.0)), "exact": exact / max(len(examples), 1)}
