"""Mentor-KD (METHODS.md §3): the `mentor_train`, `mentor_augment` and `mentor_cache` stages.

- `mentor_train`: an intermediate-size model of the student's family, sharing the student's
  tokenizer (embedded: a bigger LLaMA built on the student's tokenizer; hf: any model directory
  whose vocabulary equals the student's, else refused), trained with Std-CoT on the correct
  teacher rationales by the train stage's recipe, saved (file artifact "model") and scored
  greedily on val.
- `mentor_augment`: the mentor samples `augment.samples` rationales per TRAINING question (all
  of them, the ones the teacher got wrong too) at temperature 0.7, top-k 50; each is graded by
  `tasks.core.answers` and segmented into steps by the rationales stage's `build_rows`, and stored in
  `rationales` (source='mentor', rationale_id `<question_id>:mentor:<i>`) and `steps`. Incorrect
  samples stay with correct=false; only correct ones are trained on.
- `mentor_cache` (only with `kd.source = cached_topk`): `mentor_logits`, the mentor's top-k
  log-probs at every target token of every rationale the student trains on (correct teacher +
  mentor rationales of training questions), so a rerun of the student never reruns the mentor.
  Its own stage, so switching the KD source or k never resamples.

Keys: each stage's typed inputs hold only the part of the `mentor` section it reads, so
changing the KD weight (read by `train` alone) does not retrain the mentor.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from pydantic import Field

from tasks.config.base import KpodModel, runtime_field
from tasks.config.mentor import MentorAugment, MentorModel, MentorTraining
from tasks.config.methods import kd_stages, uses_mentor
from tasks.config.student import StudentConfig
from tasks.stages.contract import StageSpec

if TYPE_CHECKING:
    from tasks.config.pipeline import PipelineConfig
    from tasks.stages.contract import StageContext


# ---- the mentor model ------------------------------------------------------------------------
def load_tokenizer(directory: Any) -> Any:
    """The tokenizer saved with a model directory (the student's), pad token as models.load_model sets it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_mentor(cfg: MentorModel, student_tokenizer: Any) -> tuple[Any, Any]:
    """(mentor model, tokenizer): embedded on the student's tokenizer, or an HF model whose
    vocabulary must equal the student's (ValueError naming the mentor otherwise)."""
    from tasks.core.models import assert_same_vocab, embedded_llama, load_model

    if cfg.kind == "hf":
        model, tok = load_model(cfg.name_or_path)
        assert_same_vocab(student_tokenizer, tok, f"mentor tokenizer (mentor.model.name_or_path={cfg.name_or_path!r})")
        return model, student_tokenizer
    return embedded_llama(cfg, student_tokenizer), student_tokenizer


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("mentor.training.device is 'cuda' but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


# ---- mentor_train ----------------------------------------------------------------------------
def run_train(ctx: "StageContext") -> None:
    from tasks.core.grading import grade_outputs, select_questions
    from tasks.core.formatting import encode_prompt
    from tasks.core.generation import generate_ids
    from tasks.core.models import count_parameters, is_seq2seq, save_model
    from tasks.training.recipe import Recipe, std_cot_examples, train_log_table
    from tasks.config.train import TrainConfig
    from tasks.training.data import TrainMethod

    inp: MentorTrainInputs = ctx.inputs
    mt = inp.training
    student_tok = load_tokenizer(ctx.file("student", "model"))
    model, tok = build_mentor(inp.model, student_tok)
    seq2seq = is_seq2seq(model)
    from transformers import AutoConfig

    if bool(getattr(AutoConfig.from_pretrained(str(ctx.file("student", "model"))), "is_encoder_decoder", False)) != seq2seq:
        raise ValueError(
            "mentor.model: the mentor and the student must both be decoder-only or both seq2seq "
            "(the KD term compares their logits token by token); for a seq2seq student give an hf "
            "seq2seq mentor"
        )
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
    mentor.to(_device(mt.device))
    prompts = [encode_prompt(tok, q, seq2seq) for q in val.column("question").to_pylist()]
    outputs = generate_ids(mentor, tok, prompts, inp.batch_size, inp.max_new_tokens)
    graded = grade_outputs(val, outputs)
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


# ---- mentor_augment: pure parts --------------------------------------------------------------
def augment_rows(
    questions: list[dict], completions: list[list[str]], min_steps: int
) -> tuple[list[Any], dict[str, int]]:
    """`RationaleRows` of the mentor's samples: completions[i][s] is sample s of questions[i].

    Every sample is graded against the question's gold answer by `tasks.core.answers` (through the
    rationales stage's `build_rows`, which strips the answer sentence the student format ends
    with). Empty completions and rationales with fewer than `min_steps` steps are not stored
    (counted); incorrect ones are stored with correct=false. Returns (rows, counts).
    """
    from tasks.stages.rationales import build_rows

    if len(completions) != len(questions):
        raise ValueError(f"augment_rows: {len(completions)} completion lists for {len(questions)} questions")
    c = dict(sampled=0, correct=0, empty=0, dropped_short=0)
    rows = []
    for q, outs in zip(questions, completions):
        for s, text in enumerate(outs):
            c["sampled"] += 1
            if not text.strip():
                c["empty"] += 1
                continue
            r = build_rows(q["question_id"], "mentor", s, text, q["answer"], q["answer_type"], True)
            c["correct"] += bool(r.rationale["correct"])
            if r.rationale["n_steps"] < min_steps:
                c["dropped_short"] += 1
                continue
            rows.append(r)
    return rows, c


def kd_targets(
    questions: dict[str, dict], rationales: list[dict]
) -> list[dict]:
    """The rationales the student trains on: correct ones of training questions, by id."""
    out = [
        r for r in rationales
        if r["correct"] and r["question_id"] in questions and questions[r["question_id"]]["split"] == "train"
    ]
    return sorted(out, key=lambda r: r["rationale_id"])


def mentor_logits_table(
    model: Any, tokenizer: Any, questions: dict[str, dict], targets: list[dict], k: int,
    batch_size: int, device: torch.device, progress: Any = None,
) -> pa.Table:
    """`mentor_logits`: the mentor's top-k log-probs (temperature 1) at every target token of
    each full-rationale training example (`formatting.build_example`, input_steps = 0).

    `pos` is the index of the token among the example's labelled tokens (rationale, answer
    phrase, answer, EOS), in order; the student's KD term reads position `pos` of the same
    target. Teacher-forced, one forward pass per batch.
    """
    from storage.schemas import schema_for
    from tasks.core.formatting import build_example
    from tasks.core.kd import topk_logprobs
    from tasks.core.models import is_seq2seq
    from tasks.training.data import collate_examples

    seq2seq = is_seq2seq(model)
    max_len = int(getattr(model.config, "max_position_embeddings", None) or 1_000_000)
    examples = [
        build_example(
            tokenizer, questions[r["question_id"]]["question"], r["text"], questions[r["question_id"]]["answer"],
            seq2seq=seq2seq, max_len=max_len, rationale_id=r["rationale_id"],
        )
        for r in targets
    ]
    rids: list[str] = []
    poss: list[np.ndarray] = []
    ids_out: list[np.ndarray] = []
    lp_out: list[np.ndarray] = []
    model.eval()
    starts = range(0, len(examples), batch_size)
    with torch.inference_mode():
        for start in progress(starts, desc="mentor_logits") if progress else starts:
            chunk = examples[start : start + batch_size]
            batch = {key: v.to(device) for key, v in collate_examples(chunk, tokenizer.pad_token_id).items()}
            labels = batch["labels"]
            if seq2seq:
                dec = model.prepare_decoder_input_ids_from_labels(labels=labels)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               decoder_input_ids=dec).logits  # [B, T, V]
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t+1
            for b, ex in enumerate(chunk):
                sel = labels[b] != -100
                ids, lp = topk_logprobs(logits[b][sel], k)  # [T_b, k]
                n = ids.shape[0]
                rids.extend([ex.rationale_id] * n)
                poss.append(np.arange(n, dtype=np.int64))
                ids_out.append(ids.cpu().numpy().astype(np.int32))
                lp_out.append(lp.cpu().numpy().astype(np.float32))
    kk = ids_out[0].shape[1] if ids_out else min(k, 1)
    flat_ids = np.concatenate(ids_out).reshape(-1) if ids_out else np.zeros(0, np.int32)
    flat_lp = np.concatenate(lp_out).reshape(-1) if lp_out else np.zeros(0, np.float32)
    offsets = pa.array(np.arange(0, len(rids) * kk + 1, kk, dtype=np.int32))
    return pa.table(
        {
            "rationale_id": pa.array(rids, pa.string()),
            "pos": pa.array(np.concatenate(poss) if poss else np.zeros(0, np.int64)),
            "token_ids": pa.ListArray.from_arrays(offsets, pa.array(flat_ids)),
            "logprobs": pa.ListArray.from_arrays(offsets, pa.array(flat_lp)),
        }
    ).cast(schema_for("mentor_logits"))


# ---- mentor_augment: the stage ---------------------------------------------------------------
def run_augment(ctx: "StageContext") -> None:
    from tasks.core.formatting import encode_prompt
    from tasks.core.models import is_seq2seq, load_model
    from tasks.stages.rationales import rows_to_tables
    from tasks.core.sampling import completion_seed, sample_ids

    inp: MentorAugmentInputs = ctx.inputs
    aug = inp.augment
    model, tok = load_model(ctx.file("mentor_train", "model"))
    device = _device(inp.device)
    model.to(device)
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
        flat = sample_ids(model, tok, prompts, seeds, aug.temperature, aug.top_k, aug.max_new_tokens,
                          aug.batch_size, progress=bar.update)
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
        samples_per_s=round(len(prompts) / max(sample_s, 1e-9), 2),
    )


