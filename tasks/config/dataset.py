"""The `dataset` section: where questions come from (the synthetic generator, local files, HF)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.config.base import KpodModel, runtime_field


Op = Literal["+", "-", "*", "/"]


class SyntheticConfig(KpodModel):
    seed: int = Field(0, ge=0, description="Seed of the generator; each split has its own stream.")
    n_train: int = Field(2000, ge=0, le=1_000_000, description="Training questions.")
    n_val: int = Field(200, ge=0, le=1_000_000, description="Validation questions.")
    n_test: int = Field(300, ge=0, le=1_000_000, description="Test questions.")
    min_steps: int = Field(2, ge=1, le=12, description="Fewest arithmetic steps in a problem.")
    max_steps: int = Field(4, ge=1, le=12, description="Most arithmetic steps in a problem.")
    max_operand: int = Field(
        10, ge=3, le=10_000,
        description="Start amounts and +/- operands are drawn from 2..max_operand.",
    )
    max_factor: int = Field(
        4, ge=2, le=100, description="Multipliers and divisors are drawn from 2..max_factor."
    )
    max_value: int = Field(
        50, ge=6, le=1_000_000,
        description="Every intermediate result stays within 2..max_value (keeps the task learnable).",
    )
    ops: list[Op] = Field(
        default_factory=lambda: ["+", "-", "*", "/"],
        min_length=1,
        description="Operations a step may use; division is used only when exact.",
    )
    distractor_prob: float = Field(
        0.3, ge=0.0, le=1.0,
        description="Probability of a distractor sentence (an irrelevant number) after each story sentence.",
    )
    max_distractors: int = Field(2, ge=0, le=10, description="Most distractor sentences per question.")

    @model_validator(mode="after")
    def _check(self) -> "SyntheticConfig":
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) > max_steps ({self.max_steps})")
        if self.max_value < self.max_operand + 2:
            raise ValueError(f"max_value ({self.max_value}) must be >= max_operand + 2")
        if not {"+", "-"} & set(self.ops):
            # with only * and / a chain soon has no legal next step
            raise ValueError("ops must include '+' or '-'")
        return self


Task = Literal[
    "synthetic", "gsm8k", "svamp", "asdiv", "commonsense_qa", "strategy_qa", "date_understanding",
    "tracking_shuffled_objects", "last_letter_concatenation", "coin_flip",
]


Split = Literal["train", "val", "test"]


class DatasetConfig(KpodModel):
    source: Literal["synthetic", "file", "hf"] = Field(
        "synthetic", description="Where questions come from: the generator, local files, or an HF dataset."
    )
    task: Task = Field(
        "synthetic",
        description="Task family: fixes the row mapping, the answer type and the papers' splits.",
    )
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig, description="The arithmetic generator (source=synthetic)."
    )
    # a guard, not a transform: it only refuses input, so it stays out of the stage key
    max_question_chars: int = runtime_field(
        20_000, "The longest question accepted from a file or HF source, in characters; a "
        "longer one stops the run naming its file and row (it would be sent to a paid teacher).", ge=1,
    )
    path: str | None = Field(
        None,
        description="One local JSONL/JSON/Parquet file holding every question; cut into splits "
        "(source=file; the paper's sizes when it is the full set, else split_fractions).",
    )
    paths: dict[Split, str] | None = Field(
        None,
        description="Local files per split, e.g. {train: a.jsonl, test: b.json}; a missing val "
        "is carved from test (GSM8K's 660/659) or train (source=file).",
    )
    split_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/val/test fractions when one file that is not a known full set is cut."
    )
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of train drawn as val when the source has no val split."
    )
    hf_name: str | None = Field(None, description="HF `datasets` name, e.g. openai/gsm8k (source=hf).")
    hf_config: str | None = Field(None, description="HF dataset config name, e.g. main.")
    hf_revision: str | None = Field(
        None, description="HF dataset revision (commit or tag); pin it so the stage key means the same data."
    )
    limit: int | None = Field(
        None, ge=1, description="Keep at most this many questions per split (the first ones), for quick runs."
    )
    seed: int = Field(0, ge=0, description="Seed of every split drawn from a larger part (real data).")

    @model_validator(mode="after")
    def _check(self) -> "DatasetConfig":
        if (self.source == "synthetic") != (self.task == "synthetic"):
            raise ValueError(
                f"task {self.task!r} does not go with source {self.source!r} "
                "(task 'synthetic' iff source 'synthetic')"
            )
        if self.source == "file" and (self.path is None) == (self.paths is None):
            raise ValueError("source 'file' needs exactly one of path (one file) or paths (per split)")
        if self.paths is not None and not self.paths:
            raise ValueError("paths must name at least one split")
        if self.source != "file" and (self.path is not None or self.paths is not None):
            raise ValueError(f"path/paths are only read when source is 'file', not {self.source!r}")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("source 'hf' needs hf_name")
        if self.source != "hf" and (self.hf_name or self.hf_config or self.hf_revision):
            raise ValueError(f"hf_* fields are only read when source is 'hf', not {self.source!r}")
        if any(f < 0 for f in self.split_fractions) or abs(sum(self.split_fractions) - 1) > 1e-9:
            raise ValueError(f"split_fractions {self.split_fractions} must be >= 0 and sum to 1")
        return self

    def files(self) -> dict[str, str]:
        """Local files read, by source part (train/val/test, or all)."""
        if self.source != "file":
            return {}
        return {"all": self.path} if self.path is not None else dict(self.paths or {})
