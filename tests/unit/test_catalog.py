"""The DuckDB catalog: views per table, latest run by default, older runs by id, read-only."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from storage.catalog import CatalogError, query, schema_name, write_catalog_file
from storage.store import Store
from storage.schemas import schema_for


def _commit(store: Store, stage: str, key: str, table: str, data: pa.Table) -> None:
    with store.writing(stage, key, {}) as w:
        w.write_table(table, data)


def _rationales(ids: list[str], source: str) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "rationale_id": ids, "question_id": ids, "source": [source] * n, "sample": [0] * n,
            "text": ["t"] * n, "pred": ["1"] * n, "correct": [True] * n, "n_steps": [1] * n,
            "own_correct": [True] * n, "source_correct": pa.nulls(n, pa.bool_()), "correct_from": ["kpod"] * n,
        }
    )


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path)
    _commit(s, "rationales", "k1", "rationales", _rationales(["a", "b"], "teacher"))
    _commit(s, "rationales", "k2", "rationales", _rationales(["a", "b", "c"], "teacher"))
    _commit(s, "mentor_augment", "m1", "rationales", _rationales(["m"], "mentor"))
    s.save_run("run1", {"run_id": "run1", "started_at": "1", "stages": {"rationales": "k1"}})
    s.save_run("run2", {"run_id": "run2", "started_at": "2", "stages": {"rationales": "k2", "mentor_augment": "m1", "missing": "zz"}})
    return s


def test_latest_run_by_default_and_union_of_stages(store: Store) -> None:
    cols, rows = query(store, "select source, count(*) from rationales group by source order by source")
    assert rows == [("mentor", 1), ("teacher", 3)]


def test_older_run_reachable(store: Store) -> None:
    _, rows = query(store, "select count(*) from rationales", run_id="run1")
    assert rows == [(2,)]
    _, rows = query(store, f"select count(*) from {schema_name('run1')}.rationales")
    assert rows == [(2,)]
    _, rows = query(store, "select run_id, stage, complete from kpod_stages where stage = 'missing'")
    assert rows == [("run2", "missing", False)]


def test_read_only(store: Store) -> None:
    for sql in ["create table x as select 1", "copy (select 1) to '/tmp/kpod-x.csv'", "drop view steps"]:
        with pytest.raises(CatalogError, match="read-only"):
            query(store, sql)


def _snapshot(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_attacks_change_no_byte_and_write_no_file(store: Store, tmp_path_factory) -> None:
    """Statements that write, attach, install, load, change settings or read outside the store
    are all refused (by statement type, or by the locked connection), and nothing changes."""
    out = tmp_path_factory.mktemp("attacker")
    outside = out / "secret.csv"
    outside.write_text("a\n1\n")
    target = store.root / "stages" / "rationales" / "k2" / "tables" / "rationales.parquet"
    attacks = [
        f"EXPLAIN ANALYZE COPY (select * replace ('x' as text) from rationales) TO '{target}' (FORMAT parquet)",
        "EXPLAIN ANALYZE INSTALL httpfs",
        "EXPLAIN select 1",
        f"COPY rationales TO '{out}/a.csv'",
        f"EXPORT DATABASE '{out}/db'",
        "CALL pragma_version()",
        "SET enable_external_access = true",
        "PRAGMA enable_profiling",
        f"ATTACH '{out}/a.duckdb' AS a",
        "CREATE SECRET s (TYPE s3, KEY_ID 'x', SECRET 'y')",
        f"select 1; COPY (select 1) TO '{out}/b.csv'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "create table t as select 1",
        "drop view rationales",
        "CHECKPOINT",
        "VACUUM",
        "USE memory",
        f"select * from read_csv('{outside}')",
        "select * from read_text('/etc/hostname')",
        f"select * from read_parquet('{out}/../**/*.parquet')",
    ]
    before = _snapshot(store.root)
    for sql in attacks:
        with pytest.raises(CatalogError) as info:
            query(store, sql)
        assert "\n" not in str(info.value), sql
    assert _snapshot(store.root) == before
    assert sorted(p.name for p in out.iterdir()) == ["secret.csv"]
    # what is allowed still works on the locked connection
    _, rows = query(store, "select count(*) from rationales")
    assert rows == [(4,)]
    _, rows = query(store, "describe rationales")
    assert len(rows) == len(schema_for("rationales"))


def test_plain_names_show_the_latest_completed_run(store: Store) -> None:
    store.save_run("run1", {"run_id": "run1", "started_at": "1", "stages": {"rationales": "k1"}, "status": "completed"})
    store.save_run("run3", {"run_id": "run3", "started_at": "3", "stages": {}, "status": "failed"})
    _, rows = query(store, "select count(*) from rationales")
    assert rows == [(2,)]  # run1's, not the failed run3's (no table) nor run2 (no status)
    _, rows = query(store, "select run_id, status from kpod_runs order by run_id")
    assert rows == [("run1", "completed"), ("run2", None), ("run3", "failed")]


def test_errors_are_one_line(store: Store) -> None:
    with pytest.raises(CatalogError) as info:
        query(store, "select * from no_such_table")
    assert "\n" not in str(info.value)
    with pytest.raises(CatalogError, match="no run"):
        query(store, "select 1", run_id="nope")


def test_catalog_file_for_any_duckdb_client(store: Store) -> None:
    write_catalog_file(store)
    con = duckdb.connect(str(store.catalog_path()), read_only=True)
    assert con.execute("select count(*) from rationales").fetchone() == (4,)
    con.close()


def _metrics(method: str, seed: int, acc: float) -> pa.Table:
    from storage.schemas import schema_for

    rows = [dict(method=method, seed=seed, split=s, n=10, correct=int(acc * 10), accuracy=acc,
                 ci_low=0.0, ci_high=1.0) for s in ("val", "test")]
    return pa.Table.from_pylist(rows, schema=schema_for("metrics"))


def test_kpod_metrics_spans_runs_once_per_evaluation(store: Store) -> None:
    # no evaluation yet: the view exists, with the metrics columns and no rows
    cols, rows = query(store, "select * from kpod_metrics")
    assert rows == [] and cols[:3] == ["method", "seed", "split"] and cols[-1] == "run_name"

    _commit(store, "evaluate", "e1", "metrics", _metrics("std_cot", 0, 0.5))
    _commit(store, "evaluate", "e2", "metrics", _metrics("kpod", 1, 0.7))
    store.save_run("run3", {"run_id": "run3", "name": "a", "started_at": "3", "stages": {"evaluate": "e1"}})
    store.save_run("run4", {"run_id": "run4", "name": "b", "started_at": "4", "stages": {"evaluate": "e2"}})
    # run5 reuses run3's evaluation (a cached rerun): it must not count twice
    store.save_run("run5", {"run_id": "run5", "name": "a", "started_at": "5", "stages": {"evaluate": "e1"}})
    _, rows = query(store, "select method, seed, accuracy, run_id, run_name from kpod_metrics "
                           "where split = 'test' order by method")
    assert rows == [("kpod", 1, 0.7, "run4", "b"), ("std_cot", 0, 0.5, "run5", "a")]
    # the plain `metrics` view is still the latest run's only
    _, rows = query(store, "select method from metrics")
    assert {r[0] for r in rows} == {"std_cot"}


def test_kpod_sql_names_its_run_and_never_creates_a_store(store: Store, tmp_path: Path, capsys) -> None:
    from flows.cli import main

    missing = tmp_path / "no-store-here"
    assert main(["--store", str(missing), "sql", "select 1"]) == 2
    assert "no store at" in capsys.readouterr().err and not missing.exists()
    assert main(["--store", str(store.root), "sql", "select 1; select 2"]) == 2
    assert "one statement at a time" in capsys.readouterr().err
    assert main(["--store", str(store.root), "sql", "select count(*) as n from rationales", "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == ["n", "4"]  # stdout is the result alone
    assert "read run run2" in captured.err


def test_a_dead_runs_temporary_catalog_is_removed_a_live_one_kept(store: Store) -> None:
    import os
    import time

    dead, live = store.root / ".catalog-dead0001.duckdb", store.root / ".catalog-live0001.duckdb"
    for p in (dead, live):
        p.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(dead, (old, old))
    write_catalog_file(store)
    assert not dead.exists() and live.exists()  # the young one may be another run's, mid-write
    assert store.catalog_path().is_file()
