"""The schedule stage's tables (METHODS.md §2.3): question clusters and `progressive_schedule`
of `tasks.core.curriculum` turned into the `clusters`, `schedule` and `schedule_stages` tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.config.schedule import ScheduleConfig
from tasks.core.curriculum import StageRecord, output_difficulty, progressive_schedule
from tasks.core.embeddings import kmeans_clusters, student_mean_embeddings, tfidf_embeddings


def embedding_kind(cfg: ScheduleConfig, student_kind: str) -> str:
    """The question embedding in effect: `cfg.embedding`, or for `auto` the student's mean
    input embedding when the student is an HF model and TF-IDF otherwise (a student trained
    from scratch starts with random embeddings)."""
    if cfg.embedding != "auto":
        return cfg.embedding
    return "student_mean" if student_kind == "hf" else "tfidf"


def build_schedule(
    step_difficulty: pa.Table, question_of: dict[str, str], cluster_of_question: dict[str, int],
    cfg: ScheduleConfig, beta: float | None = None,
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(clusters, schedule, schedule_stages) tables from `step_difficulty` rows.

    beta: the diversity weight to use (default `cfg.beta`; see `effective_beta`).
    question_of: rationale_id -> question_id; cluster_of_question: question_id -> cluster.
    Rationales are ordered by rationale_id and steps by step id, so the result is a pure
    function of the inputs (the greedy breaks ties by that order).
    """
    by_rid: dict[str, list[tuple[int, float]]] = {}
    for rid, step, d in zip(
        step_difficulty["rationale_id"].to_pylist(),
        step_difficulty["step"].to_pylist(),
        step_difficulty["difficulty"].to_pylist(),
    ):
        by_rid.setdefault(rid, []).append((step, d))
    rids = sorted(by_rid)
    missing = [r for r in rids if r not in question_of]
    if missing:
        raise ValueError(f"step_difficulty: rationale {missing[0]!r} is not in the rationales table")
    diffs = [np.array([d for _, d in sorted(by_rid[r])], dtype=np.float64) for r in rids]
    clusters = np.array([cluster_of_question[question_of[r]] for r in rids], dtype=np.int64)
    n_clusters = int(clusters.max()) + 1 if len(clusters) else 1
    c, records = progressive_schedule(
        diffs, clusters, T=cfg.stages, beta=cfg.beta if beta is None else beta, n_clusters=n_clusters,
        c0_frac=cfg.c0_frac, p=cfg.p, start=cfg.start, delta_s=cfg.delta_s,
    )
    clusters_t = pa.table(
        {
            "rationale_id": rids,
            "question_id": [question_of[r] for r in rids],
            "cluster": clusters.tolist(),
        }
    )
    T1, N = c.shape
    schedule_t = pa.table(
        {
            "stage": np.repeat(np.arange(T1), N).tolist(),
            "rationale_id": rids * T1,
            "input_steps": c.reshape(-1).tolist(),
            "output_difficulty": [
                output_difficulty(diffs[i], int(c[t, i])) for t in range(T1) for i in range(N)
            ],
        }
    )
    stages_t = stages_table(records, np.array([len(d) for d in diffs], dtype=np.int64), c)
    return clusters_t, schedule_t, stages_t


def stages_table(records: list[StageRecord], n_steps: np.ndarray, c: np.ndarray) -> pa.Table:
    """`schedule_stages`: one row per stage from its record, n_steps [N] and c [T+1, N]."""
    return pa.table(
        {
            "stage": [r.stage for r in records],
            "budget": [r.budget for r in records],
            "used": [r.used for r in records],
            "selected": [r.selected for r in records],
            # what a stage's epoch trains on: steps in the targets (of sum(n_i) in all)
            "output_steps": [int((n_steps - c[t]).sum()) for t in range(len(records))],
            "cluster_counts": [
                json.dumps({str(k): v for k, v in sorted(r.cluster_counts.items())}) for r in records
            ],
        }
    )


def question_clusters(
    question_ids: list[str], texts: list[str], kind: str, cfg: ScheduleConfig,
    student_dir: Path | None = None,
) -> dict[str, int]:
    """question_id -> K-means cluster of its embedding (`kind`: student_mean | tfidf)."""
    if kind == "tfidf":
        x = tfidf_embeddings(texts)
    else:
        from tasks.core.models import load_model

        model, tokenizer = load_model(student_dir)
        x = student_mean_embeddings(model, tokenizer, texts)
    labels = kmeans_clusters(x, cfg.k_clusters, cfg.seed)
    return dict(zip(question_ids, labels.tolist()))
