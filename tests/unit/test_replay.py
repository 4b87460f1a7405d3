"""The replay teacher: recorded output found by question text, sample i -> i-th completion.

The shared-data tests replay every recorded file through the backend (prompts rendered by the
real template) and grade the replayed text with tasks/core/answers.py; where a file carries its own
`initial_correct` flags, grading must agree with them at the rate measured when this test was
written (a floor a little under it: an extractor change that breaks agreement fails here).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from storage.store import Store
from tasks.core.answers import extract, grade
from tasks.core.prompts import Exemplar, get_template
from tasks.teacher_backends.teach import teach
from tasks.config.teacher import TeacherConfig
from tasks.teacher_backends.base import TeacherRequest
from tasks.teacher_backends.replay import (
    QuestionIndex,
    Recorded,
    ReplayBackend,
    gsm8k_rationale,
    load_recorded,
    make_backend,
    normalize,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MENTOR = DATA / "mentor-kd"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


def _request(question: str, sample: int = 0, template: str = "zero_shot_cot", exemplars=()) -> TeacherRequest:
    r = get_template(template).render(question, exemplars)
    return TeacherRequest(f"r-{sample}", "q", sample, r.messages, r.prompt, "replay")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- formats and lookup --------------------------------------------------------------------
def test_gsm8k_rationale_strips_annotations_and_states_the_answer():
    solution = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert gsm8k_rationale(solution) == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18.\nTherefore, the answer is 18."
    )
    with pytest.raises(ValueError, match="no '#### answer'"):
        gsm8k_rationale("no final line")


def test_each_format_is_read_and_samples_follow_file_order(tmp_path):
    gsm = _write_jsonl(tmp_path / "g.jsonl", [{"question": "Q one?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"}])
    mk = tmp_path / "m_3_train.json"
    mk.write_text(json.dumps([{"input": "Q  two?\n", "chain": f"c{i}", "answer": "2"} for i in range(3)]))
    raw = tmp_path / "m_teacher6.json"
    raw.write_text(json.dumps([{"instruction": "Q three?", "output": ["a", "b"], "label": "x"}]))
    gen = _write_jsonl(
        tmp_path / "any.jsonl",
        [{"question": "Q four?", "completion": "d0"}, {"question": "Q four?", "completions": ["d1", "d2"]}],
    )
    table = load_recorded([gsm, mk, raw, gen])
    assert {q: [r.completion for r in recs] for q, recs in table.items()} == {
        "Q one?": ["1 + 1 = 2\nTherefore, the answer is 2."],
        "Q two?": ["c0", "c1", "c2"],  # whitespace-normalised key
        "Q three?": ["a", "b"],
        "Q four?": ["d0", "d1", "d2"],
    }
    backend = ReplayBackend(table)
    got = [backend.lookup(_request("Q two?", i)).completion for i in range(3)]
    assert got == ["c0", "c1", "c2"]
    past = backend.lookup(_request("Q two?", 3))
    assert past.completion is None and "has 3 recorded completion(s); sample 3" in past.error


def test_test_rows_join_reasoning_and_answer_calls(tmp_path):
    f = tmp_path / "t_test.json"
    f.write_text(json.dumps([{"input": "Q?", "chain": " reasoning. ", "completion": " (C).", "answer": "C",
                              "initial_correct": False}]))
    # the joined text, the second call's answer as its own field, and the file's flag
    assert load_recorded([f]) == {"Q?": [Recorded(" reasoning.\nTherefore, the answer is (C).", " (C).", False)]}
    res = ReplayBackend(load_recorded([f])).lookup(_request("Q?"))
    assert (res.teacher_answer, res.source_correct) == (" (C).", False)


def test_bad_rows_name_the_file_and_row(tmp_path):
    f = _write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(ValueError, match=r"x\.jsonl line 2: no recorded completion in fields \['prompt'\]"):
        load_recorded([f])
    with pytest.raises(ValueError, match=r"x\.jsonl line 1: .*expected gsm8k"):
        load_recorded([f], fmt="gsm8k")  # a forced format does not fall back to another
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: not JSON"):
        load_recorded([bad])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recorded([tmp_path / "missing.jsonl"])


def test_lookup_finds_the_target_question_after_few_shot_exemplars():
    target = "Tom has 3 apples and buys 4 more apples at the shop. How many apples?"
    exemplar = "Ann has 2 pears and buys 5 more pears at the market. How many pears?"
    inner = "How many apples?"  # a recorded question inside the target's text
    backend = ReplayBackend({normalize(q): [Recorded(q.upper())] for q in (target, exemplar, inner)})
    ex = [Exemplar(exemplar, "2 + 5 = 7.", "7")]
    for template in ("zero_shot_cot", "few_shot_cot"):
        res = backend.lookup(_request(target, template=template, exemplars=ex))
        assert res.completion == target.upper(), template
    # the text form (legacy completions: exemplars and question in one prompt)
    r = get_template("few_shot_cot").render(target, ex)
    req = TeacherRequest("r", "q", 0, (), r.prompt, "replay")
    assert backend.lookup(req).completion == target.upper()
    missing = backend.lookup(_request("Nobody recorded this question at all, did they?"))
    assert missing.completion is None and "no recorded completion" in missing.error


def test_index_matches_a_naive_substring_scan():
    # naive reference: every recorded question that occurs, best = (last end, then longest)
    qs = ["abc", "the cat sat on the mat today and then left the room", "sat on the mat today and then left the room",
          "b", "a dog ran across the long green field near the river bank", "zzz"]
    idx = QuestionIndex(qs)
    texts = ["Q: the cat sat on the mat today and then left the room\nA: step", "x abc b y", "nothing here",
             "Q: a dog ran across the long green field near the river bank? Q: abc"]
    for text in texts:
        hits = [(text.rfind(q) + len(q), len(q), q) for q in qs if q in text]
        want = max(hits)[2] if hits else None
        assert idx.find(text) == want, text


def test_make_backend_reads_the_config(tmp_path):
    f = _write_jsonl(tmp_path / "r.jsonl", [{"question": "What is 2+2?", "completion": "4. Therefore, the answer is 4."}])
    backend = make_backend(TeacherConfig(backend="replay", replay_path=str(f), replay_format="jsonl"))
    res = asyncio.run(backend.complete(_request("What is 2+2?")))
    assert res.error is None and res.completion.endswith("the answer is 4.") and res.finish_reason == "stop"


# ---- the shared recorded files ------------------------------------------------------------
ANSWER_TYPE = {
    "svamp": "numeric",
    "last_letter_concatenation": "string",
    "date_understanding": "choice",
    "tracking_shuffled_objects": "choice",
}

# measured agreement of grade(extract(replayed)) with the files' initial_correct flags:
# date 3_train .981, test .829; last_letter 3_train .990, test .973; tracking 3_train .989,
# test .880; svamp 3_train .773 (its flags were not set by last-number extraction: a quarter of
# its chains state the answer and then compute on, "... 3 games, as 7 + 7 + 7 = 21.").
AGREEMENT_FLOOR = {
    "date_understanding_3_train.json": 0.97,
    "date_understanding_test.json": 0.80,
    "last_letter_concatenation_3_train.json": 0.98,
    "last_letter_concatenation_test.json": 0.95,
    "tracking_shuffled_objects_3_train.json": 0.98,
    "tracking_shuffled_objects_test.json": 0.85,
    "svamp_3_train.json": 0.75,
}


def _replay_file(path: Path, rows: list[dict], question_key: str) -> list[tuple[dict, str]]:
    """Each row's recorded completion(s) as the backend replays them (sample i = i-th)."""
    backend = ReplayBackend.from_files([path])
    seen: Counter[str] = Counter()
    out = []
    for row in rows:
        q = row[question_key]
        for _ in row["output"] if "output" in row else [None]:
            i = seen[normalize(q)]
            seen[normalize(q)] += 1
            res = asyncio.run(backend.complete(_request(q, i)))
            assert res.error is None, res.error
            out.append((row, res.completion))
    return out


