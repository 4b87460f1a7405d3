"""The `difficulty` stage: KPOD's per-step difficulty (METHODS.md §2.2, Eq. 8).

    d_k = - sum_{j in step k} softmax_step(w)_j * log P(r_j | r_<j, x; reference)

The reference model is the initial student (`reference: init`, the paper's choice) or, for a
student trained from scratch whose random weights give meaningless losses, the student after a
short Std-CoT warm-up (`reference: warmup`) run with the train stage's recipe. Rationale tokens
are scored teacher-forced in the METHODS §0 format (`tasks.core.formatting.build_example`, full
rationale as the target); the target starts with exactly the tokens the `weights` stage wrote
(`token_weights.pos` 0..L-1, the same " " + text tokenization), which is checked, so token j's
NLL, weight and step line up by position.

Output: `step_difficulty` (rationale_id, step, difficulty, tokens) for every correct rationale
of a training question that has token weights (teacher, and mentor for kpod_mentor, read through
`tasks.stages.sources`). The warm-up trains on the teacher's rationales, as Std-CoT does. The
no_weight_in_difficulty ablation (uniform within-step weights, d_k = mean NLL of the step)
follows `uniform_within_step` or `train.method = kpod_no_weight_in_difficulty`; the effective
value enters the stage key. The math is in `tasks.core.difficulty`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydantic import Field

from tasks.config.base import KpodModel
from tasks.config.difficulty import DifficultyConfig
from tasks.config.methods import effective_reference, effective_uniform, rationale_stages, uses_schedule
from tasks.config.student import StudentConfig
from tasks.stages.contract import StageContext, StageSpec
from tasks.stages.sources import training_rationales

if TYPE_CHECKING:  # torch and the modules that load it are imported when the stage runs, not to list or plan it
    import torch

    from tasks.core.formatting import Example


def warm_up(ctx: StageContext, model: Any, tokenizer: Any, max_len: int) -> tuple[Any, dict[str, Any]]:
    """A short Std-CoT training of the student with the train stage's recipe (checkpoints in
    this stage's work dir, so a killed warm-up resumes)."""
    from tasks.config.train import TrainConfig
    from tasks.core.models import is_seq2seq
    from tasks.training.data import TrainMethod
    from tasks.training.recipe import Recipe, std_cot_examples

    dc: DifficultyConfig = ctx.inputs.difficulty
    examples = std_cot_examples(
        ctx.table("dataset", "questions"), ctx.table("rationales", "rationales"),
        tokenizer, is_seq2seq(model), max_len,
    )
    tcfg = TrainConfig(
        method="std_cot", seed=dc.seed, epochs=dc.warmup_epochs, batch_size=dc.warmup_batch_size,
        lr=dc.warmup_lr, max_len=max_len, device=dc.device,
    )
    recipe = Recipe(
        tcfg, model, tokenizer, TrainMethod(examples, tokenizer.pad_token_id),
        ctx.work_dir / "warmup", progress=ctx.progress,
    )
    recipe.setup()
    log = recipe.train()
    info = dict(warmup_steps=recipe.global_step, warmup_final_loss=round(log[-1]["loss"], 4) if log else None)
    return recipe.final_model(), info


def _to_score(
    ctx: StageContext, tokenizer: Any, seq2seq: bool, max_len: int,
) -> tuple[list[dict[str, Any]], list["Example"], dict[str, tuple[list[float], list[int]]]]:
    """The correct training rationales that have token weights, by rationale_id, with their
    training examples (METHODS §0 format) and their (weights, steps) in `pos` order."""
    from tasks.core.difficulty import weights_by_rationale
    from tasks.core.formatting import build_example

    qs = ctx.table("dataset", "questions", columns=["question_id", "split", "question", "answer"])
    train_q = {r["question_id"]: r for r in qs.to_pylist() if r["split"] == "train"}
    rat = training_rationales(ctx, columns=["rationale_id", "question_id", "text", "correct", "n_steps"])
    tw = ctx.table("weights", "token_weights", columns=["rationale_id", "pos", "step", "weight"])
    tw = tw.sort_by([("rationale_id", "ascending"), ("pos", "ascending")])
    per = weights_by_rationale(tw["rationale_id"].to_pylist(), tw["step"].to_pylist(), tw["weight"].to_pylist())
    todo = sorted(
        (r for r in rat.to_pylist() if r["correct"] and r["question_id"] in train_q and r["rationale_id"] in per),
        key=lambda r: r["rationale_id"],
    )
    if not todo:
        raise ValueError("difficulty: no correct training rationale has token weights")
    examples = [
        build_example(
            tokenizer, train_q[r["question_id"]]["question"], r["text"], train_q[r["question_id"]]["answer"],
            seq2seq=seq2seq, max_len=max_len, rationale_id=r["rationale_id"],
        )
        for r in todo
    ]
    return todo, examples, per


