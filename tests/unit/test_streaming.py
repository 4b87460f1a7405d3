"""Streaming stages (issue 16 item 7): the table writer, streaming reads, and equal outputs.

dataset -> teacher -> rationales write their tables batch by batch; these tests check the
storage pieces (atomic commit, row counts, schema conformance, a failure mid-way) and that the
streamed tables equal what the whole-table code computes, with batches far smaller than the
tables so every table spans many of them.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from storage.ledger import Ledger
from storage.store import Store
from storage.stream import duckdb_session, query_batches
from tasks.config.pipeline import load_config
from tasks.core import synthetic
from tasks.core.rationale_rows import build_rows
from tasks.stages import dataset as dataset_stage
from tasks.stages import rationales as rationales_stage
from tasks.stages import teacher as teacher_stage
from tasks.stages.contract import execute, plan
from tasks.stages.registry import BY_NAME, STAGES
from tasks.teacher_backends.requests import build_requests
from tasks.teacher_backends.teach import open_ledger

STEPS = pa.table({"rationale_id": ["a", "b", "c"], "step": pa.array([0, 1, 2], pa.int32()),
                  "char_start": [0, 1, 2], "char_end": [1, 2, 3], "text": ["x", "y", "z"]})


# ---- the table writer ---------------------------------------------------------------------
def test_table_writer_commits_batches_with_counts_and_declared_schema(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.writing("rationales", "k", {}) as w:
        with w.table_writer("steps") as sink:
            sink.write(STEPS.slice(0, 2))
            sink.write(STEPS.slice(2).to_batches()[0])  # a record batch too
            assert not (w.dir / "tables" / "steps.parquet").exists()  # not before the block ends
        with w.table_writer("rationales"):
            pass  # nothing written: an empty table with its schema
    got = store.read_table("rationales", "k", "steps")
    assert got.to_pylist() == STEPS.cast(got.schema).to_pylist()
    assert got.schema.field("step").type == pa.int64()  # conformed to the declared type
    m = store.manifest("rationales", "k")
    assert m["tables"]["steps"]["rows"] == 3 and m["tables"]["rationales"]["rows"] == 0
    # the same schema text as a table written whole
    whole = tmp_path / "w"
    with Store(whole).writing("rationales", "k", {}) as w2:
        w2.write_table("steps", STEPS)
    assert Store(whole).manifest("rationales", "k")["tables"]["steps"]["schema"] == m["tables"]["steps"]["schema"]
    assert store.read_table("rationales", "k", "rationales").num_rows == 0
    assert store.integrity("rationales", "k").state == "ok"


def test_table_writer_refuses_a_batch_with_other_columns(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="extra"):
        with store.writing("rationales", "k", {}) as w, w.table_writer("steps") as sink:
            sink.write(STEPS.append_column("oops", pa.array([1, 2, 3])))
    assert not store.is_committed("rationales", "k")


def test_a_failure_mid_table_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with store.writing("rationales", "k", {}) as w:
            with w.table_writer("steps") as sink:
                sink.write(STEPS)
                tmp_dir = w.dir
                raise RuntimeError("boom")
    assert not store.is_committed("rationales", "k")
    assert not tmp_dir.exists()  # the stage's temp dir (and the half table in it) is gone
    # a table whose block failed is not in the stage even when the stage itself goes on
    with store.writing("rationales", "k2", {}) as w:
        with pytest.raises(RuntimeError):
            with w.table_writer("steps") as sink:
                sink.write(STEPS)
                raise RuntimeError("half")
        assert "steps" not in w.tables
        assert list((w.dir / "tables").iterdir()) == []


def test_iter_batches_reads_a_table_in_order(tmp_path: Path) -> None:
    store = Store(tmp_path)
    big = pa.table({"rationale_id": [f"r{i}" for i in range(50)], "step": list(range(50)),
                    "char_start": [0] * 50, "char_end": [1] * 50, "text": ["t"] * 50})
    with store.writing("rationales", "k", {}) as w, w.table_writer("steps") as sink:
        for i in range(0, 50, 7):
            sink.write(big.slice(i, 7))
    batches = list(store.iter_batches("rationales", "k", "steps", columns=["step"], batch_rows=4))
    assert max(b.num_rows for b in batches) <= 7
    assert [v for b in batches for v in b.column("step").to_pylist()] == list(range(50))


# ---- the ledger's streaming reads ---------------------------------------------------------
def _call(rid: str, error: str | None, completion: str) -> dict:
    return dict(request_id=rid, question_id="q", sample=0, prompt="p", completion=completion, model="m",
                finish_reason="stop", tokens_in=1, tokens_out=1, cost_usd=0.0, latency_s=0.0, error=error,
                finished_at="t", teacher_answer=None, source_correct=None, part="completion", logprobs=None)


def test_latest_in_order_matches_read(tmp_path: Path) -> None:
    """The streamed choice per id is `read`'s: the latest success, else the latest failure."""
    ledger = Ledger(Store(tmp_path), "t", "teacher_calls", "request_id", flush_every=3)
    rng = random.Random(0)
    for i in range(60):
        rid = f"r{rng.randrange(15)}"
        ledger.append(_call(rid, None if rng.random() < 0.5 else f"e{i}", f"c{i}"))
    ledger.flush()
    wanted = [f"r{i}" for i in (3, 1, 14, 0, 99, 7)]  # r99 was never asked
    old = {r["request_id"]: r for r in ledger.read(wanted).to_pylist()}
    with duckdb_session(tmp_path / "scratch") as con:
        con.execute("CREATE TABLE wanted AS SELECT * FROM (VALUES " +
                    ", ".join(f"({i}, '{r}', 'reasoning')" for i, r in enumerate(wanted)) + ") t(pos, request_id, part)")
        got = [r for b in ledger.latest_in_order(con, "wanted", tmp_path / "sort", batch_rows=2) for r in b.to_pylist()]
    assert [r["request_id"] for r in got] == [r for r in wanted if r in old]
    for r in got:
        assert r["part"] == "reasoning"  # the wanted table's part replaces the record's
        assert {k: v for k, v in r.items() if k != "part"} == {k: v for k, v in old[r["request_id"]].items() if k != "part"}
    assert ledger.ok_ids() == {r for r, rec in {x["request_id"]: x for x in ledger.read().to_pylist()}.items()
                               if rec["error"] is None}


