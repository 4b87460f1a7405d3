"""The evaluate stage: Wilson intervals, grading, metrics, and the stage end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from storage.store import Store
from tasks.core import generation
from tasks.stages import evaluate
from tasks.config.evaluate import EvaluateConfig
from tasks.core import grading
from tasks.core.grading import grade_outputs, select_questions, split_metrics, wilson_interval
from tasks.core.models import build_student, save_model
from tasks.config.student import StudentConfig
from tasks.stages.contract import execute


# ---- Wilson interval ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "k, n, low, high",
    # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (Wilson score, no correction)
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_published_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def _wilson_by_quadratic(k: int, n: int, z: float) -> tuple[float, float]:
    """The interval as the set of p with |p_hat - p| <= z sqrt(p(1-p)/n): roots of
    (1 + z^2/n) p^2 - (2 p_hat + z^2/n) p + p_hat^2 = 0."""
    ph = k / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


@pytest.mark.parametrize("n", [1, 7, 50, 659])
def test_wilson_equals_the_score_test_inversion(n):
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        for z in (1.0, grading.Z95, 2.5758):
            got = wilson_interval(k, n, z)
            want = _wilson_by_quadratic(k, n, z)
            assert got == pytest.approx(want, abs=1e-12)
            assert 0.0 <= got[0] <= k / n <= got[1] <= 1.0


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="correct=5, n=4"):
        wilson_interval(5, 4)


# ---- pure core ----------------------------------------------------------------------------
def _questions() -> pa.Table:
    rows = [
        ("q-train-0", "train", "Q0", "5", "numeric"),
        ("q-test-0", "test", "What is 3 + 4?", "7", "numeric"),
        ("q-val-0", "val", "What is 1 + 1?", "2", "numeric"),
        ("q-test-1", "test", "What is 10 - 4?", "6", "numeric"),
        ("q-val-1", "val", "Pick one", "(B)", "choice"),
        ("q-test-2", "test", "What is 2 * 6?", "12", "numeric"),
    ]
    cols = list(zip(*rows))
    return pa.table(
        {
            "question_id": cols[0],
            "split": cols[1],
            "question": cols[2],
            "answer": cols[3],
            "answer_type": cols[4],
            "meta": ["{}"] * len(rows),
        }
    )


def test_select_questions_orders_splits_and_limits():
    sel = select_questions(_questions(), ["val", "test"], limit=2)
    assert sel.column("question_id").to_pylist() == ["q-val-0", "q-val-1", "q-test-0", "q-test-1"]
    assert select_questions(_questions(), ["test"], None).num_rows == 3
    with pytest.raises(ValueError, match=r"split 'dev' has no questions .*'test', 'train', 'val'"):
        select_questions(_questions(), ["dev"], None)


def test_grade_outputs_and_metrics():
    sel = select_questions(_questions(), ["val", "test"], None)
    outputs = [
        "1 + 1 = 2. Therefore, the answer is 2.",  # right
        "The answer is (C).",  # wrong letter
        "3 + 4 = 7. Therefore, the answer is 7.0.",  # right: 7.0 == 7
        "no number here",  # no answer: pred null, wrong
        "2 * 6 = 12. Therefore, the answer is 1,2.",  # wrong
    ]
    preds = grade_outputs(sel, outputs)
    assert preds.column("pred").to_pylist() == ["2", "C", "7", None, "1"]
    assert preds.column("correct").to_pylist() == [True, False, True, False, False]
    assert preds.column("answer").to_pylist() == ["2", "(B)", "7", "6", "12"]

    metrics = split_metrics(preds, "std_cot", 3).to_pylist()
    assert [(m["split"], m["n"], m["correct"]) for m in metrics] == [("val", 2, 1), ("test", 3, 1)]
    test = metrics[1]
    assert test["accuracy"] == pytest.approx(1 / 3)
    assert (test["ci_low"], test["ci_high"]) == pytest.approx(wilson_interval(1, 3))
    assert test["method"] == "std_cot" and test["seed"] == 3


def test_bad_gold_answer_names_the_question():
    sel = select_questions(_questions(), ["val"], None)
    bad = sel.set_column(3, "answer", pa.array(["2", "maybe"]))
    with pytest.raises(ValueError, match="q-val-1"):
        grade_outputs(bad, ["2", "B"])


def test_config_is_validated():
    with pytest.raises(ValueError):
        EvaluateConfig(splits=[])
    with pytest.raises(ValueError):
        EvaluateConfig(splits=["val", "val"])
    with pytest.raises(ValueError):
        EvaluateConfig(unknown=1)
    # batch_size and device cannot change outputs: they stay out of the stage key
    assert "batch_size" not in EvaluateConfig().hashable()
    assert "device" not in EvaluateConfig().hashable()


# ---- the stage end to end -----------------------------------------------------------------
KEYS = {"dataset": "d" * 16, "train": "t" * 16, "evaluate": "e" * 16}


@pytest.fixture()
def store(tmp_path) -> Store:
    """A store holding a committed `dataset` and a `train` artifact with a tiny student."""
    store = Store(tmp_path / "store")
    questions = _questions()
    with store.writing("dataset", KEYS["dataset"], {}) as w:
        w.write_table("questions", questions)
    corpus = [f"Q: {q}\nA: x. Therefore, the answer is 1." for q in questions.column("question").to_pylist()]
    model, tok = build_student(
        StudentConfig(hidden=16, layers=1, heads=2, intermediate=32, vocab_size=300), corpus
    )
    with store.writing("train", KEYS["train"], {}) as w:
        save_model(model, tok, w.path("model"))
    return store


def _config(**evaluate_fields) -> SimpleNamespace:
    return SimpleNamespace(
        evaluate=EvaluateConfig(device="cpu", **evaluate_fields),
        train=SimpleNamespace(method="std_cot", seed=1),
        mentor=None, schedule=None,
    )


def test_stage_with_a_real_tiny_student(store):
    torch.manual_seed(0)
    cfg = _config(limit=2, max_new_tokens=4, batch_size=3)
    out = execute(evaluate.SPEC, cfg, KEYS, store, show_progress=False)
    assert out.status == "computed"
    assert out.rows == {"predictions": 4, "metrics": 2}
    preds = store.read_table("evaluate", KEYS["evaluate"], "predictions")
    assert preds.column("split").to_pylist() == ["val", "val", "test", "test"]
    assert all(isinstance(o, str) for o in preds.column("output").to_pylist())
    metrics = store.read_table("evaluate", KEYS["evaluate"], "metrics").to_pylist()
    assert [m["split"] for m in metrics] == ["val", "test"]
    assert set(out.summary["accuracy"]) == {"val", "test"}
    again = execute(evaluate.SPEC, cfg, KEYS, store, show_progress=False)
    assert again.status == "cached"


def test_stage_grades_what_the_student_wrote(store, monkeypatch):
    """Scripted completions: the stage's tables follow from them through the shared grader."""
    scripted = {
        "What is 1 + 1?": "1 + 1 = 2. Therefore, the answer is 2.",
        "Pick one": "Therefore, the answer is (B).",
        "What is 3 + 4?": "Therefore, the answer is 8.",
        "What is 10 - 4?": "10 - 4 = 6. Therefore, the answer is 6.",
        "What is 2 * 6?": "Therefore, the answer is 12.",
    }
    seen_prompts = []

    def fake_generate_ids(model, tokenizer, prompts, batch_size, max_new_tokens, progress=None):
        texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        seen_prompts.extend(texts)
        if progress:
            progress(len(prompts))
        return [scripted[t.removeprefix("Q: ").removesuffix("\nA:")] for t in texts]

    monkeypatch.setattr(generation, "generate_ids", fake_generate_ids)
    out = execute(evaluate.SPEC, _config(), KEYS, store, show_progress=False)
    assert "Q: What is 1 + 1?\nA:" in seen_prompts and len(seen_prompts) == 5  # the training prompt format
    assert out.summary["accuracy"] == {"val": 1.0, "test": round(2 / 3, 4)}
    metrics = {m["split"]: m for m in store.read_table("evaluate", KEYS["evaluate"], "metrics").to_pylist()}
    assert (metrics["test"]["n"], metrics["test"]["correct"]) == (3, 2)
    assert metrics["val"]["ci_high"] == 1.0 and metrics["val"]["ci_low"] == pytest.approx(wilson_interval(2, 2)[0])


