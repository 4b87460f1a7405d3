"""KPOD's token weighting module (METHODS.md §2.1): the weight generator, its mask, its losses.

Pure torch; nothing here reads files. The pieces, in the paper's equation numbers:

    e   = Att(Emb(r))                 (Eq. 2)  `WeightGenerator`: Emb copied from the student's
    w_j = sigmoid(MLP2(e_j))          (Eq. 3)  input embedding, ONE self-attention layer, an MLP
    m_j = GumbelSoftmax(w_j)          (Eq. 4)  `binary_concrete_st`: hard 0/1 forward, soft grad
                                               (or, a departure, `bernoulli_mask` with the
                                               score-function gradient `score_function_surrogate`)
    Lp  = -sum_k sum_j log P(y_j | y_<j, r[m]_<k, x)   (Eq. 5)  `answer_prefix_loss`
    Lm  = sum_j m_j / L               (Eq. 6)  `mask_loss`, normalised per rationale token
    Lk  = Lp + alpha * Lm             (Eq. 7)

The mask multiplies the rationale token *embeddings* that the answer predictor receives through
`inputs_embeds` (`apply_mask`). Swapping masked token ids for a pad id instead (what the public
re-implementation did) cuts the graph: Lp then never reaches the generator, only Lm trains it,
and every weight collapses towards 0.

Prefixes (Eq. 5). For each rationale and each chosen step boundary k, one row of the predictor
batch is `prompt tokens + rationale tokens up to the end of step k + suffix tokens + answer
tokens`, where the suffix is the unlabelled lead-in " Therefore, the answer is" of the
serialization (METHODS §0) and only the answer tokens are labelled. **Decision:** the target is
the answer alone (the lead-in is constant, so labelling it would only add loss that no mask can
change); keeping the lead-in in the input puts the answer where the student's format puts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.core.forward import IGNORE


# ---- the weight generator (Eq. 2-3) --------------------------------------------------------
class WeightGenerator(nn.Module):
    """Rationale token ids -> keep probabilities w in (0, 1).

    Emb is a trainable copy of the student's input embedding (same tokenizer, so ids agree).
    Att is one multi-head self-attention layer over the rationale (bidirectional: whether a
    token matters can depend on what follows it), with a residual connection and a LayerNorm
    so a token's own identity is not washed out by the mixing. MLP2 is Linear-GELU-Linear.
    """

    def __init__(self, embedding: torch.Tensor, n_heads: int = 4, mlp_hidden: int = 128, init_keep: float | None = None):
        super().__init__()
        if embedding.dim() != 2:
            raise ValueError(f"embedding must be (vocab, dim), got shape {tuple(embedding.shape)}")
        vocab, dim = embedding.shape
        if dim % n_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by n_heads={n_heads}")
        self.emb = nn.Embedding(vocab, dim)
        with torch.no_grad():
            self.emb.weight.copy_(embedding.detach().float())
        self.attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, 1))
        if init_keep is not None:  # start every w near init_keep: the output bias is its logit
            with torch.no_grad():
                self.mlp[2].bias.fill_(math.log(init_keep / (1 - init_keep)))

    def logits(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids (R, L) long, valid (R, L) bool (False = padding) -> pre-sigmoid logits (R, L)."""
        if not bool(valid.any(dim=1).all()):
            raise ValueError("every rationale needs at least one token")
        x = self.emb(ids)  # (R, L, D)
        a, _ = self.attn(x, x, x, key_padding_mask=~valid, need_weights=False)
        e = self.norm(x + a)  # (R, L, D)
        return self.mlp(e).squeeze(-1)  # (R, L)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids (R, L), valid (R, L) -> w (R, L) in (0, 1); padding positions are 0."""
        return torch.sigmoid(self.logits(ids, valid)) * valid


