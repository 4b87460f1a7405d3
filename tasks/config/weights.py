"""The `weights` section: KPOD's token weighting module (METHODS §2.1)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import KpodModel, runtime_field


class WeightsConfig(KpodModel):
    alpha: float = Field(0.5, ge=0, le=100, description="Eq. 7: weight of the mask loss Lm (per-token normalised) against the answer loss Lp.")
    tau: float = Field(0.5, gt=0, le=10, description="Eq. 4: temperature of the binary Gumbel-softmax (straight-through) mask.")
    predictor: str | None = Field(
        None,
        description="Answer predictor: an HF causal LM directory or hub name sharing the student's "
        "tokenizer; None = a fresh small model of the student's architecture (see predictor_layers).",
    )
    predictor_layers: int = Field(2, ge=1, le=128, description="Layers of the default predictor (predictor = None): the student's config with this many layers, initialised from `seed`.")
    predictor_warmup_steps: int = Field(100, ge=0, le=100_000, description="Steps training the predictor alone with no mask (m = 1) before the joint phase.")
    warmup_lm: bool = Field(
        True,
        description="Warm-up also trains next-token prediction on the rationale tokens (beside the "
        "answer loss): a from-scratch predictor learns to read and copy numbers from the rationale "
        "far sooner than from the few answer tokens alone.",
    )
    steps: int = Field(100, ge=1, le=1_000_000, description="Joint steps training the weight generator and the predictor on Lp + alpha * Lm.")
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate of the weight generator.")
    predictor_lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate of the answer predictor (warm-up and joint).")
    batch_size: int = Field(16, ge=1, le=4096, description="Rationales per step (each is one packed predictor row holding all its prefixes).")
    prefixes: Literal["all", "sampled"] = Field("all", description="Eq. 5 prefixes: every step boundary, or a sampled subset (always with the full rationale).")
    n_sampled: int = Field(2, ge=1, le=1000, description="Prefixes per rationale when prefixes = sampled (the full one included).")
    heads: int = Field(4, ge=1, le=128, description="Attention heads of the generator's self-attention layer (divides the embedding size).")
    mlp_hidden: int = Field(128, ge=1, le=65536, description="Hidden size of the generator's two-layer MLP.")
    seed: int = Field(0, ge=0, description="Seed of the generator's init, batch order, prefix sampling and Gumbel noise.")
    device: str = runtime_field("cpu", description="Torch device for training and scoring (cpu, cuda, cuda:1, mps).")