def run_cache(ctx: "StageContext") -> None:
    from tasks.core.models import load_model

    inp: MentorCacheInputs = ctx.inputs
    model, tok = load_model(ctx.file("mentor_train", "model"))
    device = _device(inp.device)
    model.to(device)
    questions = ctx.table("dataset", "questions", columns=["question_id", "split", "question", "answer"]).to_pylist()
    cols = ["rationale_id", "question_id", "text", "correct"]
    rationales = ctx.table("rationales", "rationales", columns=cols).to_pylist()
    rationales += ctx.table("mentor_augment", "rationales", columns=cols).to_pylist()
    targets = kd_targets({q["question_id"]: q for q in questions}, rationales)
    t0 = time.perf_counter()
    table = mentor_logits_table(model, tok, {q["question_id"]: q for q in questions}, targets, inp.topk,
                                inp.batch_size, device, ctx.progress)
    ctx.write_table("mentor_logits", table)
    ctx.summary.update(
        rationales=len(targets), tokens=table.num_rows, topk=inp.topk,
        seconds=round(time.perf_counter() - t0, 1),
    )


# ---- the specs -------------------------------------------------------------------------------
class MentorTrainInputs(KpodModel):
    student: StudentConfig = Field(description="The student section (its tokenizer is the mentor's).")
    model: MentorModel = Field(description="mentor.model.")
    training: MentorTraining = Field(description="mentor.training.")
    max_new_tokens: int = Field(description="mentor.augment.max_new_tokens: the length of val answers.")
    batch_size: int = runtime_field(16, "mentor.augment.batch_size: val questions generated together.")


