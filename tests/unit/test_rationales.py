"""The rationales stage (tasks/stages/rationales.py, tasks/core/rationale_rows.py): pure core on hand-made
tables, and run(ctx) on a Store."""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pyarrow as pa
import pytest

from storage.schemas import conform, schema_for
from storage.store import Store
from tasks.core.answers import answer_phrases
from tasks.core.rationale_rows import build_rows, rationale_text
from tasks.stages.rationales import SPEC, build, run
from tasks.config.rationales import RationalesConfig
from tasks.stages.contract import StageContext

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _questions(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            dict(question_id=q, split="train", question=f"question {q}", answer=a, answer_type=t, meta="{}")
            for q, a, t in rows
        ],
        schema=schema_for("questions"),
    )


def _calls(rows: list[tuple], labels: dict | None = None) -> pa.Table:
    """teacher_calls rows (question, sample, completion, error); `labels` gives a call
    (question, sample) a released (teacher_answer, source_correct)."""
    labels = labels or {}
    return pa.Table.from_pylist(
        [
            dict(
                request_id=f"r-{q}-{s}", question_id=q, sample=s, prompt="p", completion=c,
                model="m", finish_reason="stop", tokens_in=1, tokens_out=1, cost_usd=0.0,
                latency_s=0.0, error=err, finished_at="2024-01-01T00:00:00",
                teacher_answer=labels.get((q, s), (None, None))[0],
                source_correct=labels.get((q, s), (None, None))[1], part="completion",
            )
            for q, s, c, err in rows
        ],
        schema=schema_for("teacher_calls"),
    )


QUESTIONS = _questions([("q1", "16", "numeric"), ("q2", "(B)", "choice"), ("q3", "5", "numeric")])
CALLS = _calls(
    [
        ("q1", 0, "First, 5 + 3 = 8 apples. Then, 8 * 2 = 16 apples. Therefore, the answer is 16.", None),
        ("q1", 1, "First, 5 + 3 = 8 apples. Then, 8 * 3 = 24 apples.\nTherefore, the answer is 24.", None),
        ("q1", 2, None, "RateLimitError: 429"),
        ("q2", 0, "Alice has the blue ball. So the correct answer is (B) blue ball.", None),
        ("q3", 0, "   \n ", None),
        ("q3", 1, "2 + 3 = 5, so the answer is 5.", None),
    ]
)


def test_build_rows_and_tables():
    counts: dict = {}
    out = build(QUESTIONS, CALLS, RationalesConfig(), counts=counts)
    assert set(out) == {"rationales", "steps"}  # no keypoint_terms given: no word_labels
    for name, table in out.items():
        conform(name, table)  # the declared schema, exactly
    r = {row["rationale_id"]: row for row in out["rationales"].to_pylist()}
    assert list(r) == ["q1:teacher:0", "q1:teacher:1", "q2:teacher:0", "q3:teacher:1"]
    assert r["q1:teacher:0"] == dict(
        rationale_id="q1:teacher:0", question_id="q1", source="teacher", sample=0,
        text="First, 5 + 3 = 8 apples. Then, 8 * 2 = 16 apples.", pred="16", correct=True, n_steps=2,
        own_correct=True, source_correct=None, correct_from="kpod",
    )
    assert (r["q1:teacher:1"]["pred"], r["q1:teacher:1"]["correct"]) == ("24", False)
    assert r["q1:teacher:1"]["text"] == "First, 5 + 3 = 8 apples. Then, 8 * 3 = 24 apples."
    assert (r["q2:teacher:0"]["pred"], r["q2:teacher:0"]["correct"]) == ("B", True)
    assert r["q2:teacher:0"]["text"] == "Alice has the blue ball."
    assert r["q3:teacher:1"]["text"] == "2 + 3 = 5."  # the phrase cut out of its own step
    # steps: spans into rationales.text, numbered from 0, n_steps of them
    steps = out["steps"].to_pylist()
    for rid, row in r.items():
        mine = [s for s in steps if s["rationale_id"] == rid]
        assert [s["step"] for s in mine] == list(range(row["n_steps"]))
        assert all(row["text"][s["char_start"] : s["char_end"]] == s["text"] for s in mine)
    assert [s["text"] for s in steps if s["rationale_id"] == "q1:teacher:0"] == [
        "First, 5 + 3 = 8 apples.", "Then, 8 * 2 = 16 apples."
    ]
    assert counts == dict(
        calls=6, answer_calls=0, skipped_error=1, skipped_empty=1, graded=4, correct=3, own_correct=3, source_flagged=0,
        source_disagree=0, no_pred=0,
        dropped_incorrect=0, dropped_short=0, teacher_accuracy=0.75, rationales=4, steps=6,
    )


