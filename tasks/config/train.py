"""The `train` section: the method, the optimiser and its schedule, selection on val."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import KpodModel, runtime_field


Method = Literal[
    "std_cot",
    "kpod",
    "kpod_no_weights",
    "kpod_no_weight_in_difficulty",
    "kpod_no_progressive",
    "kpod_no_diversity",
    "mentor_kd",
    "mentor_augment_only",
    "kpod_mentor",
]


class LoraSettings(KpodModel):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="Module names that get adapters (LLaMA: q_proj k_proj v_proj o_proj ...; T5: q v).",
    )


class TrainConfig(KpodModel):
    method: Method = Field(
        "std_cot",
        description="Distillation method (METHODS.md §1-3). mentor_augment_only is not in either "
        "paper: Std-CoT on the teacher's and the mentor's rationales without the KD term, to "
        "separate Mentor-KD's extra data from its soft labels.",
    )
    seed: int = Field(0, ge=0, description="Seed of data order and any sampling in training.")
    epochs: int = Field(12, ge=1, le=10000, description="Passes over the training rationales.")
    batch_size: int = Field(16, ge=1, le=4096, description="Sequences per micro-batch per process.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches per optimiser step.")
    lr: float = Field(2e-3, gt=0, le=1, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW decoupled weight decay (matrices only).")
    warmup_ratio: float = Field(0.05, ge=0, le=0.5, description="Fraction of steps of linear warm-up.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    curriculum_lr: Literal["shared", "hold"] = Field(
        "hold",
        description="Progressive KPOD methods: shared = one warm-up and decay over all epochs (the "
        "paper's single schedule); hold = the peak learning rate lasts through the curriculum "
        "(curriculum_warmup_epochs + schedule.stages epochs) and the decay runs over the "
        "whole-rationale epochs after it. **Departure**: hold, chosen on val (demo, kpod, one "
        "seed: val 0.785 hold vs 0.695 shared, Std-CoT 0.760; bench-arith, seed 0: 0.455 vs "
        "0.415; docs/benchmarks.md): under the "
        "shared cosine the curriculum spends the high-lr epochs on partial targets. Other "
        "methods have no curriculum: both are the same.",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_len: int = Field(256, ge=16, le=32768, description="Longest sequence; longer ones are cut at the right.")
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters (peft) instead of all weights.")
    weight_floor: float = Field(
        0.8, ge=0, le=1,
        description="Eq. 15 with a floor: rationale token j weighs f + (1 - f) * w_j in the loss, "
        "f = weight_floor; KPOD methods with token weights only. 0 is the paper's raw w. "
        "**Departure**: 0.8, chosen on val (demo, kpod_no_progressive, f in 0/0.5/0.8/0.9: val "
        "0.775/0.815/0.865/0.830; docs/benchmarks.md): raw w starves a from-scratch student of "
        "the filler it must still write (METHODS §2.5).",
    )
    curriculum_warmup_epochs: int = Field(
        0, ge=0, le=10000,
        description="Progressive KPOD methods: epochs on whole rationales before the progressive "
        "stages 0..T-1 begin (then whole rationales again). 0 is the paper, which starts the "
        "curriculum at once (**departure** when > 0).",
    )
    curriculum_input_weight: float = Field(
        0.5, ge=0, le=1,
        description="Progressive KPOD methods: loss weight lambda of the rationale steps that the "
        "schedule gives as input at the current stage. 0 is the paper: those steps are in the "
        "prompt and carry no loss. **Departure**: 0.5, chosen on val (bench-arith, kpod, 24 "
        "epochs, seed 0: val 0.530 / 0.520 / 0.585 for lambda 0 / 0.25 / 0.5, Std-CoT 0.560; "
        "3 seeds: val 0.508 for 0 against 0.575 for 0.5; docs/benchmarks.md). With lambda > 0 the "
        "whole rationale stays the target every epoch, and the steps the schedule would give as "
        "input weigh lambda times their token weight, so the curriculum moves the emphasis from "
        "the last steps to the first instead of taking the first steps out of training.",
    )
    select_every: int = Field(
        0, ge=0, le=10000,
        description="Model selection: score the student on val after every N-th epoch and the last, "
        "and keep the best epoch's weights (table val_selection); 0: off, the final weights are kept.",
    )
    select_limit: int | None = Field(
        None, ge=1, description="Score selection on the first N val questions only; none: all."
    )
    select_max_new_tokens: int = Field(
        256, ge=1, le=8192, description="Most tokens generated per val question during selection."
    )
    processes: int = Field(
        1, ge=1, le=1024,
        description="Training processes: N > 1 runs the train stage's recipe in N ranks under "
        "`accelerate launch` (DDP: gloo over CPU processes, NCCL over N GPUs); rank 0 writes the "
        "outputs and checkpoints, and a killed launch resumes. batch_size is per process, so "
        "the global batch is processes x batch_size x grad_accum: keep it equal to compare with "
        "one process. Part of the stage key (the batches, hence the result, differ).",
    )
    checkpoint_every: int = runtime_field(
        100, "Optimiser steps between resumable checkpoints in the stage's work dir.", ge=1
    )
    bf16: bool = runtime_field(False, "bf16 autocast (GPU only).")
    device: Literal["auto", "cpu", "cuda"] = runtime_field(
        "auto", "Where to train; auto = cuda when available."
    )
