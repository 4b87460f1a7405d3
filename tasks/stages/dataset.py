"""The `dataset` stage: questions from the synthetic generator, local files, or HF `datasets`.

Writes `questions` (question_id, split, question, answer, answer_type, meta) and
`keypoint_terms` (question_id, term, kind): the keypoint truth of synthetic questions, empty
for real data (no truth is known there). Bad input raises `DatasetError` naming the file and
row before anything is written, so the store never holds a half-built dataset.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.keys import file_fingerprint
from storage.stream import BATCH_ROWS, iter_table_batches, sorted_by_position
from pydantic import Field

from tasks.config.base import KpodModel
from tasks.core import real_datasets, synthetic
from tasks.core.real_datasets import SPLITS, DatasetError, Record
from tasks.stages.contract import StageContext, StageSpec
from tasks.config.dataset import SyntheticConfig
from tasks.config.dataset import DatasetConfig



# ---- the pure core ------------------------------------------------------------------------
QUESTION_COLUMNS = ["question_id", "split", "question", "answer", "answer_type", "meta"]
_EMPTY_TERMS = pa.table({c: pa.array([], pa.string()) for c in ("question_id", "term", "kind")})


def _questions_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in QUESTION_COLUMNS})


def _synthetic_sizes(cfg: SyntheticConfig, limit: int | None) -> dict[str, int]:
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    return sizes if limit is None else {s: min(n, limit) for s, n in sizes.items()}


def _problem_tables(problems: list[synthetic.Problem]) -> tuple[pa.Table, pa.Table]:
    """(questions, keypoint_terms) rows of some synthetic problems, in their order."""
    rows = [
        dict(question_id=p.question_id, split=p.split, question=p.question, answer=str(p.answer),
             answer_type="numeric", meta=p.meta_json())
        for p in problems
    ]
    terms = [(p.question_id, t, k) for p in problems for t, k in synthetic.keypoint_terms(p)]
    keypoints = pa.table({
        "question_id": pa.array([t[0] for t in terms], pa.string()),
        "term": pa.array([t[1] for t in terms], pa.string()),
        "kind": pa.array([t[2] for t in terms], pa.string()),
    })
    return _questions_table(rows), keypoints


def synthetic_batches(cfg: SyntheticConfig, limit: int | None = None,
                      batch_rows: int = BATCH_ROWS) -> Iterator[tuple[pa.Table, pa.Table]]:
    """(questions, keypoint_terms) of the synthetic dataset, `batch_rows` questions at a time, in
    the tables' order: a million questions never sit in memory at once."""
    problems = synthetic.iter_problems(cfg, _synthetic_sizes(cfg, limit))
    while chunk := list(itertools.islice(problems, batch_rows)):
        yield _problem_tables(chunk)


def synthetic_tables(cfg: SyntheticConfig, limit: int | None = None) -> tuple[pa.Table, pa.Table]:
    """The whole synthetic dataset as (questions, keypoint_terms) tables (small configs, tests)."""
    parts = list(synthetic_batches(cfg, limit))
    if not parts:
        return _problem_tables([])
    return pa.concat_tables([q for q, _ in parts]), pa.concat_tables([k for _, k in parts])


def real_sources(cfg: DatasetConfig) -> Iterator[tuple[str, Iterator[Record]]]:
    """(part, its records as they are read) of a file or HF source."""
    if cfg.source == "file":
        return ((part, real_datasets.iter_file(cfg.task, path, part, cfg.max_question_chars))
                for part, path in cfg.files().items())
    return real_datasets.hf_parts(cfg.task, cfg.hf_name, cfg.hf_config, cfg.hf_revision, cfg.max_question_chars)


def real_parts(cfg: DatasetConfig) -> dict[str, list[Record]]:
    """Source parts (train/val/test or all) of a file or HF source, rows mapped, in memory (tests)."""
    return {part: list(records) for part, records in real_sources(cfg)}


def check_source(cfg: DatasetConfig) -> int:
    """Read and map every row of a file or HF source, holding none; the distinct questions.
    Bad input raises DatasetError (file and row)."""
    return sum(sum(1 for _ in records) for _, records in real_sources(cfg))


def _record_table(records: list[Record]) -> pa.Table:
    return pa.table({
        "question_id": pa.array([r.question_id for r in records], pa.string()),
        "question": pa.array([r.question for r in records], pa.string()),
        "answer": pa.array([r.answer for r in records], pa.string()),
        "meta": pa.array([json.dumps(r.meta, sort_keys=True, ensure_ascii=False) for r in records], pa.string()),
    })


def spill_records(records: Iterable[Record], path: Path, batch_rows: int = BATCH_ROWS) -> int:
    """Write records to a Parquet file `batch_rows` at a time, in their order; how many (no
    file when none)."""
    n, writer, records = 0, None, iter(records)  # a list would restart at every islice
    try:
        while chunk := list(itertools.islice(records, batch_rows)):
            table = _record_table(chunk)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            n += len(chunk)
    finally:
        if writer is not None:
            writer.close()
    return n