@needs_data
@pytest.mark.parametrize("name", sorted(AGREEMENT_FLOOR))
def test_replayed_mentor_kd_grading_agrees_with_the_files_flags(name):
    path = MENTOR / name
    rows = json.loads(path.read_text())
    task = next(t for t in ANSWER_TYPE if name.startswith(t))
    replayed = _replay_file(path, rows, "input")
    assert len(replayed) == len(rows)
    if "completion" not in rows[0]:  # a train file: the replayed text is the row's chain
        assert all(text == row["chain"] for row, text in replayed)
    agree = sum(
        grade(extract(text, ANSWER_TYPE[task]), row["answer"], ANSWER_TYPE[task]) == row["initial_correct"]
        for row, text in replayed
    )
    assert agree / len(rows) >= AGREEMENT_FLOOR[name], f"{name}: agreement {agree / len(rows):.3f}"


@needs_data
@pytest.mark.parametrize("task", ["date_understanding", "last_letter_concatenation"])
def test_replayed_raw_teacher6_outputs(task):
    # no flags in these files: all six outputs of every question replay in order, and the
    # recorded gpt-3.5 answers grade correct at the measured rate (.989 date, .987 letters)
    path = MENTOR / f"{task}_teacher6.json"
    rows = json.loads(path.read_text())
    replayed = _replay_file(path, rows, "instruction")
    assert [t for _, t in replayed] == [o for r in rows for o in r["output"]]
    at = ANSWER_TYPE[task]
    correct = sum(grade(extract(t, at), row["label"], at) for row, t in replayed)
    assert correct / len(replayed) >= 0.97


