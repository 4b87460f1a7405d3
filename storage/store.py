"""The artifact store: the only module that knows where things live on disk.

Layout under the store root:

    stages/<stage>/<key>/            a committed artifact (tables/*.parquet, files/, manifest.json)
    stages/<stage>/.tmp-<key>-<id>/  a stage being written; never read
    stages/<stage>/<key>.lock        held while a process computes that stage
    work/<stage>/<key>/              resumable scratch of a long stage (checkpoints)
    ledgers/<name>/part-*.parquet    append-only records shared across keys (teacher calls)
    runs/<run_id>.json               which key each stage had in a run; runs/latest -> newest
    comparisons/<id>.json            a `kpod compare`: its config, methods, seeds and runs
    comparisons/<id>/*.parquet       its `comparisons` and `comparison_steps` tables
    comparisons/<id>/runs/           each run's config (YAML) and log
    reports/<name>.html              pages written for people (`kpod report`)
    exports/<name>/                  HF-format folders written by `kpod export`
    prefect-results/                 Prefect's persisted task results
    serve.json                       the pids and API address of a running `kpod serve`
    catalog.duckdb                   views over the latest run, for any DuckDB client

A stage is committed iff its directory holds manifest.json, which is written last, inside the
temp dir, before the rename: a crash at any moment leaves either nothing or a whole artifact.
The manifest records every file's size and sha256 (`checksums`); a committed stage is complete
(served, cached) only while its files still have the recorded sizes. One whose files changed
is corrupt: never read, reported by `kpod status` and `kpod verify`, recomputed by `kpod run`.
`kpod verify --deep` compares the hashes too. Manifests written before checksums existed are
unverified: served as before, and `kpod verify` says it cannot check them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from storage.schemas import conform, schema_for
from storage.stream import BATCH_ROWS, TableSink, duckdb_session, iter_table_batches

MANIFEST = "manifest.json"
CHECKSUMS = "checksums"  # the manifest field: file path (relative to the stage dir) -> size, sha256
DEFAULT_ROOT = "kpod-store"
# a temporary file or dir is a dead run's once older than this and unlocked (a catalog is written
# in seconds; a stage's temp dir is also guarded by its key's lock, held while it computes)
STALE_TMP_S = 600.0


def default_root() -> Path:
    return Path(os.environ.get("KPOD_STORE", DEFAULT_ROOT)).resolve()


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file under `directory` but the manifest: relative path -> {"bytes", "sha256"}."""
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            out[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return out


@dataclass(frozen=True)
class Integrity:
    """What a stage dir holds compared with its manifest."""

    state: str  # "ok" | "unverified" (a manifest without checksums) | "corrupt" | "missing"
    problem: str = ""  # for "corrupt": the first mismatch, naming the file

    @property
    def served(self) -> bool:
        return self.state in ("ok", "unverified")


class StoreNotWritable(RuntimeError):
    """The store's root cannot be created or written: the user's to fix (--store, $KPOD_STORE)."""


class StageIncomplete(RuntimeError):
    """A stage stopped on purpose before finishing (a budget, say); its work so far is kept."""


class StageWriter:
    """Collects one stage's outputs in a temp dir; `Store.writing` commits it atomically."""

    def __init__(self, stage: str, key: str, tmp_dir: Path):
        self.stage, self.key, self.dir = stage, key, tmp_dir
        self.tables: dict[str, dict[str, Any]] = {}
        self.files: list[str] = []
        self.summary: dict[str, Any] = {}

    def write_table(self, name: str, data: pa.Table) -> pa.Table:
        data = conform(name, data)
        write_parquet_atomic(self.dir / "tables" / f"{name}.parquet", data)
        self.tables[name] = {"rows": data.num_rows, "schema": data.schema.to_string()}
        return data

    @contextmanager
    def table_writer(self, name: str) -> Iterator[TableSink]:
        """Write table `name` batch by batch (`sink.write(batch)`, each conformed to its schema).

        The table exists in the stage only once the block ends without an error: it is written
        to a temp name and renamed then, so a failure mid-way leaves no table (and the stage,
        which fails with it, commits nothing). Memory stays one batch, however many rows.
        """
        final = self.dir / "tables" / f"{name}.parquet"
        final.parent.mkdir(parents=True, exist_ok=True)
        sink = TableSink(name, final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp"))
        try:
            yield sink
            sink.finish()
            os.replace(sink.path, final)
        finally:
            sink.abort()  # a no-op once renamed
        self.tables[name] = {"rows": sink.rows, "schema": schema_for(name).to_string()}

    def path(self, name: str) -> Path:
        """A file or directory for a non-tabular output (model weights, an HTML page)."""
        if name.startswith("/") or ".." in Path(name).parts:
            raise ValueError(f"artifact file name must be relative: {name!r}")
        self.files.append(name)
        p = self.dir / "files" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


class Store:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).resolve() if root is not None else default_root()

    def ensure_writable(self) -> None:
        """Create the root if needed and write a probe file in it. The OS's own error for an
        unwritable place can mislead (mkdir under /proc says "No such file or directory")."""
        probe = self.root / f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreNotWritable(
                f"the store {self.root} is not writable ({exc.strerror or exc}); choose another with "
                "--store or $KPOD_STORE"
            ) from None

    # ---- committed stage artifacts -------------------------------------------------------
    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key

    def is_committed(self, stage: str, key: str) -> bool:
        """Whether the stage was committed (its manifest exists), intact or not."""
        return (self.stage_dir(stage, key) / MANIFEST).is_file()

    def is_complete(self, stage: str, key: str) -> bool:
        """Committed, and its files still have the sizes its manifest recorded: safe to serve."""
        return self.integrity(stage, key).served

    def integrity(self, stage: str, key: str, deep: bool = False) -> Integrity:
        """Compare the stage's files with its manifest: sizes (a stat per file, cheap enough for
        every run and status), and with `deep` their sha256 (reads every byte)."""
        directory = self.stage_dir(stage, key)
        if not (directory / MANIFEST).is_file():
            return Integrity("missing")
        try:
            recorded = json.loads((directory / MANIFEST).read_text()).get(CHECKSUMS)
        except (ValueError, OSError) as exc:  # a manifest edited or truncated after the commit
            return Integrity("corrupt", f"{MANIFEST} is unreadable ({type(exc).__name__})")
        if recorded is None:
            return Integrity("unverified")
        for rel, expected in recorded.items():
            path = directory / rel
            if not path.is_file():
                return Integrity("corrupt", f"{rel} is missing")
            size = path.stat().st_size
            if size != expected["bytes"]:
                return Integrity("corrupt", f"{rel} has {size} bytes, its manifest says {expected['bytes']}")
            if deep and file_sha256(path) != expected["sha256"]:
                return Integrity("corrupt", f"{rel} does not match the sha256 in its manifest")
        return Integrity("ok")

    def committed_stages(self) -> list[tuple[str, str]]:
        """(stage, key) of every committed stage in the store, intact or not, sorted."""
        return sorted((m.parent.parent.name, m.parent.name) for m in (self.root / "stages").glob(f"*/*/{MANIFEST}"))

    def complete_keys(self, stage: str) -> list[str]:
        """Keys of the stage's committed, intact results in this store, sorted."""
        root = self.root / "stages" / stage
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and self.is_complete(stage, p.name))

    def manifest(self, stage: str, key: str) -> dict[str, Any]:
        path = self.stage_dir(stage, key) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"stage {stage!r} with key {key} is not complete in {self.root}")
        return json.loads(path.read_text())

    def _require_complete(self, stage: str, key: str) -> None:
        """Raise unless the stage may be read: what is committed is what is served."""
        check = self.integrity(stage, key)
        if check.state == "corrupt":
            raise FileNotFoundError(f"stage {stage!r} ({key}) is corrupt: {check.problem}; `kpod run` recomputes it")
        if not check.served:
            raise FileNotFoundError(f"stage {stage!r} ({key}) is not complete; run it first")

    def table_path(self, stage: str, key: str, table: str) -> Path:
        path = self.stage_dir(stage, key) / "tables" / f"{table}.parquet"
        self._require_complete(stage, key)
        if not path.is_file():
            raise FileNotFoundError(f"stage {stage!r} ({key}) has no table {table!r}")
        return path

    def read_table(self, stage: str, key: str, table: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.table_path(stage, key, table), columns=columns)

    def iter_batches(
        self, stage: str, key: str, table: str, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        """A committed table's rows in order, a record batch at a time (a streaming read)."""
        yield from iter_table_batches(self.table_path(stage, key, table), columns, batch_rows)

    @contextmanager
    def query(self, tables: dict[str, tuple[str, str, str]], scratch: Path) -> Iterator[Any]:
        """A DuckDB connection (spilling into `scratch`) with a view per committed table:
        `tables` maps a view name to (stage, key, table); each view has `file_row_number` (a
        row's position in its table). For joins over tables larger than memory; read results
        with `storage.stream.query_batches`."""
        with duckdb_session(scratch) as con:
            for view, (stage, key, table) in tables.items():
                path = str(self.table_path(stage, key, table)).replace("'", "''")
                con.execute(f'CREATE VIEW "{view}" AS SELECT * FROM read_parquet(\'{path}\', file_row_number = true)')
            yield con

    def file_path(self, stage: str, key: str, name: str) -> Path:
        self._require_complete(stage, key)
        return self.stage_dir(stage, key) / "files" / name

    def lock(self, stage: str, key: str) -> FileLock:
        path = self.root / "stages" / stage / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    @contextmanager
    def writing(
        self, stage: str, key: str, manifest: dict[str, Any]
    ) -> Iterator[StageWriter]:
        """Write a stage into a temp dir, then commit it: manifest last, then one rename.

        The caller holds `lock(stage, key)` (see `compute_once`). On any exception the temp dir
        is removed and nothing looks done.
        """
        parent = self.root / "stages" / stage
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        writer = StageWriter(stage, key, tmp)
        started = time.time()
        try:
            yield writer
            record = dict(manifest)
            record.update(
                stage=stage,
                key=key,
                tables=writer.tables,
                files=sorted(set(writer.files)),
                summary=writer.summary,
                started_at=datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                finished_at=_utcnow(),
                seconds=round(time.time() - started, 3),
            )
            record[CHECKSUMS] = checksums(tmp)  # what a reader checks the files against
            write_json_atomic(tmp / MANIFEST, record)
            _fsync_dir(tmp)
            final = self.stage_dir(stage, key)
            if final.exists():  # a forced recompute replaces the old artifact
                trash = parent / f".old-{key}-{uuid.uuid4().hex[:6]}"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def remove_dead_temps(self) -> list[str]:
        """Delete what runs that died left in stages/: temp dirs (`.tmp-<key>-...`) and the old
        artifact of an interrupted swap (`.old-<key>-...`); returns their names. One is dead
        once older than STALE_TMP_S and nobody holds its key's lock: a live stage may write
        into its temp dir for hours, but it holds the lock all along."""
        now, gone = time.time(), []
        for tmp in sorted((self.root / "stages").glob("*/.tmp-*")) + sorted((self.root / "stages").glob("*/.old-*")):
            try:
                if now - tmp.stat().st_mtime <= STALE_TMP_S:
                    continue
            except FileNotFoundError:  # its run committed or cleaned it meanwhile
                continue
            try:
                with self.lock(tmp.parent.name, tmp.name.split("-")[1]).acquire(timeout=0):
                    shutil.rmtree(tmp, ignore_errors=True)
            except Timeout:  # a live process computes that key
                continue
            gone.append(f"{tmp.parent.name}/{tmp.name}")
        return gone

    # ---- resumable scratch and ledgers ---------------------------------------------------
    def work_dir(self, stage: str, key: str) -> Path:
        path = self.root / "work" / stage / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clear_work_dir(self, stage: str, key: str) -> bool:
        """Delete the stage's scratch (checkpoints, partial results); whether there was any.
        A forced stage starts from nothing; a committed one needs its scratch no more."""
        path = self.root / "work" / stage / key
        existed = path.is_dir()
        shutil.rmtree(path, ignore_errors=True)
        return existed

    def ledger_dir(self, name: str) -> Path:
        path = self.root / "ledgers" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def prefect_results_dir(self) -> Path:
        path = self.root / "prefect-results"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- runs ----------------------------------------------------------------------------
    def runs_dir(self) -> Path:
        path = self.root / "runs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def save_run(self, run_id: str, record: dict[str, Any]) -> None:
        write_json_atomic(self.runs_dir() / f"{run_id}.json", record)
        write_json_atomic(self.runs_dir() / "latest.json", {"run_id": run_id})

    def load_run(self, run_id: str | None = None) -> dict[str, Any]:
        if run_id is None:
            latest = self.runs_dir() / "latest.json"
            if not latest.is_file():
                raise FileNotFoundError(f"no run recorded in {self.root}; run `kpod run` first")
            run_id = json.loads(latest.read_text())["run_id"]
        path = self.runs_dir() / f"{run_id}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no run {run_id!r} in {self.root}")
        return json.loads(path.read_text())

    def list_runs(self) -> list[dict[str, Any]]:
        runs = []
        for path in sorted(self.runs_dir().glob("*.json")):
            if path.name != "latest.json":
                runs.append(json.loads(path.read_text()))
        return sorted(runs, key=lambda r: r.get("started_at", ""))

    # ---- comparisons (`kpod compare`) -----------------------------------------------------
    def comparisons_dir(self) -> Path:
        path = self.root / "comparisons"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def save_comparison(self, comparison_id: str, record: dict[str, Any]) -> None:
        write_json_atomic(self.comparisons_dir() / f"{comparison_id}.json", record)

    def load_comparison(self, comparison_id: str | None = None) -> dict[str, Any]:
        """One comparison's record; None: the latest started."""
        records = self.list_comparisons()
        if comparison_id is None:
            if not records:
                raise FileNotFoundError(f"no comparison recorded in {self.root}; run `kpod compare` first")
            return records[-1]
        path = self.comparisons_dir() / f"{comparison_id}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no comparison {comparison_id!r} in {self.root}")
        return json.loads(path.read_text())

    def list_comparisons(self) -> list[dict[str, Any]]:
        if not (self.root / "comparisons").is_dir():
            return []
        records = [json.loads(p.read_text()) for p in sorted(self.comparisons_dir().glob("*.json"))]
        return sorted(records, key=lambda r: r.get("started_at", ""))

    def comparison_table_path(self, comparison_id: str, table: str) -> Path:
        """A comparison's table (`comparisons`, `comparison_steps`), rewritten as runs finish."""
        path = self.comparisons_dir() / comparison_id / f"{table}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def comparison_file(self, comparison_id: str, name: str) -> Path:
        """A file of one comparison's runs (their configs, their logs)."""
        path = self.comparisons_dir() / comparison_id / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_comparison_table(self, comparison_id: str, table: str, data: pa.Table) -> None:
        write_parquet_atomic(self.comparison_table_path(comparison_id, table), conform(table, data))

    def comparison_tables(self, table: str) -> list[Path]:
        """Every comparison's file of `table` (for the catalog's view over all of them)."""
        if not (self.root / "comparisons").is_dir():
            return []
        return sorted(p for p in self.comparisons_dir().glob(f"*/{table}.parquet"))

    def export_dir(self, name: str) -> Path:
        """Where `kpod export` writes one HF-format folder set (datasets, model, cards)."""
        path = self.root / "exports" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def serve_record_path(self) -> Path:
        """Where `kpod serve` records its pids and API address while it runs."""
        return self.root / "serve.json"

    def page_path(self, name: str) -> Path:
        """Reports written for people (HTML pages, PNGs) outside any stage."""
        path = self.root / "reports" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
