"""The `pretrain` section: the pretrained miniature's corpus and base model (issue 13).

A departure made necessary by the machine, not by the papers: they start from downloaded
pretrained models (LLaMA, FlanT5); kpod pretrains its own small base on a generated generic
corpus (tasks/core/corpus.py) so the papers' setting can be reproduced offline. Used when
`student.init` is `base`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import KpodModel, runtime_field


class PretrainConfig(KpodModel):
    models: list[Literal["student", "mentor"]] = Field(
        ["student"], min_length=1,
        description="Bases to pretrain on the one corpus and tokenizer: the student's shape "
        "(student.init=base) and, for Mentor-KD, the mentor's (mentor.model.init=base).",
    )
    kinds: list[Literal["facts", "recall", "story", "quiz", "retell"]] = Field(
        ["facts", "recall", "story", "quiz"], min_length=1,
        description="Document kinds of the corpus, drawn evenly (tasks/core/corpus.py): facts, "
        "recall, story and quiz are the first corpus; retell (one person's counted actions among "
        "others', retold in order) teaches following one actor through a text. Adding retell "
        "did not change Std-CoT from the base on bench-arith (val 0.36 either way, seed 0), so "
        "it is off by default.",
    )
    documents: int = Field(80_000, ge=10, le=10_000_000, description="Corpus documents the base is trained on (one epoch = one pass over them).")
    task_vocabulary: bool = Field(
        False,
        description="Add `words` documents: the task's training words (single words, case kept, "
        "never its word order; not the answer phrase or the Q:/A: prompt) in random order and "
        "neutral frames, so the base has seen every token the task uses (without them a quarter "
        "of bench-arith's target tokens never occur in the corpus). Off by default: on "
        "bench-arith it cut the base's NLL on task text from ~10 to ~7 nats per token but not "
        "Std-CoT's val accuracy from the base (0.345 against 0.390, seed 0; docs/benchmarks.md).",
    )
    tokenizer_documents: int = Field(
        20_000, ge=0, le=10_000_000,
        description="Corpus documents the tokenizer is trained on, together with the task's "
        "training text (so no task token is unseen in pretraining).",
    )
    tokenizer_task_weight: int = Field(
        4, ge=1, le=100,
        description="Times the task's training text is repeated in the tokenizer's training text. "
        "1: once beside the corpus documents, so corpus words take most merges and task words "
        "split (on bench-arith 10% more tokens per rationale than a task-only tokenizer: "
        "'taking' -> 'ta k ing'); 4 (the default) gives the task-only tokenizer's lengths and "
        "lifted Std-CoT from the base from val 0.315 to 0.36 (bench-arith, seed 0).",
    )
    held_out: int = Field(500, ge=1, le=1_000_000, description="Held-out corpus documents (their own stream, minus any text the corpus holds) for the base's perplexity.")
    probes: int = Field(400, ge=1, le=1_000_000, description="Single-operation facts ('a op b = r', their own stream) for the base's operation accuracy; a fact may also be in the corpus (the table is small), so this checks that the base learned it, not that it generalises.")
    max_value: int = Field(100, ge=10, le=999, description="Largest number the corpus writes (operands and results).")
    max_tokens: int = Field(160, ge=16, le=32768, description="Tokens per document at most (longer ones are cut at the right).")
    pack_tokens: int = Field(
        0, ge=0, le=32768,
        description="0: one document per training sequence; N: documents packed back to back "
        "(separated by </s>) into sequences of N tokens, as LLM pretraining does, so the base "
        "also learns to attend as far back as the task's sequences reach.",
    )
    epochs: int = Field(1, ge=1, le=1000, description="Passes over the corpus.")
    batch_size: int = Field(32, ge=1, le=4096, description="Documents per optimiser step.")
    lr: float = Field(2e-3, gt=0, le=1, description="Peak learning rate (AdamW, warm-up then cosine decay).")
    warmup_ratio: float = Field(0.02, ge=0, le=0.5, description="Fraction of steps of linear warm-up.")
    seed: int = Field(0, ge=0, description="Seed of the corpus, the base's init and the data order.")
    checkpoint_every: int = runtime_field(200, "Optimiser steps between resumable checkpoints.", ge=1)
    device: Literal["auto", "cpu", "cuda"] = runtime_field("auto", "Where to pretrain; auto = cuda when available.")
