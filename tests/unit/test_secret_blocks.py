"""The Secret-block lookup lives in flows/ and reaches only the teacher stage, at run time."""

from __future__ import annotations

import flows.secret_blocks as secret_blocks
from tasks.config.pipeline import PipelineConfig

SENTINEL = "sk-kpod-secret-block-sentinel"


def test_only_the_teacher_gets_the_block_key(monkeypatch):
    looked_up = []
    monkeypatch.setattr(secret_blocks, "secret_from_block", lambda name: looked_up.append(name) or SENTINEL)
    cfg = PipelineConfig.model_validate({"teacher": {"backend": "openai", "model": "m", "api_key_block": "blk"}})
    assert secret_blocks.stage_runtime("teacher", cfg) == {"api_key": SENTINEL}
    assert secret_blocks.stage_runtime("rationales", cfg) == {}
    assert looked_up == ["blk"]
    # no block named: nothing is looked up (the backend reads teacher.api_key_env itself)
    assert secret_blocks.stage_runtime("teacher", PipelineConfig()) == {}
    assert looked_up == ["blk"]
    # the block name is a runtime field: never part of the teacher's inputs or key
    assert "api_key_block" not in cfg.teacher.hashable()
