"""The DuckDB catalog: one view per table, over the Parquet files of the stages of a run.

- Plain names (`steps`, `rationales`, ...) are the tables of the latest completed run, or of
  the run given.
- Every recorded run also has its own schema, `run_<id>`, so older runs stay reachable:
  `select * from run_20261122_101500_ab12.metrics`.
- `kpod_runs` lists runs; `kpod_stages` lists each run's stages with key and row counts.
- `kpod_metrics` holds every evaluation in the store, one row per split as in `metrics`, plus
  the evaluate key and the latest run (id, name) that used it: the table for comparing
  methods and seeds across runs (an evaluation reused by several runs appears once).
- `comparisons` and `comparison_steps` hold every `kpod compare` in the store (one row per
  method and seed; accuracy by number of steps), whichever run is shown.
- A table written by several stages of one run (teacher and mentor `rationales`) is their
  UNION ALL BY NAME.
- `lineage` (and `run_<id>.lineage`) follows each question from its teacher calls to its
  predictions, with the stage keys of every value (storage/lineage.py).

`kpod sql` builds this in memory and runs one SELECT (by DuckDB's parser) on a connection that
can read only the store's files, cannot install or load extensions and cannot change settings;
after each run the same views are also written to `catalog.duckdb` in the store for any other
DuckDB client.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from typing import Any

import duckdb

from storage.store import STALE_TMP_S, Store

# EXPLAIN is not here: EXPLAIN ANALYZE runs the statement it explains (COPY ... TO included)
READ_ONLY_TYPES = {"SELECT"}

log = logging.getLogger("kpod")


class CatalogError(ValueError):
    pass


def _quote_path(path: str) -> str:
    return "'" + path.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def schema_name(run_id: str) -> str:
    return "run_" + re.sub(r"[^0-9A-Za-z_]", "_", run_id)


def run_tables(store: Store, run: dict[str, Any], problems: list[str]) -> dict[str, list[str]]:
    """table name -> Parquet paths, for the complete stages of one run record. A corrupt stage
    (files that no longer match its manifest) is left out, and `problems` says so."""
    tables: dict[str, list[str]] = {}
    for stage, key in run.get("stages", {}).items():
        if not store.is_complete(stage, key):
            check = store.integrity(stage, key)
            if check.state == "corrupt":
                _note(problems, f"stage {stage} ({key}) is corrupt, its tables are left out: {check.problem}")
            continue
        for table in store.manifest(stage, key).get("tables", {}):
            tables.setdefault(table, []).append(str(store.table_path(stage, key, table)))
    return tables


def _note(problems: list[str], problem: str) -> None:
    if problem not in problems:  # many runs may share one stage: say it once
        problems.append(problem)


def _view_sql(paths: list[str]) -> str:
    selects = [f"SELECT * FROM read_parquet({_quote_path(p)})" for p in paths]
    return " UNION ALL BY NAME ".join(selects)


def _unreadable(con: duckdb.DuckDBPyConnection, paths: list[str]) -> dict[str, str]:
    """Those of `paths` DuckDB cannot open as Parquet (binding reads each footer) -> why."""
    bad = {}
    for path in paths:
        try:
            con.execute(f"SELECT * FROM read_parquet({_quote_path(path)}) LIMIT 0")
        except duckdb.Error as exc:
            bad[path] = str(exc).splitlines()[0]
    return bad


def _create_view(con: duckdb.DuckDBPyConnection, name: str, paths: list[str], problems: list[str]) -> None:
    """CREATE VIEW name over `paths`; a file DuckDB cannot read (same size, other bytes: only
    `kpod verify --deep` tells) leaves this view out instead of failing the whole catalog."""
    try:
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {_view_sql(paths)}")
    except duckdb.Error:
        bad = _unreadable(con, paths)
        if not bad:  # not a file's fault: a bug, keep its traceback
            raise
        path, why = next(iter(bad.items()))
        _note(problems, f"cannot read {path} ({why}); views over it are left out")


def create_views(con: duckdb.DuckDBPyConnection, store: Store, run_id: str | None = None) -> list[str]:
    """Create the views on `con`; returns the problems met (a corrupt stage, an unreadable
    file), one line each, also logged: the catalog is built around them, never dies of them."""
    runs = store.list_runs()
    if not runs:
        raise CatalogError(f"no run recorded in {store.root}; run `kpod run` first")
    by_id = {r["run_id"]: r for r in runs}
    if run_id is None:
        run_id = default_run(runs)["run_id"]
    if run_id not in by_id:
        raise CatalogError(f"no run {run_id!r} in {store.root} (see `select * from kpod_runs`)")

    problems: list[str] = []
    run_rows, stage_rows = [], []
    for run in runs:
        schema = schema_name(run["run_id"])
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(schema)}")
        for table, paths in run_tables(store, run, problems).items():
            _create_view(con, f"{_ident(schema)}.{_ident(table)}", paths, problems)
        _create_lineage_view(con, f"{_ident(schema)}.lineage", store, run, problems)
        run_rows.append(
            (run["run_id"], run.get("name"), run.get("started_at"), run.get("finished_at"), run.get("status"))
        )
        for stage, key in run.get("stages", {}).items():
            complete = store.is_complete(stage, key)
            rows = store.manifest(stage, key).get("tables", {}) if complete else {}
            stage_rows.append(
                (run["run_id"], stage, key, complete, sum(v["rows"] for v in rows.values()))
            )
    _create_run_tables(con, run_rows, stage_rows)
    _create_metrics_view(con, store, runs, problems)
    _create_comparison_views(con, store, problems)
    for table, paths in run_tables(store, by_id[run_id], problems).items():
        _create_view(con, _ident(table), paths, problems)
    _create_lineage_view(con, "lineage", store, by_id[run_id], problems)
    for problem in problems:
        log.warning("kpod: catalog: %s", problem)
    return problems


def _create_lineage_view(
    con: duckdb.DuckDBPyConnection, name: str, store: Store, run: dict[str, Any], problems: list[str]
) -> None:
    """The run's `lineage` view (storage/lineage.py); a file DuckDB cannot read leaves it out."""
    from storage.lineage import lineage_sql

    try:
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {lineage_sql(store, run)}")
    except duckdb.Error:  # a file of other bytes (only `verify --deep` tells): said as for any view
        paths = [p for ps in run_tables(store, run, problems).values() for p in ps]
        bad = _unreadable(con, paths)
        if not bad:  # not a file's fault: a bug, keep its traceback
            raise
        for path, why in bad.items():
            _note(problems, f"cannot read {path} ({why}); views over it are left out")