def test_a_killed_evaluation_resumes_with_the_questions_left(store, monkeypatch):
    """The stage fails after its first chunk (2 questions): the rerun generates the other 3 only,
    and its tables equal an uninterrupted run's."""
    from tasks.core import saved_generation

    def fake(model, tokenizer, prompts, batch_size, max_new_tokens, progress=None):
        texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        asked.append(len(texts))
        if len(asked) == 2 and fail:
            raise RuntimeError("out of memory")
        return [f"Therefore, the answer is {len(t) % 3}." for t in texts]

    monkeypatch.setattr(generation, "generate_ids", fake)
    monkeypatch.setattr(saved_generation, "CHUNK_BATCHES", 2)
    asked, fail = [], True
    with pytest.raises(RuntimeError, match="out of memory"):
        execute(evaluate.SPEC, _config(batch_size=1), KEYS, store, show_progress=False)
    asked, fail = [], False
    out = execute(evaluate.SPEC, _config(batch_size=1), KEYS, store, show_progress=False)
    assert asked == [2, 1] and out.summary["resumed_completions"] == 2
    resumed = store.read_table("evaluate", KEYS["evaluate"], "predictions")
    asked = []
    whole = execute(evaluate.SPEC, _config(batch_size=1), KEYS, store, show_progress=False, force=True)
    assert asked == [2, 2, 1] and "resumed_completions" not in whole.summary
    assert store.read_table("evaluate", KEYS["evaluate"], "predictions").equals(resumed)


