"""The kpod flow on configs/smoke.yaml, in-process under the Prefect test harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage.catalog import query
from storage.store import Store

pytestmark = pytest.mark.e2e


def statuses(outcomes: list[dict]) -> dict[str, str]:
    return {o["stage"]: o["status"] for o in outcomes}


def test_cached_rerun_and_single_stage_invalidation(prefect_harness, smoke_config, tmp_path: Path) -> None:
    from flows.kpod import kpod

    store = str(tmp_path / "store")
    first = kpod(config=smoke_config, store=store)
    assert set(statuses(first).values()) == {"computed"}

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
    from flows.kpod import StageSelectionError, kpod

    with pytest.raises(StageSelectionError, match="unknown stage 'teachr'"):
        kpod(config=smoke_config, store=str(tmp_path / "s"), stages=["teachr"])
    assert not (tmp_path / "s" / "stages").exists()


def test_cli_run_sql_status(prefect_harness, tmp_path: Path, capsys) -> None:
    from flows.cli import main

    store = str(tmp_path / "store")
    assert main(["--store", store, "run", "smoke", "--stages", "rationales"]) == 0
    assert "accuracy" not in capsys.readouterr().out  # nothing evaluated, no accuracy table
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "smoke", "--set", "teacher.bogus=1"], "teacher.bogus: unknown field"),
        (["run", "smoke", "--set", "teacher.samples=many"], "teacher.samples"),
        (["run", "smoke", "--stages", "nope"], "unknown stage 'nope'"),
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
