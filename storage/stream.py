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
from typing import Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from storage.schemas import conform, schema_for

BATCH_ROWS = 4096  # rows per record batch a streaming stage handles at once (and per row group)
DUCKDB_MEMORY_MB = 256  # what a streaming query may hold before DuckDB spills to its scratch dir


class TableSink:
    """Batches of one declared table appended to a Parquet file; `rows` counts them."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.schema = schema_for(name)
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        """Append `data` (cast to the declared schema; a missing or extra column is an error)."""
        table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
        table = conform(self.name, table)
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