def test_source_labels_trust_the_released_flag_and_keep_kpods_grade_beside_it():
    questions = _questions([("q1", "16", "numeric"), ("q2", "C", "choice"), ("q3", "7", "numeric")])
    calls = _calls(
        [
            # a flagged-correct chain that states the answer and computes on (svamp's kind)
            ("q1", 0, "He has 16 apples, as 8 + 8 = 16. Then 16 - 4 = 12.", None),
            # a two-stage row: the chain never states the answer; the second call does
            ("q2", 0, "Alice swaps with Bob, then with Claire.", None),
            ("q3", 0, "3 + 4 = 7.", None),  # no released label: kpod's grade either way
        ],
        labels={("q1", 0): (None, True), ("q2", 0): (" (C).", False)},
    )
    for mode, want in (("trust", [True, False, True]), ("regrade", [False, True, True])):
        counts: dict = {}
        out = build(questions, calls, RationalesConfig(source_labels=mode), counts=counts)
        rows = out["rationales"].to_pylist()
        assert [r["correct"] for r in rows] == want, mode
        assert [r["own_correct"] for r in rows] == [False, True, True]
        assert [r["source_correct"] for r in rows] == [True, False, None]
        src = "source" if mode == "trust" else "kpod"
        assert [r["correct_from"] for r in rows] == [src, src, "kpod"]
        assert rows[1]["pred"] == "C"  # the teacher's answer is the second call's
        assert (counts["source_flagged"], counts["source_disagree"]) == (2, 2)
        assert counts["correct"] == sum(want) and counts["own_correct"] == 2


def test_config_switches():
    counts: dict = {}
    out = build(QUESTIONS, CALLS, RationalesConfig(keep_incorrect=False), counts=counts)
    assert out["rationales"].column("correct").to_pylist() == [True, True, True]
    assert counts["dropped_incorrect"] == 1 and counts["teacher_accuracy"] == 0.75

    out = build(QUESTIONS, CALLS, RationalesConfig(min_steps=2), counts=counts)
    assert out["rationales"].column("rationale_id").to_pylist() == ["q1:teacher:0", "q1:teacher:1"]
    assert counts["dropped_short"] == 2

    out = build(QUESTIONS, CALLS, RationalesConfig(strip_answer_sentence=False))
    texts = out["rationales"].column("text").to_pylist()
    assert texts[0] == "First, 5 + 3 = 8 apples. Then, 8 * 2 = 16 apples. Therefore, the answer is 16."
    assert out["rationales"].column("n_steps").to_pylist() == [3, 3, 2, 1]

    with pytest.raises(Exception, match="extra"):
        RationalesConfig(unknown=1)
    with pytest.raises(Exception):
        RationalesConfig(min_steps=-1)


def test_bad_input_names_the_row():
    with pytest.raises(ValueError, match="question_id 'q9' is not in dataset.questions"):
        build(QUESTIONS, _calls([("q9", 0, "The answer is 1.", None)]), RationalesConfig())
    dup = _calls([("q1", 0, "The answer is 16.", None), ("q1", 0, "The answer is 16.", None)])
    with pytest.raises(ValueError, match="two successful calls for question 'q1' sample 0"):
        build(QUESTIONS, dup, RationalesConfig())
    bad_gold = _questions([("q1", "sixteen", "numeric")])
    with pytest.raises(ValueError, match="dataset.questions row 'q1'.*'sixteen' is not a valid numeric"):
        build(bad_gold, _calls([("q1", 0, "The answer is 16.", None)]), RationalesConfig())


def test_empty_calls_give_empty_tables_with_schema():
    counts: dict = {}
    out = build(QUESTIONS, CALLS.slice(0, 0), RationalesConfig(), counts=counts)
    assert out["rationales"].num_rows == 0 and out["rationales"].schema == schema_for("rationales")
    assert counts["teacher_accuracy"] is None


def test_build_rows_for_mentor_samples():
    rows = build_rows("q1", "mentor", 2, "8 * 2 = 16.\nThe answer is 16", "16", "numeric")
    assert rows.rationale["rationale_id"] == "q1:mentor:2"
    assert rows.rationale["source"] == "mentor" and rows.rationale["correct"]
    assert rows.rationale["text"] == "8 * 2 = 16."
    assert [s["rationale_id"] for s in rows.steps] == ["q1:mentor:2"]