class MentorAugmentInputs(KpodModel):
    augment: MentorAugment = Field(description="mentor.augment.")
    min_steps: int = Field(description="rationales.min_steps: shorter sampled rationales are not stored.")
    device: str = runtime_field("auto", "mentor.training.device: where the mentor samples.")


class MentorCacheInputs(KpodModel):
    topk: int = Field(description="mentor.kd.topk: tokens kept per position (tau is applied when training).")
    batch_size: int = runtime_field(16, "mentor.augment.batch_size: rationales scored together.")
    device: str = runtime_field("auto", "mentor.training.device: where the mentor runs.")


SPEC_TRAIN = StageSpec(
    name="mentor_train",
    run=run_train,
    inputs=lambda cfg: MentorTrainInputs(
        student=cfg.student, model=cfg.mentor.model, training=cfg.mentor.training,
        max_new_tokens=cfg.mentor.augment.max_new_tokens, batch_size=cfg.mentor.augment.batch_size,
    ),
    upstream=lambda cfg: ("dataset", "rationales", "student"),
    description="Mentor-KD: train the mentor (bigger, same tokenizer) with Std-CoT; val accuracy",
    enabled=lambda cfg: uses_mentor(cfg.train.method),
)

SPEC_AUGMENT = StageSpec(
    name="mentor_augment",
    run=run_augment,
    inputs=lambda cfg: MentorAugmentInputs(
        augment=cfg.mentor.augment, min_steps=cfg.rationales.min_steps, device=cfg.mentor.training.device
    ),
    upstream=lambda cfg: ("dataset", "rationales", "student", "mentor_train"),
    description="Mentor-KD: the mentor samples n rationales per training question, graded",
    enabled=lambda cfg: uses_mentor(cfg.train.method),
)

SPEC_CACHE = StageSpec(
    name="mentor_cache",
    run=run_cache,
    inputs=lambda cfg: MentorCacheInputs(
        topk=cfg.mentor.kd.topk, batch_size=cfg.mentor.augment.batch_size, device=cfg.mentor.training.device
    ),
    upstream=lambda cfg: ("dataset", "rationales", "mentor_train", "mentor_augment"),
    description="Mentor-KD (kd.source=cached_topk): the mentor's top-k log-probs per target token",
    enabled=lambda cfg: "mentor_cache" in kd_stages(cfg),
)
