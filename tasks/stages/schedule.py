"""The `schedule` stage: KPOD's progressive in-rationale curriculum (METHODS.md §2.3).

Reads the per-step difficulties, embeds and clusters the questions, and runs the pure schedule
of `tasks.core.curriculum` for stages 0..T. Training epoch e uses stage min(e, T) (0-based epochs):
stage 0 outputs only each rationale's last step, stage T the full rationale.

Tables:
- `clusters` (rationale_id, question_id, cluster): K-means cluster of the question embedding;
- `schedule` (stage, rationale_id, input_steps, output_difficulty): c_i(t) and h_i(t) for
  every stage 0..T and every scheduled rationale;
- `schedule_stages` (stage, budget, used, selected, cluster_counts): D(t), H(t), |S(t)| and
  the selected rationales per cluster (JSON).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from tasks.config.base import KpodModel
from tasks.core.curriculum import output_difficulty, progressive_schedule
from tasks.training.progressive import uses_schedule
from tasks.stages.sources import rationale_stages, training_rationales
from tasks.stages.contract import StageContext, StageSpec

if TYPE_CHECKING:
    from tasks.config.pipeline import PipelineConfig


class ScheduleConfig(KpodModel):
    beta: float = Field(
        12.0, ge=0.0, le=1e6,
        description="Weight of the diversity term beta * sum_k sqrt(|C_k ∩ S|) (Eq. 12); "
        "0 is the no_diversity ablation (train.method = kpod_no_diversity also sets 0).",
    )
    k_clusters: int = Field(5, ge=1, le=1000, description="K-means clusters K of the question embeddings.")
    c0_frac: float = Field(
        0.3, ge=0.0, le=1.0, description="C0 = c0_frac * B, the budget D(0) of stage 0 (Eq. 10)."
    )
    p: float = Field(0.5, ge=0.0, le=10.0, description="Exponent p of the budget D(t) (Eq. 10).")
    stages: int = Field(
        6, ge=1, le=10000,
        description="T, the number of progressive stages (one per epoch); METHODS: half the "
        "training epochs (the default matches train.epochs = 12). Epoch e (0-based) trains at "
        "stage min(e, T); stage T is the full rationale, so T must be below train.epochs.",
    )
    embedding: Literal["auto", "student_mean", "tfidf"] = Field(
        "auto",
        description="Question embedding for clustering: student_mean = mean of the student's "
        "input embeddings over the question tokens; tfidf = TF-IDF of the question text; auto = "
        "student_mean for a pre-trained (hf) student, tfidf for the embedded student, whose "
        "embeddings are a random initialisation.",
    )
    seed: int = Field(0, ge=0, description="Seed of K-means.")


def effective_beta(cfg: "PipelineConfig") -> float:
    """beta of Eq. 12: the config's, or 0 under the no_diversity ablation method."""
    return 0.0 if cfg.train.method == "kpod_no_diversity" else cfg.schedule.beta


def _embedding_kind(cfg: ScheduleConfig, student_kind: str) -> str:
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
        c0_frac=cfg.c0_frac, p=cfg.p,
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
    stages_t = pa.table(
        {
            "stage": [r.stage for r in records],
            "budget": [r.budget for r in records],
            "used": [r.used for r in records],
            "selected": [r.selected for r in records],
            "cluster_counts": [
                json.dumps({str(k): v for k, v in sorted(r.cluster_counts.items())}) for r in records
            ],
        }
    )
    return clusters_t, schedule_t, stages_t


def question_clusters(
    question_ids: list[str], texts: list[str], kind: str, cfg: ScheduleConfig,
    student_dir: Path | None = None,
) -> dict[str, int]:
    """question_id -> K-means cluster of its embedding (`kind`: student_mean | tfidf)."""
    from tasks.core.embeddings import kmeans_clusters, student_mean_embeddings, tfidf_embeddings

    if kind == "tfidf":
        x = tfidf_embeddings(texts)
    else:
        from tasks.core.models import load_model

        model, tokenizer = load_model(student_dir)
        x = student_mean_embeddings(model, tokenizer, texts)
    labels = kmeans_clusters(x, cfg.k_clusters, cfg.seed)
    return dict(zip(question_ids, labels.tolist()))


def run(ctx: StageContext) -> None:
    cfg: ScheduleConfig = ctx.config.schedule
    sd = ctx.table("difficulty", "step_difficulty")
    rat = training_rationales(ctx, columns=["rationale_id", "question_id"])
    question_of = dict(zip(rat["rationale_id"].to_pylist(), rat["question_id"].to_pylist()))
    qids = sorted({question_of[r] for r in set(sd["rationale_id"].to_pylist()) if r in question_of})
    qs = ctx.table("dataset", "questions", columns=["question_id", "question"])
    text_of = dict(zip(qs["question_id"].to_pylist(), qs["question"].to_pylist()))
    absent = [q for q in qids if q not in text_of]
    if absent:
        raise ValueError(f"rationales: question {absent[0]!r} is not in the questions table")
    kind = _embedding_kind(cfg, ctx.config.student.kind)
    cluster_of = question_clusters(
        qids, [text_of[q] for q in qids], kind, cfg,
        student_dir=ctx.file("student", "model") if kind == "student_mean" else None,
    )
    beta = effective_beta(ctx.config)
    clusters_t, schedule_t, stages_t = build_schedule(sd, question_of, cluster_of, cfg, beta)
    ctx.write_table("clusters", clusters_t)
    ctx.write_table("schedule", schedule_t)
    ctx.write_table("schedule_stages", stages_t)
    ctx.summary.update(
        embedding=kind,
        beta=beta,
        rationales=clusters_t.num_rows,
        stages=cfg.stages,
        clusters=len(set(cluster_of.values())),
        total_difficulty=float(sum(sd["difficulty"].to_pylist())),
    )


SPEC = StageSpec(
    name="schedule",
    run=run,
    sections=("schedule",),
    upstream=lambda cfg: ("dataset", *rationale_stages(cfg), "student", "difficulty"),
    code=("tasks.stages.schedule", "tasks.core.curriculum", "tasks.core.embeddings", "tasks.stages.sources"),
    description="KPOD progressive schedule: question clusters and input steps per stage (Eq. 9-13)",
    # train.method = kpod_no_diversity sets beta = 0: hash the effective value only
    enabled=lambda cfg: uses_schedule(cfg.train.method),
    external=lambda cfg: {"beta": effective_beta(cfg)},
)
