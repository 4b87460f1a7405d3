"""The kpod flow on configs/smoke.yaml, in-process under the Prefect test harness."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from storage.catalog import query
from storage.store import Store

pytestmark = pytest.mark.e2e


def statuses(outcomes: list[dict]) -> dict[str, str]:
    return {o["stage"]: o["status"] for o in outcomes}


def spans(outcomes: list[dict]) -> dict[str, tuple[datetime, datetime]]:
    """stage -> (started_at, finished_at), as the task measured them."""
    return {o["stage"]: (datetime.fromisoformat(o["started_at"]), datetime.fromisoformat(o["finished_at"])) for o in outcomes}


def overlap(a: tuple[datetime, datetime], b: tuple[datetime, datetime]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


# KPOD + Mentor-KD with cached soft labels: `mentor_cache` and `weights` both wait only on
# `mentor_augment` and `student` (weights reads the mentor's rationales), so they may run at once
MENTOR_CACHED = ["train.method=kpod_mentor", "mentor.kd.source=cached_topk"]
BRANCHES = ["mentor_cache", "weights"]


@pytest.fixture(scope="module")
def mentor_store(prefect_harness, tmp_path_factory) -> str:
    """A store holding every stage up to the mentor's rationales (they take a while: shared)."""
    from flows.kpod import kpod
    from tasks.config.pipeline import load_config

    from tests.e2e.conftest import SMOKE

    store = str(tmp_path_factory.mktemp("mentor") / "store")
    kpod(config=load_config(SMOKE, MENTOR_CACHED), store=store, stages=["mentor_augment", "student"])
    return store


def test_cached_rerun_and_single_stage_invalidation(prefect_harness, smoke_config, tmp_path: Path) -> None:
    from flows.kpod import kpod

    store = str(tmp_path / "store")
    first = kpod(config=smoke_config, store=store)
    assert set(statuses(first).values()) == {"computed"}
    # a run that evaluated writes its page and links it from the flow run
    from prefect.artifacts import Artifact

    run_id = Store(store).load_run()["run_id"]
    page = Store(store).page_path(f"{run_id}.html")
    assert page.is_file() and "<html" in page.read_text(encoding="utf-8")[:300].lower()
    link = Artifact.get("kpod-run-report")
    assert link is not None and page.resolve().as_uri() in link.data

    second = kpod(config=smoke_config, store=store)
    assert set(statuses(second).values()) == {"cached"}, statuses(second)

    # one field of the rationales section: dataset and teacher stay cached
    tweaked = smoke_config.model_copy(deep=True)
    tweaked.rationales.min_steps = smoke_config.rationales.min_steps + 1
    third = statuses(kpod(config=tweaked, store=store, stages=["rationales"]))
    assert third == {"rationales": "computed"}

    # SQL over the latest run: the new rationales artifact, same dataset/teacher artifacts
    s = Store(store)
    _, rows = query(s, "select count(*) from steps")
    assert rows[0][0] > 0
    _, rows = query(s, "select count(*) from kpod_runs")
    assert rows[0][0] == 3
    run = s.load_run()
    assert run["status"] == "completed" and run["stages"]["teacher"] == second[1]["key"]


def test_force_recomputes_only_named_stage(prefect_harness, smoke_config, tmp_path: Path) -> None:
    from flows.kpod import kpod

    store = str(tmp_path / "store")
    kpod(config=smoke_config, store=store, stages=["rationales"])
    again = statuses(kpod(config=smoke_config, store=store, stages=["rationales"], force=["teacher"]))
    assert again == {"teacher": "computed", "rationales": "cached"}


def test_unknown_stage_is_refused_before_anything_runs(prefect_harness, smoke_config, tmp_path: Path) -> None:
    from flows.kpod import kpod
    from flows.selection import StageSelectionError

    with pytest.raises(StageSelectionError, match="unknown stage 'teachr'"):
        kpod(config=smoke_config, store=str(tmp_path / "s"), stages=["teachr"])
    assert not (tmp_path / "s" / "stages").exists()


