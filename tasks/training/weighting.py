"""Training KPOD's token weighting module (METHODS §2.1), and applying it once frozen.

The `weights` stage reads tables and files; everything it computes lives here:
  1. encoding: every rationale tokenized on its own with the student's fast tokenizer, its
     tokens mapped to steps through the offset mapping (`tasks.core.steps`);
  2. warm-up: the answer predictor learns to produce the answer from the question and each
     unmasked rationale prefix (m = 1), `predictor_warmup_steps` steps, extended while a probe
     on held-out rationales says it cannot yet read the answer (`min_predictor_accuracy`);
  3. joint: the weight generator and the predictor minimise Lp + alpha * Lm with straight-through
     binary-concrete masks on the rationale embeddings (or, `weights.estimator: score_function`,
     sampled hard masks and a leave-one-out REINFORCE gradient), `steps` steps;
  4. scoring: w_j (the probability, not a sampled mask) for every token of every rationale,
     and its quality against a keypoint truth when the data set has one.
The model pieces and losses are in `tasks.core.mask_model`.
"""

from __future__ import annotations

import array
import collections
import copy
import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import torch

from tasks.config.weights import WeightsConfig
from tasks.core.formatting import ANSWER_PHRASE, encode_prompt
from tasks.core.forward import IGNORE, resolve_device
from tasks.core.mask_model import (
    answer_hits,
    PrefixBatch,
    WeightGenerator,
    answer_prefix_loss,
    auroc,
    bernoulli_mask,
    binary_concrete_st,
    build_packed_batch,
    kpod_mask_objective,
    mask_log_prob,
    mask_loss,
    predictor_logits,
    rationale_answer_loss,
    score_function_surrogate,
    select_boundaries,
    step_boundaries,
)
from tasks.core.steps import token_steps
from tasks.core.synthetic import ROLES, token_roles


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


def encode_all(tok: Any, rationales: list[dict], steps: pa.Table, questions: dict[str, dict]) -> list[Encoded]:
    """`encode_rationale` for every row of `rationales` (rationale_id, question_id, text), with
    its step spans from the `steps` table and its question and answer from `questions`
    (question_id -> row)."""
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


# ---- training ------------------------------------------------------------------------------
@dataclass
class Trained:
    generator: WeightGenerator
    log: list[dict[str, Any]]
    # the predictor probe before and after the joint phase (`probe_predictor`), and the
    # warm-up steps taken; empty when no rationale was held out
    probe: dict[str, float] = dataclasses.field(default_factory=dict)


class PredictorCannotReadAnswers(ValueError):
    """The answer predictor stayed below `weights.min_predictor_accuracy` after its warm-up."""


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None


