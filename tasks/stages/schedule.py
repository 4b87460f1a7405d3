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
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pydantic import Field

from tasks.config.base import KpodModel
from tasks.config.methods import effective_beta, rationale_stages, uses_schedule
from tasks.core.curriculum import output_difficulty, progressive_schedule
from tasks.stages.contract import StageContext, StageSpec
from tasks.stages.sources import training_rationales
from tasks.config.schedule import ScheduleConfig

if TYPE_CHECKING:
    from tasks.config.pipeline import PipelineConfig


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
    inp: ScheduleInputs = ctx.inputs
    cfg = inp.schedule
    sd = ctx.table("difficulty", "step_difficulty")
    rat = training_rationales(ctx, columns=["rationale_id", "question_id"])
    question_of = dict(zip(rat["rationale_id"].to_pylist(), rat["question_id"].to_pylist()))
    qids = sorted({question_of[r] for r in set(sd["rationale_id"].to_pylist()) if r in question_of})
    qs = ctx.table("dataset", "questions", columns=["question_id", "question"])
    text_of = dict(zip(qs["question_id"].to_pylist(), qs["question"].to_pylist()))
    absent = [q for q in qids if q not in text_of]
    if absent:
        raise ValueError(f"rationales: question {absent[0]!r} is not in the questions table")
    kind = _embedding_kind(cfg, inp.student_kind)
    cluster_of = question_clusters(
        qids, [text_of[q] for q in qids], kind, cfg,
        student_dir=ctx.file("student", "model") if kind == "student_mean" else None,
    )
    beta = inp.beta
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


class ScheduleInputs(KpodModel):
    schedule: ScheduleConfig = Field(description="The schedule section.")
    beta: float = Field(description="beta in effect: the section's, or 0 under kpod_no_diversity.")
    student_kind: str = Field(description="student.kind: decides the auto question embedding.")


SPEC = StageSpec(
    name="schedule",
    run=run,
    inputs=lambda cfg: ScheduleInputs(schedule=cfg.schedule, beta=effective_beta(cfg), student_kind=cfg.student.kind),
    upstream=lambda cfg: ("dataset", *rationale_stages(cfg), "student", "difficulty"),
    description="KPOD progressive schedule: question clusters and input steps per stage (Eq. 9-13)",
    enabled=lambda cfg: uses_schedule(cfg.train.method),
)
