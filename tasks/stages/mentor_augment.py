"""The `mentor_augment` stage (Mentor-KD, METHODS.md §3): the mentor's own rationales.

The trained mentor samples `augment.samples` rationales per TRAINING question (all of them, the
ones the teacher got wrong too) at the configured temperature and top-k, each seeded by
(seed, question, sample) so a rerun or another batch size gives the same text. Each sample is
graded and segmented like the teacher's (`tasks.training.mentor.augment_rows`) and stored in
`rationales` (source='mentor', rationale_id `<question_id>:mentor:<i>`) and `steps`. Incorrect
samples stay with correct=false; only correct ones are trained on. Finished samples are saved
in chunks (`tasks.core.saved_generation`), so a killed stage resumes with the samples left.
"""

from __future__ import annotations

import time

from pydantic import Field

from tasks.config.base import KpodModel, runtime_field
from tasks.config.mentor import MentorAugment
from tasks.config.methods import uses_mentor_data
from tasks.core.formatting import encode_prompt
from tasks.core.rationale_rows import rows_to_tables
from tasks.stages.contract import StageContext, StageSpec


def run(ctx: StageContext) -> None:
    from tasks.core.forward import is_seq2seq, resolve_device
    from tasks.core.models import load_model
    from tasks.core.sampling import completion_seed, sample_ids
    from tasks.core.saved_generation import generate_saved, model_stamp
    from tasks.training.mentor import augment_rows

    inp: MentorAugmentInputs = ctx.inputs
    aug = inp.augment
    model_dir = ctx.file("mentor_train", "model")
    model, tok = load_model(model_dir)
    model.to(resolve_device(inp.device))
    seq2seq = is_seq2seq(model)
    qrows = ctx.table("dataset", "questions", columns=["question_id", "split", "question", "answer", "answer_type"]).to_pylist()
    train_q = sorted((q for q in qrows if q["split"] == "train"), key=lambda q: q["question_id"])
    if not train_q:
        raise ValueError("mentor_augment: dataset.questions has no train-split question")

    prompts, seeds = [], []
    for q in train_q:
        ids = encode_prompt(tok, q["question"], seq2seq)
        for s in range(aug.samples):
            prompts.append(ids)
            seeds.append(completion_seed(aug.seed, q["question_id"], s))
    t0 = time.perf_counter()
    with ctx.progress(total=len(prompts), desc="mentor samples", unit="sample") as bar:
        # finished chunks are saved in the work dir: a rerun after a crash samples the rest only
        flat, restored = generate_saved(
            lambda idx, progress: sample_ids(model, tok, [prompts[i] for i in idx], [seeds[i] for i in idx],
                                             aug.temperature, aug.top_k, aug.max_new_tokens, aug.batch_size,
                                             progress=progress),
            prompts, aug.batch_size, ctx.work_dir / "sampled", progress=bar.update, tags=seeds,
            fingerprint=f"sampled t={aug.temperature} top_k={aug.top_k} max_new_tokens={aug.max_new_tokens} "
            + model_stamp(model_dir),
        )
    sample_s = time.perf_counter() - t0
    completions = [flat[i * aug.samples : (i + 1) * aug.samples] for i in range(len(train_q))]
    rows, counts = augment_rows(train_q, completions, inp.min_steps)
    tables = rows_to_tables(rows)
    ctx.write_table("rationales", tables["rationales"])
    ctx.write_table("steps", tables["steps"])

    ctx.summary.update(
        counts,
        questions=len(train_q),
        stored=len(rows),
        # the paper's data: 61-99% of the mentor's samples are correct, depending on the task
        augmentation_yield=round(counts["correct"] / counts["sampled"], 4),
        questions_with_a_correct_sample=len({r.rationale["question_id"] for r in rows if r.rationale["correct"]}),
        # of this run's own sampling; `resumed_samples` were read back from an interrupted run
        samples_per_s=round((len(prompts) - restored) / max(sample_s, 1e-9), 2) if restored < len(prompts) else None,
        **({"resumed_samples": restored} if restored else {}),
    )


class MentorAugmentInputs(KpodModel):
    augment: MentorAugment = Field(description="mentor.augment.")
    min_steps: int = Field(description="rationales.min_steps: shorter sampled rationales are not stored.")
    device: str = runtime_field("auto", "mentor.training.device: where the mentor samples.")


SPEC = StageSpec(
    name="mentor_augment",
    run=run,
    inputs=lambda cfg: MentorAugmentInputs(
        augment=cfg.mentor.augment, min_steps=cfg.rationales.min_steps, device=cfg.mentor.training.device
    ),
    upstream=lambda cfg: ("dataset", "rationales", "student", "mentor_train"),
    description="Mentor-KD: the mentor samples n rationales per training question, graded",
    enabled=lambda cfg: uses_mentor_data(cfg.train.method),
)
