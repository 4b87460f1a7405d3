"""The configured teacher backend; each backend module is imported only when chosen."""

from __future__ import annotations

from tasks.config.teacher import TeacherConfig
from tasks.teacher_backends.base import Backend


def make_backend(cfg: TeacherConfig, api_key: str | None = None) -> Backend:
    """The backend `cfg.backend` names.

    `api_key`: a key the orchestrator looked up (a Prefect Secret block named by
    `teacher.api_key_block`, see flows/secret_blocks.py); without it the openai backend reads the
    environment variable named by `teacher.api_key_env`."""
    if cfg.backend == "scripted":
        from tasks.teacher_backends import scripted

        return scripted.make_backend(cfg)
    if cfg.backend == "openai":
        from tasks.teacher_backends import openai_backend

        return openai_backend.make_backend(cfg, api_key=api_key)
    if cfg.backend == "replay":
        from tasks.teacher_backends import replay

        return replay.make_backend(cfg)
    if cfg.backend == "hf":
        from tasks.teacher_backends import hf

        return hf.make_backend(cfg)
    if cfg.backend == "openai_batch":
        # it answers whole batches, not one request: teach.dispatch sends it (openai_batch.py)
        raise ValueError("teacher.backend 'openai_batch' has no per-request backend; teach() runs its batches")
    raise ValueError(f"teacher.backend: unknown backend {cfg.backend!r}")