def test_cli_run_sql_status(prefect_harness, tmp_path: Path, capsys) -> None:
    from flows.cli import main

    store = str(tmp_path / "store")
    assert main(["--store", store, "run", "smoke", "--stages", "rationales", "--parallel", "1"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" not in out  # nothing evaluated, no accuracy table
    # each stage's start and end, in seconds since the first stage started: one after another
    header, *rows = [line.split() for line in out.strip().splitlines()]
    assert header[-2:] == ["start", "end"] and [r[0] for r in rows] == ["dataset", "teacher", "rationales"]
    ends = [(float(r[-2]), float(r[-1])) for r in rows]
    assert ends[0][0] == 0 and all(a[1] <= b[0] for a, b in zip(ends, ends[1:])), ends
    assert main(["--store", store, "sql", "select count(*) as n from steps", "--format", "json"]) == 0
    n = json.loads(capsys.readouterr().out)[0]["n"]
    assert n > 0
    assert main(["--store", store, "sql", "select * from rationales where not correct limit 3"]) == 0
    out = capsys.readouterr().out
    assert "rationale_id" in out
    assert main(["--store", store, "status", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "rationales" in out and "complete" in out
    # a whole run prints the student's accuracy without --report (issue 3's acceptance)
    assert main(["--store", store, "run", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy [95% CI]" in out and "std_cot" in out
    assert "Try:" not in out  # the example queries are --report's
    assert "without starting Prefect" not in out  # train and evaluate computed: a flow ran
    # the same run again: every stage is cached, so it is recorded from the manifests, no flow
    flow_runs = len(Store(store).list_runs())
    assert main(["--store", store, "run", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "recorded without starting Prefect" in out and "test accuracy [95% CI]" in out
    runs = Store(store).list_runs()
    assert len(runs) == flow_runs + 1 and runs[-1]["status"] == "completed" and runs[-1]["prefect"] is False
    assert {o["status"] for o in runs[-1]["outcomes"]} == {"cached"} and len(runs[-1]["outcomes"]) == 6
    # an unknown stage is refused before any server would start
    assert main(["--store", store, "run", "smoke", "--stages", "trian"]) == 2
    assert "unknown stage 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "smoke", "--set", "teacher.bogus=1"], "teacher.bogus: unknown field"),
        (["run", "smoke", "--set", "teacher.samples=many"], "teacher.samples"),
        (["run", "smoke", "--stages", "nope"], "unknown stage 'nope'"),
        (["run", "smoke", "--parallel", "0"], "parallel must be at least 1"),
        (["run", "no-such-config.yaml"], "no such config file"),
        (["sql", "drop table steps"], "read-only"),
    ],
)
def test_bad_input_is_one_line(prefect_harness, tmp_path: Path, capsys, argv, message) -> None:
    from flows.cli import main

    store = str(tmp_path / "store")
    if argv[0] == "sql":
        Store(store).save_run("r", {"run_id": "r", "stages": {}})
    assert main(["--store", store, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (Path(store) / "stages").exists()


def test_malformed_data_file_names_file_and_row(prefect_harness, tmp_path: Path, capsys) -> None:
    from flows.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", \n')
    store = str(tmp_path / "store")
    rc = main(
        ["--store", store, "run", "smoke", "--stages", "dataset",
         "--set", "dataset.source=file", "--set", "dataset.task=gsm8k", "--set", f"dataset.path={data}"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "2" in err
    stages = Path(store) / "stages"
    assert not stages.exists() or not any(p.name[0] != "." for p in (stages / "dataset").glob("*") if p.is_dir())


def test_weights_stage_by_name_and_show(prefect_harness, tmp_path: Path, capsys) -> None:
    """Std-CoT skips KPOD's weights stage, but it still runs by name; `show weights` renders it."""
    from flows.cli import main

    store = str(tmp_path / "store")
    assert main(["--store", store, "run", "smoke", "--stages", "weights"]) == 0
    capsys.readouterr()
    assert main(["--store", store, "sql", "select step, avg(weight) as w from token_weights group by step", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(0 < r["w"] < 1 for r in rows)
    assert main(["--store", store, "show", "weights", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    html_path = Path(out.split("html:")[1].split()[0])
    png_path = Path(out.split("png:")[1].split()[0])
    assert "background:rgb(" in html_path.read_text() and png_path.stat().st_size > 1000
    # bad arguments are one line each, exit 2
    assert main(["--store", store, "show", "weights", "--rationale", "no-such:teacher:0"]) == 2
    assert "'no-such:teacher:0' has no token weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse's own usage error
        main(["--store", store, "show", "weights", "--limit", "0"])
    assert info.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["--store", str(a_file), "sql", "select 1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kpod: ") and "\n" not in err


def test_kpod_mentor_runs_every_stage(prefect_harness, tmp_path: Path) -> None:
    """KPOD + Mentor-KD on smoke: mentor, weights, difficulty, schedule, train, evaluate all run."""
    from flows.kpod import kpod
    from tasks.config.pipeline import load_config

    from tests.e2e.conftest import SMOKE

    # with model selection on val after each epoch
    cfg = load_config(SMOKE, ["train.method=kpod_mentor", "train.select_every=1", "train.select_max_new_tokens=32"])
    store = str(tmp_path / "store")
    done = statuses(kpod(config=cfg, store=store))
    assert {"mentor_train", "mentor_augment", "weights", "difficulty", "schedule", "train", "evaluate"} <= set(done)
    s = Store(store)
    _, rows = query(s, "select source, count(*) from rationales group by source order by source")
    assert [r[0] for r in rows] == ["mentor", "teacher"]
    _, rows = query(s, "select max(stage), min(input_steps) from schedule")
    assert rows[0] == (cfg.schedule.stages, 0)
    _, rows = query(s, "select count(*) from train_log where kd is not null")
    assert rows[0][0] > 0
    _, rows = query(s, "select epoch, n, selected from val_selection order by epoch")
    assert [r[0] for r in rows] == list(range(cfg.train.epochs)) and sum(r[2] for r in rows) == 1
    assert all(r[1] == 12 for r in rows)  # smoke's 12 val questions


def test_independent_branches_run_at_once(prefect_harness, mentor_store: str) -> None:
    """parallel=1 runs mentor_cache then weights; parallel=2 runs them side by side, same rows."""
    from flows.kpod import kpod
    from tasks.config.pipeline import load_config
    from tasks.stages.contract import plan
    from tasks.stages.registry import STAGES

    from tests.e2e.conftest import SMOKE

    cfg = load_config(SMOKE, MENTOR_CACHED)
    keys = {p.name: p.key for p in plan(cfg, STAGES)}
    s = Store(mentor_store)
    one = kpod(config=cfg, store=mentor_store, stages=BRANCHES, parallel=1)
    assert statuses(one) == dict.fromkeys(BRANCHES, "computed")
    assert not overlap(*(spans(one)[b] for b in BRANCHES)), spans(one)
    before = {b: s.read_table(b, keys[b], t) for b, t in (("mentor_cache", "mentor_logits"), ("weights", "token_weights"))}

    two = kpod(config=cfg, store=mentor_store, stages=BRANCHES, force=BRANCHES, parallel=2)
    assert [o["stage"] for o in two] == BRANCHES  # DAG order, whichever finished first
    assert statuses(two) == dict.fromkeys(BRANCHES, "computed")
    assert overlap(*(spans(two)[b] for b in BRANCHES)), spans(two)
    for b, t in (("mentor_cache", "mentor_logits"), ("weights", "token_weights")):
        assert s.read_table(b, keys[b], t).equals(before[b]), f"{b}.{t} differs when run beside the other branch"
    assert s.load_run()["status"] == "completed"

    # Prefect's results persist under the store, keyed by stage key, not in the default location
    results = s.prefect_results_dir()
    assert (results / f"kpod-weights-{keys['weights']}").is_file(), sorted(p.name for p in results.iterdir())
    assert not (Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"]) / f"kpod-weights-{keys['weights']}").exists()


def test_failed_stage_fails_run_and_nothing_below_it_runs(prefect_harness, mentor_store: str) -> None:
    """weights fails inside the stage: the flow raises its error, the independent mentor branch
    still finishes, the stages below weights never run, and the run record says failed."""
    from flows.kpod import kpod
    from tasks.config.pipeline import load_config
    from tasks.stages.contract import plan
    from tasks.stages.registry import STAGES

    from tests.e2e.conftest import SMOKE

    # a predictor that does not exist fails in weights; a new topk gives mentor_cache a new key
    cfg = load_config(SMOKE, [*MENTOR_CACHED, "weights.predictor=/nonexistent/kpod-predictor", "mentor.kd.topk=4"])
    keys = {p.name: p.key for p in plan(cfg, STAGES)}
    with pytest.raises(FileNotFoundError, match="kpod-predictor"):
        kpod(config=cfg, store=mentor_store, parallel=2)
    s = Store(mentor_store)
    run = s.load_run()
    assert run["status"] == "failed"
    assert "FileNotFoundError" in run["error"] and "kpod-predictor" in run["error"]  # why, in the record
    done = statuses(run["outcomes"])
    assert done["mentor_cache"] == "computed" and s.is_complete("mentor_cache", keys["mentor_cache"])
    below = ["weights", "difficulty", "schedule", "train", "evaluate"]
    assert not set(below) & set(done), done
    assert not any(s.is_complete(b, keys[b]) for b in below)


def test_only_independent_stages_can_overlap() -> None:
    """A chain of stages runs in the flow's own process; a fork (kpod_mentor with cached soft
    labels: mentor_cache beside weights) gets worker processes."""
    from flows.dag import can_overlap
    from tasks.config.pipeline import load_config
    from tasks.stages.contract import plan
    from tasks.stages.registry import STAGES

    from tests.e2e.conftest import SMOKE

    std = [p for p in plan(load_config(SMOKE, []), STAGES) if p.enabled]
    assert not can_overlap(std, std)
    forked = plan(load_config(SMOKE, MENTOR_CACHED), STAGES)
    todo = [p for p in forked if p.enabled]
    assert can_overlap(todo, forked)
    assert not can_overlap([p for p in todo if p.name in ("mentor_cache", "train")], forked)
    assert can_overlap([p for p in todo if p.name in BRANCHES], forked)