@pytest.mark.parametrize(
    "completion, kind, want",
    [
        ("A. B. Therefore, the answer is 7.", "numeric", "A. B."),
        ("A. B.\n\nSo, the correct answer is (C) blue ball.", "choice", "A. B."),
        ("A.\nThe correct answer is:\n\n(D) 05/01/2020", "choice", "A."),  # a trailer line after it
        ("3 + 4 = 7, so the answer is 7", "numeric", "3 + 4 = 7."),
        ("Adding 3 and 4 gives 7 --> 7", "numeric", "Adding 3 and 4 gives 7."),
        ("The answer is 7.", "numeric", ""),  # nothing but the answer: no rationale
        ("The answer is 7. Because 3 + 4 = 7. Then more. Done.", "numeric",  # an early phrase stays
         "The answer is 7. Because 3 + 4 = 7. Then more. Done."),
        ("No phrase here. 3 + 4 = 7.", "numeric", "No phrase here. 3 + 4 = 7."),
    ],
)
def test_rationale_text(completion, kind, want):
    assert rationale_text(completion, kind) == want


def test_word_labels_from_keypoint_terms(monkeypatch):
    """word_labels comes from tasks.core.synthetic.word_roles with each question's terms; replaced here
    by a stub so this test checks the plumbing (ids, numbering, which terms go with which text)."""
    seen = []

    def word_roles(text, kinds):
        seen.append((text, frozenset(kinds)))
        return [(0, 5, text[:5], True, "core"), (6, 7, text[6:7], False, "filler")]

    monkeypatch.setitem(sys.modules, "tasks.core.synthetic", types.SimpleNamespace(word_roles=word_roles))
    terms = pa.Table.from_pylist(
        [dict(question_id="q1", term="16", kind="result"), dict(question_id="q1", term="+", kind="operator"),
         dict(question_id="q2", term="ball", kind="quantity")],
        schema=schema_for("keypoint_terms"),
    )
    out = build(QUESTIONS, CALLS, RationalesConfig(), keypoint_terms=terms)
    conform("word_labels", out["word_labels"])
    rows = out["word_labels"].to_pylist()
    assert [(r["rationale_id"], r["word"]) for r in rows] == [
        ("q1:teacher:0", 0), ("q1:teacher:0", 1), ("q1:teacher:1", 0), ("q1:teacher:1", 1),
        ("q2:teacher:0", 0), ("q2:teacher:0", 1),
    ]  # q3 has no terms: not labelled
    assert seen[0] == ("First, 5 + 3 = 8 apples. Then, 8 * 2 = 16 apples.", frozenset({"16", "+"}))
    assert seen[2][1] == frozenset({"ball"})


def test_word_labels_with_the_real_synthetic_labeller():
    synthetic = pytest.importorskip("tasks.core.synthetic")
    terms = pa.Table.from_pylist(
        [dict(question_id="q1", term=t, kind="quantity" if t == "apples" else "number")
         for t in ("5", "3", "8", "16", "+", "*", "=", "apples")],
        schema=schema_for("keypoint_terms"),
    )
    out = build(QUESTIONS, CALLS.slice(0, 1), RationalesConfig(), keypoint_terms=terms)
    text = out["rationales"].column("text")[0].as_py()
    rows = out["word_labels"].to_pylist()
    assert all(text[r["char_start"] : r["char_end"]] == r["text"] for r in rows)
    assert [r["text"] for r in rows if r["keypoint"]] == ["5", "+", "3", "=", "8", "apples", "8", "*", "=", "16", "apples"]
    assert {r["text"] for r in rows if not r["keypoint"]} == {"First", "Then", "2"}
    # every number is core (2 is no term of this stub's list, yet a number), "apples" is context
    roles = {r["text"]: r["role"] for r in rows}
    assert roles["2"] == roles["16"] == roles["+"] == "core" and roles["apples"] == "context"
    assert roles["First"] == roles["Then"] == "filler"
    assert synthetic.word_roles is not None


# ---- run(ctx) on a real Store -------------------------------------------------------------
def _commit(store: Store, stage: str, key: str, tables: dict[str, pa.Table]) -> None:
    with store.lock(stage, key), store.writing(stage, key, {}) as w:
        for name, t in tables.items():
            w.write_table(name, t)


