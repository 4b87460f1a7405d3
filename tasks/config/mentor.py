"""The `mentor` section: Mentor-KD's mentor model, its training, its sampling and the KD term."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tasks.config.base import KpodModel, runtime_field
from tasks.config.student import EmbeddedShape
from tasks.config.train import LoraSettings


class MentorModel(EmbeddedShape):
    """The mentor: the student's shape fields, with larger defaults (an intermediate model)."""

    SECTION: ClassVar[str] = "mentor.model"

    kind: Literal["embedded", "hf"] = Field(
        "embedded",
        description="embedded: a LLaMA built on the student's tokenizer (make it bigger than the "
        "student); hf: load `name_or_path`, whose tokenizer must equal the student's.",
    )
    init: Literal["scratch", "base"] = Field(
        "scratch",
        description="Embedded: scratch = random weights; base = the `pretrain` stage's base of "
        "this shape (needs student.init=base, so both share its tokenizer, and 'mentor' in "
        "pretrain.models).",
    )
    hidden: int = Field(192, ge=8, le=16384, description="Embedded: hidden size.")
    layers: int = Field(3, ge=1, le=128, description="Embedded: number of decoder layers.")
    heads: int = Field(6, ge=1, le=128, description="Embedded: attention heads (divides hidden).")
    intermediate: int = Field(512, ge=8, le=65536, description="Embedded: MLP inner size.")


class MentorTraining(KpodModel):
    epochs: int = Field(12, ge=1, le=10000, description="Std-CoT epochs over the correct teacher rationales.")
    lr: float = Field(
        2e-3, gt=0, le=1,
        description="Peak learning rate (AdamW, cosine). The paper uses 1e-4..3e-4 for pre-trained "
        "mentors; a small model trained from scratch wants ~1e-3..3e-3.",
    )
    batch_size: int = Field(16, ge=1, le=4096, description="Sequences per micro-batch (16, like the student: more, smaller steps learn the arithmetic faster).")
    max_len: int = Field(256, ge=16, le=32768, description="Longest training sequence; longer ones are cut.")
    seed: int = Field(0, ge=0, description="Seed of the data order.")
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters (peft) instead of all weights.")
    val_limit: int | None = Field(
        None, ge=1, description="Score the mentor on the first N val questions only; none: all."
    )
    processes: int = Field(
        1, ge=1, le=1024,
        description="Training processes: N > 1 trains the mentor in N ranks under `accelerate "
        "launch`, as train.processes does for the student (batch_size is per process; part of "
        "the stage key). Its val scoring runs on rank 0.",
    )
    device: Literal["auto", "cpu", "cuda"] = runtime_field("auto", "Where to train and generate.")
    bf16: bool = runtime_field(False, "bf16 autocast (GPU only).")


class MentorAugment(KpodModel):
    samples: int = Field(3, ge=1, le=64, description="Rationales the mentor samples per training question.")
    temperature: float = Field(0.7, gt=0, le=2, description="Sampling temperature.")
    top_k: int = Field(50, ge=1, le=1_000_000, description="Sample among the k most likely tokens.")
    max_new_tokens: int = Field(256, ge=1, le=8192, description="Most tokens per sampled rationale.")
    seed: int = Field(0, ge=0, description="Seed of the sampling (each completion has its own stream).")
    batch_size: int = runtime_field(
        64, "Prompts sampled together (speed only; outputs equal up to float rounding).", ge=1, le=4096
    )


class KdSettings(KpodModel):
    tau: float = Field(2.0, gt=0, le=100, description="Softmax temperature of both models in the KL.")
    lam: float = Field(0.3, ge=0, le=1, description="lambda: loss = (1 - lambda) * CE + lambda * KL.")
    source: Literal["online", "cached_topk", "teacher_topk"] = Field(
        "online",
        description="online: run the mentor on every student batch (exact KL); cached_topk: "
        "the mentor_cache stage stores its top-k log-probs once per target token (a student rerun "
        "does not rerun the mentor; KL over the renormalised top-k); teacher_topk: the teacher's "
        "own top-k log-probs (teacher.top_logprobs, table teacher_logprobs) at the tokens of its "
        "rationales, for a student whose tokenizer is the teacher's (checked: a mismatch names the "
        "first rationale and position). Only tokens the teacher wrote get the term: the answer "
        "sentence, EOS and the mentor's rationales get none (no mentor soft labels are mixed in); "
        "the mentor still supplies its rationales.",
    )
    topk: int = Field(
        32, ge=1, le=1_000_000,
        description="cached_topk: tokens kept per position (teacher_topk keeps teacher.top_logprobs').",
    )


class MentorConfig(KpodModel):
    model: MentorModel = Field(default_factory=MentorModel, description="The mentor model.")
    training: MentorTraining = Field(default_factory=MentorTraining, description="Std-CoT training of the mentor.")
    augment: MentorAugment = Field(default_factory=MentorAugment, description="Sampling rationales from the mentor.")
    kd: KdSettings = Field(default_factory=KdSettings, description="The soft-label term of the student loss.")