def _create_run_tables(con: duckdb.DuckDBPyConnection, run_rows: list[tuple], stage_rows: list[tuple]) -> None:
    con.execute(
        "CREATE OR REPLACE TABLE kpod_runs (run_id VARCHAR, name VARCHAR, started_at VARCHAR, "
        "finished_at VARCHAR, status VARCHAR)"
    )
    if run_rows:
        con.executemany("INSERT INTO kpod_runs VALUES (?, ?, ?, ?, ?)", run_rows)
    con.execute(
        "CREATE OR REPLACE TABLE kpod_stages (run_id VARCHAR, stage VARCHAR, key VARCHAR, "
        "complete BOOLEAN, rows BIGINT)"
    )
    if stage_rows:
        con.executemany("INSERT INTO kpod_stages VALUES (?, ?, ?, ?, ?)", stage_rows)


def _create_metrics_view(
    con: duckdb.DuckDBPyConnection, store: Store, runs: list[dict[str, Any]], problems: list[str]
) -> None:
    latest: dict[str, dict[str, Any]] = {}  # evaluate key -> the last run that used it
    for run in runs:  # oldest first
        if key := run.get("stages", {}).get("evaluate"):
            latest[key] = run
    # each key's manifest is read once, however many runs reused it
    paths = {
        key: str(store.table_path("evaluate", key, "metrics")) for key in latest
        if store.is_complete("evaluate", key) and "metrics" in store.manifest("evaluate", key).get("tables", {})
    }
    selects = [
        f"SELECT *, {_quote_path(key)} AS evaluate_key, {_quote_path(latest[key]['run_id'])} AS run_id, "
        f"{_quote_path(str(latest[key].get('name')))} AS run_name FROM read_parquet({_quote_path(path)})"
        for key, path in paths.items()
    ]
    try:
        con.execute(f"CREATE OR REPLACE VIEW kpod_metrics AS {' UNION ALL BY NAME '.join(selects or [_no_metrics()])}")
    except duckdb.Error:  # one unreadable evaluation: every other one stays comparable
        bad = _unreadable(con, list(paths.values()))
        if not bad:
            raise
        for path, why in bad.items():
            _note(problems, f"cannot read {path} ({why}); kpod_metrics leaves it out")
        good = [sql for sql, path in zip(selects, paths.values()) if path not in bad]
        con.execute(f"CREATE OR REPLACE VIEW kpod_metrics AS {' UNION ALL BY NAME '.join(good or [_no_metrics()])}")