def _run_stage(tmp_path: Path, with_terms: bool) -> tuple[Store, str]:
    store = Store(tmp_path)
    dataset = {"questions": QUESTIONS}
    if with_terms:
        dataset["keypoint_terms"] = pa.Table.from_pylist(
            [dict(question_id="q1", term="16", kind="result")], schema=schema_for("keypoint_terms")
        )
    _commit(store, "dataset", "dkey", dataset)
    _commit(store, "teacher", "tkey", {"teacher_calls": CALLS})
    config = types.SimpleNamespace(rationales=RationalesConfig())
    keys = {"dataset": "dkey", "teacher": "tkey", "rationales": "rkey"}
    with store.writing("rationales", "rkey", {}) as writer:
        ctx = StageContext(store, SPEC, "rkey", config, keys, writer, show_progress=False)
        run(ctx)
        writer.summary.update(ctx.summary)
    return store, "rkey"


def test_run_writes_tables_and_summary(tmp_path):
    store, key = _run_stage(tmp_path, with_terms=False)
    m = store.manifest("rationales", key)
    assert m["tables"]["rationales"]["rows"] == 4 and m["tables"]["steps"]["rows"] == 6
    assert "word_labels" not in m["tables"]
    assert m["summary"]["teacher_accuracy"] == 0.75 and m["summary"]["skipped_error"] == 1
    assert store.read_table("rationales", key, "rationales").column("pred").to_pylist() == ["16", "24", "B", "5"]


def test_run_writes_word_labels_when_the_dataset_has_keypoints(tmp_path):
    pytest.importorskip("tasks.core.synthetic")
    store, key = _run_stage(tmp_path, with_terms=True)
    labels = store.read_table("rationales", key, "word_labels").to_pylist()
    assert {r["rationale_id"] for r in labels} == {"q1:teacher:0", "q1:teacher:1"}
    assert [r["text"] for r in labels if r["keypoint"]] == ["16"]


# ---- real teacher output ------------------------------------------------------------------
@pytest.mark.parametrize("task, kind", [("date_understanding", "choice"), ("last_letter_concatenation", "string")])
def test_real_completions_round_trip_through_the_student_format(task, kind):
    """On gpt-3.5 completions: stripping never changes the graded answer, leaves a non-empty
    rationale, and the student format built on it grades as the gold answer."""
    path = DATA / "mentor-kd" / f"{task}_teacher6.json"
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data relative to the repo)")
    rows = json.loads(path.read_text())
    random.seed(0)
    sample = random.sample([(r["label"], o) for r in rows for o in r["output"]], 300)
    from tasks.core.answers import extract, grade

    left = 0
    for i, (gold, completion) in enumerate(sample):
        rr = build_rows(f"q{i}", "teacher", 0, completion, gold, kind)
        assert rr.rationale["text"] and rr.rationale["n_steps"] >= 1
        assert rr.rationale["pred"] == extract(completion, kind)
        student = f"{rr.rationale['text']} Therefore, the answer is {gold}."
        assert grade(extract(student, kind), gold, kind)
        last = rr.steps[-1]["text"]
        left += bool(answer_phrases(last, kind))
    assert left <= 3  # an answer phrase survives in the last step only in rare odd layouts


def test_scripted_synthetic_rationales_grade_and_segment_exactly():
    """The synthetic teacher's text: one sentence per arithmetic step, then the answer sentence.
    Stripped and segmented, a k-step problem gives exactly k steps, and correct iff no error."""
    synthetic = pytest.importorskip("tasks.core.synthetic")
    problems = synthetic.generate(synthetic.SyntheticConfig(seed=3, n_train=60, n_val=0, n_test=0, max_steps=5))
    rng = random.Random(0)
    errors = {p.question_id: rng.random() < 0.3 for p in problems}
    questions = _questions([(p.question_id, str(p.answer), "numeric") for p in problems])
    calls = _calls(
        [(p.question_id, 0, synthetic.render_rationale(p, rng, error=errors[p.question_id]), None) for p in problems]
    )
    out = build(questions, calls, RationalesConfig())
    by_id = {p.question_id: p for p in problems}
    assert out["rationales"].num_rows == len(problems)
    for row in out["rationales"].to_pylist():
        p = by_id[row["question_id"]]
        assert row["correct"] is (not errors[p.question_id])
        assert row["n_steps"] == p.n_steps, row["text"]
        assert "answer" not in row["text"]