# ---- the mask (Eq. 4) ----------------------------------------------------------------------
def binary_concrete_st(
    w: torch.Tensor, tau: float, generator: torch.Generator | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Straight-through binary Gumbel-softmax sample of keep masks.

    w (...) keep probabilities -> m (...) with values exactly 0.0 or 1.0 in the forward pass
    and the gradient of the soft sample y = softmax([log w + g1, log(1-w) + g0] / tau)[0].
    A two-class Gumbel-softmax equals sigmoid((logit(w) + g1 - g0) / tau), and g1 - g0 is
    logistic noise log(u) - log(1-u); that is what is drawn here (one uniform per entry).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    wc = w.clamp(eps, 1 - eps)
    logit = torch.log(wc) - torch.log1p(-wc)
    u = torch.rand(w.shape, generator=generator, device=w.device, dtype=w.dtype).clamp(eps, 1 - eps)
    noise = torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logit + noise) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    # hard + (soft - soft.detach()) is hard exactly in the forward pass (the bracket is 0.0)
    return hard + (soft - soft.detach())


# ---- the score-function estimator (**departure**, `weights.estimator`) -----------------------
# The straight-through gradient is the predictor's local slope at the sampled mask, and it
# passes w(1 - w) back through the sigmoid, so once every w is near 0 or 1 nothing moves it.
# The score-function (REINFORCE) gradient instead weighs each sampled mask's actual answer loss:
# for one token, E[dLp/dlogit_j] = w_j (1 - w_j) (E[Lp | m_j = 1] - E[Lp | m_j = 0]), the sign
# Eq. 7 asks for, whatever the predictor's slope.
def bernoulli_mask(w: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """w (...) keep probabilities -> m (...) hard 0/1 samples m_j ~ Bernoulli(w_j), no gradient."""
    u = torch.rand(w.shape, generator=generator, device=w.device, dtype=w.dtype)
    return (u < w.detach()).to(w.dtype)


def mask_log_prob(m: torch.Tensor, w: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """log P(m | w) per rationale: sum over real tokens of m log w + (1 - m) log(1 - w).

    m (R, L) 0/1 masks; w (R, L) keep probabilities (gradient flows through w); valid (R, L)
    bool/0-1, True on real tokens -> (R,).
    """
    wc = w.clamp(eps, 1 - eps)
    per_token = m * torch.log(wc) + (1 - m) * torch.log1p(-wc)
    return (per_token * valid.to(w.dtype)).sum(dim=1)


def rloo_advantages(losses: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline: losses (K, R), K >= 2 sampled masks per rationale -> (K, R) with
    A_kr = L_kr - mean over the other K - 1 samples of rationale r (an unbiased baseline: it does
    not depend on sample k)."""
    k = losses.shape[0]
    if losses.dim() != 2 or k < 2:
        raise ValueError(f"leave-one-out needs losses (K, R) with K >= 2, got shape {tuple(losses.shape)}")
    others = (losses.sum(dim=0, keepdim=True) - losses) / (k - 1)
    return losses - others


def score_function_surrogate(losses: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient is the leave-one-out REINFORCE estimate of the gradient of
    (1/R) sum_r E_m[Lp_r]: mean over k and r of A_kr * log P(m_kr | w_r).

    losses (K, R) each sampled mask's answer loss (treated as constants); log_probs (K, R)
    `mask_log_prob` of those masks (carrying the gradient) -> scalar (its value is not Lp).
    """
    if losses.shape != log_probs.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and log_probs {tuple(log_probs.shape)} differ")
    return (rloo_advantages(losses.detach()) * log_probs).mean()


# ---- prefix batches (Eq. 5) ----------------------------------------------------------------
def step_boundaries(token_steps: Sequence[int]) -> list[int]:
    """Per-token step numbers (non-decreasing) -> exclusive token ends of each step.

    [1, 1, 2, 2, 2, 3] -> [2, 5, 6]: the prefix for step k is tokens[:ends[k-1]].
    """
    if not token_steps:
        raise ValueError("a rationale with no tokens has no step boundaries")
    ends = []
    for i in range(1, len(token_steps)):
        if token_steps[i] < token_steps[i - 1]:
            raise ValueError(f"token steps decrease at position {i}: {list(token_steps)}")
        if token_steps[i] != token_steps[i - 1]:
            ends.append(i)
    ends.append(len(token_steps))
    return ends


def select_boundaries(
    ends: Sequence[int], mode: str, n_sampled: int, generator: torch.Generator | None = None
) -> list[int]:
    """Which prefixes enter Eq. 5: `all` step boundaries (the paper), `final` = only the full
    rationale, or `sampled` = the full rationale plus up to n_sampled - 1 other boundaries
    drawn uniformly without replacement (the full rationale is always kept so the predictor
    always sees the complete case)."""
    if mode == "final":
        return [ends[-1]]
    if mode == "all" or len(ends) <= n_sampled:
        return list(ends)
    if mode != "sampled":
        raise ValueError(f"prefix mode must be 'all', 'final' or 'sampled', got {mode!r}")
    others = list(ends[:-1])
    pick = torch.randperm(len(others), generator=generator)[: max(n_sampled - 1, 0)]
    return sorted(others[i] for i in pick.tolist()) + [ends[-1]]


@dataclass
class PrefixBatch:
    """One predictor row per (rationale, prefix). N rows, T = longest row.

    input_ids (N, T) long, padded on the right with pad_id
    attention_mask (N, T) long
    labels (N, T) long: answer token ids, IGNORE elsewhere (not yet shifted)
    rat_pos (N, T) long: the rationale position a token comes from, -1 for prompt, suffix,
        answer and padding (these are never masked)
    row_src (N,) long: which rationale of the batch (0..R-1) the row belongs to
    prefix_end (N,) long: the exclusive rationale token end of the row's prefix
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rat_pos: torch.Tensor
    row_src: torch.Tensor
    prefix_end: torch.Tensor
    # packed batches only (`build_packed_batch`): (N, T, T) bool, query t may attend key s,
    # and (N, T) long position ids
    allowed: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "PrefixBatch":
        return PrefixBatch(*(None if v is None else v.to(device) for v in (
            self.input_ids, self.attention_mask, self.labels, self.rat_pos, self.row_src,
            self.prefix_end, self.allowed, self.position_ids)))

    @property
    def n_rationales(self) -> int:
        return int(self.row_src.max().item()) + 1 if self.row_src.numel() else 0


def _check_prefix_inputs(
    prompts: Sequence[Sequence[int]],
    rationales: Sequence[Sequence[int]],
    prefix_ends: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
) -> None:
    """The checks both batch builders need: aligned inputs, answers, ends inside rationales."""
    if not (len(prompts) == len(rationales) == len(prefix_ends) == len(answers)):
        raise ValueError("prompts, rationales, prefix_ends and answers must have the same length")
    for i, (r, ends, a) in enumerate(zip(rationales, prefix_ends, answers)):
        if not a:
            raise ValueError(f"rationale {i}: empty answer tokens")
        for end in ends:
            if not 0 < end <= len(r):
                raise ValueError(f"rationale {i}: prefix end {end} outside 1..{len(r)}")


def _pad_rows(
    ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], rat_pos: Sequence[Sequence[int]],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad N rows of token lists to the longest, T.

    -> input_ids (N, T) padded with pad_id, attention_mask (N, T) 1 on real tokens,
    labels (N, T) padded with IGNORE, rat_pos (N, T) padded with -1.
    """
    n, t = len(ids), max(len(r) for r in ids)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attention = torch.zeros((n, t), dtype=torch.long)
    label_t = torch.full((n, t), IGNORE, dtype=torch.long)
    pos_t = torch.full((n, t), -1, dtype=torch.long)
    for row, (r_ids, r_lab, r_pos) in enumerate(zip(ids, labels, rat_pos)):
        k = len(r_ids)
        input_ids[row, :k] = torch.tensor(r_ids)
        attention[row, :k] = 1
        label_t[row, :k] = torch.tensor(r_lab)
        pos_t[row, :k] = torch.tensor(r_pos)
    return input_ids, attention, label_t, pos_t


def build_prefix_batch(
    prompts: Sequence[Sequence[int]],
    rationales: Sequence[Sequence[int]],
    prefix_ends: Sequence[Sequence[int]],
    suffix: Sequence[int],
    answers: Sequence[Sequence[int]],
    pad_id: int,
) -> PrefixBatch:
    """Rows `prompt + rationale[:end] + suffix + answer` for every end in prefix_ends[i].

    prompts[i], rationales[i], answers[i]: token ids of rationale i's question prompt, its
    rationale and its answer; prefix_ends[i]: exclusive rationale token ends (step
    boundaries, see `step_boundaries`); suffix: the unlabelled lead-in before the answer.
    """
    _check_prefix_inputs(prompts, rationales, prefix_ends, answers)
    rows: list[tuple[list[int], list[int], list[int], int, int]] = []
    for i, (p, r, ends, a) in enumerate(zip(prompts, rationales, prefix_ends, answers)):
        for end in ends:
            ids = list(p) + list(r[:end]) + list(suffix) + list(a)
            labels = [IGNORE] * (len(ids) - len(a)) + list(a)
            pos = [-1] * len(p) + list(range(end)) + [-1] * (len(suffix) + len(a))
            rows.append((ids, labels, pos, i, end))
    if not rows:
        raise ValueError("no prefixes to build a batch from")
    input_ids, attention, labels, rat_pos = _pad_rows(
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], pad_id
    )
    row_src = torch.tensor([r[3] for r in rows], dtype=torch.long)
    prefix_end = torch.tensor([r[4] for r in rows], dtype=torch.long)
    return PrefixBatch(input_ids, attention, labels, rat_pos, row_src, prefix_end)


def _packed_row(
    prompt: Sequence[int], rationale: Sequence[int], ends: Sequence[int], suffix: Sequence[int],
    answer: Sequence[int],
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """One packed row as token lists: ids, labels, rat_pos, position ids and owner (-1 for the
    prompt and rationale, k for the suffix+answer block of ends[k])."""
    block = list(suffix) + list(answer)
    ids = list(prompt) + list(rationale)
    labels = [IGNORE] * len(ids)
    pos = [-1] * len(prompt) + list(range(len(rationale)))
    position = list(range(len(prompt) + len(rationale)))
    owner = [-1] * len(ids)
    for k, end in enumerate(ends):
        ids += block
        labels += [IGNORE] * len(suffix) + list(answer)
        pos += [-1] * len(block)
        # the block continues right after prompt + rationale[:end], as in its unpacked row
        position += [len(prompt) + end + j for j in range(len(block))]
        owner += [k] * len(block)
    return ids, labels, pos, position, owner


def _packed_visibility(owner: Sequence[int], rat_pos: Sequence[int], ends: Sequence[int]) -> torch.Tensor:
    """(k, k) bool for one packed row of k tokens, before the causal mask: query t may see key s.

    Prompt and rationale tokens see each other; block b sees the prompt, the rationale tokens
    before ends[b], and its own tokens (never another block).
    """
    own = torch.tensor(owner)  # (k,)
    rp = torch.tensor(rat_pos)  # (k,)
    end_of = torch.tensor([ends[o] if o >= 0 else 0 for o in owner])  # (k,)
    base = own.unsqueeze(1).eq(-1) & own.unsqueeze(0).eq(-1)  # text attends text
    sees_prompt = own.unsqueeze(1).ge(0) & (rp.unsqueeze(0).eq(-1) & own.unsqueeze(0).eq(-1))
    sees_prefix = own.unsqueeze(1).ge(0) & rp.unsqueeze(0).ge(0) & (rp.unsqueeze(0) < end_of.unsqueeze(1))
    same_block = own.unsqueeze(1).eq(own.unsqueeze(0)) & own.unsqueeze(1).ge(0)
    return base | sees_prompt | sees_prefix | same_block


def build_packed_batch(
    prompts: Sequence[Sequence[int]],
    rationales: Sequence[Sequence[int]],
    prefix_ends: Sequence[Sequence[int]],
    suffix: Sequence[int],
    answers: Sequence[Sequence[int]],
    pad_id: int,
) -> PrefixBatch:
    """The same prefixes as `build_prefix_batch`, packed into ONE row per rationale:

        prompt | rationale (all of it) | suffix+answer for end_1 | ... | suffix+answer for end_K

    Block k attends to the prompt, rationale tokens before end_k, and itself (causally); its
    positions continue from prompt + end_k, so each block sees exactly what row k of
    `build_prefix_batch` sees and yields the same answer log-probs (Eq. 5) while the prompt
    and rationale are computed once instead of K times. Needs a non-empty suffix (the first
    answer token of a block is predicted from the block's own last suffix token).
    """
    if not suffix:
        raise ValueError("packing prefixes needs a non-empty suffix between prefix and answer")
    _check_prefix_inputs(prompts, rationales, prefix_ends, answers)
    rows = []
    for i, (p, r, ends, a) in enumerate(zip(prompts, rationales, prefix_ends, answers)):
        if not ends:
            raise ValueError(f"rationale {i}: no prefix ends")
        rows.append((*_packed_row(p, r, ends, suffix, a), list(ends)))
    input_ids, attention, labels, rat_pos = _pad_rows(
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], pad_id
    )
    n, t = input_ids.shape
    position_ids = torch.zeros((n, t), dtype=torch.long)
    allowed = torch.zeros((n, t, t), dtype=torch.bool)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for row, (ids, _, pos, position, owner, ends) in enumerate(rows):
        k = len(ids)
        position_ids[row, :k] = torch.tensor(position)
        allowed[row, :k, :k] = _packed_visibility(owner, pos, ends) & causal[:k, :k]
        allowed[row, k:, k:] = torch.eye(t - k, dtype=torch.bool)  # padding sees itself: no empty rows
    row_src = torch.arange(n, dtype=torch.long)
    prefix_end = torch.tensor([r[5][-1] for r in rows], dtype=torch.long)
    return PrefixBatch(input_ids, attention, labels, rat_pos, row_src, prefix_end, allowed, position_ids)


def apply_mask(
    embeds: torch.Tensor, m: torch.Tensor, rat_pos: torch.Tensor, row_src: torch.Tensor
) -> torch.Tensor:
    """Multiply each rationale token's embedding by its mask value; other tokens keep 1.

    embeds (N, T, D) predictor input embeddings of a PrefixBatch; m (R, L) masks per
    rationale token; rat_pos (N, T), row_src (N,) from the batch -> (N, T, D).
    """
    is_rat = rat_pos >= 0  # (N, T)
    gathered = m[row_src.unsqueeze(1), rat_pos.clamp(min=0)]  # (N, T)
    scale = torch.where(is_rat, gathered, torch.ones_like(gathered))
    return embeds * scale.unsqueeze(-1).to(embeds.dtype)


# ---- losses (Eq. 5-7) ----------------------------------------------------------------------
def rationale_answer_loss(
    logits: torch.Tensor, labels: torch.Tensor, row_src: torch.Tensor, n_rationales: int
) -> torch.Tensor:
    """Eq. 5 for each rationale on its own: logits (N, T, V), labels (N, T) as in
    `answer_prefix_loss`, row_src (N,) the rationale of each row -> (R,) the summed answer NLL
    over that rationale's prefixes. Its mean is `answer_prefix_loss`."""
    per_row = answer_row_nll(logits, labels)  # (N,)
    return torch.zeros(n_rationales, dtype=per_row.dtype, device=per_row.device).index_add(0, row_src, per_row)


def answer_prefix_loss(logits: torch.Tensor, labels: torch.Tensor, n_rationales: int) -> torch.Tensor:
    """Eq. 5, averaged over the rationales of the batch.

    logits (N, T, V) of the predictor on a PrefixBatch; labels (N, T) unshifted, IGNORE where
    not an answer token -> scalar = (1/R) * sum over rows (all prefixes of all rationales) of
    sum over answer tokens of -log P(y_j | y_<j, masked prefix, x). Summing over prefixes and
    tokens is the paper's Eq. 5; the mean over R only makes the scale independent of batch size.
    """
    if n_rationales <= 0:
        raise ValueError("n_rationales must be positive")
    # one flat sum: summing `answer_row_nll` instead would reorder the float additions (and the
    # documented runs, measured with this order, would no longer repeat to the last digit)
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return nll / n_rationales


def mask_loss(m: torch.Tensor, rationale_mask: torch.Tensor, norm: str = "per_token") -> torch.Tensor:
    """Eq. 6, Lm = sum_j m_j per rationale, averaged over the rationales of the batch.

    m (R, L) masks; rationale_mask (R, L) bool/0-1, True on real tokens -> scalar.
    norm "sum": the paper's plain sum (mean over R of sum_j m_j, the same batch scale as Lp);
    norm "per_token" (**Decision**, METHODS §2.1): each rationale's sum divided by its length
    L_i, in [0, 1], so alpha's meaning does not depend on rationale length.
    """
    valid = rationale_mask.to(m.dtype)
    lengths = valid.sum(dim=1)
    if bool((lengths <= 0).any()):
        raise ValueError("every rationale needs at least one token")
    kept = (m * valid).sum(dim=1)  # (R,)
    if norm == "sum":
        return kept.mean()
    if norm != "per_token":
        raise ValueError(f"mask norm must be 'per_token' or 'sum', got {norm!r}")
    return (kept / lengths).mean()


def kpod_mask_objective(lp: torch.Tensor, lm: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 7: Lk = Lp + alpha * Lm (scalars)."""
    return lp + alpha * lm


def predictor_logits(
    predictor: nn.Module, batch: PrefixBatch, m: torch.Tensor | None
) -> torch.Tensor:
    """Run a causal LM on a PrefixBatch with rationale embeddings scaled by m.

    predictor: an HF causal LM (anything with get_input_embeddings() and inputs_embeds);
    m (R, L) or None for no mask (m = 1, the warm-up) -> logits (N, T, V).
    """
    embeds = predictor.get_input_embeddings()(batch.input_ids)  # (N, T, D)
    if m is not None:
        embeds = apply_mask(embeds, m, batch.rat_pos, batch.row_src)
    if batch.allowed is None:
        out = predictor(inputs_embeds=embeds, attention_mask=batch.attention_mask)
        return out.logits
    # a custom 4D additive mask (N, 1, T, T): 0 where allowed, the dtype's min elsewhere
    mask4 = torch.zeros(batch.allowed.shape, dtype=embeds.dtype, device=embeds.device)
    mask4 = mask4.masked_fill(~batch.allowed, torch.finfo(embeds.dtype).min).unsqueeze(1)
    out = predictor(inputs_embeds=embeds, attention_mask=mask4, position_ids=batch.position_ids)
    return out.logits


def auroc(scores: Sequence[float], truth: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for the positives in `truth` (Mann-Whitney U with
    average ranks for ties). Needs both classes present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(truth, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes (got {n_pos} positives, {n_neg} negatives)")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])  # first index of each tie run
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends - 1) / 2 + 1  # average 1-based rank of each run
    ranks = np.empty_like(s)
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def answer_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, whether greedy teacher-forced decoding gets every answer token right, and the
    answer's NLL.

    logits (N, T, V) of the predictor on a PrefixBatch; labels (N, T) unshifted, IGNORE where
    not an answer token -> (hit (N,) bool, nll (N,) float32 summed over the answer tokens).
    """
    shift_logits, shift_labels = logits[:, :-1, :].float(), labels[:, 1:]
    answer = shift_labels != IGNORE
    right = (shift_logits.argmax(dim=-1) == shift_labels) | ~answer
    return right.all(dim=1) & answer.any(dim=1), answer_row_nll(logits, labels)


def answer_row_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (N, T, V), labels (N, T) unshifted, IGNORE where not an answer token -> (N,)
    float32: each row's answer NLL summed over its answer tokens."""
    shift_logits, shift_labels = logits[:, :-1, :].float(), labels[:, 1:]
    return F.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none"
    ).sum(dim=1)
