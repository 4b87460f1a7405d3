"""The real-data presets run their first stages on the shared data, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.catalog import query
from storage.store import Store
from tasks.config.pipeline import load_config
from tasks.stages.registry import BY_NAME, STAGES
from tasks.stages.contract import execute, plan

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"


def test_gsm8k_openai_preset_validates_without_a_key(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = load_config(REPO / "configs" / "gsm8k-openai.yaml")
    assert cfg.teacher.backend == "openai" and cfg.dataset.task == "gsm8k"
    # the key's *name* is config; no value of it is anywhere in the config
    assert "OPENAI_API_KEY" == cfg.teacher.api_key_env


# each replay preset: its question counts (a seeded 10% of the released training questions
# becomes val) and the share of released chains kpod's own grading also calls correct
REPLAYS = {
    "svamp-replay": ({"train": 586, "val": 65, "test": 150}, (0.7, 0.9)),
    "date-replay": ({"train": 230, "val": 26, "test": 111}, (0.95, 1.0)),
    "last-letter-replay": ({"train": 315, "val": 35, "test": 150}, (0.95, 1.0)),
    "tracking-replay": ({"train": 461, "val": 51, "test": 225}, (0.95, 1.0)),
}


@pytest.mark.skipif(not (SHARED / "mentor-kd").is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("preset", sorted(REPLAYS))
def test_replay_preset_dataset_teacher_rationales(monkeypatch, tmp_path: Path, preset: str) -> None:
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    expected, (low, high) = REPLAYS[preset]
    keys = {p.name: p.key for p in plan(cfg, STAGES)}
    store = Store(tmp_path)
    for stage in ("dataset", "teacher", "rationales"):
        execute(BY_NAME[stage], cfg, keys, store, show_progress=False)
    store.save_run("r", {"run_id": "r", "stages": keys})
    _, rows = query(store, "select split, count(*) from questions group by split order by split")
    counts = dict(rows)
    assert counts == expected
    _, rows = query(store, "select count(*), count(distinct request_id), count(error) from teacher_calls")
    n, distinct, errors = rows[0]
    assert n == distinct == 3 * counts["train"] and errors == 0
    # source_labels: trust: every chain the files flag correct (all of them) is trained on;
    # kpod's own grade of the chains sits beside it (see test_answers, docs/benchmarks.md)
    _, rows = query(store, "select avg(correct::int), avg(own_correct::int), count(*) filter (where "
                           "correct_from = 'source') from rationales")
    trusted, own, from_source = rows[0]
    assert trusted == 1.0 and low < own < high and from_source == 3 * counts["train"]
