"""The `mentor_cache` stage (Mentor-KD with `kd.source = cached_topk`): the mentor's soft labels.

`mentor_logits`: the mentor's top-k log-probs at every target token of every rationale the
student trains on (correct teacher + mentor rationales of training questions,
`tasks.training.mentor.kd_targets`), so a rerun of the student never reruns the mentor. Its
own stage, so switching the KD source or k never resamples the mentor's rationales.
"""

from __future__ import annotations

import time

from pydantic import Field

from tasks.config.base import KpodModel, runtime_field
from tasks.config.methods import kd_stages
from tasks.stages.contract import StageContext, StageSpec


def run(ctx: StageContext) -> None:
    from tasks.core.forward import resolve_device
    from tasks.core.models import load_model
    from tasks.training.mentor import kd_targets, mentor_logits_table

    inp: MentorCacheInputs = ctx.inputs
    model, tok = load_model(ctx.file("mentor_train", "model"))
    device = resolve_device(inp.device)
    model.to(device)
    questions = ctx.table("dataset", "questions", columns=["question_id", "split", "question", "answer"]).to_pylist()
    by_id = {q["question_id"]: q for q in questions}
    cols = ["rationale_id", "question_id", "text", "correct"]
    rationales = ctx.table("rationales", "rationales", columns=cols).to_pylist()
    rationales += ctx.table("mentor_augment", "rationales", columns=cols).to_pylist()
    targets = kd_targets(by_id, rationales)
    t0 = time.perf_counter()
    table = mentor_logits_table(model, tok, by_id, targets, inp.topk, inp.batch_size, device, ctx.progress)
    ctx.write_table("mentor_logits", table)
    ctx.summary.update(
        rationales=len(targets), tokens=table.num_rows, topk=inp.topk,
        seconds=round(time.perf_counter() - t0, 1),
    )


class MentorCacheInputs(KpodModel):
    topk: int = Field(description="mentor.kd.topk: tokens kept per position (tau is applied when training).")
    batch_size: int = runtime_field(16, "mentor.augment.batch_size: rationales scored together.")
    device: str = runtime_field("auto", "mentor.training.device: where the mentor runs.")


SPEC = StageSpec(
    name="mentor_cache",
    run=run,
    inputs=lambda cfg: MentorCacheInputs(
        topk=cfg.mentor.kd.topk, batch_size=cfg.mentor.augment.batch_size, device=cfg.mentor.training.device
    ),
    upstream=lambda cfg: ("dataset", "rationales", "mentor_train", "mentor_augment"),
    description="Mentor-KD (kd.source=cached_topk): the mentor's top-k log-probs per target token",
    enabled=lambda cfg: "mentor_cache" in kd_stages(cfg),
)