@needs_data
def test_replayed_gsm8k_solutions_grade_correct_through_the_teacher_stage(tmp_path):
    path = DATA / "gsm8k" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    questions = pa.table(
        {
            "question_id": [f"gsm8k-test-{i}" for i in range(len(rows))],
            "split": ["train"] * len(rows),
            "question": [r["question"] for r in rows],
            "meta": ["{}"] * len(rows),
        }
    )
    cfg = TeacherConfig(backend="replay", model="gsm8k-gold", replay_path=str(path), concurrency=64)
    table, stats, summary = teach(questions, cfg, Store(tmp_path / "store"))
    assert table.num_rows == len(rows) and summary["errors"] == 0
    by_id = dict(zip(table.column("question_id").to_pylist(), table.column("completion").to_pylist()))
    for i, row in enumerate(rows):
        text = by_id[f"gsm8k-test-{i}"]
        assert "<<" not in text
        gold = row["answer"].split("####")[-1].strip()
        assert grade(extract(text, "numeric"), gold, "numeric"), (i, text[-120:])


@needs_data
def test_a_file_without_completions_is_refused_clearly():
    with pytest.raises(ValueError, match=r"svamp_test\.json row 0: no recorded completion"):
        load_recorded([MENTOR / "svamp_test.json"])


# ---- bad recorded files: one line each, naming the file and row (kpod prints it, exit 2) ----
def test_a_too_long_recorded_rationale_is_refused_naming_file_and_row(tmp_path):
    from tasks.teacher_backends.base import TeacherInputError

    f = _write_jsonl(tmp_path / "r.jsonl", [{"question": "a?", "completion": "ok"}, {"question": "b?", "completion": "y" * 50}])
    with pytest.raises(TeacherInputError, match=r"r\.jsonl line 2: a recorded rationale of 50 characters is longer than teacher\.replay_max_chars \(10\)"):
        make_backend(TeacherConfig(backend="replay", replay_path=str(f), replay_max_chars=10))
    assert make_backend(TeacherConfig(backend="replay", replay_path=str(f))).recorded["b?"] == [Recorded("y" * 50)]


def test_bad_replay_input_is_a_user_error_of_one_line(tmp_path):
    from flows.errors import user_error
    from tasks.teacher_backends.requests import check_requests

    binary = tmp_path / "rec.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    wrong_format = _write_jsonl(tmp_path / "w.jsonl", [{"question": "a?", "completion": "b"}])
    broken_list = tmp_path / "l.json"
    broken_list.write_text('[{"question": "a?", ')
    errors = []
    for path, fmt in ((binary, "auto"), (wrong_format, "mentor_kd"), (broken_list, "auto")):
        with pytest.raises(ValueError) as err:
            make_backend(TeacherConfig(backend="replay", replay_path=str(path), replay_format=fmt))
        errors.append(err.value)
    with pytest.raises(ValueError) as err:
        check_requests([], TeacherConfig())
    errors.append(err.value)
    lines = [user_error(e) for e in errors]
    assert all(line is not None and "\n" not in line for line in lines), lines
    assert str(binary) in lines[0] and "not UTF-8" in lines[0]
    assert "w.jsonl line 1: no recorded completion" in lines[1] and "l.json line 1: not JSON" in lines[2]
    assert "the dataset has no questions in splits" in lines[3]


