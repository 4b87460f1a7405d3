"""Runtime secrets the flow hands to stages, never hashed, stored or logged.

`teacher.api_key_block` names a Prefect Secret block; it is read here, in the orchestration
layer, and reaches the teacher stage through `StageContext.runtime`, so nothing under tasks/
imports Prefect. (Not `secrets.py`: a deployment loads flows/kpod.py by path, which puts flows/ on
the import path of the stages' worker processes, where that name shadows the standard library.)
"""

from __future__ import annotations

from typing import Any


def secret_from_block(name: str) -> str:
    """The value of the Prefect Secret block `name`."""
    from prefect.blocks.system import Secret

    return Secret.load(name).get()


def stage_runtime(stage: str, config: Any) -> dict[str, Any]:
    """What stage `stage` needs at run time beyond its inputs: the teacher's API key from a
    Secret block, when the config names one."""
    if stage == "teacher" and config.teacher.api_key_block:
        return {"api_key": secret_from_block(config.teacher.api_key_block)}
    return {}
