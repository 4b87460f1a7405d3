"""The pipeline config: one section per stage, the flow's single typed parameter.

Prefect validates it when a run is created and renders it as a form in the UI. Each section's
model has its own module in tasks/config/; a stage's key hashes only the inputs it declares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from tasks.config.base import KpodModel
from tasks.config.dataset import DatasetConfig
from tasks.config.difficulty import DifficultyConfig
from tasks.config.evaluate import EvaluateConfig
from tasks.config.mentor import MentorConfig
from tasks.config.methods import uses_mentor_data
from tasks.config.pretrain import PretrainConfig
from tasks.config.student import StudentConfig
from tasks.config.rationales import RationalesConfig
from tasks.config.schedule import ScheduleConfig
from tasks.config.teacher import TeacherConfig
from tasks.config.train import TrainConfig
from tasks.config.weights import WeightsConfig


class PipelineConfig(KpodModel):
    name: str = Field("kpod", description="A label for runs of this config (not hashed into keys).")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="Where questions come from.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Which teacher writes rationales, and how.")
    rationales: RationalesConfig = Field(default_factory=RationalesConfig, description="Parsing teacher output into graded, segmented rationales.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="The pretrained miniature: generic corpus, shared tokenizer and base model (used when student.init or student.tokenizer is base).")
    student: StudentConfig = Field(default_factory=StudentConfig, description="The student model and its tokenizer.")
    weights: WeightsConfig = Field(default_factory=WeightsConfig, description="KPOD token weighting module (mask model) and its training.")
    difficulty: DifficultyConfig = Field(default_factory=DifficultyConfig, description="KPOD step difficulty (Eq. 8): reference model and within-step weighting.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="KPOD progressive schedule (Eq. 9-13): budget, diversity, clusters, stages.")
    mentor: MentorConfig = Field(default_factory=MentorConfig, description="Mentor-KD: the mentor model, its training, its sampled rationales and the KD term.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Student training (method, optimiser, schedule).")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Generation and grading of the student.")

    @model_validator(mode="after")
    def _check_sections(self) -> "PipelineConfig":
        shared = "needs the base's tokenizer (student.init 'base' or student.tokenizer 'base')"
        if self.weights.predictor == "base" and not self.student.base_tokenizer:
            raise ValueError(f"weights.predictor 'base' {shared}: the predictor shares the student's tokenizer")
        if self.difficulty.reference == "base" and not self.student.base_tokenizer:
            raise ValueError(f"difficulty.reference 'base' {shared}")
        if self.mentor.model.init == "base":
            if not self.student.base_tokenizer or self.mentor.model.kind != "embedded":
                raise ValueError(f"mentor.model.init 'base' needs an embedded mentor and {shared[6:]}")
            if "mentor" not in self.pretrain.models:
                raise ValueError("mentor.model.init 'base' needs 'mentor' in pretrain.models")
        if self.mentor.kd.source == "teacher_topk" and self.teacher.top_logprobs is None:
            raise ValueError("mentor.kd.source 'teacher_topk' needs teacher.top_logprobs (the teacher's log-probs)")
        self._check_lengths()
        return self

    def _check_lengths(self) -> None:
        """Prompt + generation must fit the embedded models' positions (student.max_prompt_tokens
        reserves the prompt's share): refused here, not warned about by transformers mid-run."""
        reserve = self.student.max_prompt_tokens
        checks = []
        if self.student.kind == "embedded":
            checks.append(("evaluate.max_new_tokens", self.evaluate.max_new_tokens, "student.max_len", self.student.max_len))
            if self.train.select_every:
                checks.append(("train.select_max_new_tokens", self.train.select_max_new_tokens,
                               "student.max_len", self.student.max_len))
        if self.mentor.model.kind == "embedded" and uses_mentor_data(self.train.method):
            checks.append(("mentor.augment.max_new_tokens", self.mentor.augment.max_new_tokens,
                           "mentor.model.max_len", self.mentor.model.max_len))
        for gen_name, gen, len_name, length in checks:
            if gen + reserve > length:
                raise ValueError(
                    f"{gen_name} ({gen}) + student.max_prompt_tokens ({reserve}) = {gen + reserve} "
                    f"exceeds {len_name} ({length}); lower one of the first two or raise {len_name}"
                )


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the field."""


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`teacher.samples=3` -> ("teacher.samples", 3); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot read value {raw!r}: {exc}") from None
    return key, value


def format_validation_error(exc: ValidationError, source: str) -> str:
    errs = exc.errors()
    first = errs[0]
    loc = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{source}: {loc}: {msg}{more}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML preset (or the defaults), apply `--set` overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        data = loaded
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
