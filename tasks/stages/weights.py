"""The `weights` stage: KPOD's token weighting module, trained, frozen, and applied (METHODS §2.1).

Reads the graded rationales and their steps, the questions, and the initial student (its
tokenizer and its input embedding); trains the weight generator with an answer predictor
(`tasks.training.weighting`: warm-up, then the joint phase of Eq. 7) and writes w_j for every
token of every rationale. Training uses correct rationales of train-split questions; weights are
written for all rationales (incorrect ones too, which is harmless and lets a user inspect them).
The predictor that passed the warm-up gate is saved in the work dir, so a stage killed in the
joint phase resumes there without warming up again. The scoring pass goes a chunk of rationales
at a time: `token_weights` (a row per token) is written as it is scored, never held whole, and
the quality figures are gathered from flat arrays of the labelled tokens' weights.

Outputs: `token_weights`, `weights_log`, `weights_quality` (AUROC of w against the synthetic
keypoint truth when `word_labels` exists), `mask_model.safetensors` + `mask_model.json`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

import pyarrow as pa
from pydantic import Field

from storage.schemas import schema_for
from tasks.config.base import KpodModel
from tasks.config.methods import rationale_stages, uses_weights
from tasks.config.student import StudentConfig
from tasks.config.weights import WeightsConfig
from tasks.stages.contract import StageContext, StageSpec
from tasks.stages.sources import training_rationales, training_steps

SCORE_CHUNK = 512  # rationales scored and written at a time; a multiple of score()'s batch (64)

if TYPE_CHECKING:  # torch and the modules that load it are imported when the stage runs, not to list or plan it
    import torch

    from tasks.training.weighting import Encoded, WordRoles


def _models(ctx: StageContext, cfg: WeightsConfig) -> tuple[Any, torch.Tensor, torch.nn.Module]:
    """(student tokenizer, a copy of the student's input embedding (V, D), answer predictor)."""
    from tasks.core.models import assert_same_vocab, is_seq2seq, load_model
    from tasks.training.weighting import default_predictor

    student, tok = load_model(ctx.file("student", "model"))
    if not getattr(tok, "is_fast", False):
        raise ValueError("weights: the student tokenizer is not a fast tokenizer; offsets are needed to align tokens")
    embedding = student.get_input_embeddings().weight.detach().clone()
    if is_seq2seq(student) and cfg.predictor is None:
        raise ValueError("weights: the student is seq2seq; set weights.predictor to a causal LM sharing its tokenizer")
    if cfg.predictor is None:
        return tok, embedding, default_predictor(student.config, cfg.predictor_layers, cfg.seed)
    if cfg.predictor == "base":  # the pretrained miniature's base, on the student's (its) tokenizer
        predictor, ptok = load_model(ctx.file("pretrain", "base"))
        assert_same_vocab(tok, ptok, "the pretrained base's tokenizer")
        return tok, embedding, predictor
    predictor, ptok = load_model(cfg.predictor)
    assert_same_vocab(tok, ptok, "weights.predictor tokenizer")
    if is_seq2seq(predictor):
        raise ValueError(f"weights.predictor {cfg.predictor!r} is seq2seq; it must be a decoder-only causal LM")
    return tok, embedding, predictor


def run(ctx: StageContext) -> None:
    from tasks.core.forward import resolve_device
    from tasks.core.weights_view import examples_markdown, render_html
    from tasks.training.weighting import answer_lead_ids, encode_all, save_generator, train_weighting

    cfg: WeightsConfig = ctx.inputs.weights
    t0 = time.perf_counter()
    questions = {q["question_id"]: q for q in ctx.table(
        "dataset", "questions", columns=["question_id", "split", "question", "answer"]).to_pylist()}
    # teacher rationales, plus the mentor's for kpod_mentor (tasks/stages/sources.py)
    rationales = training_rationales(ctx, columns=["rationale_id", "question_id", "text", "correct"]).to_pylist()
    steps = training_steps(ctx, columns=["rationale_id", "step", "char_start", "char_end"])
    tok, embedding, predictor = _models(ctx, cfg)
    examples = encode_all(tok, rationales, steps, questions)
    words = _word_labels(ctx)
    train_idx = [i for i, r in enumerate(rationales) if r["correct"] and questions[r["question_id"]]["split"] == "train"]
    trained = train_weighting(
        [examples[i] for i in train_idx], embedding, predictor, answer_lead_ids(tok), cfg,
        tok.pad_token_id, progress=lambda **kw: ctx.progress(**kw),
        saved=ctx.work_dir,  # the warmed-up predictor: a crash in the joint phase does not repeat the warm-up
        words=words,  # the probe also reads answers through role masks (what Lp rewards)
    )
    t_train = time.perf_counter() - t0
    texts = [r["text"] for r in rationales]
    scored = _score_all(ctx, trained.generator, examples, texts, words, tok.pad_token_id, resolve_device(cfg.device))
    ctx.write_table("weights_log", pa.Table.from_pylist(trained.log, schema=schema_for("weights_log")))
    save_generator(trained.generator.cpu(), ctx.output_path("mask_model.safetensors"), ctx.output_path("mask_model.json"))

    n_probe = int(trained.probe.get("probe_rationales", 0))
    quality = scored.quality.rows() + [dict(metric=k, value=v, tokens=n_probe) for k, v in trained.probe.items()]
    ctx.write_table("weights_quality", pa.Table.from_pylist(quality, schema=schema_for("weights_quality")))
    for q in quality:
        ctx.summary[q["metric"]] = round(q["value"], 4)
    joint = [r for r in trained.log if r["phase"] == "joint"]
    tail = joint[-max(1, len(joint) // 10):]
    ctx.summary.update(
        rationales=len(examples),
        trained_on=len(train_idx),
        tokens=scored.tokens,
        final_lp=round(sum(r["lp"] for r in tail) / len(tail), 4),
        final_kept_ratio=round(sum(r["kept_ratio"] for r in tail) / len(tail), 4),
        mean_weight=round(scored.weight_sum / max(1, scored.tokens), 4),
        train_seconds=round(t_train, 2),
    )
    render_html(scored.first_rows, ctx.output_path("weights.html"))
    ctx.summary["examples"] = examples_markdown(scored.first_rows, limit=3)


class _Scored:
    """What the scoring pass keeps: counts, the quality inputs, the first rationales' rows."""

    def __init__(self, quality: Any):
        self.tokens, self.weight_sum, self.quality = 0, 0.0, quality
        self.first_rows: list[dict[str, Any]] = []


def _score_all(ctx: StageContext, generator: Any, examples: Sequence[Encoded], texts: Sequence[str],
               words: WordRoles | None, pad_id: int, device: Any) -> _Scored:
    """w_j of every token of every rationale, `SCORE_CHUNK` rationales at a time: each chunk's
    `token_weights` rows are written as it is scored (the table, one row per token, is the
    stage's largest output and is never held whole), and its weights go to the quality inputs."""
    from tasks.training.weighting import QualityInputs, score, token_weights_table

    scored = _Scored(QualityInputs(words))
    with ctx.table_writer("token_weights") as out:
        for lo in range(0, len(examples), SCORE_CHUNK):
            chunk, chunk_texts = examples[lo:lo + SCORE_CHUNK], texts[lo:lo + SCORE_CHUNK]
            weights = score(generator, chunk, pad_id, device)
            out.write(token_weights_table(chunk, chunk_texts, weights))
            scored.tokens += sum(map(len, weights))
            scored.weight_sum += sum(map(sum, weights))
            scored.quality.add(chunk, weights)
            if lo == 0:  # the page and the summary show the first rationales
                scored.first_rows = token_weights_table(chunk[:5], chunk_texts[:5], weights[:5]).to_pylist()
    return scored


def _word_labels(ctx: StageContext) -> WordRoles | None:
    """rationale id -> its words (char_start, char_end, keypoint, role), sorted; None when the
    data set has no keypoint truth (real data)."""
    try:
        labels = ctx.table("rationales", "word_labels", columns=["rationale_id", "char_start", "char_end", "keypoint", "role"])
    except FileNotFoundError:  # only synthetic data knows its keypoints
        return None
    words: WordRoles = {}
    for r in labels.to_pylist():
        words.setdefault(r["rationale_id"], []).append((r["char_start"], r["char_end"], r["keypoint"], r["role"]))
    return {rid: sorted(ws) for rid, ws in words.items()}


class WeightsInputs(KpodModel):
    weights: WeightsConfig = Field(description="The weights section.")
    student: StudentConfig = Field(description="The student section (its model is the embedding and default predictor source).")


SPEC = StageSpec(
    name="weights",
    run=run,
    inputs=lambda cfg: WeightsInputs(weights=cfg.weights, student=cfg.student),
    upstream=lambda cfg: ("dataset", *rationale_stages(cfg), "student", *(("pretrain",) if cfg.weights.predictor == "base" else ())),
    description="KPOD token weights: train the mask model (Eq. 2-7), freeze it, weight every rationale token",
    # only KPOD methods read token weights; `kpod run --stages weights` still runs it by name
    enabled=lambda cfg: uses_weights(cfg.train.method),
)