# ---- the end-of-run report ----------------------------------------------------------------
def test_format_report_tables_and_sql_examples_run(store, monkeypatch):
    import duckdb

    from tasks.core.report import SQL_EXAMPLES, format_report

    monkeypatch.setattr(
        generation, "generate_ids", lambda m, t, prompts, *a, **k: ["The answer is 2."] * len(prompts)
    )
    execute(evaluate.SPEC, _config(), KEYS, store, show_progress=False)
    metrics = store.read_table("evaluate", KEYS["evaluate"], "metrics").to_pylist()
    stages = [
        {"stage": "dataset", "status": "cached", "seconds": 0.01},
        {"stage": "train", "status": "computed", "seconds": 95.25},
        {"stage": "evaluate", "status": "computed", "seconds": 4.5},
    ]
    text = format_report(stages, metrics)
    lines = text.splitlines()
    row = next(ln for ln in lines if ln.strip().startswith("std_cot"))
    # val: "2" is right for q-val-0 only (1 of 2); test: none of 3
    lo, hi = wilson_interval(1, 2)
    assert f"0.500 [{lo:.3f}, {hi:.3f}] n=2" in row
    assert row.index("n=2") < row.index("0.000 [0.000")  # val column before test
    assert any(ln.split() == ["total", "99.8"] for ln in lines)
    assert any(ln.split() == ["train", "computed", "95.2"] or ln.split() == ["train", "computed", "95.3"] for ln in lines)
    assert sum('kpod sql "' in ln for ln in lines) == 2

    # the example queries run against the tables they name
    con = duckdb.connect()
    for table, stage in (("metrics", "evaluate"), ("predictions", "evaluate"), ("questions", "dataset")):
        path = store.table_path(stage, KEYS[stage], table)
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{path}')")
    assert len(con.execute(SQL_EXAMPLES[0]).fetchall()) == 2
    wrong = con.execute(SQL_EXAMPLES[1]).fetchall()
    assert len(wrong) == 3 and {w[2] for w in wrong} == {"2"}


def test_format_report_without_metrics():
    from tasks.core.report import format_report

    text = format_report([{"stage": "dataset", "status": "computed", "seconds": 1.0}], [])
    assert "no metrics" in text and "dataset" in text


def test_report_total_is_wall_time_when_stages_overlap():
    from tasks.core.report import timing_lines

    stages = [
        dict(stage="weights", status="computed", seconds=10.0,
             started_at="2026-11-28T10:00:00+00:00", finished_at="2026-11-28T10:00:10+00:00"),
        dict(stage="mentor_cache", status="computed", seconds=8.0,
             started_at="2026-11-28T10:00:02+00:00", finished_at="2026-11-28T10:00:10+00:00"),
    ]
    assert timing_lines(stages)[-1].split()[-1] == "10.0"  # not 18.0
    assert timing_lines([{k: v for k, v in s.items() if "_at" not in k} for s in stages])[-1].split()[-1] == "18.0"
