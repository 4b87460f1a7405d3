"""Every stage, in DAG order. The flow, the CLI and the deployments all read this list."""

from __future__ import annotations

from tasks import dataset, evaluate, rationales, teacher, train
from tasks.stage import StageSpec

STAGES: list[StageSpec] = [
    dataset.SPEC,
    teacher.SPEC,
    rationales.SPEC,
    train.SPEC,
    evaluate.SPEC,
]

BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}


def stage_names() -> list[str]:
    return [s.name for s in STAGES]
