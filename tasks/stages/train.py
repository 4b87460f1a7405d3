"""The `train` stage: distil rationales into the student with the configured method.

A thin shell: it reads the student, the training rationales and whatever the method needs
(KPOD's token weights and schedule, Mentor-KD's mentor or its cached log-probs), builds the
method's examples (tasks/training) and runs the recipe (tasks/training/recipe.py), which
checkpoints into this stage's work dir and resumes after a kill. With `select_every` it keeps
the best epoch by val accuracy (never test). With `train.processes` N > 1 it runs that same
code in N ranks under `accelerate launch` (tasks/stages/ranks.py); rank 0 writes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pydantic import Field

from tasks.config.base import KpodModel
from tasks.config.methods import (
    PROGRESSIVE, kd_stages, kpod_stages, rationale_stages, uses_mentor, uses_mentor_data, uses_weights,
)
from tasks.config.mentor import KdSettings
from tasks.config.student import StudentConfig
from tasks.config.train import TrainConfig
from tasks.stages.contract import StageContext, StageSpec
from tasks.stages.ranks import launch_ranks, launched
from tasks.stages.sources import training_rationales, training_steps

if TYPE_CHECKING:  # torch and the modules that load it are imported when the stage runs, not to list or plan it
    from tasks.training.progressive import KpodMethod


def run(ctx: StageContext) -> None:
    from tasks.core.models import is_seq2seq, load_model, save_model
    from tasks.training.data import TrainMethod
    from tasks.training.recipe import Recipe, std_cot_examples, train_log_table

    cfg: TrainConfig = ctx.inputs.train
    if cfg.processes > 1 and not launched():  # this process launches the ranks; they train
        from tasks.core.forward import resolve_device

        return launch_ranks(ctx, cfg.processes, on_cpu=resolve_device(cfg.device).type == "cpu")
    model, tokenizer = load_model(ctx.file("student", "model"))
    seq2seq = is_seq2seq(model)
    questions, rationales = ctx.table("dataset", "questions"), training_rationales(ctx)
    mentor = uses_mentor(cfg.method)
    if uses_weights(cfg.method):  # progressive, token-weighted examples (METHODS §2.3)
        method = kpod_method(ctx, tokenizer, seq2seq)
    else:
        method = TrainMethod(
            std_cot_examples(
                questions, rationales, tokenizer, seq2seq, cfg.max_len,
                sources=("teacher", "mentor") if uses_mentor_data(cfg.method) else ("teacher",),
            ),
            tokenizer.pad_token_id,
        )
    examples = method.examples
    if mentor:  # Mentor-KD: teacher + mentor rationales, plus the KD term
        from tasks.training.mentor_kd import with_mentor_kd

        kd = ctx.inputs.kd
        method = with_mentor_kd(
            kd, method, model, tokenizer, questions, rationales,
            mentor_dir=ctx.file("mentor_train", "model") if kd.source == "online" else None,
            mentor_logits=ctx.table("mentor_cache", "mentor_logits") if kd.source == "cached_topk" else None,
            teacher_logprobs=ctx.table("teacher", "teacher_logprobs") if kd.source == "teacher_topk" else None,
        )
    selection = _val_selection(ctx, cfg, questions, tokenizer)
    recipe = Recipe(cfg, model, tokenizer, method, ctx.work_dir, progress=ctx.progress, on_epoch_end=selection)
    t0 = time.perf_counter()
    recipe.setup()
    log = recipe.train()
    if recipe.accelerator.is_main_process:
        if selection is not None:
            best = selection.restore_best(recipe.accelerator.unwrap_model(recipe.model))
            ctx.write_table("val_selection", selection.table())
            ctx.summary.update(selected_epoch=best["epoch"] + 1, selected_val_accuracy=round(best["accuracy"], 4))
        save_model(recipe.final_model(), tokenizer, ctx.output_path("model"))
        ctx.write_table("train_log", train_log_table(log))
    seconds = time.perf_counter() - t0
    new_tokens = sum(r["tokens"] for r in log if recipe.resumed_from is None or r["step"] > recipe.resumed_from)
    ctx.summary.update(
        method=cfg.method,
        examples=len(examples),
        truncated=sum(e.truncated for e in examples),
        steps=recipe.global_step,
        resumed_from=recipe.resumed_from,
        final_loss=round(log[-1]["loss"], 4) if log else None,
        seconds=round(seconds, 1),
        tokens_per_s=round(new_tokens / max(seconds, 1e-9), 1),
    )


def _val_selection(ctx: StageContext, cfg: TrainConfig, questions: Any, tokenizer: Any) -> Any:
    """Model selection on val only (never test), or None when `train.select_every` is 0."""
    if not cfg.select_every:
        return None
    from tasks.core.grading import select_questions
    from tasks.training.selection import ValSelection

    if "val" not in questions.column("split").to_pylist():
        raise ValueError("train.select_every needs val questions, and the dataset has none; set it to 0")
    return ValSelection(
        select_questions(questions, ["val"], cfg.select_limit), tokenizer, cfg.select_every,
        cfg.epochs, ctx.work_dir, cfg.select_max_new_tokens,
    )


def kpod_method(ctx: StageContext, tokenizer: Any, seq2seq: bool) -> KpodMethod:
    """The `TrainMethod` of a KPOD method: progressive, token-weighted examples (METHODS §2.3)."""
    from tasks.training.progressive import KpodMethod, load_rationales

    inp: TrainInputs = ctx.inputs
    method, T = inp.train.method, inp.schedule_stages
    progressive = method in PROGRESSIVE
    W = inp.train.curriculum_warmup_epochs
    if progressive and W + T >= inp.train.epochs:
        raise ValueError(
            f"train.curriculum_warmup_epochs ({W}) + schedule.stages (T={T}) must be below "
            f"train.epochs ({inp.train.epochs}): epoch W + T is the first on full rationales after "
            "the curriculum (METHODS: T = half the epochs)"
        )
    rationales = load_rationales(
        ctx.table("dataset", "questions"), training_rationales(ctx), training_steps(ctx),
        ctx.table("weights", "token_weights"), ctx.table("schedule", "schedule") if progressive else None,
        sources=("teacher", "mentor") if uses_mentor_data(method) else ("teacher",),
    )
    return KpodMethod(
        rationales, tokenizer, seq2seq, inp.train.max_len, tokenizer.pad_token_id, method, T or 0,
        weight_floor=inp.train.weight_floor, warmup_epochs=W,
        input_weight=inp.train.curriculum_input_weight,
    )


class TrainInputs(KpodModel):
    train: TrainConfig = Field(description="The train section.")
    student: StudentConfig = Field(description="The student section.")
    kd: KdSettings | None = Field(None, description="mentor.kd, for the Mentor-KD methods (else none).")
    schedule_stages: int | None = Field(
        None, description="schedule.stages (T), for the progressive KPOD methods (else none)."
    )


def train_inputs(cfg: Any) -> TrainInputs:
    return TrainInputs(
        train=cfg.train, student=cfg.student,
        kd=cfg.mentor.kd if uses_mentor(cfg.train.method) else None,
        schedule_stages=cfg.schedule.stages if cfg.train.method in PROGRESSIVE else None,
    )


SPEC = StageSpec(
    name="train",
    run=run,
    inputs=train_inputs,
    # methods that read more (token weights, schedule, mentor output) extend Std-CoT's
    upstream=lambda cfg: (
        "dataset", *rationale_stages(cfg), "student", *kd_stages(cfg), *kpod_stages(cfg.train.method)
    ),
    description="train the student on the rationales (Std-CoT; KPOD and Mentor-KD plug in)",
)
