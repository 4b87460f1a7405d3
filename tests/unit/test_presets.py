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


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_every_preset_loads_for_every_method(monkeypatch, preset: str) -> None:
    """A preset's length checks depend on the method (the mentor's only bind with a mentor):
    gsm8k-openai once refused mentor_kd at load time (its mentor's max_len was the default)."""
    from typing import get_args

    from tasks.config.train import Method

    monkeypatch.chdir(REPO)
    for method in get_args(Method):
        assert load_config(REPO / "configs" / f"{preset}.yaml", [f"train.method={method}"]).train.method == method


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


@pytest.mark.skipif(not (SHARED / "gsm8k").is_dir(), reason="../shared/data is absent")
def test_gsm8k_openai_preset_runs_its_teacher_through_a_local_openai_server(monkeypatch, tmp_path: Path) -> None:
    """The preset as written (GSM8K files, the `openai` backend, zero-shot-CoT, prices and a
    budget), pointed at the test server on 127.0.0.1: no LLM is reachable here, so the server
    answers each question with GSM8K's own reference solution, written as a chain that ends in
    "The answer is N". Every rationale is then graded correct and split into its steps."""
    import json
    import re

    from tests.support.openai_server import serve

    solutions = {}
    for line in (SHARED / "gsm8k" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        steps, gold = row["answer"].split("####")
        chain = " ".join(re.sub(r"<<[^>]*>>", "", s).strip() for s in steps.strip().splitlines())
        solutions[row["question"].strip()] = f"{chain} The answer is {gold.strip().replace(',', '')}."

    def reference(text: str, k: int) -> str:
        question = re.search(r"Q: (.*?)\nA:", text, re.S).group(1).strip()
        return solutions[question]

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("KPOD_TEST_KEY", "sk-test-0000")
    with serve() as server:
        server.responder, server.models = reference, ("gpt-3.5-turbo",)
        cfg = load_config(REPO / "configs" / "gsm8k-openai.yaml", [
            f"teacher.base_url={server.base_url}", "teacher.api_key_env=KPOD_TEST_KEY", "dataset.limit=8"])
        keys = {p.name: p.key for p in plan(cfg, STAGES)}
        store = Store(tmp_path)
        outs = {s: execute(BY_NAME[s], cfg, keys, store, show_progress=False) for s in ("dataset", "teacher", "rationales")}
        sent = len(server.received)
    assert outs["dataset"].summary["train"] == 8 and sent == 8
    assert outs["teacher"].summary["errors"] == 0 and outs["teacher"].summary["cost_usd"] > 0
    store.save_run("r", {"run_id": "r", "stages": keys})
    _, rows = query(store, "select count(*), avg(correct::int), min(n_steps), avg(n_steps) from rationales")
    n, correct, fewest, mean_steps = rows[0]
    assert n == 8 and correct == 1.0 and fewest >= 1 and mean_steps > 2, rows
