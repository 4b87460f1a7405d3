"""The data side of training: what a method feeds per epoch, length-grouped batches, collation.

A training method plugs in through `TrainMethod`:
  - `examples_for_epoch(epoch)`: the examples of that epoch (KPOD moves the input/target split
    of each rationale from epoch to epoch; Std-CoT returns the same list every time);
  - `stage_for_epoch(epoch)`: the curriculum stage recorded in `train_log`;
  - `collate(examples)`: the batch dict (a method may add fields, e.g. KD targets), with
    `per_token` naming the fields that hold one value per label;
  - `loss(nll_loss, parts, batch, aligned)`: the final loss from the weighted NLL, given the
    batch and `tasks.core.forward.aligned_logits`' output (Mentor-KD mixes in its KL term here).
Batches are grouped by length so no compute is spent on padding beyond a batch's longest
sequence; the order is a pure function of (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tasks.core.formatting import Example
from tasks.core.forward import IGNORE, Aligned

MEGABATCH = 50  # batches per sorted window: long enough to group lengths, short enough to mix


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, world: int = 1
) -> list[list[int]]:
    """Index batches for one epoch: shuffle, sort by length in windows, shuffle the batches.

    Every window of MEGABATCH * batch_size shuffled examples is sorted by length and cut into
    batches, so a batch holds similar lengths; batch order is then shuffled so lengths do not
    drift through the epoch. With `world` processes the batch count is cut to a multiple of
    `world` (process r takes batches r, r+world, ...), so every process steps equally often.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = MEGABATCH * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window].tolist(), key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    perm = rng.permutation(len(batches))
    batches = [batches[i] for i in perm]
    usable = len(batches) - len(batches) % world
    return batches[:usable]


def collate_examples(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence (right padding).

    Decoder-only: input_ids, attention_mask, labels, weights all [B, T].
    Seq2seq: input_ids/attention_mask [B, S] (encoder) and labels/weights [B, T] (decoder);
    the model builds its decoder inputs by shifting the labels right.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    seq2seq = examples[0].seq2seq
    n_in = max(len(e.input_ids) for e in examples)
    n_out = max(len(e.labels) for e in examples) if seq2seq else n_in
    B = len(examples)
    input_ids = torch.full((B, n_in), pad_id, dtype=torch.long)
    attention = torch.zeros((B, n_in), dtype=torch.long)
    labels = torch.full((B, n_out), IGNORE, dtype=torch.long)
    weights = torch.zeros((B, n_out), dtype=torch.float32)
    for b, e in enumerate(examples):
        input_ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[b, : len(e.input_ids)] = 1
        labels[b, : len(e.labels)] = torch.tensor(e.labels)
        weights[b, : len(e.weights)] = torch.tensor(e.weights, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "weights": weights}


class TrainMethod:
    """Std-CoT: the same examples every epoch, stage 0, loss = weighted NLL (weights 1).

    Other methods subclass this and override what they change.
    """

    name = "std_cot"
    curriculum_epochs = 0  # epochs before training settles on whole rationales (KPOD: W + T)
    # batch tensors that hold one value per label: `aligned_logits` shifts them like the labels
    per_token: tuple[str, ...] = ("weights",)

    def __init__(self, examples: list[Example], pad_id: int):
        if not examples:
            raise ValueError("no training examples: are there correct rationales for train questions?")
        self.examples = examples
        self.pad_id = pad_id

    def examples_for_epoch(self, epoch: int) -> list[Example]:
        return self.examples

    def stage_for_epoch(self, epoch: int) -> int:
        return 0

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return collate_examples(examples, self.pad_id)

    def loss(
        self,
        nll_loss: torch.Tensor,
        parts: dict[str, torch.Tensor],
        batch: dict[str, Any],
        aligned: Aligned,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Final loss from the weighted NLL. `batch` is the collated batch as the model saw it;
        `aligned` its logits [B,T,V], labels [B,T] and `per_token` tensors, aligned."""
        return nll_loss, parts
