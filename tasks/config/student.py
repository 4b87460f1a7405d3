"""The `student` section, and the model shape the mentor shares."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from tasks.config.base import KpodModel, runtime_field


class EmbeddedShape(KpodModel):
    """What builds a model: an HF name, or the shape of an embedded LLaMA (student, mentor)."""

    SECTION: ClassVar[str] = "model"  # the config path named in errors

    kind: Literal["embedded", "hf"] = Field(
        "embedded", description="embedded: a small LLaMA built from this config; hf: load `name_or_path`."
    )
    name_or_path: str | None = Field(None, description="HF model directory or hub name (kind=hf only).")
    hidden: int = Field(128, ge=8, le=16384, description="Embedded: hidden size.")
    layers: int = Field(2, ge=1, le=128, description="Embedded: number of decoder layers.")
    heads: int = Field(4, ge=1, le=128, description="Embedded: attention heads (divides hidden).")
    intermediate: int = Field(256, ge=8, le=65536, description="Embedded: MLP inner size.")
    max_len: int = Field(
        512, ge=16, le=32768, description="Embedded: maximum positions (prompt + target)."
    )
    seed: int = Field(0, ge=0, description="Embedded: seed of the weight initialisation.")

    @model_validator(mode="after")
    def _check(self) -> "EmbeddedShape":
        sec = self.SECTION
        if self.kind == "hf" and not self.name_or_path:
            raise ValueError(f"{sec}.name_or_path is required when {sec}.kind is 'hf'")
        if self.kind == "embedded" and self.hidden % self.heads:
            raise ValueError(
                f"{sec}.hidden ({self.hidden}) must be divisible by {sec}.heads ({self.heads})"
            )
        return self


class StudentConfig(EmbeddedShape):
    SECTION: ClassVar[str] = "student"

    kind: Literal["embedded", "hf"] = Field(
        "embedded",
        description="embedded: a small LLaMA built from this config with a tokenizer trained on "
        "the training text; hf: load `name_or_path` (causal LM or seq2seq, from its config).",
    )
    name_or_path: str | None = Field(
        None, description="HF model directory or hub name (kind=hf only); its tokenizer is used."
    )
    init: Literal["scratch", "base"] = Field(
        "scratch",
        description="Embedded: scratch = random weights and a tokenizer trained on the task text "
        "(the fast demo); base = the `pretrain` stage's base and its tokenizer (the pretrained "
        "miniature: the papers' setting of a pretrained student, made offline; issue 13).",
    )
    base_mix: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Embedded, init base: the student starts at m * base + (1 - m) * a fresh "
        "init of the same shape (student.seed), parameter by parameter. 1 = the base as is (the "
        "papers fine-tune their pretrained model unchanged); below 1 is a departure, the "
        "shrink-and-perturb remedy for warm-started networks that generalise worse than fresh ones "
        "(Ash & Adams, 2020), measured on bench-arith in docs/benchmarks.md.",
    )
    tokenizer: Literal["auto", "task", "base"] = Field(
        "auto",
        description="Embedded: task = a tokenizer trained on the task text; base = the `pretrain` "
        "stage's tokenizer (corpus and task text), so a student trained from scratch can still use "
        "the base as KPOD's answer predictor or difficulty reference; auto = base when init is "
        "base, else task.",
    )
    vocab_size: int = Field(
        1024, ge=300, le=65536,
        description="Embedded: most BPE tokens to train (256 byte symbols + 3 specials + merges); "
        "training stops earlier when no pair is left to merge.",
    )

    # a guard, not a transform: it only refuses a config or a dataset, so it stays out of the key
    max_prompt_tokens: int = runtime_field(
        128, "Embedded: positions of student.max_len reserved for a question's prompt ('Q: ...\\nA:'). "
        "When the config loads, each generation length (evaluate.max_new_tokens; "
        "train.select_max_new_tokens when train.select_every is set; for an embedded mentor, "
        "mentor.augment.max_new_tokens against mentor.model.max_len) plus this must fit; the "
        "student stage, where the tokenizer and so the real prompt lengths are known, refuses a "
        "question whose prompt is longer. (Characters bound no token count honestly, so "
        "dataset.max_question_chars is not used.)", ge=1, le=32768,
    )

    @model_validator(mode="after")
    def _check_init(self) -> "StudentConfig":
        if self.init == "base" and self.kind != "embedded":
            raise ValueError("student.init 'base' needs student.kind 'embedded' (an hf student is pretrained already)")
        if self.init == "base" and self.tokenizer == "task":
            raise ValueError("student.init 'base' needs the base's tokenizer (student.tokenizer 'base' or 'auto')")
        if self.base_mix < 1 and self.init != "base":
            raise ValueError("student.base_mix below 1 needs student.init 'base' (there is no base to mix)")
        if self.tokenizer == "base" and self.kind != "embedded":
            raise ValueError("student.tokenizer 'base' needs student.kind 'embedded'")
        return self

    @property
    def base_tokenizer(self) -> bool:
        """Whether the student uses the pretrained miniature's tokenizer (so the `pretrain` stage runs)."""
        return self.init == "base" or self.tokenizer == "base"
