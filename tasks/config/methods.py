"""Which stages each distillation method needs, and the values a method switches in them.

One table of facts about `train.method`, read by the stage specs (upstream, enabled) and by the
stages' typed inputs. Plain data and functions of a `PipelineConfig`; nothing else of tasks/.
"""

from __future__ import annotations

from typing import Any

# a tasks.config.pipeline.PipelineConfig; not imported, since the pipeline's validators read this table
PipelineConfig = Any

# kpod_mentor trains like kpod on teacher + mentor rationales; the train stage adds the KD term
PROGRESSIVE = frozenset({"kpod", "kpod_no_weights", "kpod_no_weight_in_difficulty", "kpod_no_diversity", "kpod_mentor"})
WEIGHTED = frozenset({"kpod", "kpod_no_weight_in_difficulty", "kpod_no_diversity", "kpod_no_progressive", "kpod_mentor"})
KPOD_METHODS = PROGRESSIVE | {"kpod_no_progressive"}
MENTOR_METHODS = frozenset({"mentor_kd", "kpod_mentor"})  # the KD term on the mentor's soft labels
# methods that train on the mentor's rationales: mentor_augment_only has them without the KD
# term (a measurement, not in the paper: it separates the extra data from the soft labels)
MENTOR_DATA_METHODS = MENTOR_METHODS | {"mentor_augment_only"}
RATIONALE_STAGES = ("rationales", "mentor_augment")  # stages that write `rationales` / `steps`


def _name(method: object) -> str:
    return str(getattr(method, "value", method))


def uses_schedule(method: str) -> bool:
    """Methods whose pipeline runs `difficulty` and `schedule`."""
    return _name(method) in PROGRESSIVE


def uses_weights(method: str) -> bool:
    """Methods that read KPOD token weights (the `weights` stage)."""
    return _name(method) in KPOD_METHODS


def uses_mentor(method: str) -> bool:
    """Methods that train with Mentor-KD's KD term (the mentor's soft labels)."""
    return _name(method) in MENTOR_METHODS


def uses_mentor_data(method: str) -> bool:
    """Methods that train on mentor-augmented rationales (so run mentor_train and mentor_augment)."""
    return _name(method) in MENTOR_DATA_METHODS


def rationale_stages(cfg: PipelineConfig) -> tuple[str, ...]:
    """The stages whose `rationales`/`steps` tables this config trains on."""
    return RATIONALE_STAGES if uses_mentor_data(cfg.train.method) else RATIONALE_STAGES[:1]


def kd_stages(cfg: PipelineConfig) -> tuple[str, ...]:
    """What the train stage reads for the KD term: the mentor model (`mentor.kd.source=online`),
    its cached top-k log-probs (`cached_topk`) or the teacher's (`teacher_topk`); nothing for
    other methods."""
    if not uses_mentor(cfg.train.method):
        return ()
    return {"cached_topk": ("mentor_cache",), "teacher_topk": ("teacher",)}.get(cfg.mentor.kd.source, ("mentor_train",))


def kpod_stages(method: str) -> tuple[str, ...]:
    """Stages the train stage reads beyond Std-CoT's for a KPOD method."""
    if _name(method) in PROGRESSIVE:
        return ("weights", "schedule")
    if _name(method) == "kpod_no_progressive":
        return ("weights",)
    return ()


def effective_beta(cfg: PipelineConfig) -> float:
    """beta of Eq. 12: the config's, or 0 under the no_diversity ablation method."""
    return 0.0 if cfg.train.method == "kpod_no_diversity" else cfg.schedule.beta


def effective_uniform(cfg: PipelineConfig) -> bool:
    """Uniform within-step weights: the config switch or the no_weight_in_difficulty method."""
    return cfg.difficulty.uniform_within_step or cfg.train.method == "kpod_no_weight_in_difficulty"


def effective_reference(cfg: PipelineConfig) -> str:
    """The difficulty reference model: as configured, or (auto) the pretrained student itself
    when there is one (hf, or the pretrained miniature's base; the base itself when
    student.base_mix mixes the initial student with a fresh init) and a short Std-CoT warm-up of
    a from-scratch one (METHODS §2.2)."""
    if cfg.difficulty.reference != "auto":
        return cfg.difficulty.reference
    if cfg.student.init == "base" and cfg.student.base_mix < 1:
        return "base"  # the initial student is part fresh init: the base is the pretrained one
    pretrained = cfg.student.kind == "hf" or cfg.student.init == "base"
    return "init" if pretrained else "warmup"
