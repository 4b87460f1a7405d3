"""Append-only ledgers of records that cost money or time to redo (teacher requests).

Records are buffered in memory and flushed as a new immutable Parquet part file every
`flush_every` records or `flush_seconds` seconds (and on close). Each part is written to a temp
name, fsynced and renamed, so a kill -9 loses at most the records since the last flush and never
leaves a torn part. Readers take the union of parts and keep, per id, the last record written
(a successful record always wins over an earlier failed one).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.schemas import conform, schema_for
from storage.store import Store, write_parquet_atomic
from storage.stream import BATCH_ROWS, query_batches, sorted_by_position


class Ledger:
    def __init__(
        self,
        store: Store,
        name: str,
        table: str,
        id_column: str,
        flush_every: int = 32,
        flush_seconds: float = 5.0,
    ):
        self.dir: Path = store.ledger_dir(name)
        self.table, self.id_column = table, id_column
        self.schema = schema_for(table)
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    # ---- writing -------------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._buffer.append(record)
            due = (
                len(self._buffer) >= self.flush_every
                or time.monotonic() - self._last_flush >= self.flush_seconds
            )
        if due:
            self.flush()

    def flush(self) -> int:
        with self._lock:
            rows, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
        if not rows:
            return 0
        data = conform(self.table, pa.Table.from_pylist(rows, schema=self.schema))
        # time-ordered names make "last written wins" a plain sort
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:6]}.parquet"
        write_parquet_atomic(self.dir / name, data)
        return len(rows)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading -------------------------------------------------------------------------
    def parts(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("part-*.parquet"))

    def read(self, ids: Iterable[str] | None = None, ok_column: str | None = "error") -> pa.Table:
        """Latest record per id (a record with null `ok_column` beats a later failure).

        `ids` restricts the result to those ids (the requests a stage key needs).
        """
        parts = self.parts()
        if not parts:
            return self.schema.empty_table()
        data = pa.concat_tables([pq.read_table(p, schema=self.schema) for p in parts])
        wanted = set(ids) if ids is not None else None
        best: dict[str, int] = {}
        ids_col = data.column(self.id_column).to_pylist()
        ok = (
            [v is None for v in data.column(ok_column).to_pylist()]
            if ok_column
            else [True] * data.num_rows
        )
        for row, rid in enumerate(ids_col):
            if wanted is not None and rid not in wanted:
                continue
            prev = best.get(rid)
            # later rows come from later parts; keep the latest, but never let a failure
            # replace a success
            if prev is None or ok[row] or not ok[prev]:
                best[rid] = row
        # typed indices: an empty Python list would be a null array that `take` refuses
        return data.take(pa.array(sorted(best.values()), type=pa.int64()))

    # ---- streaming reads (memory flat in the number of records) ---------------------------
    def ok_ids(self, ok_column: str = "error") -> set[str]:
        """The ids with a successful record (null `ok_column`), reading only those two columns."""
        out: set[str] = set()
        for p in self.parts():
            t = pq.read_table(p, columns=[self.id_column, ok_column])
            out.update(t.filter(pc.is_null(t[ok_column]))[self.id_column].to_pylist())
        return out

    def _scan(self, columns: list[str] | None) -> pa.RecordBatchReader:
        """Every record in write order (parts by name, rows in order) with `_seq`, its index in
        that order, one part at a time; `columns` None: all of the schema's."""
        names = columns or self.schema.names
        schema = pa.schema([self.schema.field(c) for c in names] + [pa.field("_seq", pa.int64())])

        def batches() -> Iterator[pa.RecordBatch]:
            seq = 0
            for p in self.parts():
                t = pq.read_table(p, schema=self.schema, columns=names)  # only the columns asked for
                t = t.append_column("_seq", pa.array(range(seq, seq + t.num_rows), pa.int64()))
                seq += t.num_rows
                yield from t.combine_chunks().to_batches()

        return pa.RecordBatchReader.from_batches(schema, batches())

    def ok_values(self, con: Any, table: str, wanted: str, column: str, ok_column: str = "error") -> None:
        """DuckDB temp table `table` (the id column, `column`): for each id of DuckDB table
        `wanted`, `column` of its latest successful record (null `ok_column`); ids without one
        are left out. The ledger is scanned once, three columns, so it need not fit in memory."""
        con.register("_ledger_ok", self._scan([self.id_column, column, ok_column]))
        try:
            con.execute(f"""
                CREATE TEMP TABLE {table} AS
                SELECT s.{self.id_column}, arg_max(s.{column}, s._seq) AS {column}
                FROM _ledger_ok s JOIN (SELECT DISTINCT {self.id_column} FROM {wanted}) w
                  ON s.{self.id_column} = w.{self.id_column}
                WHERE s.{ok_column} IS NULL
                GROUP BY s.{self.id_column}""")
        finally:
            con.unregister("_ledger_ok")

    def latest_in_order(self, con: Any, wanted: str, scratch: Path, batch_rows: int = BATCH_ROWS,
                        ok_column: str = "error") -> Iterator[pa.RecordBatch]:
        """`read`'s records for the ids of DuckDB table `wanted` (`pos`, the id column, and
        columns that replace the record's, such as the part a request plays in this run),
        ordered by `pos` (dense: 0..n-1), in record batches. The ledger is scanned twice (ids,
        then the chosen records), DuckDB joins, and an external bucket sort in `scratch` orders."""
        extra = [d[0] for d in con.execute(f"SELECT * FROM {wanted} LIMIT 0").description
                 if d[0] not in ("pos", self.id_column)]
        con.register("_ledger_ids", self._scan([self.id_column, ok_column]))
        # the latest success, else the latest failure: one key, success first, then write order
        con.execute(f"""
            CREATE TEMP TABLE _best AS
            SELECT {", ".join(f"w.{c}" for c in ["pos", *extra])},
                   arg_max(s._seq, (s.{ok_column} IS NULL)::BIGINT * {1 << 48} + s._seq) AS seq
            FROM _ledger_ids s JOIN {wanted} w ON s.{self.id_column} = w.{self.id_column}
            GROUP BY {", ".join(f"w.{c}" for c in ["pos", *extra])}""")
        con.unregister("_ledger_ids")
        con.register("_ledger_rows", self._scan(None))
        cols = [f"s.{c}" for c in self.schema.names if c not in extra] + [f"b.{c}" for c in extra]
        chosen = query_batches(con, f"""
            SELECT {", ".join(cols)}, b.pos FROM _ledger_rows s JOIN _best b ON s._seq = b.seq""", batch_rows=batch_rows)
        yield from sorted_by_position(chosen, scratch, "ledger", "pos", batch_rows)
        con.unregister("_ledger_rows")
        con.execute("DROP TABLE _best")
