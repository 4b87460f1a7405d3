"""The `evaluate` section: generation and grading of the student."""

from __future__ import annotations

from pydantic import Field, field_validator

from tasks.config.base import KpodModel, runtime_field


class EvaluateConfig(KpodModel):
    splits: list[str] = Field(
        default_factory=lambda: ["val", "test"],
        min_length=1,
        description="Splits of dataset.questions to evaluate on; each must have questions.",
    )
    max_new_tokens: int = Field(
        256, ge=1, le=8192, description="Most tokens the student may generate per question."
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Evaluate only the first N questions of each split (dataset order); none: all.",
    )
    batch_size: int = runtime_field(
        64, ge=1, le=4096, description="Questions generated together (memory vs speed only)."
    )
    device: str = runtime_field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
        description="Where the student generates: auto (cuda when available, else cpu), cpu, "
        "cuda, cuda:N or mps. Greedy tokens do not depend on it up to float rounding.",
    )

    @field_validator("splits")
    @classmethod
    def _unique_splits(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"splits must be distinct, got {v}")
        return v
