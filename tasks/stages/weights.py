"""The `weights` stage: KPOD's token weighting module, trained, frozen, and applied (METHODS §2.1).

Reads the graded rationales and their steps, the questions, and the initial student (its
tokenizer and its input embedding). Every rationale is tokenized on its own with the student's
fast tokenizer; its tokens are mapped to steps through the offset mapping (`tasks.core.steps`).
Then:
  1. warm-up: the answer predictor learns to produce the answer from the question and each
     unmasked rationale prefix (m = 1), `predictor_warmup_steps` steps;
  2. joint: the weight generator and the predictor minimise Lp + alpha * Lm with straight-through
     binary-concrete masks on the rationale embeddings, `steps` steps;
  3. frozen: w_j (the probability, not a sampled mask) for every token of every rationale.
Training uses correct rationales of train-split questions; weights are written for all
rationales (incorrect ones too, which is harmless and lets a user inspect them).

Outputs: `token_weights`, `weights_log`, `weights_quality` (AUROC of w against the synthetic
keypoint truth when `word_labels` exists), `mask_model.safetensors` + `mask_model.json`.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
import torch

from storage.schemas import schema_for
from pydantic import Field

from tasks.config.base import KpodModel
from tasks.config.methods import rationale_stages, uses_weights
from tasks.config.student import StudentConfig
from tasks.core.mask_model import (
    IGNORE,
    WeightGenerator,
    answer_prefix_loss,
    auroc,
    binary_concrete_st,
    build_packed_batch,
    kpod_mask_objective,
    mask_loss,
    predictor_logits,
    select_boundaries,
    step_boundaries,
)
from tasks.stages.contract import StageContext, StageSpec
from tasks.stages.sources import training_rationales, training_steps
from tasks.core.formatting import ANSWER_PHRASE, encode_prompt
from tasks.core.steps import token_steps
from tasks.config.weights import WeightsConfig


# ---- encoding ------------------------------------------------------------------------------
@dataclass
class Encoded:
    """One rationale in the student's tokens. Position j of `ids` is `token_weights.pos`."""

    rationale_id: str
    ids: list[int]
    offsets: list[tuple[int, int]]  # char spans in the rationale text
    steps: list[int]  # the `steps` table's step number of each token
    prompt: list[int]
    answer: list[int]


