"""The `dataset` stage: questions from the synthetic generator, local files, or HF `datasets`.

Writes `questions` (question_id, split, question, answer, answer_type, meta) and
`keypoint_terms` (question_id, term, kind): the keypoint truth of synthetic questions, empty
for real data (no truth is known there). Bad input raises `DatasetError` naming the file and
row before anything is written, so the store never holds a half-built dataset.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from typing import Any, Iterator

import pyarrow as pa

from storage.keys import file_fingerprint
from storage.stream import BATCH_ROWS
from pydantic import Field

from tasks.config.base import KpodModel
from tasks.core import real_datasets, synthetic
from tasks.core.real_datasets import SPLITS, DatasetError, Record
from tasks.stages.contract import StageContext, StageSpec
from tasks.config.dataset import SyntheticConfig
from tasks.config.dataset import DatasetConfig



# ---- the pure core ------------------------------------------------------------------------
def _questions_table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = ["question_id", "split", "question", "answer", "answer_type", "meta"]
    return pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in cols})


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


def real_parts(cfg: DatasetConfig) -> dict[str, list[Record]]:
    """Source parts (train/val/test or all) of a file or HF source, rows mapped."""
    if cfg.source == "file":
        return {part: real_datasets.load_file(cfg.task, path, part, cfg.max_question_chars) for part, path in cfg.files().items()}
    return real_datasets.load_hf(cfg.task, cfg.hf_name, cfg.hf_config, cfg.hf_revision, cfg.max_question_chars)


def real_tables(cfg: DatasetConfig, parts: dict[str, list[Record]]) -> tuple[pa.Table, pa.Table]:
    splits = real_datasets.assign_splits(
        cfg.task, parts, seed=cfg.seed, val_fraction=cfg.val_fraction, split_fractions=cfg.split_fractions
    )
    answer_type = real_datasets.task_info(cfg.task).answer_type
    rows = []
    for split in SPLITS:
        records = splits[split][: cfg.limit] if cfg.limit is not None else splits[split]
        rows += [
            dict(question_id=r.question_id, split=split, question=r.question, answer=r.answer,
                 answer_type=answer_type, meta=json.dumps(r.meta, sort_keys=True, ensure_ascii=False))
            for r in records
        ]
    if not rows:
        raise DatasetError(f"dataset ({cfg.source}, {cfg.task}): no questions")
    empty_terms = pa.table({c: pa.array([], pa.string()) for c in ("question_id", "term", "kind")})
    return _questions_table(rows), empty_terms


def build(cfg: DatasetConfig) -> tuple[pa.Table, pa.Table]:
    """(questions, keypoint_terms) for a dataset config. Raises DatasetError on bad input."""
    if cfg.source == "synthetic":
        return synthetic_tables(cfg.synthetic, cfg.limit)
    return real_tables(cfg, real_parts(cfg))


# ---- the stage ----------------------------------------------------------------------------
def run(ctx: StageContext) -> None:
    cfg: DatasetConfig = ctx.inputs.dataset
    # synthetic questions stream in batches (any number fits); a file or HF source is read row by
    # row but its mapped records are held (the splits are drawn over all of them)
    parts = synthetic_batches(cfg.synthetic, cfg.limit) if cfg.source == "synthetic" else [build(cfg)]
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