def test_ok_values_are_reads_successes(tmp_path: Path) -> None:
    """`ok_values`: per wanted id, the completion `read` chooses when that choice is a success."""
    ledger = Ledger(Store(tmp_path), "t", "teacher_calls", "request_id", flush_every=4)
    rng = random.Random(1)
    for i in range(80):
        ledger.append(_call(f"r{rng.randrange(20)}", None if rng.random() < 0.4 else f"e{i}", f"c{i}"))
    ledger.flush()
    wanted = [f"r{i}" for i in range(0, 20, 2)] + ["r99"]  # odd ids are not wanted; r99 never asked
    naive = {r["request_id"]: r["completion"] for r in ledger.read(wanted).to_pylist() if r["error"] is None}
    with duckdb_session(tmp_path / "scratch") as con:
        con.execute("CREATE TABLE wanted AS SELECT * FROM (VALUES " +
                    ", ".join(f"({i}, '{r}')" for i, r in enumerate(wanted)) + ") t(pos, request_id)")
        ledger.ok_values(con, "texts", "wanted", "completion")
        got = dict(con.execute("SELECT request_id, completion FROM texts").fetchall())
    assert got == naive and 0 < len(got) < len(wanted) - 1  # some wanted ids only ever failed


def test_sorted_by_position_orders_across_buckets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.stream

    monkeypatch.setattr(storage.stream, "BUCKET_ROWS", 4)
    order = list(range(30))
    random.Random(1).shuffle(order)
    table = pa.table({"pos": pa.array(order, pa.int64()), "v": [f"v{p}" for p in order]})
    out = list(storage.stream.sorted_by_position(table.to_batches(7), tmp_path, "t", batch_rows=5))
    assert [v for b in out for v in b.column("v").to_pylist()] == [f"v{p}" for p in range(30)]
    assert out[0].schema.names == ["v"] and not (tmp_path / "buckets-t").exists()


def test_query_batches_streams_in_batches(tmp_path: Path) -> None:
    with duckdb_session(tmp_path) as con:
        batches = list(query_batches(con, "SELECT range AS x FROM range(10) ORDER BY x DESC", batch_rows=3))
    assert [v for b in batches for v in b.column("x").to_pylist()] == list(range(9, -1, -1))
    assert max(b.num_rows for b in batches) <= 3


# ---- streamed stages equal the whole-table computation --------------------------------------
def _reference_problems(cfg, sizes):
    """The generator as it was before streaming: every text kept, splits assembled at the end."""
    seen, by_split = set(), {}
    for split in ("test", "val", "train"):
        rng, out, misses = synthetic._split_rng(cfg.seed, split), [], 0
        while len(out) < sizes.get(split, 0):
            name, pronoun = rng.choice(synthetic.NAMES)
            noun = rng.choice(synthetic.NOUNS)
            start, steps = synthetic._chain(rng, cfg, noun)
            q, d = synthetic._question(rng, cfg, name, pronoun, noun, start, steps)
            if q in seen:
                misses += 1
                continue
            seen.add(q)
            out.append(synthetic.Problem(name, pronoun, noun, start, steps, d, q, f"syn-{split}-{len(out)}", split))
        by_split[split] = out
    return [p for s in synthetic.SPLITS for p in by_split[s]]