def encode_rationale(
    tokenizer: Any, rationale_id: str, text: str, spans: Sequence[tuple[int, int]],
    step_numbers: Sequence[int], question: str, answer: str,
) -> Encoded:
    """Tokenize one rationale as the student's target begins (after "A:" and a space, like
    `tasks.core.formatting.build_example`), map every token to a step via the offset mapping, and
    tokenize its prompt (`encode_prompt`) and answer.

    spans: char spans of the steps in `text` (in order), step_numbers: their `steps.step`.
    Offsets are in `text` characters, so consumers align weights by characters, not positions.
    """
    enc = tokenizer(" " + text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not ids:
        raise ValueError(f"rationale {rationale_id}: empty text, nothing to weight")
    # shift offsets back over the added space; a token covering only that space becomes (0, 0)
    offsets = [(max(s - 1, 0), max(e - 1, 0)) for s, e in enc["offset_mapping"]]
    idx = token_steps(offsets, list(spans))
    # token_steps gives -1 to zero-width tokens: here only the lone leading space, which
    # belongs with the first step
    steps = [int(step_numbers[max(i, 0)]) for i in idx]
    prompt = encode_prompt(tokenizer, question, seq2seq=False)
    ans = list(tokenizer(" " + str(answer).strip(), add_special_tokens=False)["input_ids"])
    if not ans:
        raise ValueError(f"rationale {rationale_id}: answer {answer!r} has no tokens")
    return Encoded(rationale_id, ids, offsets, steps, prompt, ans)


def answer_lead_ids(tokenizer: Any) -> list[int]:
    """The unlabelled " Therefore, the answer is" placed between a prefix and the answer."""
    return list(tokenizer(" " + ANSWER_PHRASE, add_special_tokens=False)["input_ids"])


def pad_rationales(batch: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (R, L) long padded with pad_id, valid (R, L) bool."""
    L = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    valid = torch.zeros((len(batch), L), dtype=torch.bool)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        valid[i, : len(e.ids)] = True
    return ids, valid


# ---- training ------------------------------------------------------------------------------
@dataclass
class Trained:
    generator: WeightGenerator
    log: list[dict[str, Any]]


def _batch_order(n: int, steps: int, batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """`steps` batches of indices, epochs of seeded permutations (no index twice in a batch
    unless the data set is smaller than a batch)."""
    order: list[int] = []
    need = steps * batch_size
    while len(order) < need:
        order += torch.randperm(n, generator=gen).tolist()
    bs = min(batch_size, n)
    return [order[i * bs : (i + 1) * bs] for i in range(steps)]


def train_weighting(
    examples: Sequence[Encoded], embedding: torch.Tensor, predictor: torch.nn.Module,
    suffix: Sequence[int], cfg: WeightsConfig, pad_id: int, progress=None,
) -> Trained:
    """Warm up the predictor (m = 1), then train generator + predictor jointly (Eq. 7).

    embedding (V, D): the student's input embedding, copied into the generator; suffix: token
    ids of the unlabelled answer lead-in placed between a prefix and the answer.
    Returns the generator in eval mode with gradients off, and one log row per step.
    """
    if not examples:
        raise ValueError("weights: no correct train rationales to train the weighting module on")
    device = torch.device(cfg.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        generator = WeightGenerator(embedding, cfg.heads, cfg.mlp_hidden).to(device)
    predictor.to(device).train()
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    log: list[dict[str, Any]] = []

    def batch_for(idx: list[int]):
        ex = [examples[i] for i in idx]
        ends = [select_boundaries(step_boundaries(e.steps), cfg.prefixes, cfg.n_sampled, g) for e in ex]
        pb = build_packed_batch(
            [e.prompt for e in ex], [e.ids for e in ex], ends, suffix, [e.answer for e in ex], pad_id
        )
        ids, valid = pad_rationales(ex, pad_id)
        return pb.to(device), ids.to(device), valid.to(device)

    popt = torch.optim.AdamW(predictor.parameters(), lr=cfg.predictor_lr)
    warm = _batch_order(len(examples), cfg.predictor_warmup_steps, cfg.batch_size, g)
    joint = _batch_order(len(examples), cfg.steps, cfg.batch_size, g)
    bar = progress(total=len(warm) + len(joint), desc="weights") if progress else None
    for step, idx in enumerate(warm):
        pb, _, _ = batch_for(idx)
        logits = predictor_logits(predictor, pb, None)
        lp = answer_prefix_loss(logits, pb.labels, pb.n_rationales)
        loss = lp
        if cfg.warmup_lm:  # rationale tokens as next-token targets (same sum-per-rationale scale)
            lm_labels = torch.where(pb.rat_pos >= 0, pb.input_ids, torch.full_like(pb.input_ids, IGNORE))
            loss = lp + answer_prefix_loss(logits, lm_labels, pb.n_rationales)
        popt.zero_grad(set_to_none=True)
        loss.backward()
        popt.step()
        # loss = lp + the rationale LM term when warmup_lm (lm = 1: nothing is masked)
        log.append(dict(step=step, phase="warmup", lp=lp.item(), lm=1.0, loss=loss.item(), kept_ratio=1.0))
        if bar:
            bar.update(1)
    gopt = torch.optim.AdamW(generator.parameters(), lr=cfg.lr)
    generator.train()
    for step, idx in enumerate(joint, start=len(warm)):
        pb, ids, valid = batch_for(idx)
        w = generator(ids, valid)  # (R, L)
        m = binary_concrete_st(w, cfg.tau, noise) * valid  # (R, L), 0 on padding
        lp = answer_prefix_loss(predictor_logits(predictor, pb, m), pb.labels, pb.n_rationales)
        lm = mask_loss(m, valid)
        loss = kpod_mask_objective(lp, lm, cfg.alpha)
        popt.zero_grad(set_to_none=True)
        gopt.zero_grad(set_to_none=True)
        loss.backward()
        popt.step()
        gopt.step()
        kept = (m.detach() * valid).sum().item() / valid.sum().item()
        log.append(dict(step=step, phase="joint", lp=lp.item(), lm=lm.item(), loss=loss.item(), kept_ratio=kept))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    return Trained(generator, log)


# ---- scoring and quality -------------------------------------------------------------------
@torch.no_grad()
def score(
    generator: WeightGenerator, examples: Sequence[Encoded], pad_id: int, device: str = "cpu",
    batch_size: int = 64,
) -> list[list[float]]:
    """w_j (float64, from the logits so it stays inside (0, 1)) for every token of every example."""
    out: list[list[float]] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids, valid = pad_rationales(chunk, pad_id)
        w = torch.sigmoid(generator.logits(ids.to(device), valid.to(device)).double()).cpu()
        out += [w[j, : len(e.ids)].tolist() for j, e in enumerate(chunk)]
    return out


def token_keypoints(
    offsets: Sequence[tuple[int, int]], words: Sequence[tuple[int, int, bool]]
) -> list[bool | None]:
    """Keypoint truth per token from word labels (char_start, char_end, keypoint), sorted by
    start: True if the token overlaps a keypoint word, False if it overlaps only filler words,
    None if it overlaps no word (whitespace, punctuation), which is excluded from the AUROC."""
    out: list[bool | None] = []
    for s, e in offsets:
        hit = [k for ws, we, k in words if min(e, we) > max(s, ws)]
        out.append(any(hit) if hit else None)
    return out


def quality_rows(weights: Sequence[Sequence[float]], truth: Sequence[Sequence[bool | None]]) -> list[dict[str, Any]]:
    """AUROC of w against the keypoint truth, and the mean weight of each class."""
    ws = [w for wr, tr in zip(weights, truth) for w, t in zip(wr, tr) if t is not None]
    ys = [t for tr in truth for t in tr if t is not None]
    kp = [w for w, y in zip(ws, ys) if y]
    fi = [w for w, y in zip(ws, ys) if not y]
    return [
        dict(metric="auroc", value=auroc(ws, ys), tokens=len(ws)),
        dict(metric="mean_weight_keypoint", value=sum(kp) / len(kp), tokens=len(kp)),
        dict(metric="mean_weight_filler", value=sum(fi) / len(fi), tokens=len(fi)),
    ]


def token_weights_table(examples: Sequence[Encoded], texts: Sequence[str], weights: Sequence[Sequence[float]]) -> pa.Table:
    rows: dict[str, list] = {k: [] for k in ("rationale_id", "pos", "token", "char_start", "char_end", "step", "weight")}
    for e, text, w in zip(examples, texts, weights):
        for pos, ((s, t), st, wj) in enumerate(zip(e.offsets, e.steps, w)):
            rows["rationale_id"].append(e.rationale_id)
            rows["pos"].append(pos)
            rows["token"].append(text[s:t])
            rows["char_start"].append(s)
            rows["char_end"].append(t)
            rows["step"].append(st)
            rows["weight"].append(wj)
    return pa.table(rows)


# ---- saving the frozen module --------------------------------------------------------------
def save_generator(generator: WeightGenerator, weights_path, config_path) -> None:
    from safetensors.torch import save_file

    vocab, dim = generator.emb.weight.shape
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    save_file(state, str(weights_path))
    config_path.write_text(json.dumps(dict(
        vocab=vocab, dim=dim, heads=generator.attn.num_heads, mlp_hidden=generator.mlp[0].out_features,
    ), indent=2))


def load_generator(weights_path, config_path) -> WeightGenerator:
    """The frozen weight generator from `mask_model.safetensors` + `mask_model.json`."""
    from safetensors.torch import load_file

    c = json.loads(config_path.read_text())
    gen = WeightGenerator(torch.zeros(c["vocab"], c["dim"]), c["heads"], c["mlp_hidden"])
    gen.load_state_dict(load_file(str(weights_path)))
    gen.eval()
    return gen


def default_predictor(student_config: Any, layers: int, seed: int) -> torch.nn.Module:
    """**Decision** (METHODS §2.1): with no pretrained predictor, a fresh causal LM of the
    student's architecture (its config: vocabulary, width, heads) with only `layers` layers, so
    the warm-up and joint phases stay cheap. Initialised from `seed` without touching the
    caller's RNG."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(student_config)
    config.num_hidden_layers = layers
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = list(config.layer_types)[:layers]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


# ---- the stage -----------------------------------------------------------------------------
def _encode_all(tok: Any, rationales: list[dict], steps: pa.Table, questions: dict[str, dict]) -> list[Encoded]:
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for r in steps.to_pylist():
        spans.setdefault(r["rationale_id"], []).append((r["step"], r["char_start"], r["char_end"]))
    out = []
    for r in rationales:
        rid = r["rationale_id"]
        if rid not in spans:
            raise ValueError(f"rationales: rationale {rid} has no rows in the steps table")
        q = questions.get(r["question_id"])
        if q is None:
            raise ValueError(f"rationales: rationale {rid} names question {r['question_id']}, absent from questions")
        st = sorted(spans[rid])
        out.append(encode_rationale(
            tok, rid, r["text"], [(a, b) for _, a, b in st], [k for k, _, _ in st], q["question"], q["answer"],
        ))
    return out


def run(ctx: StageContext) -> None:
    from tasks.core.models import assert_same_vocab, is_seq2seq, load_model
    from tasks.core.weights_view import examples_markdown, render_html

    cfg: WeightsConfig = ctx.inputs.weights
    t0 = time.perf_counter()
    questions = {q["question_id"]: q for q in ctx.table(
        "dataset", "questions", columns=["question_id", "split", "question", "answer"]).to_pylist()}
    # teacher rationales, plus the mentor's for kpod_mentor (tasks/stages/sources.py)
    rationales = training_rationales(ctx, columns=["rationale_id", "question_id", "text", "correct"]).to_pylist()
    steps = training_steps(ctx, columns=["rationale_id", "step", "char_start", "char_end"])
    student, tok = load_model(ctx.file("student", "model"))
    if not getattr(tok, "is_fast", False):
        raise ValueError("weights: the student tokenizer is not a fast tokenizer; offsets are needed to align tokens")
    embedding = student.get_input_embeddings().weight.detach().clone()
    if is_seq2seq(student) and cfg.predictor is None:
        raise ValueError("weights: the student is seq2seq; set weights.predictor to a causal LM sharing its tokenizer")
    if cfg.predictor is None:
        predictor = default_predictor(student.config, cfg.predictor_layers, cfg.seed)
    else:
        predictor, ptok = load_model(cfg.predictor)
        assert_same_vocab(tok, ptok, "weights.predictor tokenizer")
        if is_seq2seq(predictor):
            raise ValueError(f"weights.predictor {cfg.predictor!r} is seq2seq; it must be a decoder-only causal LM")
    del student

    examples = _encode_all(tok, rationales, steps, questions)
    train_idx = [i for i, r in enumerate(rationales) if r["correct"] and questions[r["question_id"]]["split"] == "train"]
    trained = train_weighting(
        [examples[i] for i in train_idx], embedding, predictor, answer_lead_ids(tok), cfg,
        tok.pad_token_id, progress=lambda **kw: ctx.progress(**kw),
    )
    t_train = time.perf_counter() - t0
    weights = score(trained.generator, examples, tok.pad_token_id, cfg.device)
    texts = [r["text"] for r in rationales]
    ctx.write_table("token_weights", token_weights_table(examples, texts, weights))
    ctx.write_table("weights_log", pa.Table.from_pylist(trained.log, schema=schema_for("weights_log")))
    save_generator(trained.generator.cpu(), ctx.output_path("mask_model.safetensors"), ctx.output_path("mask_model.json"))

    quality = _quality(ctx, examples, weights)
    ctx.write_table("weights_quality", pa.Table.from_pylist(quality, schema=schema_for("weights_quality")))
    for q in quality:
        ctx.summary[q["metric"]] = round(q["value"], 4)
    joint = [r for r in trained.log if r["phase"] == "joint"]
    tail = joint[-max(1, len(joint) // 10):]
    ctx.summary.update(
        rationales=len(examples),
        trained_on=len(train_idx),
        tokens=sum(len(e.ids) for e in examples),
        final_lp=round(sum(r["lp"] for r in tail) / len(tail), 4),
        final_kept_ratio=round(sum(r["kept_ratio"] for r in tail) / len(tail), 4),
        mean_weight=round(sum(map(sum, weights)) / max(1, sum(map(len, weights))), 4),
        train_seconds=round(t_train, 2),
    )
    rows = token_weights_table(examples[:5], texts[:5], weights[:5]).to_pylist()
    render_html(rows, ctx.output_path("weights.html"))
    ctx.summary["examples"] = examples_markdown(rows, limit=3)


def _quality(ctx: StageContext, examples: Sequence[Encoded], weights: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    """Quality against the keypoint truth; [] when the data set has none (real data)."""
    try:
        labels = ctx.table("rationales", "word_labels", columns=["rationale_id", "char_start", "char_end", "keypoint"])
    except FileNotFoundError:  # only synthetic data knows its keypoints
        return []
    words: dict[str, list[tuple[int, int, bool]]] = {}
    for r in labels.to_pylist():
        words.setdefault(r["rationale_id"], []).append((r["char_start"], r["char_end"], r["keypoint"]))
    keep = [i for i, e in enumerate(examples) if e.rationale_id in words]
    if not keep:
        return []
    truth = [token_keypoints(examples[i].offsets, sorted(words[examples[i].rationale_id])) for i in keep]
    return quality_rows([weights[i] for i in keep], truth)


class WeightsInputs(KpodModel):
    weights: WeightsConfig = Field(description="The weights section.")
    student: StudentConfig = Field(description="The student section (its model is the embedding and default predictor source).")


SPEC = StageSpec(
    name="weights",
    run=run,
    inputs=lambda cfg: WeightsInputs(weights=cfg.weights, student=cfg.student),
    upstream=lambda cfg: ("dataset", *rationale_stages(cfg), "student"),
    description="KPOD token weights: train the mask model (Eq. 2-7), freeze it, weight every rationale token",
    # only KPOD methods read token weights; `kpod run --stages weights` still runs it by name
    enabled=lambda cfg: uses_weights(cfg.train.method),
)
