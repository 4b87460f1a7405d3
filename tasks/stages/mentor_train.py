"""The `mentor_train` stage (Mentor-KD, METHODS.md §3): train the mentor, score it on val.

The mentor is an intermediate-size model of the student's family sharing the student's
tokenizer (`tasks.training.mentor.build_mentor`), trained with Std-CoT on the correct teacher
rationales by the train stage's recipe, saved (file artifact "model") and scored greedily on
val. With `mentor.training.processes` N > 1 the same code runs in N ranks under `accelerate
launch` (tasks/stages/ranks.py); rank 0 writes and scores. Its inputs hold only the part of
the `mentor` section it reads, so changing the KD weight (read by `train` alone) does not
retrain the mentor.
"""

from __future__ import annotations

import time

from pydantic import Field

from tasks.config.base import KpodModel, runtime_field
from tasks.config.mentor import MentorModel, MentorTraining
from tasks.config.methods import uses_mentor_data
from tasks.config.student import StudentConfig
from tasks.config.train import TrainConfig
from tasks.core.formatting import encode_prompt
from tasks.core.grading import grade_outputs, select_questions
from tasks.stages.contract import StageContext, StageSpec
from tasks.stages.ranks import launch_ranks, launched


def run(ctx: StageContext) -> None:
    from tasks.core.forward import is_seq2seq, resolve_device
    from tasks.core.generation import generate_ids
    from tasks.core.models import count_parameters, load_model, load_tokenizer, save_model
    from tasks.training.data import TrainMethod
    from tasks.training.mentor import build_mentor
    from tasks.training.recipe import Recipe, std_cot_examples, train_log_table

    inp: MentorTrainInputs = ctx.inputs
    mt = inp.training
    if mt.processes > 1 and not launched():  # this process launches the ranks; they train
        return launch_ranks(ctx, mt.processes, on_cpu=resolve_device(mt.device).type == "cpu")
    if inp.model.init == "base":  # the mentor-shape base, on the tokenizer it shares with the student
        model, tok = load_model(ctx.file("pretrain", "base_mentor"))
    else:
        model, tok = build_mentor(inp.model, load_tokenizer(ctx.file("student", "model")))
    seq2seq = is_seq2seq(model)
    _check_same_family(ctx, seq2seq)
    questions = ctx.table("dataset", "questions")
    examples = std_cot_examples(questions, ctx.table("rationales", "rationales"), tok, seq2seq, mt.max_len)
    tcfg = TrainConfig(
        method="std_cot", seed=mt.seed, epochs=mt.epochs, batch_size=mt.batch_size, lr=mt.lr,
        max_len=mt.max_len, lora=mt.lora, device=mt.device, bf16=mt.bf16,
    )
    t0 = time.perf_counter()
    recipe = Recipe(tcfg, model, tok, TrainMethod(examples, tok.pad_token_id), ctx.work_dir, progress=ctx.progress)
    recipe.setup()
    log = recipe.train()
    train_s = time.perf_counter() - t0
    mentor = recipe.final_model()
    if not recipe.accelerator.is_main_process:
        return
    save_model(mentor, tok, ctx.output_path("model"))
    # its own table name: the catalog unions same-named tables, and this is not the student's log
    ctx.write_table("mentor_train_log", train_log_table(log))

    val = select_questions(questions, ["val"], mt.val_limit)
    mentor.to(resolve_device(mt.device))
    prompts = [encode_prompt(tok, q, seq2seq) for q in val.column("question").to_pylist()]
    graded = grade_outputs(val, generate_ids(mentor, tok, prompts, inp.batch_size, inp.max_new_tokens))
    n_ok = sum(graded.column("correct").to_pylist())
    ctx.summary.update(
        kind=inp.model.kind,
        parameters=count_parameters(mentor),
        examples=len(examples),
        steps=recipe.global_step,
        resumed_from=recipe.resumed_from,
        final_loss=round(log[-1]["loss"], 4) if log else None,
        train_seconds=round(train_s, 1),
        val_n=graded.num_rows,
        val_accuracy=round(n_ok / graded.num_rows, 4),
    )


def _check_same_family(ctx: StageContext, seq2seq: bool) -> None:
    """The KD term compares the two models' logits token by token: both decoder-only or both seq2seq."""
    from transformers import AutoConfig

    student = AutoConfig.from_pretrained(str(ctx.file("student", "model")))
    if bool(getattr(student, "is_encoder_decoder", False)) != seq2seq:
        raise ValueError(
            "mentor.model: the mentor and the student must both be decoder-only or both seq2seq "
            "(the KD term compares their logits token by token); for a seq2seq student give an hf "
            "seq2seq mentor"
        )


class MentorTrainInputs(KpodModel):
    student: StudentConfig = Field(description="The student section (its tokenizer is the mentor's).")
    model: MentorModel = Field(description="mentor.model.")
    training: MentorTraining = Field(description="mentor.training.")
    max_new_tokens: int = Field(description="mentor.augment.max_new_tokens: the length of val answers.")
    batch_size: int = runtime_field(16, "mentor.augment.batch_size: val questions generated together.")


SPEC = StageSpec(
    name="mentor_train",
    run=run,
    inputs=lambda cfg: MentorTrainInputs(
        student=cfg.student, model=cfg.mentor.model, training=cfg.mentor.training,
        max_new_tokens=cfg.mentor.augment.max_new_tokens, batch_size=cfg.mentor.augment.batch_size,
    ),
    upstream=lambda cfg: ("dataset", "rationales", "student", *(("pretrain",) if cfg.mentor.model.init == "base" else ())),
    description="Mentor-KD: train the mentor (bigger, same tokenizer) with Std-CoT; val accuracy",
    enabled=lambda cfg: uses_mentor_data(cfg.train.method),
)
