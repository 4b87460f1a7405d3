"""The `schedule` stage: KPOD's progressive in-rationale curriculum (METHODS.md §2.3).

Reads the per-step difficulties, embeds and clusters the questions, and runs the pure schedule
of `tasks.core.curriculum` for stages 0..T. Training epoch e uses stage min(e, T) (0-based epochs):
stage 0 outputs only each rationale's last step (or only the answer: `schedule.start`), stage T
the full rationale.

Tables:
- `clusters` (rationale_id, question_id, cluster): K-means cluster of the question embedding;
- `schedule` (stage, rationale_id, input_steps, output_difficulty): c_i(t) and h_i(t) for
  every stage 0..T and every scheduled rationale;
- `schedule_stages` (stage, budget, used, selected, output_steps, cluster_counts): D(t), H(t),
  |S(t)|, the steps in that stage's targets, and the selected rationales per cluster (JSON).
"""

from __future__ import annotations

from pydantic import Field

from tasks.config.base import KpodModel
from tasks.config.methods import effective_beta, rationale_stages, uses_schedule
from tasks.config.schedule import ScheduleConfig
from tasks.stages.contract import StageContext, StageSpec
from tasks.stages.sources import training_rationales


def run(ctx: StageContext) -> None:
    from tasks.core.schedule_tables import build_schedule, embedding_kind, question_clusters

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
    kind = embedding_kind(cfg, inp.student_kind)
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
