"""The dataset stage: config validation, the pure core, and a run through the stage contract."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from storage.schemas import schema_for
from storage.store import Store
from tasks.stages.dataset import SPEC, DatasetError, build
from tasks.config.dataset import DatasetConfig
from tasks.stages.contract import execute, plan
from tasks.core.synthetic import keypoint_terms, problem_from_meta

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
TINY = {"n_train": 40, "n_val": 10, "n_test": 12}


def run_stage(cfg: DatasetConfig, store: Store):
    config = SimpleNamespace(dataset=cfg)  # plan/execute read only the sections a spec names
    keys = {p.name: p.key for p in plan(config, [SPEC])}
    return execute(SPEC, config, keys, store, show_progress=False)


def test_defaults_describe_the_embedded_demo():
    cfg = DatasetConfig()
    assert (cfg.source, cfg.task) == ("synthetic", "synthetic")
    s = cfg.synthetic
    assert (s.min_steps, s.max_steps, s.n_train, s.n_val, s.n_test) == (2, 4, 2000, 200, 300)


@pytest.mark.parametrize(
    "kw",
    [
        {"source": "file", "task": "gsm8k"},  # neither path nor paths
        {"source": "file", "task": "gsm8k", "path": "a.jsonl", "paths": {"test": "b.jsonl"}},
        {"source": "synthetic", "task": "gsm8k"},
        {"source": "file", "task": "synthetic", "path": "a.jsonl"},
        {"source": "hf", "task": "gsm8k"},  # no hf_name
        {"source": "synthetic", "path": "a.jsonl"},
        {"source": "file", "task": "svamp", "paths": {"dev": "a.json"}},
        {"source": "file", "task": "svamp", "path": "a.json", "split_fractions": (0.5, 0.1, 0.1)},
        {"limit": 0},
        {"synthetic": {"max_steps": 20}},
        {"unknown_field": 1},
    ],
)
def test_config_rejects(kw):
    with pytest.raises(ValidationError):
        DatasetConfig(**kw)


def test_synthetic_core_tables():
    cfg = DatasetConfig(synthetic=TINY)
    questions, keypoints = build(cfg)
    assert questions.schema.names == schema_for("questions").names
    rows = questions.to_pylist()
    assert [r["split"] for r in rows].count("train") == 40 and len(rows) == 62
    assert {r["answer_type"] for r in rows} == {"numeric"}
    by_q: dict[str, set] = {}
    for r in keypoints.to_pylist():
        by_q.setdefault(r["question_id"], set()).add((r["term"], r["kind"]))
    for r in rows:
        p = problem_from_meta(r["meta"])
        assert str(p.answer) == r["answer"] and json.loads(r["meta"])["n_steps"] == p.n_steps
        assert by_q[r["question_id"]] == set(keypoint_terms(p))
    limited, _ = build(DatasetConfig(synthetic=TINY, limit=5))
    assert limited.num_rows == 15


def test_stage_runs_once_then_is_cached_and_keys_follow_the_config(tmp_path):
    store = Store(tmp_path)
    cfg = DatasetConfig(synthetic=TINY)
    first = run_stage(cfg, store)
    assert first.status == "computed"
    assert first.rows["questions"] == 62 and first.rows["keypoint_terms"] > 62
    assert first.summary["train"] == 40
    second = run_stage(cfg, store)
    assert (second.status, second.key) == ("cached", first.key)
    table = store.read_table("dataset", first.key, "questions")
    assert table.schema == schema_for("questions")
    other = run_stage(DatasetConfig(synthetic={**TINY, "seed": 1}), store)
    assert other.key != first.key and other.status == "computed"


def test_file_source_key_follows_the_file_bytes(tmp_path):
    data = tmp_path / "svamp.jsonl"
    data.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n")
    cfg = DatasetConfig(source="file", task="svamp", paths={"test": str(data)})
    store = Store(tmp_path / "store")
    first = run_stage(cfg, store)
    assert first.rows == {"questions": 1, "keypoint_terms": 0}
    data.write_text(json.dumps({"question": "1 + 2?", "answer": "3"}) + "\n")
    second = run_stage(cfg, store)
    assert second.status == "computed" and second.key != first.key


def test_bad_file_raises_one_line_error_and_commits_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\n{"question": "b"}\n')
    store = Store(tmp_path / "store")
    cfg = DatasetConfig(source="file", task="gsm8k", paths={"train": str(bad)})
    with pytest.raises(DatasetError, match=r"bad\.jsonl: line 2: row has no answer"):
        run_stage(cfg, store)
    stage_dir = tmp_path / "store" / "stages" / "dataset"
    assert [p.name for p in stage_dir.iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(DatasetError, match=r"missing\.jsonl: no such data file"):
        run_stage(DatasetConfig(source="file", task="gsm8k", path=str(tmp_path / "missing.jsonl")), store)


def test_shared_gsm8k_through_the_stage(tmp_path):
    test, train = DATA / "gsm8k" / "test.jsonl", DATA / "gsm8k" / "train.jsonl"
    if not test.is_file():
        pytest.skip(f"shared data {test} is absent")
    cfg = DatasetConfig(source="file", task="gsm8k", paths={"test": str(test)})
    out = run_stage(cfg, Store(tmp_path))
    assert out.summary == {"source": "file", "task": "gsm8k", "train": 0, "val": 660, "test": 659}
    questions, _ = build(DatasetConfig(source="file", task="gsm8k", paths={"test": str(test), "train": str(train)}, limit=3))
    assert [r["question_id"] for r in questions.to_pylist()] == [
        "gsm8k-train-0", "gsm8k-train-1", "gsm8k-train-2",
        "gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2",
        "gsm8k-test-660", "gsm8k-test-661", "gsm8k-test-662",
    ]


def test_task_names_match_the_loaders():
    from typing import get_args

    from tasks.config.dataset import Task
    from tasks.core.real_datasets import TASKS

    assert set(get_args(Task)) == set(TASKS) | {"synthetic"}
