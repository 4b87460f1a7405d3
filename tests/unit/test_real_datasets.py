"""Loaders of the real datasets: file formats, row mapping, the papers' splits, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.real_datasets import (
    DatasetError,
    assign_splits,
    load_file,
    map_row,
    read_rows,
    records_from_hf,
)

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
SPLIT_KW = dict(seed=0, val_fraction=0.1, split_fractions=(0.8, 0.1, 0.1))


def shared(rel: str) -> Path:
    path = DATA / rel
    if not path.is_file():
        pytest.skip(f"shared data file {path} is absent")
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_gsm8k_official_test_set_cut_660_val_659_test():
    path = shared("gsm8k/test.jsonl")
    records = load_file("gsm8k", path, "test")
    assert len(records) == 1319
    first = json.loads(path.read_text().splitlines()[0])
    assert records[0].question == first["question"].strip()
    assert records[0].answer == first["answer"].split("####")[-1].strip().replace(",", "")
    assert records[0].meta["solution"] == first["answer"].split("####")[0].strip()
    splits = assign_splits("gsm8k", {"test": records}, **SPLIT_KW)
    assert [r.question_id for r in splits["val"]] == [f"gsm8k-test-{i}" for i in range(660)]
    assert [r.question_id for r in splits["test"]] == [f"gsm8k-test-{i}" for i in range(660, 1319)]
    assert splits["train"] == []


def test_gsm8k_commas_and_hashes(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "1,000 + 234 = 1,234\n#### 1,234"}])
    (rec,) = load_file("gsm8k", path, "train")
    assert rec.answer == "1234" and rec.meta["solution"] == "1,000 + 234 = 1,234"


def test_mentor_kd_svamp_one_row_per_question_with_the_files_answers():
    path = shared("mentor-kd/svamp_3_train.json")
    raw = json.loads(path.read_text())
    records = load_file("svamp", path, "train")
    gold = {r["input"].strip(): r["answer"] for r in raw}
    assert len(records) == len(gold) == 651
    for rec in records:
        assert float(rec.answer) == float(gold[rec.question])
    a = assign_splits("svamp", {"train": records}, **SPLIT_KW)
    b = assign_splits("svamp", {"train": records}, **SPLIT_KW)
    c = assign_splits("svamp", {"train": records}, **{**SPLIT_KW, "seed": 1})
    assert len(a["val"]) == 65 and len(a["train"]) == 586
    assert a["val"] == b["val"] and a["val"] != c["val"]
    assert not {r.question_id for r in a["val"]} & {r.question_id for r in a["train"]}


def test_mentor_kd_teacher6_format():
    path = shared("mentor-kd/date_understanding_teacher6.json")
    raw = json.loads(path.read_text())
    records = load_file("date_understanding", path, "train")
    assert len(records) == len({r["instruction"] for r in raw})
    assert records[0].question == raw[0]["instruction"].strip()
    assert records[0].answer == raw[0]["label"].strip("()")
    assert "Answer choices" in records[0].question


def test_paper_split_for_a_full_set_and_fractions_otherwise(tmp_path):
    rows = [{"Body": f"Tom has {i} pens.", "Question": "How many?", "Answer": float(i)} for i in range(1000)]
    path = tmp_path / "svamp.json"
    path.write_text(json.dumps(rows))
    records = load_file("svamp", path, "all")
    assert records[3].question == "Tom has 3 pens. How many?" and records[3].answer == "3"
    splits = assign_splits("svamp", {"all": records}, **SPLIT_KW)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [700, 150, 150]
    ids = [r.question_id for s in splits.values() for r in s]
    assert sorted(ids) == sorted(r.question_id for r in records)
    fewer = assign_splits("svamp", {"all": records[:900]}, **SPLIT_KW)
    assert [len(fewer[s]) for s in ("train", "val", "test")] == [720, 90, 90]


def test_parquet_and_json_examples_layouts(tmp_path):
    pq.write_table(pa.table({"question": ["Is it?", "Is it not?"], "answer": [True, False]}), tmp_path / "s.parquet")
    recs = load_file("strategy_qa", tmp_path / "s.parquet", "train")
    assert [r.answer for r in recs] == ["yes", "no"]
    (tmp_path / "c.json").write_text(json.dumps({"examples": [{"question": "Heads?", "answer": "No"}]}))
    assert load_file("coin_flip", tmp_path / "c.json", "test")[0].answer == "no"


@pytest.mark.parametrize(
    "task,row,question,answer",
    [
        ("asdiv", {"body": "Sam has 9 apples.", "question": "How many?", "answer": "9 (apples)"},
         "Sam has 9 apples. How many?", "9"),
        ("asdiv", {"body": "b", "question": "q", "answer": "1/2"}, "b q", "0.5"),
        ("date_understanding", {"input": "When?\nOptions:\n(A) x\n(B) y", "target": "(B)"},
         "When?\nOptions:\n(A) x\n(B) y", "B"),
        ("last_letter_concatenation", {"question": "Take \"Ab Cd\"", "answer": "\"bd\""}, "Take \"Ab Cd\"", "bd"),
        ("commonsense_qa", {"question": {"stem": "Where?", "choices": [{"label": "A", "text": "home"},
                                                                      {"label": "B", "text": "park"}]},
                            "answerKey": "B"},
         "Where?\nAnswer choices: (A) home, (B) park.", "B"),
    ],
)
def test_row_mapping(task, row, question, answer):
    q, a, _ = map_row(task, row, "f: row 0")
    assert (q, a) == (question, answer)


def test_hf_rows_go_through_the_same_mapping():
    datasets = pytest.importorskip("datasets")

    def csqa(i, key):
        return {"id": str(i), "question": f"Q{i}?", "question_concept": "c",
                "choices": {"label": ["A", "B", "C"], "text": ["x", "y", "z"]}, "answerKey": key}

    dd = {
        "train": datasets.Dataset.from_list([csqa(i, "ABC"[i % 3]) for i in range(20)]),
        "validation": datasets.Dataset.from_list([csqa(100 + i, "A") for i in range(5)]),
        "test": datasets.Dataset.from_list([csqa(200 + i, "") for i in range(5)]),  # hidden labels
    }
    parts = records_from_hf("commonsense_qa", dd, "tau/commonsense_qa")
    assert set(parts) == {"train", "test"}  # validation is the test set; unlabelled test unused
    assert parts["train"][1].question == "Q1?\nAnswer choices: (A) x, (B) y, (C) z."
    assert parts["train"][1].answer == "B"
    assert [r.question_id for r in parts["test"]] == [f"commonsense_qa-test-{i}" for i in range(5)]
    splits = assign_splits("commonsense_qa", parts, **SPLIT_KW)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [18, 2, 5]

    single = records_from_hf("gsm8k", {"train": datasets.Dataset.from_list(
        [{"question": "How many?", "answer": "3 + 4 = 7\n#### 7"}])}, "openai/gsm8k")
    assert single["train"][0].answer == "7"


def test_jsonl_and_parquet_rows_are_read_as_they_are_drawn(tmp_path):
    """A data file is never held whole as rows: the rows before a broken line come out before it
    fails, and a Parquet file is read a batch at a time, in order, across row groups."""
    path = write_jsonl(tmp_path / "big.jsonl", [{"question": "a", "answer": "1"}, "", {"question": "b", "answer": "2"},
                                                '{"question": '])
    rows = read_rows(path)
    assert next(rows) == ("line 1", {"question": "a", "answer": "1"})
    assert next(rows) == ("line 3", {"question": "b", "answer": "2"})
    with pytest.raises(DatasetError, match=r"big\.jsonl: line 4: not valid JSON"):
        next(rows)
    table = pa.table({"question": [f"q{i}" for i in range(2500)], "answer": [str(i) for i in range(2500)]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=700)
    got = list(read_rows(tmp_path / "t.parquet"))
    assert [w for w, _ in got] == [f"row {i}" for i in range(2500)]
    assert got[0][1] == {"question": "q0", "answer": "0"} and got[-1][1] == {"question": "q2499", "answer": "2499"}
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        list(read_rows(tmp_path / "bad.parquet"))


# ---- bad input ----------------------------------------------------------------------------
def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "1"}, "", '{"question": "b", "answer": '])
    with pytest.raises(DatasetError) as err:
        list(read_rows(path))
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "\n" not in msg


def test_row_without_answer_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "noans.jsonl", [{"question": "a", "answer": "1"}, {"question": "b"}])
    with pytest.raises(DatasetError, match=r"noans\.jsonl: line 2: row has no answer"):
        load_file("gsm8k", path, "train")
    path = write_jsonl(tmp_path / "blank.jsonl", [{"question": "a", "answer": " "}])
    with pytest.raises(DatasetError, match=r"blank\.jsonl: line 1: row has no answer"):
        load_file("svamp", path, "train")


def test_other_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match="nope.jsonl: no such data file"):
        load_file("gsm8k", tmp_path / "nope.jsonl", "train")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"input": "a", "answer": "1"},\n {"input": ')
    with pytest.raises(DatasetError, match=r"bad\.json: line 2: not valid JSON"):
        load_file("svamp", bad, "train")
    notnum = write_jsonl(tmp_path / "nn.jsonl", [{"question": "a", "answer": "many"}])
    with pytest.raises(DatasetError, match=r"nn\.jsonl: line 1: answer 'many' is not a number"):
        load_file("svamp", notnum, "train")
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps([{"input": "q", "answer": "1"}, {"input": "q", "answer": "2"}]))
    with pytest.raises(DatasetError, match=r"clash\.json: row 1: answer '2' contradicts"):
        load_file("svamp", clash, "train")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unsupported data file type"):
        load_file("svamp", tmp_path / "x.csv", "train")
    with pytest.raises(DatasetError, match="not a valid choice answer"):
        map_row("commonsense_qa", {"question": "q", "answerKey": "maybe"}, "f: row 0")


@pytest.mark.parametrize("name", ["garbage.jsonl", "garbage.json"])
def test_a_binary_file_is_named_not_a_unicode_traceback(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01garbage")
    with pytest.raises(DatasetError) as err:
        list(read_rows(path))
    msg = str(err.value)
    assert msg.startswith(str(path)) and "not UTF-8 text" in msg and "\n" not in msg


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", ""), ("none.json", "[]")])
def test_an_empty_data_file_is_named(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: no rows \(the data file is empty\)$"):
        load_file("gsm8k", path, "train")


def test_a_too_long_question_names_its_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "x" * 20_001, "answer": "2"}])
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: line 2: the question has 20001 characters, more than the 20000 accepted$"):
        load_file("gsm8k", path, "train")
    assert len(load_file("gsm8k", path, "train", max_question_chars=20_001)) == 2


def test_dataset_max_question_chars_reaches_the_loader_and_not_the_key(tmp_path):
    from tasks.config.pipeline import load_config
    from tasks.stages.contract import plan
    from tasks.stages.dataset import real_parts
    from tasks.stages.registry import STAGES

    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "x" * 50, "answer": "2"}])
    sets = ["dataset.source=file", "dataset.task=gsm8k", f"dataset.path={path}"]
    with pytest.raises(DatasetError, match="the question has 50 characters, more than the 49 accepted"):
        real_parts(load_config(None, sets + ["dataset.max_question_chars=49"]).dataset)
    assert len(real_parts(load_config(None, sets + ["dataset.max_question_chars=50"]).dataset)["all"]) == 1
    keys = [{p.name: p.key for p in plan(load_config(None, sets + [f"dataset.max_question_chars={n}"]), STAGES)} for n in (49, 50)]
    assert keys[0] == keys[1]
