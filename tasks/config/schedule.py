"""The `schedule` section: KPOD's progressive schedule (Eq. 9-13)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import KpodModel


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
    start: Literal["last_step", "answer_only"] = Field(
        "last_step",
        description="c_i(0), where the curriculum starts: last_step = every rationale outputs its "
        "last step (n_i - 1 input steps; METHODS' reading of the paper); answer_only = the whole "
        "rationale is input and only the answer is output (n_i; a departure, measured in "
        "docs/benchmarks.md).",
    )
    delta_s: int = Field(
        1, ge=1, le=100,
        description="Delta_s, steps a selected rationale moves from input to output per stage "
        "(fewer when fewer are left); 1 is the paper's.",
    )
    seed: int = Field(0, ge=0, description="Seed of K-means.")