def split_positions(plan: dict[str, list[real_datasets.Segment]], counts: dict[str, int],
                    limit: int | None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Each source row's place in the questions table (train rows first, then val, then test,
    each split cut to `limit`), -1 for a row not taken; and the rows per split."""
    dest = {part: np.full(n, -1, dtype=np.int64) for part, n in counts.items()}
    sizes, pos = {}, 0
    for split in SPLITS:
        taken = 0
        for part, idx in plan[split]:
            if limit is not None:
                idx = idx[: max(limit - taken, 0)]
            if len(idx):
                dest[part][idx] = np.arange(pos, pos + len(idx), dtype=np.int64)
            pos, taken = pos + len(idx), taken + len(idx)
        sizes[split] = taken
    return dest, sizes


def _placed(spills: dict[str, Path], dest: dict[str, np.ndarray], sizes: dict[str, int],
            batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The taken rows of the spill files with their split and place (`pos`), in file order."""
    ends = np.cumsum([sizes[s] for s in SPLITS])
    names = np.asarray(SPLITS)
    for part, path in spills.items():
        start = 0
        for batch in iter_table_batches(path, None, batch_rows):
            pos = dest[part][start:start + batch.num_rows]
            start += batch.num_rows
            keep = pos >= 0
            if not keep.any():
                continue
            table = pa.Table.from_batches([batch]).filter(pa.array(keep))
            pos = pos[keep]
            split = names[np.searchsorted(ends, pos, side="right")]
            table = table.append_column("split", pa.array(split.tolist(), pa.string()))
            yield from table.append_column("pos", pa.array(pos)).to_batches()


def real_batches(cfg: DatasetConfig, scratch: Path, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """The questions table of a file or HF source, `batch_rows` rows at a time, in its order.

    Records are mapped as the rows are read and spilled to Parquet in `scratch`; the splits are
    drawn from the parts' sizes alone (`split_plan`), and the rows are put in the table's order by
    an external sort: memory does not grow with the source, bar ~100 bytes per distinct question
    (the duplicate check) and 8 per row (its place). No row is yielded before the whole source
    was read, so bad input fails before anything is written."""
    counts, spills = {}, {}
    for part, records in real_sources(cfg):
        path = scratch / f"records-{part}.parquet"
        counts[part] = spill_records(records, path, batch_rows)
        if counts[part]:
            spills[part] = path
    plan = real_datasets.split_plan(cfg.task, counts, seed=cfg.seed, val_fraction=cfg.val_fraction,
                                    split_fractions=cfg.split_fractions)
    dest, sizes = split_positions(plan, counts, cfg.limit)
    if not sum(sizes.values()):
        raise DatasetError(f"dataset ({cfg.source}, {cfg.task}): no questions")
    answer_type = real_datasets.task_info(cfg.task).answer_type
    for batch in sorted_by_position(_placed(spills, dest, sizes, batch_rows), scratch, "questions", batch_rows=batch_rows):
        table = pa.Table.from_batches([batch])
        table = table.append_column("answer_type", pa.array([answer_type] * table.num_rows, pa.string()))
        yield table.select(QUESTION_COLUMNS)
    for path in spills.values():
        path.unlink(missing_ok=True)


def real_tables(cfg: DatasetConfig, scratch: Path | None = None) -> tuple[pa.Table, pa.Table]:
    """The whole questions table of a file or HF source (small sources, tests; spilled in
    `scratch`, else a temp dir), and the empty keypoint terms (no truth is known for real data)."""
    if scratch is None:
        with tempfile.TemporaryDirectory(prefix="kpod-dataset-") as tmp:
            return real_tables(cfg, Path(tmp))
    return pa.concat_tables(list(real_batches(cfg, scratch))), _EMPTY_TERMS


def build(cfg: DatasetConfig, scratch: Path | None = None) -> tuple[pa.Table, pa.Table]:
    """(questions, keypoint_terms) for a dataset config. Raises DatasetError on bad input."""
    if cfg.source == "synthetic":
        return synthetic_tables(cfg.synthetic, cfg.limit)
    return real_tables(cfg, scratch)


# ---- the stage ----------------------------------------------------------------------------
def run(ctx: StageContext) -> None:
    cfg: DatasetConfig = ctx.inputs.dataset
    # both stream in batches: synthetic questions as drawn, a file or HF source through spill files
    if cfg.source == "synthetic":
        parts = synthetic_batches(cfg.synthetic, cfg.limit)
    else:
        parts = ((q, _EMPTY_TERMS) for q in real_batches(cfg, ctx.work_dir))
    counts = dict.fromkeys(SPLITS, 0)
    with ctx.table_writer("questions") as questions, ctx.table_writer("keypoint_terms") as keypoints:
        for q, k in parts:
            questions.write(q)
            keypoints.write(k)
            for split, n in Counter(q.column("split").to_pylist()).items():
                counts[split] += n
    ctx.summary.update({"source": cfg.source, "task": cfg.task, **counts})


def file_fingerprints(cfg: DatasetConfig) -> dict[str, dict[str, str]]:
    """Fingerprints of the local files read: editing a data file changes the stage key."""
    out = {}
    for part, path in cfg.files().items():
        try:
            out[part] = {"path": path, "sha256": file_fingerprint(path)}
        except FileNotFoundError:
            raise DatasetError(f"{path}: no such data file (dataset.paths/path)") from None
        except IsADirectoryError:
            raise DatasetError(f"{path}: is a directory, not a data file (dataset.paths/path)") from None
    return out


class DatasetInputs(KpodModel):
    dataset: DatasetConfig = Field(description="The dataset section.")
    files: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Each local data file read (by part) with its sha256."
    )


SPEC = StageSpec(
    name="dataset",
    run=run,
    inputs=lambda cfg: DatasetInputs(dataset=cfg.dataset, files=file_fingerprints(cfg.dataset)),
    upstream=lambda cfg: (),
    description="questions (train/val/test) from the synthetic generator, local files or HF datasets",
)
