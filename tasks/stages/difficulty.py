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
`tasks.stages.sources`). The warm-up trains on the teacher's rationales, as Std-CoT does. The no_weight_in_difficulty ablation (uniform
within-step weights, d_k = mean NLL of the step) follows `uniform_within_step` or
`train.method = kpod_no_weight_in_difficulty`; the effective value enters the stage key.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from pydantic import Field

from tasks.config.base import KpodModel
from tasks.config.methods import effective_reference, effective_uniform, rationale_stages, uses_schedule
from tasks.config.student import StudentConfig
from tasks.stages.contract import StageContext, StageSpec
from tasks.stages.sources import training_rationales
from tasks.config.difficulty import DifficultyConfig

if TYPE_CHECKING:
    from tasks.core.formatting import Example
    from tasks.config.pipeline import PipelineConfig


# ---- the pure core ---------------------------------------------------------------------------
def step_difficulty(
    token_nll: torch.Tensor, weights: torch.Tensor, token_step: torch.Tensor, n_steps: int,
    uniform_within_step: bool = False,
) -> torch.Tensor:
    """Eq. 8: d_k = - sum_{j in step k} softmax_step(w)_j * log P(r_j | r_<j, x).

    token_nll [L]: -log P(r_j | r_<j, x) of each rationale token under the reference model;
    weights [L]: the token weights w_j; token_step [L] ints in [0, n_steps): the 0-based step
    of each token. Returns d [n_steps]. The softmax runs over the tokens of one step only.
    `uniform_within_step` replaces the softmax by 1/|step| (the no_weight_in_difficulty
    ablation), so d_k is the step's mean token NLL. A step without tokens has d_k = 0.
    """
    if not (token_nll.shape == weights.shape == token_step.shape) or token_nll.dim() != 1:
        raise ValueError(
            f"step_difficulty: token_nll {tuple(token_nll.shape)}, weights {tuple(weights.shape)} "
            f"and token_step {tuple(token_step.shape)} must be the same 1-D shape"
        )
    idx = token_step.long()
    if len(idx) and (idx.min() < 0 or idx.max() >= n_steps):
        raise ValueError(f"step_difficulty: token_step outside [0, {n_steps})")
    nll = token_nll.double()
    w = torch.zeros_like(nll) if uniform_within_step else weights.double()
    # softmax within each step: subtract the step's max before exp for stability
    step_max = torch.full((n_steps,), -torch.inf, dtype=w.dtype).scatter_reduce(
        0, idx, w, reduce="amax", include_self=True
    )
    e = torch.exp(w - step_max[idx])  # [L]
    denom = torch.zeros(n_steps, dtype=w.dtype).index_add(0, idx, e)  # [n]
    soft = e / denom[idx]  # [L], sums to 1 within each step
    return torch.zeros(n_steps, dtype=w.dtype).index_add(0, idx, soft * nll)


def target_token_nll(model: Any, examples: list["Example"], pad_id: int, batch_size: int, device: Any) -> list[torch.Tensor]:
    """-log P(label_t | ...) of every labelled position of each example, in order: [T_e] each.

    Teacher-forced, one forward pass per batch. Decoder-only: position t predicts token t+1;
    seq2seq: the decoder's logits are aligned with the labels.
    """
    from tasks.core.models import is_seq2seq
    from tasks.training.data import collate_examples

    seq2seq = is_seq2seq(model)
    model.eval()
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate_examples(chunk, pad_id).items()}
            labels = batch["labels"]
            if seq2seq:
                dec = model.prepare_decoder_input_ids_from_labels(labels=labels)
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=dec,
                ).logits  # [B, T, V]
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logits, labels = logits[:, :-1], labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
            )  # [B, T]
            for b in range(len(chunk)):
                out.append(nll[b][labels[b] != -100].double().cpu())
    return out


