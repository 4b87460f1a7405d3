"""The `dataset` stage: questions from the synthetic generator, local files, or HF `datasets`.

Writes `questions` (question_id, split, question, answer, answer_type, meta) and
`keypoint_terms` (question_id, term, kind): the keypoint truth of synthetic questions, empty
for real data (no truth is known there). Bad input raises `DatasetError` naming the file and
row before anything is written, so the store never holds a half-built dataset.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from storage.keys import file_fingerprint
from tasks.core import real_datasets, synthetic
from tasks.config.base import KpodModel
from tasks.core.real_datasets import SPLITS, DatasetError, Record
from tasks.stages.contract import StageContext, StageSpec
from tasks.core.synthetic import SyntheticConfig

__all__ = ["DatasetConfig", "DatasetError", "SyntheticConfig", "build", "SPEC"]

Task = Literal[
    "synthetic", "gsm8k", "svamp", "asdiv", "commonsense_qa", "strategy_qa", "date_understanding",
    "tracking_shuffled_objects", "last_letter_concatenation", "coin_flip",
]
Split = Literal["train", "val", "test"]


class DatasetConfig(KpodModel):
    source: Literal["synthetic", "file", "hf"] = Field(
        "synthetic", description="Where questions come from: the generator, local files, or an HF dataset."
    )
    task: Task = Field(
        "synthetic",
        description="Task family: fixes the row mapping, the answer type and the papers' splits.",
    )
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig, description="The arithmetic generator (source=synthetic)."
    )
    path: str | None = Field(
        None,
        description="One local JSONL/JSON/Parquet file holding every question; cut into splits "
        "(source=file; the paper's sizes when it is the full set, else split_fractions).",
    )
    paths: dict[Split, str] | None = Field(
        None,
        description="Local files per split, e.g. {train: a.jsonl, test: b.json}; a missing val "
        "is carved from test (GSM8K's 660/659) or train (source=file).",
    )
    split_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/val/test fractions when one file that is not a known full set is cut."
    )
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of train drawn as val when the source has no val split."
    )
    hf_name: str | None = Field(None, description="HF `datasets` name, e.g. openai/gsm8k (source=hf).")
    hf_config: str | None = Field(None, description="HF dataset config name, e.g. main.")
    hf_revision: str | None = Field(
        None, description="HF dataset revision (commit or tag); pin it so the stage key means the same data."
    )
    limit: int | None = Field(
        None, ge=1, description="Keep at most this many questions per split (the first ones), for quick runs."
    )
    seed: int = Field(0, ge=0, description="Seed of every split drawn from a larger part (real data).")

    @model_validator(mode="after")
    def _check(self) -> "DatasetConfig":
        if (self.source == "synthetic") != (self.task == "synthetic"):
            raise ValueError(
                f"task {self.task!r} does not go with source {self.source!r} "
                "(task 'synthetic' iff source 'synthetic')"
            )
        if self.source == "file" and (self.path is None) == (self.paths is None):
            raise ValueError("source 'file' needs exactly one of path (one file) or paths (per split)")
        if self.paths is not None and not self.paths:
            raise ValueError("paths must name at least one split")
        if self.source != "file" and (self.path is not None or self.paths is not None):
            raise ValueError(f"path/paths are only read when source is 'file', not {self.source!r}")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("source 'hf' needs hf_name")
        if self.source != "hf" and (self.hf_name or self.hf_config or self.hf_revision):
            raise ValueError(f"hf_* fields are only read when source is 'hf', not {self.source!r}")
        if any(f < 0 for f in self.split_fractions) or abs(sum(self.split_fractions) - 1) > 1e-9:
            raise ValueError(f"split_fractions {self.split_fractions} must be >= 0 and sum to 1")
        return self

    def files(self) -> dict[str, str]:
        """Local files read, by source part (train/val/test, or all)."""
        if self.source != "file":
            return {}
        return {"all": self.path} if self.path is not None else dict(self.paths or {})


# ---- the pure core ------------------------------------------------------------------------
def _questions_table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = ["question_id", "split", "question", "answer", "answer_type", "meta"]
    return pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in cols})


def synthetic_tables(cfg: SyntheticConfig, limit: int | None = None) -> tuple[pa.Table, pa.Table]:
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    if limit is not None:
        sizes = {s: min(n, limit) for s, n in sizes.items()}
    problems = synthetic.generate(cfg, sizes)
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


def real_parts(cfg: DatasetConfig) -> dict[str, list[Record]]:
    """Source parts (train/val/test or all) of a file or HF source, rows mapped."""
    if cfg.source == "file":
        return {part: real_datasets.load_file(cfg.task, path, part) for part, path in cfg.files().items()}
    return real_datasets.load_hf(cfg.task, cfg.hf_name, cfg.hf_config, cfg.hf_revision)


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
    cfg: DatasetConfig = ctx.config.dataset
    questions, keypoints = build(cfg)
    ctx.write_table("questions", questions)
    ctx.write_table("keypoint_terms", keypoints)
    splits = questions.column("split").to_pylist()
    ctx.summary.update({"source": cfg.source, "task": cfg.task, **{s: splits.count(s) for s in SPLITS}})


def external(config: Any) -> dict[str, Any]:
    """Fingerprints of the local files read: editing a data file changes the stage key."""
    out = {}
    for part, path in config.dataset.files().items():
        try:
            out[part] = {"path": path, "sha256": file_fingerprint(path)}
        except FileNotFoundError:
            raise DatasetError(f"{path}: no such data file (dataset.paths/path)") from None
        except IsADirectoryError:
            raise DatasetError(f"{path}: is a directory, not a data file (dataset.paths/path)") from None
    return out


SPEC = StageSpec(
    name="dataset",
    run=run,
    sections=("dataset",),
    upstream=lambda cfg: (),
    code=("tasks.stages.dataset", "tasks.core.synthetic", "tasks.core.real_datasets", "tasks.core.answers"),
    external=external,
    description="questions (train/val/test) from the synthetic generator, local files or HF datasets",
)
