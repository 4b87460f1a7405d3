"""The `difficulty` section: KPOD step difficulty (Eq. 8) and its reference model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import KpodModel, runtime_field


class DifficultyConfig(KpodModel):
    reference: Literal["auto", "init", "warmup", "base"] = Field(
        "auto",
        description="Model that scores the rationale tokens: init = the initial student (the "
        "paper: a pretrained student before distillation); warmup = the student after a short "
        "Std-CoT warm-up (**departure** for a student trained from scratch, whose init is "
        "random); base = the pretrained miniature's base (needs its tokenizer: student.tokenizer "
        "base), the paper's reading when the student itself starts from scratch; auto = init for "
        "a pretrained student (hf, or student.init base), base when student.base_mix < 1 (the "
        "initial student is then part fresh init), warmup otherwise.",
    )
    uniform_within_step: bool = Field(
        False,
        description="Weigh a step's tokens uniformly instead of softmax(w) (the "
        "no_weight_in_difficulty ablation; also on when train.method says so).",
    )
    warmup_epochs: int = Field(
        2, ge=1, le=1000,
        description="reference=warmup: Std-CoT epochs over the correct training rationales "
        "(the train recipe counts epochs, not steps).",
    )
    warmup_lr: float = Field(2e-3, gt=0, le=1, description="reference=warmup: peak learning rate (AdamW, cosine).")
    warmup_batch_size: int = Field(32, ge=1, le=4096, description="reference=warmup: sequences per batch.")
    seed: int = Field(0, ge=0, description="reference=warmup: seed of the warm-up's data order.")
    batch_size: int = runtime_field(32, "Sequences per forward pass when scoring.", ge=1, le=4096)
    device: Literal["auto", "cpu", "cuda"] = runtime_field(
        "auto", "Where to warm up and score; auto = cuda when available."
    )