def test_iter_problems_equals_the_whole_generator() -> None:
    cfg = synthetic.SyntheticConfig(seed=4, n_train=300, n_val=40, n_test=40, max_steps=2, max_operand=5,
                                    max_value=9, distractor_prob=0.0)  # a small space: many redraws
    sizes = {"train": 300, "val": 40, "test": 40}
    assert list(synthetic.iter_problems(cfg, sizes)) == _reference_problems(cfg, sizes)


def _reference_rationales(questions: pa.Table, calls: pa.Table, terms: pa.Table, rcfg) -> dict[str, list]:
    """The rationales stage's tables as the whole-table code built them (one-stage calls)."""
    gold = {q["question_id"]: q for q in questions.to_pylist()}
    kinds: dict[str, dict] = {}
    for t in terms.to_pylist():
        kinds.setdefault(t["question_id"], {})[t["term"]] = t["kind"]
    rows = []
    for c in calls.to_pylist():
        if c["error"] is not None or not (c["completion"] or "").strip():
            continue
        g = gold[c["question_id"]]
        r = build_rows(c["question_id"], "teacher", c["sample"], c["completion"], g["answer"], g["answer_type"],
                       rcfg.strip_answer_sentence, c["teacher_answer"], c["source_correct"], rcfg.source_labels)
        if (r.rationale["correct"] or rcfg.keep_incorrect) and r.rationale["n_steps"] >= rcfg.min_steps:
            rows.append(r)
    rows.sort(key=lambda r: (r.rationale["question_id"], r.rationale["sample"]))
    words = [dict(rationale_id=r.rationale["rationale_id"], word=i, char_start=s, char_end=e, text=w, keypoint=k, role=ro)
             for r in rows for i, (s, e, w, k, ro) in enumerate(synthetic.word_roles(r.rationale["text"],
                                                                                       kinds[r.rationale["question_id"]]))]
    return {"rationales": [r.rationale for r in rows], "steps": [s for r in rows for s in r.steps], "word_labels": words}


def test_streamed_stages_equal_whole_table_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """smoke's dataset -> teacher -> rationales in batches of a few rows equal the tables the
    whole-table code computes from the same inputs (rows, contents and order)."""
    import storage.stream

    monkeypatch.setattr(dataset_stage.synthetic_batches, "__defaults__", (None, 7))
    monkeypatch.setattr(teacher_stage, "REQUEST_BATCH", 5)
    monkeypatch.setattr(storage.stream.query_batches, "__defaults__", (None, 6))
    monkeypatch.setattr(storage.stream, "BUCKET_ROWS", 9)  # the external sorts use many buckets
    monkeypatch.setattr(rationales_stage, "BUCKET_ROWS", 9)
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml",
                      ["teacher.flush_every=5", "dataset.synthetic.n_train=45"])
    keys = {p.name: p.key for p in plan(cfg, STAGES)}
    store = Store(tmp_path)
    for name in ("dataset", "teacher", "rationales"):
        execute(BY_NAME[name], cfg, keys, store, show_progress=False)

    def table(stage: str, name: str) -> pa.Table:
        return store.read_table(stage, keys[stage], name)

    questions, terms = dataset_stage._problem_tables(
        _reference_problems(cfg.dataset.synthetic, {"train": 45, "val": 12, "test": 12}))
    assert table("dataset", "questions").equals(questions)
    assert table("dataset", "keypoint_terms").equals(terms)
    # teacher_calls: the ledger's record of every request, in question order (samples in order)
    requests = build_requests(questions, cfg.teacher)
    by_id = {r["request_id"]: r for r in open_ledger(store, cfg.teacher).read([r.request_id for r in requests]).to_pylist()}
    calls = table("teacher", "teacher_calls")
    assert calls.to_pylist() == [by_id[r.request_id] for r in requests]
    want = _reference_rationales(questions, calls, terms, cfg.rationales)
    for name, rows in want.items():
        assert table("rationales", name).to_pylist() == rows, name
    assert len(want["rationales"]) > 20 and len(want["word_labels"]) > 500  # many batches of 6
    assert store.manifest("rationales", keys["rationales"])["tables"]["steps"]["rows"] == len(want["steps"])