def _batch_order(n: int, steps: int, batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """`steps` batches of indices, epochs of seeded permutations (no index twice in a batch
    unless the data set is smaller than a batch)."""
    order: list[int] = []
    need = steps * batch_size
    while len(order) < need:
        order += torch.randperm(n, generator=gen).tolist()
    bs = min(batch_size, n)
    return [order[i * bs : (i + 1) * bs] for i in range(steps)]


def _prefix_batch(
    idx: list[int], examples: Sequence[Encoded], suffix: Sequence[int], cfg: WeightsConfig,
    pad_id: int, gen: torch.Generator, device: torch.device,
) -> tuple[PrefixBatch, torch.Tensor, torch.Tensor]:
    """The examples at `idx` as a packed predictor batch (prefixes chosen with `gen`), and their
    rationale ids (R, L) and valid mask (R, L) for the generator."""
    ex = [examples[i] for i in idx]
    ends = [select_boundaries(step_boundaries(e.steps), cfg.prefixes, cfg.n_sampled, gen) for e in ex]
    pb = build_packed_batch(
        [e.prompt for e in ex], [e.ids for e in ex], ends, suffix, [e.answer for e in ex], pad_id
    )
    ids, valid = pad_rationales(ex, pad_id)
    return pb.to(device), ids.to(device), valid.to(device)


def _warmup_step(
    predictor: torch.nn.Module, popt: torch.optim.Optimizer, pb: PrefixBatch, warmup_lm: bool
) -> dict[str, float]:
    """One predictor step on unmasked prefixes (m = 1): Lp, plus with `warmup_lm` the rationale
    tokens as next-token targets (same sum-per-rationale scale)."""
    logits = predictor_logits(predictor, pb, None)
    lp = answer_prefix_loss(logits, pb.labels, pb.n_rationales)
    loss = lp
    if warmup_lm:
        lm_labels = torch.where(pb.rat_pos >= 0, pb.input_ids, torch.full_like(pb.input_ids, IGNORE))
        loss = lp + answer_prefix_loss(logits, lm_labels, pb.n_rationales)
    popt.zero_grad(set_to_none=True)
    loss.backward()
    popt.step()
    # lm = 1: nothing is masked
    return dict(lp=lp.item(), lm=1.0, loss=loss.item(), kept_ratio=1.0)


def _joint_step(
    generator: WeightGenerator, predictor: torch.nn.Module, opts: Sequence[torch.optim.Optimizer],
    batch: tuple[PrefixBatch, torch.Tensor, torch.Tensor], cfg: WeightsConfig, noise: torch.Generator,
) -> dict[str, float]:
    """One step of generator and predictor together on Lk = Lp + alpha * Lm (Eq. 7)."""
    if cfg.estimator == "score_function":
        return _score_function_step(generator, predictor, opts, batch, cfg, noise)
    pb, ids, valid = batch
    w = generator(ids, valid)  # (R, L)
    m = binary_concrete_st(w, cfg.tau, noise) * valid  # (R, L), 0 on padding
    lp = answer_prefix_loss(predictor_logits(predictor, pb, m), pb.labels, pb.n_rationales)
    lm = mask_loss(m, valid, cfg.mask_norm)
    loss = kpod_mask_objective(lp, lm, cfg.alpha)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in opts:
        opt.step()
    kept = (m.detach() * valid).sum().item() / valid.sum().item()
    return dict(lp=lp.item(), lm=lm.item(), loss=loss.item(), kept_ratio=kept)


def _score_function_step(
    generator: WeightGenerator, predictor: torch.nn.Module, opts: Sequence[torch.optim.Optimizer],
    batch: tuple[PrefixBatch, torch.Tensor, torch.Tensor], cfg: WeightsConfig, noise: torch.Generator,
) -> dict[str, float]:
    """`_joint_step` with the score-function estimator: cfg.samples hard masks per rationale,
    the generator on the leave-one-out REINFORCE surrogate of Lp plus alpha * E[Lm] = alpha *
    Lm(w); a training predictor on the mean Lp of the sampled masks."""
    pb, ids, valid = batch
    w = generator(ids, valid)  # (R, L)
    trains = any(p.requires_grad for p in predictor.parameters())
    lps, logps, masks = [], [], []
    for _ in range(cfg.samples):
        m = bernoulli_mask(w, noise) * valid  # (R, L) 0/1, no gradient
        with torch.set_grad_enabled(trains):
            logits = predictor_logits(predictor, pb, m)
            lps.append(rationale_answer_loss(logits, pb.labels, pb.row_src, pb.n_rationales))  # (R,)
        logps.append(mask_log_prob(m, w, valid))  # (R,)
        masks.append(m)
    lp_rows = torch.stack(lps)  # (K, R)
    lm = mask_loss(w, valid, cfg.mask_norm)  # Lm is linear in m: its expectation is Lm(w)
    loss = score_function_surrogate(lp_rows, torch.stack(logps)) + cfg.alpha * lm
    if trains:
        loss = loss + lp_rows.mean()
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in opts:
        opt.step()
    lp = lp_rows.detach().mean().item()
    kept = sum(m.sum().item() for m in masks) / (len(masks) * valid.sum().item())
    return dict(lp=lp, lm=lm.item(), loss=lp + cfg.alpha * lm.item(), kept_ratio=kept)


def split_probe(examples: Sequence[Encoded], n: int, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """(training examples, probe examples): `n` (at most a fifth) drawn with `seed`, held out."""
    n = min(n, len(examples) // 5)
    if n <= 0:
        return list(examples), []
    held = set(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7))[:n].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


# rationale id -> its words (char_start, char_end, keypoint, role), sorted (the synthetic truth)
WordRoles = dict[str, list[tuple[int, int, bool, str]]]
ORACLES = ("core_only", "filler_only", "final_step_only", "without_final_step", "final_step_core")


def oracle_masks(
    examples: Sequence[Encoded], words: WordRoles | None,
) -> dict[str, list[list[float]]]:
    """Fixed masks for the probe, one per example, for what Lp rewards (a diagnostic): keep
    only the core tokens, only the filler tokens (by the synthetic roles in `words`: rationale
    id -> (char_start, char_end, keypoint, role)), only the last step's tokens, every token but
    the last step's, or only the last step's core tokens. Empty when any example has no word
    roles (real data)."""
    if not examples or words is None or any(e.rationale_id not in words for e in examples):
        return {}
    out: dict[str, list[list[float]]] = {name: [] for name in ORACLES}
    for e in examples:
        roles = token_roles(e.offsets, [(a, b, r) for a, b, _, r in words[e.rationale_id]])
        last = max(e.steps)
        out["core_only"].append([float(r == "core") for r in roles])
        out["filler_only"].append([float(r == "filler") for r in roles])
        out["final_step_only"].append([float(st == last) for st in e.steps])
        out["without_final_step"].append([float(st != last) for st in e.steps])
        out["final_step_core"].append([float(st == last and r == "core") for st, r in zip(e.steps, roles)])
    return out


def _padded(rows: Sequence[Sequence[float]], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """(R, L) float, rows left-aligned, 0 beyond each row."""
    out = torch.zeros(shape)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out.to(device)


@torch.no_grad()
def probe_predictor(
    predictor: torch.nn.Module, examples: Sequence[Encoded], suffix: Sequence[int], pad_id: int,
    device: torch.device, generator: WeightGenerator | None = None, batch_size: int = 32,
    oracles: dict[str, list[list[float]]] | None = None,
) -> dict[str, float]:
    """Can the predictor read the answer off a rationale? Teacher-forced greedy answer accuracy
    (every answer token right) and answer NLL from the question plus the FULL rationale, with
    the rationale unmasked (m = 1), fully masked (m = 0), with each of `oracles` (name -> a mask
    per example, `oracle_masks`) and, given a generator, with its learned hard mask
    m = 1[w > 0.5] (`learned_kept`: the share of rationale tokens it keeps)."""
    was_training = predictor.training
    predictor.eval()
    sums: dict[str, float] = collections.defaultdict(float)
    for i in range(0, len(examples), batch_size):
        ex = examples[i : i + batch_size]
        pb = build_packed_batch([e.prompt for e in ex], [e.ids for e in ex], [[len(e.ids)] for e in ex],
                                suffix, [e.answer for e in ex], pad_id).to(device)
        ids, valid = (t.to(device) for t in pad_rationales(ex, pad_id))
        masks: dict[str, torch.Tensor | None] = {"unmasked": None, "masked": torch.zeros(ids.shape, device=device)}
        masks |= {name: _padded(rows[i : i + batch_size], ids.shape, device) for name, rows in (oracles or {}).items()}
        if generator is not None:
            masks["learned"] = (generator(ids, valid) > 0.5).float() * valid
        for name, m in masks.items():
            hit, nll = answer_hits(predictor_logits(predictor, pb, m), pb.labels)
            sums[f"{name}_accuracy"] += hit.float().sum().item()
            sums[f"{name}_nll"] += nll.sum().item()
            if name not in ("unmasked", "masked"):  # the share of tokens each mask keeps (Lm's side)
                sums[f"{name}_kept"] += m.sum().item()
    predictor.train(was_training)
    n_tokens = sum(len(e.ids) for e in examples)
    return {k: v / (n_tokens if k.endswith("_kept") else len(examples)) for k, v in sums.items()}


def _warm_up(
    predictor: torch.nn.Module, popt: torch.optim.Optimizer, batches: Sequence[list[int]], batch_for,
    warmup_lm: bool, log: list[dict[str, Any]], bar: Any,
) -> None:
    for idx in batches:
        pb, _, _ = batch_for(idx)
        log.append(dict(step=len(log), phase="warmup", **_warmup_step(predictor, popt, pb, warmup_lm)))
        bar.update(1)


def _competent_predictor(
    predictor: torch.nn.Module, popt: torch.optim.Optimizer, n_train: int, batch_for,
    probe, cfg: WeightsConfig, log: list[dict[str, Any]], bar: Any,
) -> dict[str, float]:
    """Probe after the warm-up; while the predictor answers fewer than min_predictor_accuracy
    of the probe rationales, warm up `probe_every` more steps, up to max_warmup_steps in all.
    Extra batches come from their own seeded stream, so a run that needs no extension draws
    exactly the batches it always did. Raises PredictorCannotReadAnswers if still below."""
    result = probe()
    extra = torch.Generator().manual_seed(cfg.seed + 3)
    while result["unmasked_accuracy"] < cfg.min_predictor_accuracy and len(log) < cfg.max_warmup_steps:
        n = min(cfg.probe_every, cfg.max_warmup_steps - len(log))
        _warm_up(predictor, popt, _batch_order(n_train, n, cfg.batch_size, extra), batch_for, cfg.warmup_lm, log, bar)
        result = probe()
    if result["unmasked_accuracy"] < cfg.min_predictor_accuracy:
        raise PredictorCannotReadAnswers(
            f"weights: the answer predictor answers {result['unmasked_accuracy']:.1%} of held-out full "
            f"rationales after {len(log)} warm-up steps, below weights.min_predictor_accuracy "
            f"({cfg.min_predictor_accuracy:.0%}), so Lp would be noise; raise weights.max_warmup_steps "
            "or set weights.predictor to a pretrained model"
        )
    return result


def _save_warm(path: Path, predictor: torch.nn.Module, popt: torch.optim.Optimizer, g: torch.Generator,
               log: list[dict[str, Any]], before: dict[str, float]) -> None:
    """The warmed-up predictor and everything the joint phase continues from (its optimizer,
    the batch generator's and torch's RNG states, the log and the probe), written then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"predictor": predictor.state_dict(), "popt": popt.state_dict(), "g": g.get_state(),
             "torch_rng": torch.get_rng_state(), "log": log, "before": before}
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _warm_phase(
    predictor: torch.nn.Module, popt: torch.optim.Optimizer, warm: Sequence[list[int]], n_train: int, batch_for,
    probe, held: bool, g: torch.Generator, cfg: WeightsConfig, bar: Any, saved: Path | None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The warm-up and the predictor gate: (log rows, probe before the joint phase). With
    `saved`, a predictor that passed the gate is saved there, and a rerun (after a crash in the
    joint phase) loads it instead of warming up again, continuing exactly where it was."""
    path = None if saved is None else saved / "warm_predictor.pt"
    if path is not None and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        predictor.load_state_dict(state["predictor"])
        popt.load_state_dict(state["popt"])
        g.set_state(state["g"])
        torch.set_rng_state(state["torch_rng"])
        bar.update(len(state["log"]))
        return state["log"], state["before"]
    log: list[dict[str, Any]] = []
    _warm_up(predictor, popt, warm, batch_for, cfg.warmup_lm, log, bar)
    before = _competent_predictor(predictor, popt, n_train, batch_for, probe, cfg, log, bar) if held else {}
    if path is not None:
        _save_warm(path, predictor, popt, g, log, before)
    return log, before


def train_weighting(
    examples: Sequence[Encoded], embedding: torch.Tensor, predictor: torch.nn.Module,
    suffix: Sequence[int], cfg: WeightsConfig, pad_id: int, progress=None, saved: Path | None = None,
    words: WordRoles | None = None,
) -> Trained:
    """Warm up the predictor (m = 1) until the probe says it reads answers, then train
    generator + predictor jointly (Eq. 7).

    embedding (V, D): the student's input embedding, copied into the generator; suffix: token
    ids of the unlabelled answer lead-in placed between a prefix and the answer; saved: a
    directory that survives a crash (the stage's work dir), where the warmed-up predictor is
    kept so that a rerun skips the warm-up; words: the synthetic word roles (`oracle_masks`),
    so the probe also reads answers through fixed role masks.
    Returns the generator in eval mode with gradients off, one log row per step and the probe.
    """
    examples, held = split_probe(examples, cfg.probe_rationales, cfg.seed)
    if not examples:
        raise ValueError("weights: no correct train rationales to train the weighting module on")
    device = resolve_device(cfg.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        generator = WeightGenerator(embedding, cfg.heads, cfg.mlp_hidden, cfg.init_keep).to(device)
    predictor.to(device).train()
    # one generator for batch order and prefix sampling, in this order, so a seed fixes both
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    batch_for = functools.partial(
        _prefix_batch, examples=examples, suffix=suffix, cfg=cfg, pad_id=pad_id, gen=g, device=device
    )
    probe = functools.partial(probe_predictor, predictor, held, suffix, pad_id, device, oracles=oracle_masks(held, words))
    popt = torch.optim.AdamW(predictor.parameters(), lr=cfg.predictor_lr)
    warm = _batch_order(len(examples), cfg.predictor_warmup_steps, cfg.batch_size, g)
    joint = _batch_order(len(examples), cfg.steps, cfg.batch_size, g)
    bar = progress(total=len(warm) + len(joint), desc="weights") if progress else _NoBar()
    log, before = _warm_phase(predictor, popt, warm, len(examples), batch_for, probe, bool(held), g, cfg, bar, saved)
    n_warm = len(log)
    gopt = torch.optim.AdamW(generator.parameters(), lr=cfg.lr)
    generator.train()
    opts: tuple[torch.optim.Optimizer, ...] = (popt, gopt)
    if cfg.joint_predictor == "frozen":  # gradients still reach the mask through its inputs
        predictor.requires_grad_(False)
        opts = (gopt,)
    for step, idx in enumerate(joint, start=n_warm):
        row = _joint_step(generator, predictor, opts, batch_for(idx), cfg, noise)
        log.append(dict(step=step, phase="joint", **row))
        bar.update(1)
    bar.close()
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    after = probe(generator=generator) if held else {}
    probes = {f"probe_before_{k}": v for k, v in before.items()} | {f"probe_after_{k}": v for k, v in after.items()}
    if held:
        probes |= {"probe_rationales": float(len(held)), "warmup_steps": float(n_warm)}
    return Trained(generator, log, probes)


# ---- scoring and quality -------------------------------------------------------------------
@torch.no_grad()
def score(
    generator: WeightGenerator, examples: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu",
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


def role_quality_rows(weights: Sequence[Sequence[float]], roles: Sequence[Sequence[str | None]]) -> list[dict[str, Any]]:
    """AUROC of w for core tokens against filler tokens (the headline: does the module find what
    decides the answer, and drop what does not), core against all the rest, and mean w per role."""
    pairs = [(w, r) for wr, rr in zip(weights, roles) for w, r in zip(wr, rr) if r is not None]
    by = {role: [w for w, r in pairs if r == role] for role in ROLES}
    out = []
    if by["core"] and by["filler"]:
        cf = by["core"] + by["filler"]
        out.append(dict(metric="auroc_core_vs_filler", value=auroc(cf, [True] * len(by["core"]) + [False] * len(by["filler"])), tokens=len(cf)))
    if by["core"] and len(by["core"]) < len(pairs):
        out.append(dict(metric="auroc_core_vs_rest", value=auroc([w for w, _ in pairs], [r == "core" for _, r in pairs]), tokens=len(pairs)))
    return out + [
        dict(metric=f"mean_weight_role_{role}", value=sum(ws) / len(ws), tokens=len(ws)) for role, ws in by.items() if ws
    ]


class QualityInputs:
    """The weights of the tokens that carry keypoint truth or a role, gathered a chunk of
    rationales at a time into flat arrays (not a list per rationale), for `quality_rows` and
    `role_quality_rows`. `words`: rationale id -> its words (char_start, char_end, keypoint,
    role), sorted; None: the data has no truth (real data), and `rows()` is empty."""

    def __init__(self, words: WordRoles | None):
        self.words, self.labelled = words, 0  # rationales with truth seen
        self.kw, self.kt = array.array("d"), []  # keypoint truth: w, is keypoint
        self.rw, self.rr = array.array("d"), []  # roles: w, role

    def add(self, examples: Sequence[Encoded], weights: Sequence[Sequence[float]]) -> None:
        for e, w in zip(examples, weights):
            ws = (self.words or {}).get(e.rationale_id)
            if ws is None:
                continue
            self.labelled += 1
            for wj, t in zip(w, token_keypoints(e.offsets, [(a, b, k) for a, b, k, _ in ws])):
                if t is not None:
                    self.kw.append(wj)
                    self.kt.append(t)
            for wj, r in zip(w, token_roles(e.offsets, [(a, b, r) for a, b, _, r in ws])):
                if r is not None:
                    self.rw.append(wj)
                    self.rr.append(r)

    def rows(self) -> list[dict[str, Any]]:
        if not self.labelled:
            return []
        return quality_rows([self.kw], [self.kt]) + role_quality_rows([self.rw], [self.rr])


def token_weights_table(examples: Sequence[Encoded], texts: Sequence[str], weights: Sequence[Sequence[float]]) -> pa.Table:
    """`token_weights` rows: one per token of each example, with its text span, step and w."""
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
    """`mask_model.safetensors` (the state dict) + `mask_model.json` (its shape)."""
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