def _create_comparison_views(con: duckdb.DuckDBPyConnection, store: Store, problems: list[str]) -> None:
    """`comparisons` and `comparison_steps` over every comparison's files (none: no rows)."""
    from storage.schemas import schema_for

    for table in ("comparisons", "comparison_steps"):
        paths = [str(p) for p in store.comparison_tables(table)]
        if paths:
            _create_view(con, _ident(table), paths, problems)
        else:
            con.execute(f"CREATE OR REPLACE VIEW {_ident(table)} AS {_empty_select(schema_for(table))}")


def _empty_select(schema: Any) -> str:
    """A SELECT with `schema`'s columns and no rows."""
    sql_type = {"string": "VARCHAR", "int64": "BIGINT", "double": "DOUBLE", "bool": "BOOLEAN"}
    cols = [f"NULL::{sql_type[str(f.type)]} AS {_ident(f.name)}" for f in schema]
    return f"SELECT {', '.join(cols)} WHERE false"


def _no_metrics() -> str:
    """No evaluation yet: kpod_metrics' columns, no rows."""
    from storage.schemas import schema_for

    extra = ", ".join(f"NULL::VARCHAR AS {c}" for c in ("evaluate_key", "run_id", "run_name"))
    return _empty_select(schema_for("metrics")).replace(" WHERE false", f", {extra} WHERE false")


def default_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run plain table names show: the latest completed one (a run that failed or is still
    running does not hide the last good data), else the latest of any status."""
    completed = [r for r in runs if r.get("status") == "completed"]
    return (completed or runs)[-1]


def lock_down(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    """After the views exist: the connection may read the store's files and nothing else, may
    not install or load extensions, and may not change any setting back."""
    root = str(store.root.resolve())
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET allowed_directories = [$1]", [root])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def connect(store: Store, run_id: str | None = None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    create_views(con, store, run_id)
    lock_down(con, store)
    return con


def check_read_only(sql: str) -> None:
    """One statement, of a type DuckDB's own parser calls SELECT (DESCRIBE, SUMMARIZE, SHOW and
    FROM-first queries included); anything else is refused before a connection exists."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise CatalogError(f"SQL does not parse: {str(exc).splitlines()[0]}") from None
    if not statements:
        raise CatalogError("no SQL statement given")
    if len(statements) > 1:
        raise CatalogError(f"kpod sql runs one statement at a time; got {len(statements)}")
    kind = statements[0].type.name
    if kind not in READ_ONLY_TYPES:
        raise CatalogError(f"kpod sql is read-only; {kind} statements are refused")


def query(store: Store, sql: str, run_id: str | None = None) -> tuple[list[str], list[tuple]]:
    """Run read-only SQL against the catalog; returns (column names, rows)."""
    check_read_only(sql)
    con = connect(store, run_id)
    try:
        cur = con.execute(sql)
        columns = [d[0] for d in cur.description] if cur.description else []
        return columns, cur.fetchall()
    except duckdb.Error as exc:
        raise CatalogError(str(exc).splitlines()[0]) from None
    finally:
        con.close()


def remove_stale_catalogs(store: Store) -> list[str]:
    """Delete the temporary catalogs (.catalog-*.duckdb) a killed run left behind; returns
    their names. One younger than STALE_TMP_S may be another run's, still being written."""
    now, gone = time.time(), []
    for tmp in store.catalog_path().parent.glob(".catalog-*.duckdb*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
                gone.append(tmp.name)
        except FileNotFoundError:  # another run's cleanup or swap got there first
            continue
    return gone


def write_catalog_file(store: Store) -> list[str]:
    """Rebuild catalog.duckdb (views only) and swap it in, so a reader never sees half; first
    remove what dead runs left of their own attempts. Returns the problems met (create_views)."""
    remove_stale_catalogs(store)
    final = store.catalog_path()
    tmp = final.with_name(f".catalog-{uuid.uuid4().hex[:8]}.duckdb")
    con = duckdb.connect(str(tmp))
    try:
        problems = create_views(con, store)
    finally:
        con.close()
    os.replace(tmp, final)
    return problems
