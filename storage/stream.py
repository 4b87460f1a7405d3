"""Streaming reads and writes of Parquet tables, so a stage's memory does not grow with its rows.

- `TableSink`: one declared table written batch by batch into a temp file (each batch conformed
  to its schema, rows counted); `StageWriter.table_writer` renames it into the stage's temp dir
  only when the whole table was written, so a failure mid-way leaves no table behind.
- `duckdb_session`: a DuckDB connection for joins and sorts larger than memory: it spills into a
  scratch directory beyond `memory_mb`, on one thread (this box's cores belong to training runs).
  Query results come back as Arrow record batches (`query_batches`), never as one table.

Nothing here builds a store path: callers (storage/store.py, storage/ledger.py) hand them in.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.schemas import conform, schema_for

BATCH_ROWS = 4096  # rows per record batch a streaming stage handles at once (and per row group)
DUCKDB_MEMORY_MB = 256  # what a streaming query may hold before DuckDB spills to its scratch dir


def as_table(data: pa.Table | pa.RecordBatch) -> pa.Table:
    """A record batch as a one-batch table; a table as it is."""
    return pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data


class TableSink:
    """Batches of one declared table appended to a Parquet file; `rows` counts them."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.schema = schema_for(name)
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        """Append `data` (cast to the declared schema; a missing or extra column is an error)."""
        table = conform(self.name, as_table(data))
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self.schema)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows

    def finish(self) -> None:
        """Close the file (an empty table still gets its schema) and fsync it."""
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self.schema)
        self._writer.close()
        with open(self.path, "rb+") as fh:
            os.fsync(fh.fileno())

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:  # already broken: the file is deleted anyway
                pass
        self.path.unlink(missing_ok=True)


def iter_table_batches(path: Path, columns: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A Parquet file's rows in order, `batch_rows` at a time (a row group is read at once)."""
    with pq.ParquetFile(path) as f:
        yield from f.iter_batches(batch_size=batch_rows, columns=columns)


@contextmanager
def duckdb_session(scratch: Path, memory_mb: int = DUCKDB_MEMORY_MB) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB that spills into `scratch` (removed afterwards)."""
    spill = scratch / "duckdb-spill"
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"SET memory_limit = '{int(memory_mb)}MB'")
        con.execute("SET threads = 1")
        con.execute("SET temp_directory = ?", [str(spill)])
        # results keep the ORDER BY asked for; nothing else needs insertion order
        con.execute("SET preserve_insertion_order = false")
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def query_batches(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None,
                  batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The rows of a query as Arrow record batches of at most `batch_rows`, as DuckDB makes them."""
    reader = con.sql(sql, params=params).to_arrow_reader(batch_rows)  # streamed, not fetched whole
    for batch in reader:
        if batch.num_rows:
            yield batch


BUCKET_ROWS = 16384  # rows per bucket of an external bucket sort (what one bucket holds in memory)


class Buckets:
    """An external bucket sort's files: rows appended by bucket number (an int64 column), then
    read back one bucket at a time. DuckDB's own ORDER BY ran out of its memory limit on a
    million wide rows; keys that are dense positions (0..n-1) make buckets of a bounded size
    that are written once and read once, so time stays linear."""

    def __init__(self, scratch: Path, name: str):
        self.dir = scratch / f"buckets-{name}"
        shutil.rmtree(self.dir, ignore_errors=True)  # a killed run's leftovers
        self.dir.mkdir(parents=True)
        self._writers: dict[int, pq.ParquetWriter] = {}

    def add(self, batch: pa.RecordBatch | pa.Table, bucket: str) -> None:
        """Append each row of `batch` to the bucket its column `bucket` names (the column is dropped)."""
        table = as_table(batch)
        numbers = table.column(bucket)
        table = table.drop_columns([bucket])
        for b in pc.unique(numbers).to_pylist():
            part = table.filter(pc.equal(numbers, b))
            if b not in self._writers:
                self._writers[b] = pq.ParquetWriter(self.dir / f"{b:09d}.parquet", part.schema)
            self._writers[b].write_table(part)

    def close(self) -> list[int]:
        """Finish writing; the bucket numbers that got rows, in order."""
        for w in self._writers.values():
            w.close()
        return sorted(self._writers)

    def read(self, bucket: int) -> pa.Table | None:
        """One bucket's rows (None when it got none), its file deleted once read."""
        path = self.dir / f"{bucket:09d}.parquet"
        if not path.is_file():
            return None
        table = pq.read_table(path)
        path.unlink()
        return table

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def sorted_by_position(batches: Iterable[pa.RecordBatch], scratch: Path, name: str, key: str = "pos",
                       batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The rows of `batches` ordered by `key`, a dense position (0..n-1, each once), without
    `key`: an external bucket sort through `scratch` (memory: one bucket of BUCKET_ROWS rows)."""
    buckets = Buckets(scratch, name)
    try:
        for batch in batches:
            bucket = pc.divide(batch.column(key), pa.scalar(BUCKET_ROWS, pa.int64()))
            buckets.add(pa.Table.from_batches([batch]).append_column("_bucket", bucket), "_bucket")
        for b in buckets.close():
            table = buckets.read(b)
            yield from table.sort_by(key).drop_columns([key]).to_batches(batch_rows)
    finally:
        buckets.remove()