def difficulty_rows(
    rationale_id: str, target_nll: torch.Tensor, target_ids: list[int], rationale_ids: list[int],
    weights: list[float], steps: list[int], n_steps: int, uniform_within_step: bool,
) -> list[dict[str, Any]]:
    """`step_difficulty` rows of one rationale.

    target_nll [T] / target_ids [T]: the NLL and ids of the example's labelled tokens; the
    first L of them must be `rationale_ids` [L] (the weights stage's tokens, `pos` order), with
    `weights` [L] and 0-based `steps` [L]. Tokens cut off by truncation (T < L) are not scored;
    a step with no scored token gets difficulty 0 and tokens 0.
    """
    L = len(rationale_ids)
    if not (len(weights) == len(steps) == L):
        raise ValueError(f"token_weights: rationale {rationale_id!r} has ragged weight/step rows")
    scored = min(L, len(target_ids))
    if list(target_ids[:scored]) != list(rationale_ids[:scored]):
        raise ValueError(
            f"rationale {rationale_id!r}: the training target's tokens differ from the tokens "
            "the weights stage weighted; both must tokenize ' ' + text with the student tokenizer"
        )
    if any(not 0 <= s < n_steps for s in steps):
        raise ValueError(f"token_weights: rationale {rationale_id!r} has a step outside 0..{n_steps - 1}")
    step_t = torch.tensor(steps[:scored], dtype=torch.long)
    d = step_difficulty(
        target_nll[:scored], torch.tensor(weights[:scored], dtype=torch.float64), step_t,
        n_steps, uniform_within_step=uniform_within_step,
    )
    counts = torch.bincount(step_t, minlength=n_steps)
    return [
        dict(rationale_id=rationale_id, step=k, difficulty=float(d[k]), tokens=int(counts[k]))
        for k in range(n_steps)
    ]


# ---- the stage -------------------------------------------------------------------------------
def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("difficulty.device is 'cuda' but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def warm_up(ctx: StageContext, model: Any, tokenizer: Any, max_len: int) -> tuple[Any, dict[str, Any]]:
    """A short Std-CoT training of the student with the train stage's recipe (checkpoints in
    this stage's work dir, so a killed warm-up resumes)."""
    from tasks.core.models import is_seq2seq
    from tasks.stages.train import Recipe, std_cot_examples
    from tasks.config.train import TrainConfig
    from tasks.training.data import TrainMethod

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


def run(ctx: StageContext) -> None:
    from tasks.core.formatting import build_example
    from tasks.core.models import is_seq2seq, load_model

    dc: DifficultyConfig = ctx.inputs.difficulty
    uniform, reference = ctx.inputs.uniform_within_step, ctx.inputs.reference
    model, tokenizer = load_model(ctx.file("student", "model"))
    seq2seq = is_seq2seq(model)
    # longest sequence the model takes; a longer example is cut and its tail steps unscored
    max_len = int(getattr(model.config, "max_position_embeddings", None) or 1_000_000)
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if reference == "warmup":
        model, info = warm_up(ctx, model, tokenizer, max_len)
    device = _device(dc.device)
    model.to(device)

    qs = ctx.table("dataset", "questions", columns=["question_id", "split", "question", "answer"])
    train_q = {r["question_id"]: r for r in qs.to_pylist() if r["split"] == "train"}
    rat = training_rationales(ctx, columns=["rationale_id", "question_id", "text", "correct", "n_steps"])
    tw = ctx.table("weights", "token_weights", columns=["rationale_id", "pos", "step", "weight"])
    tw = tw.sort_by([("rationale_id", "ascending"), ("pos", "ascending")])
    per: dict[str, tuple[list[float], list[int]]] = {}
    for rid, step, w in zip(tw["rationale_id"].to_pylist(), tw["step"].to_pylist(), tw["weight"].to_pylist()):
        ws, ss = per.setdefault(rid, ([], []))
        ws.append(w)
        ss.append(step)
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
    nlls = []
    for start in ctx.progress(range(0, len(examples), dc.batch_size), desc="difficulty"):
        nlls += target_token_nll(model, examples[start : start + dc.batch_size], tokenizer.pad_token_id, dc.batch_size, device)
    rows: list[dict[str, Any]] = []
    for r, ex, nll in zip(todo, examples, nlls):
        rid = r["rationale_id"]
        ws, ss = per[rid]
        rationale_ids = tokenizer(" " + r["text"].strip(), add_special_tokens=False)["input_ids"]
        if len(rationale_ids) != len(ws):
            raise ValueError(
                f"token_weights: rationale {rid!r} has {len(ws)} tokens, the student tokenizer gives {len(rationale_ids)}"
            )
        target_ids = [t for t in ex.labels if t != -100]
        rows += difficulty_rows(rid, nll, target_ids, rationale_ids, ws, ss, int(r["n_steps"]), uniform)
    table = pa.Table.from_pylist(rows)
    ctx.write_table("step_difficulty", table)
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
    reference: str = Field(description="The reference model in effect (init or warmup).")


SPEC = StageSpec(
    name="difficulty",
    run=run,
    inputs=lambda cfg: DifficultyInputs(
        difficulty=cfg.difficulty, student=cfg.student,
        uniform_within_step=effective_uniform(cfg), reference=effective_reference(cfg),
    ),
    upstream=lambda cfg: ("dataset", *rationale_stages(cfg), "student", "weights"),
    description="KPOD step difficulty from the reference student's token NLL (Eq. 8)",
    enabled=lambda cfg: uses_schedule(cfg.train.method),
)
