"""File and HF sources stream through the dataset stage: records mapped as rows are read,
splits drawn from the parts' sizes (`split_plan`), rows put in order by an external sort. Each
is checked against a naive in-memory reference (the list-based splitting kpod used before)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import storage.stream
from tasks.config.dataset import DatasetConfig
from tasks.core.real_datasets import (
    DatasetError,
    Record,
    iter_hf_parts,
    iter_records,
    load_file,
    split_plan,
    task_info,
)
from tasks.stages.dataset import check_source, real_batches, real_tables, spill_records

KW = dict(seed=3, val_fraction=0.1, split_fractions=(0.8, 0.1, 0.1))


def naive_splits(task: str, parts: dict[str, list], *, seed, val_fraction, split_fractions) -> dict[str, list]:
    """Train/val/test as lists, the straightforward way (the module doc's rules)."""
    info = task_info(task)
    if "all" in parts:
        rows = parts["all"]
        if info.paper_split and len(rows) == sum(info.paper_split):
            n_train, n_val, _ = info.paper_split
        else:
            n_train, n_val = round(split_fractions[0] * len(rows)), round(split_fractions[1] * len(rows))
        idx = list(range(len(rows)))
        random.Random(f"kpod-split:{seed}:{task}:all").shuffle(idx)
        order = [rows[i] for i in idx]
        return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    out = {s: list(parts.get(s, [])) for s in ("train", "val", "test")}
    if "val" in parts:
        return out
    if info.val_from_test and len(out["test"]) == info.val_from_test[0]:
        k = info.val_from_test[1]
        return {"train": out["train"], "val": out["test"][:k], "test": out["test"][k:]}
    train = out["train"]
    k = info.val_from_train[1] if info.val_from_train and len(train) == info.val_from_train[0] else round(val_fraction * len(train))
    idx = list(range(len(train)))
    random.Random(f"kpod-split:{seed}:{task}:val").shuffle(idx)
    chosen = set(idx[:k])
    return {"train": [r for i, r in enumerate(train) if i not in chosen],
            "val": [r for i, r in enumerate(train) if i in chosen], "test": out["test"]}


@pytest.mark.parametrize("task, counts", [
    ("svamp", {"all": 1000}),                 # the paper's sizes
    ("svamp", {"all": 37}),                   # split_fractions
    ("gsm8k", {"test": 1319}),                # val = the first 660 of the official test set
    ("gsm8k", {"train": 50, "test": 1319}),
    ("gsm8k", {"train": 41, "test": 9}),      # val = a seeded fraction of train
    ("commonsense_qa", {"train": 9741, "test": 1221}),  # val = 1,221 drawn from train
    ("strategy_qa", {"train": 12, "val": 5, "test": 4}),
    ("strategy_qa", {"test": 6}),             # no train: an empty val
])
def test_split_plan_matches_the_naive_split(task, counts):
    parts = {p: [(p, i) for i in range(n)] for p, n in counts.items()}
    plan = split_plan(task, counts, **KW)
    got = {s: [(p, int(i)) for p, idx in segs for i in idx] for s, segs in plan.items()}
    assert got == naive_splits(task, parts, **KW)


def test_split_plan_refuses_all_beside_parts():
    with pytest.raises(DatasetError, match="cannot be combined"):
        split_plan("svamp", {"all": 3, "test": 2}, **KW)


def test_records_come_out_as_rows_are_read_and_only_digests_are_kept():
    def rows():
        yield "row 0", {"question": "q0", "answer": "1"}
        yield "row 1", {"question": "q0", "answer": "1"}  # a repeat: dropped
        yield "row 2", {"question": "q1", "answer": "2"}
        raise RuntimeError("the source broke after three rows")

    got = iter_records("gsm8k", rows(), "train", "src")
    first, second = next(got), next(got)
    assert (first.question_id, first.question, second.question_id, second.answer) == ("gsm8k-train-0", "q0", "gsm8k-train-1", "2")
    with pytest.raises(RuntimeError, match="broke"):
        next(got)
    clash = iter_records("gsm8k", iter([("row 0", {"question": "q", "answer": "1"}), ("row 5", {"question": "q", "answer": "2"})]), "t", "src")
    with pytest.raises(DatasetError, match=r"src: row 5: answer '2' contradicts '1'"):
        list(clash)


def write(path: Path, n: int, dupes: bool = True) -> Path:
    rows = [{"question": f"How many is {i} and {i % 5}?", "answer": str(i + i % 5), "extra": "x" * 30} for i in range(n)]
    if dupes:
        rows += rows[: n // 4]  # repeated questions (as in a Mentor-KD file): dropped
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def naive_questions(cfg: DatasetConfig) -> list[dict]:
    parts = {p: load_file(cfg.task, path, p) for p, path in cfg.files().items()}
    splits = naive_splits(cfg.task, parts, seed=cfg.seed, val_fraction=cfg.val_fraction, split_fractions=cfg.split_fractions)
    kind = task_info(cfg.task).answer_type
    return [
        dict(question_id=r.question_id, split=s, question=r.question, answer=r.answer, answer_type=kind,
             meta=json.dumps(r.meta, sort_keys=True, ensure_ascii=False))
        for s in ("train", "val", "test") for r in (splits[s][: cfg.limit] if cfg.limit else splits[s])
    ]


@pytest.mark.parametrize("files, limit", [({"all": 230}, None), ({"all": 230}, 9), ({"train": 150, "test": 61}, None), ({"train": 150, "test": 61}, 20)])
def test_streamed_questions_equal_the_in_memory_table(tmp_path, monkeypatch, files, limit):
    # tiny sort buckets and batches, so rows cross many of both
    monkeypatch.setattr(storage.stream, "BUCKET_ROWS", 16)
    paths = {p: str(write(tmp_path / f"{p}.jsonl", n)) for p, n in files.items()}
    kw = {"path": paths["all"]} if "all" in paths else {"paths": paths}
    cfg = DatasetConfig(source="file", task="svamp", limit=limit, seed=2, **kw)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    batches = list(real_batches(cfg, scratch, batch_rows=7))
    got = [row for b in batches for row in b.to_pylist()]
    assert got == naive_questions(cfg)
    assert max(b.num_rows for b in batches) <= 7
    assert list(scratch.iterdir()) == []  # spill files and sort buckets are gone
    assert check_source(cfg) == sum(n for n in files.values())


def test_bad_row_fails_before_any_questions_come_out(tmp_path):
    path = write(tmp_path / "d.jsonl", 40, dupes=False)
    with path.open("a") as fh:
        fh.write("{not json\n")
    cfg = DatasetConfig(source="file", task="svamp", path=str(path))
    with pytest.raises(DatasetError, match=r"d\.jsonl: line 41: not valid JSON"):
        next(real_batches(cfg, tmp_path, batch_rows=4))
    with pytest.raises(DatasetError, match="line 41"):
        check_source(cfg)


def test_hf_parts_stream_and_name_an_unusable_source():
    dd = {"train": [{"question": f"q{i}", "answer": str(i)} for i in range(5)], "validation": [{"question": "v", "answer": "1"}]}
    parts = dict(iter_hf_parts("gsm8k", dd, "hf/x"))
    assert set(parts) == {"train", "val"}
    assert [r.question_id for r in parts["train"]] == [f"gsm8k-train-{i}" for i in range(5)]
    assert isinstance(next(parts["val"]), Record)
    with pytest.raises(DatasetError, match=r"hf/x: no usable split among \['dev', 'extra'\]"):
        next(iter_hf_parts("gsm8k", {"dev": [], "extra": []}, "hf/x"))


def test_real_tables_without_scratch_use_a_temp_dir(tmp_path):
    cfg = DatasetConfig(source="file", task="svamp", path=str(write(tmp_path / "d.jsonl", 30)))
    questions, terms = real_tables(cfg)
    assert questions.to_pylist() == naive_questions(cfg) and terms.num_rows == 0


def test_spill_takes_a_list_or_an_iterator(tmp_path):
    import pyarrow.parquet as pq

    recs = [Record(f"t-train-{i}", f"q{i}", str(i), {"where": f"row {i}"}) for i in range(5)]
    assert spill_records(recs, tmp_path / "a.parquet", batch_rows=2) == 5
    assert spill_records(iter(recs), tmp_path / "b.parquet", batch_rows=2) == 5
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    assert pq.read_table(tmp_path / "a.parquet").column("question").to_pylist() == [f"q{i}" for i in range(5)]
    assert spill_records([], tmp_path / "c.parquet") == 0 and not (tmp_path / "c.parquet").exists()
