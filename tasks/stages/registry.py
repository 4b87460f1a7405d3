"""Every stage, in DAG order. The flow, the CLI and the deployments all read this list."""

from __future__ import annotations

from tasks.stages import dataset, difficulty, evaluate, pretrain, rationales, schedule, student, teacher, train, weights
from tasks.stages import mentor_train, mentor_augment, mentor_cache
from tasks.stages.contract import StageSpec

STAGES: list[StageSpec] = [
    dataset.SPEC,
    teacher.SPEC,
    rationales.SPEC,
    pretrain.SPEC,
    student.SPEC,
    mentor_train.SPEC,
    mentor_augment.SPEC,
    mentor_cache.SPEC,
    weights.SPEC,
    difficulty.SPEC,
    schedule.SPEC,
    train.SPEC,
    evaluate.SPEC,
]

BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}


def stage_names() -> list[str]:
    return [s.name for s in STAGES]
