"""The `lineage` view and `kpod lineage`: a question from its teacher calls to its predictions,
over the smoke store (tests/support/export_store.py), for a KPOD run, a Std-CoT run and a run
that stopped after the teacher."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from storage.catalog import query
from tests.support.export_store import SmokeStore, smoke_store


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> SmokeStore:
    s = smoke_store(tmp_path_factory)
    # a run that stopped after the teacher: its lineage has questions and calls, nothing below
    keys = {k: v for k, v in s.keys["run_std"].items() if k in ("dataset", "teacher")}
    s.store.save_run("run_teacher", {"run_id": "run_teacher", "started_at": "0", "stages": keys, "status": "failed"})
    return s


def _table(smoke: SmokeStore, run: str, stage: str, table: str) -> list[dict]:
    return smoke.store.read_table(stage, smoke.keys[run][stage], table).to_pylist()


def _lineage(smoke: SmokeStore, where: str, run: str | None = None) -> list[dict]:
    cols, rows = query(smoke.store, f"select * from lineage where {where} order by rationale_id", run_id=run)
    return [dict(zip(cols, r)) for r in rows]


def test_a_train_questions_lineage_from_teacher_calls_to_schedule(smoke) -> None:
    keys = smoke.keys["run_kpod"]
    rationales = _table(smoke, "run_kpod", "rationales", "rationales")
    # a question whose rationales are all correct, so each has schedule input steps
    qid = next(q for q in (r["question_id"] for r in rationales)
               if all(r["correct"] for r in rationales if r["question_id"] == q))
    rows = _lineage(smoke, f"question_id = '{qid}'")
    calls = {c["request_id"]: c for c in _table(smoke, "run_kpod", "teacher", "teacher_calls") if c["question_id"] == qid}
    assert {r["request_id"] for r in rows} == set(calls) and len(rows) == len(calls) == 2
    assert [r["rationale_id"] for r in rows] == sorted(r["rationale_id"] for r in rationales if r["question_id"] == qid)
    steps = _table(smoke, "run_kpod", "rationales", "steps")
    weights = _table(smoke, "run_kpod", "weights", "token_weights")
    schedule = _table(smoke, "run_kpod", "schedule", "schedule")
    for r in rows:
        rid = r["rationale_id"]
        assert (r["run_id"], r["teacher_key"], r["rationales_key"]) == ("run_kpod", keys["teacher"], keys["rationales"])
        assert r["tokens_out"] == calls[r["request_id"]]["tokens_out"] and r["sample"] == calls[r["request_id"]]["sample"]
        assert r["steps"] == sum(s["rationale_id"] == rid for s in steps) > 0
        mine = [w["weight"] for w in weights if w["rationale_id"] == rid]
        assert r["weighted_tokens"] == len(mine) and r["mean_weight"] == pytest.approx(sum(mine) / len(mine))
        assert list(r["schedule_input_steps"]) == [s["input_steps"] for s in sorted(schedule, key=lambda s: s["stage"]) if s["rationale_id"] == rid]
        assert (r["weights_key"], r["schedule_key"], r["train_key"]) == (keys["weights"], keys["schedule"], keys["train"])
        assert r["trained"] == r["rationale_correct"]
        assert r["evaluate_key"] is None  # train questions are not evaluated


def test_a_test_questions_prediction_and_the_teacher_calls_that_fed_it(smoke) -> None:
    preds = {p["question_id"]: p for p in _table(smoke, "run_kpod", "evaluate", "predictions")}
    qid = next(q for q, p in preds.items() if p["split"] == "test")
    [row] = _lineage(smoke, f"question_id = '{qid}'")
    assert row["prediction_correct"] == preds[qid]["correct"] and row["evaluate_key"] == smoke.keys["run_kpod"]["evaluate"]
    assert row["request_id"] is None  # the teacher answered train questions only
    _, fed = query(smoke.store, "select distinct l.request_id from lineage l join lineage t using (train_key) "
                   f"where t.question_id = '{qid}' and l.trained")
    correct_train = {(r["question_id"], r["sample"]) for r in _table(smoke, "run_kpod", "rationales", "rationales") if r["correct"]}
    want = {c["request_id"] for c in _table(smoke, "run_kpod", "teacher", "teacher_calls")
            if (c["question_id"], c["sample"]) in correct_train}
    assert {r[0] for r in fed} == want and want


def test_std_cot_run_builds_the_view_without_weights_or_schedule(smoke) -> None:
    _, rows = query(smoke.store, "select count(*), count(weights_key), count(schedule_input_steps), count(trained), "
                    "sum(trained::int), count(evaluate_key) from run_run_std.lineage")
    total, weights, schedule, flagged, trained, evaluated = rows[0]
    assert weights == schedule == 0  # the KPOD run computed weights with the same key: not used here
    assert flagged == sum(1 for r in _table(smoke, "run_std", "rationales", "rationales"))
    assert 0 < trained < flagged and evaluated == 24 and total > flagged
    assert _lineage(smoke, "true", run="run_std")[0]["train_key"] == smoke.keys["run_std"]["train"]


def test_a_run_without_rationales_still_has_a_valid_view(smoke) -> None:
    _, rows = query(smoke.store, "select count(*), count(request_id), count(rationale_id), count(train_key) "
                    "from run_run_teacher.lineage")
    calls = _table(smoke, "run_std", "teacher", "teacher_calls")
    questions = _table(smoke, "run_std", "dataset", "questions")
    alone = sum(q["question_id"] not in {c["question_id"] for c in calls} for q in questions)  # val, test
    assert rows == [(len(calls) + alone, len(calls), 0, 0)] and alone == 24


def test_kpod_lineage_prints_a_summary_and_rows(smoke, capsys) -> None:
    rationales = _table(smoke, "run_kpod", "rationales", "rationales")
    qid = rationales[0]["question_id"]
    assert main(["--store", str(smoke.store.root), "lineage", qid]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"question {qid} (train), run run_kpod")
    assert all(c["request_id"] in out for c in _table(smoke, "run_kpod", "teacher", "teacher_calls") if c["question_id"] == qid)
    assert f"{rationales[0]['rationale_id']}  " in out and "mean weight" in out and "trained on" in out
    assert main(["--store", str(smoke.store.root), "lineage", qid, "--run", "run_std", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["run_id"] for r in rows} == {"run_std"} and all(r["mean_weight"] is None for r in rows)


def test_unknown_question_is_one_line(smoke, capsys) -> None:
    assert main(["--store", str(smoke.store.root), "lineage", "no-such-question"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no question 'no-such-question' in run run_kpod" in err


def test_every_declared_table_has_an_empty_typed_source():
    """A stage a run lacks stands in as its table's declared columns with no rows: every
    declared schema (nested list and struct columns included) must become DuckDB SQL."""
    import duckdb

    from storage.lineage import _empty
    from storage.schemas import SCHEMAS

    con = duckdb.connect()
    for table, schema in SCHEMAS.items():
        cols = [d[0] for d in con.execute(_empty(table)).description]
        assert cols == [f.name for f in schema] + ["_stage", "_key"], table