def _reference_nll(
    ctx: StageContext, model: Any, examples: list["Example"], pad_id: int, batch_size: int, device: torch.device,
) -> list[torch.Tensor]:
    """The reference model's NLL [T_e] of every example's labelled tokens, batch by batch."""
    from tasks.core.difficulty import target_token_nll
    from tasks.training.data import collate_examples

    nlls: list[torch.Tensor] = []
    for start in ctx.progress(range(0, len(examples), batch_size), desc="difficulty"):
        batch = collate_examples(examples[start : start + batch_size], pad_id)
        nlls += target_token_nll(model, {k: v.to(device) for k, v in batch.items()})
    return nlls


def _rows(
    tokenizer: Any, todo: list[dict[str, Any]], examples: list["Example"], nlls: list[torch.Tensor],
    per: dict[str, tuple[list[float], list[int]]], uniform: bool,
) -> list[dict[str, Any]]:
    """`step_difficulty` rows of every scored rationale, after checking that the student
    tokenizer gives the tokens the weights stage weighted."""
    from tasks.core.difficulty import difficulty_rows
    from tasks.core.forward import IGNORE

    rows: list[dict[str, Any]] = []
    for r, ex, nll in zip(todo, examples, nlls):
        rid = r["rationale_id"]
        ws, ss = per[rid]
        rationale_ids = tokenizer(" " + r["text"].strip(), add_special_tokens=False)["input_ids"]
        if len(rationale_ids) != len(ws):
            raise ValueError(
                f"token_weights: rationale {rid!r} has {len(ws)} tokens, the student tokenizer gives {len(rationale_ids)}"
            )
        target_ids = [t for t in ex.labels if t != IGNORE]
        rows += difficulty_rows(rid, nll, target_ids, rationale_ids, ws, ss, int(r["n_steps"]), uniform)
    return rows


def run(ctx: StageContext) -> None:
    import torch

    from tasks.core.forward import resolve_device
    from tasks.core.models import is_seq2seq, load_model

    dc: DifficultyConfig = ctx.inputs.difficulty
    uniform, reference = ctx.inputs.uniform_within_step, ctx.inputs.reference
    # base: the pretrained miniature's base scores (its tokenizer is the student's)
    source = ("pretrain", "base") if reference == "base" else ("student", "model")
    model, tokenizer = load_model(ctx.file(*source))
    seq2seq = is_seq2seq(model)
    # longest sequence the model takes; a longer example is cut and its tail steps unscored
    max_len = int(getattr(model.config, "max_position_embeddings", None) or 1_000_000)
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if reference == "warmup":
        model, info = warm_up(ctx, model, tokenizer, max_len)
    device = resolve_device(dc.device)
    model.to(device)

    todo, examples, per = _to_score(ctx, tokenizer, seq2seq, max_len)
    nlls = _reference_nll(ctx, model, examples, tokenizer.pad_token_id, dc.batch_size, device)
    rows = _rows(tokenizer, todo, examples, nlls, per, uniform)
    ctx.write_table("step_difficulty", pa.Table.from_pylist(rows))
    ds = [x["difficulty"] for x in rows]
    ctx.summary.update(
        reference=reference,
        uniform_within_step=uniform,
        rationales=len(todo),
        steps=len(rows),
        truncated=sum(e.truncated for e in examples),
        mean_difficulty=round(sum(ds) / len(ds), 4),
        mean_token_nll=round(float(torch.cat(nlls).mean()), 4),
        seconds=round(time.perf_counter() - t0, 1),
        **info,
    )


class DifficultyInputs(KpodModel):
    difficulty: DifficultyConfig = Field(description="The difficulty section.")
    student: StudentConfig = Field(description="The student section (the reference model's source).")
    uniform_within_step: bool = Field(
        description="In effect: difficulty.uniform_within_step or the kpod_no_weight_in_difficulty method."
    )
    reference: str = Field(description="The reference model in effect (init, warmup or base).")


SPEC = StageSpec(
    name="difficulty",
    run=run,
    inputs=lambda cfg: DifficultyInputs(
        difficulty=cfg.difficulty, student=cfg.student,
        uniform_within_step=effective_uniform(cfg), reference=effective_reference(cfg),
    ),
    upstream=lambda cfg: ("dataset", *rationale_stages(cfg), "student", "weights",
                          *(("pretrain",) if effective_reference(cfg) == "base" else ())),
    description="KPOD step difficulty from the reference student's token NLL (Eq. 8)",
    enabled=lambda cfg: uses_schedule(cfg.train.method),
)