# ---- released labels through the teacher and rationales stages (rationales.source_labels) ----
# measured kpod-vs-flag agreement (regrade) on the files that carry the whole two-call completion
# and a flag (docs/benchmarks.md, "Real released data: source labels (issue 15)")
REGRADE_AGREEMENT = {
    "date_understanding_test.json": 110 / 111,
    "last_letter_concatenation_test.json": 146 / 150,
    "tracking_shuffled_objects_test.json": 225 / 225,
    "svamp_3_train.json": 1511 / 1953,
}


def replayed(name: str, tmp_path, samples: int) -> tuple[pa.Table, pa.Table]:
    """(questions with gold answers, teacher_calls) of a shared Mentor-KD file replayed as the
    teacher: its questions as train questions, its rows as their recorded completions."""
    from tasks.core.real_datasets import load_file, task_info

    task = next(t for t in ANSWER_TYPE if name.startswith(t))
    records = load_file(task, MENTOR / name, "train")
    questions = pa.table({
        "question_id": [r.question_id for r in records], "split": ["train"] * len(records),
        "question": [r.question for r in records], "answer": [r.answer for r in records],
        "answer_type": [task_info(task).answer_type] * len(records), "meta": ["{}"] * len(records),
    })
    cfg = TeacherConfig(backend="replay", replay_path=str(MENTOR / name), replay_format="mentor_kd",
                        samples=samples, concurrency=64)
    calls, _, _ = teach(questions.drop_columns(["answer", "answer_type"]), cfg, Store(tmp_path / "s"))
    return questions, calls


@needs_data
@pytest.mark.parametrize("name", sorted(REGRADE_AGREEMENT))
def test_released_flags_are_the_verdict_with_trust_and_kpods_grade_sits_beside_them(name, tmp_path):
    from tasks.config.rationales import RationalesConfig
    from tasks.stages.rationales import build

    questions, calls = replayed(name, tmp_path, samples=3 if "3_train" in name else 1)
    flags = json.loads((MENTOR / name).read_text())
    assert sorted(calls.column("source_correct").to_pylist()) == sorted(r["initial_correct"] for r in flags)
    trust = build(questions, calls, RationalesConfig(source_labels="trust"))["rationales"].to_pylist()
    regrade = build(questions, calls, RationalesConfig(source_labels="regrade"))["rationales"].to_pylist()
    assert len(trust) == len(regrade) == len(flags)
    # trust: every rationale the file flags correct is trained on, and nothing else is
    assert [r["correct"] for r in trust] == [r["source_correct"] for r in trust]
    assert all(r["correct_from"] == "source" for r in trust)
    # regrade: kpod's own verdict, identical in both tables
    assert [r["correct"] for r in regrade] == [r["own_correct"] for r in regrade] == [r["own_correct"] for r in trust]
    agree = sum(r["own_correct"] == r["source_correct"] for r in regrade) / len(regrade)
    assert agree >= REGRADE_AGREEMENT[name] - 1e-9, f"{name}: agreement {agree:.4f}"


@needs_data
@pytest.mark.parametrize("name", ["date_understanding_test.json", "last_letter_concatenation_test.json",
                                  "tracking_shuffled_objects_test.json"])
def test_zero_shot_cot_grading_reproduces_every_released_flag(name, tmp_path):
    """`rationales.teacher_grading: zero_shot_cot` grades the second call as Kojima et al.'s
    cleansing did when the flags were set: on the files that keep it, every flag is reproduced
    (kpod's own reader differs on 5 of 486 rows: hyphen-spelled letters, "August" read as A)."""
    from tasks.config.rationales import RationalesConfig
    from tasks.stages.rationales import build

    questions, calls = replayed(name, tmp_path, samples=1)
    rows = build(questions, calls, RationalesConfig(source_labels="regrade", teacher_grading="zero_shot_cot"))
    rows = rows["rationales"].to_pylist()
    assert len(rows) == len(json.loads((MENTOR / name).read_text()))
    assert [r["own_correct"] for r in rows] == [r["source_correct"] for r in rows]
    kpod = build(questions, calls, RationalesConfig(source_labels="regrade"))["rationales"].to_pylist()
    differ = sum(a["own_correct"] != b["own_correct"] for a, b in zip(kpod, rows))
    assert differ == {"date_understanding_test.json": 1, "last_letter_concatenation_test.json": 4,
                      "tracking_shuffled_objects_test.json": 0}[name]
