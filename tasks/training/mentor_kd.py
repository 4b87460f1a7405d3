"""The KD term in the train stage: a `TrainMethod` wrapper for `mentor_kd` and `kpod_mentor`.

`MentorKD(base, ...)` keeps everything the base method decides (the examples of each epoch,
KPOD's token weights and schedule, the weighted CE) and adds METHODS.md §3.4's term:

    loss = (1 - lambda) * CE_base + lambda * KL(p_mentor^tau || p_student^tau)

- online: the frozen mentor runs teacher-forced on the very batch the student sees;
- cached_topk: the mentor's top-k log-probs were stored once per target token of each full
  rationale by `mentor_cache` (`mentor_logits`), and are looked up here. For a KPOD example
  whose first c steps moved into the prompt, the labelled tokens are a suffix of the full
  target's: the cache rows are that suffix (`cache_offset`). The mentor's context then is the
  same text, tokenized as one target instead of prompt + target; with the embedded tokenizer
  (split at spaces and digits) those are the same tokens, and a tokenizer whose labels are not
  a suffix is refused with a message pointing to `mentor.kd.source=online`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from tasks.core.formatting import Example
from tasks.core.forward import IGNORE, Aligned, aligned_logits
from tasks.core.kd import kd_kl, kd_kl_topk, mix
from tasks.training.data import TrainMethod

if TYPE_CHECKING:
    from tasks.config.mentor import KdSettings


def cache_offset(rationale_id: str, labels: list[int], full: list[int], input_steps: int, target_len: int) -> int:
    """Index into the full target's tokens `full` of an example's first labelled token.

    labels: the example's labelled token ids (its `labels` without IGNORE), in order;
    target_len: how many there were before the example was cut at max_len. The full rationale
    (input_steps = 0) starts at 0; a progressive example's whole target ends where the full
    target ends, so it starts at len(full) - target_len, cut or not. ValueError when the
    tokens do not line up.
    """
    n = len(labels)
    offset = 0 if input_steps == 0 else len(full) - max(target_len, n)
    if offset < 0 or full[offset : offset + n] != labels:
        raise ValueError(
            f"mentor_logits: the target tokens of rationale {rationale_id!r} (input_steps="
            f"{input_steps}) are not those the mentor was cached on; with this tokenizer use "
            "mentor.kd.source=online"
        )
    return offset


class TopkCache:
    """Per rationale: the cached (ids [L, K], logprobs [L, K]) over its full target's L tokens,
    which of them have a cached row (`have` [L]), and the full target's token ids.

    `partial` (the teacher's top-k, `tasks.training.teacher_kd`): positions and rationales
    without rows get no KD term; otherwise (the mentor's cache) every target token of every
    trained rationale must have its row."""

    def __init__(self, table: pa.Table, full_targets: dict[str, list[int]], partial: bool = False):
        table = table.sort_by([("rationale_id", "ascending"), ("pos", "ascending")])
        rids = table.column("rationale_id").to_pylist()
        pos = np.array(table.column("pos").to_pylist(), dtype=np.int64)
        k = len(table.column("token_ids")[0].as_py()) if table.num_rows else 0
        ids = np.array(table.column("token_ids").combine_chunks().flatten(), dtype=np.int64).reshape(-1, k or 1)
        lps = np.array(table.column("logprobs").combine_chunks().flatten(), dtype=np.float32).reshape(-1, k or 1)
        self.k, self.partial, self.full = k, partial, full_targets
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        start = 0
        for i in range(1, len(rids) + 1):
            if i == len(rids) or rids[i] != rids[start]:
                self.rows[rids[start]] = self._place(rids[start], pos[start:i], ids[start:i], lps[start:i])
                start = i

    def _place(self, rid: str, pos: np.ndarray, ids: np.ndarray, lps: np.ndarray) -> tuple[torch.Tensor, ...]:
        """One rationale's rows spread over its L target positions: (ids, logprobs, have)."""
        full = self.full.get(rid)
        if full is None:  # not trained on: kept as it is, never looked up
            return torch.from_numpy(ids), torch.from_numpy(lps), torch.ones(len(pos), dtype=torch.bool)
        L = len(full)
        if (not self.partial and len(pos) != L) or (len(pos) and (pos.min() < 0 or pos.max() >= L)):
            raise ValueError(
                f"mentor_logits: rationale {rid!r} has {len(pos)} cached positions (up to {pos.max()}), "
                f"its target has {L} tokens"
            )
        out_ids, out_lps = torch.zeros((L, ids.shape[1]), dtype=torch.long), torch.zeros((L, ids.shape[1]))
        have = torch.zeros(L, dtype=torch.bool)
        at = torch.from_numpy(pos)
        out_ids[at], out_lps[at], have[at] = torch.from_numpy(ids), torch.from_numpy(lps), True
        return out_ids, out_lps, have

    def lookup(self, ex: Example) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached (ids [n, K], logprobs [n, K], have [n]) for the example's n labelled tokens."""
        labels = [t for t in ex.labels if t != IGNORE]
        if ex.rationale_id not in self.rows:
            if not self.partial:
                raise ValueError(f"mentor_logits: no cached rows for training rationale {ex.rationale_id!r}")
            n, K = len(labels), max(self.k, 1)  # a mentor rationale, say: no teacher targets
            return torch.zeros((n, K), dtype=torch.long), torch.zeros((n, K)), torch.zeros(n, dtype=torch.bool)
        off = cache_offset(ex.rationale_id, labels, self.full[ex.rationale_id], ex.input_steps, ex.target_len)
        ids, lps, have = self.rows[ex.rationale_id]
        n = len(labels)
        return ids[off : off + n], lps[off : off + n], have[off : off + n]


class MentorKD(TrainMethod):
    """The base method's examples and weighted CE, plus the KD term (online or cached)."""

    def __init__(
        self, base: TrainMethod, kd: "KdSettings", mentor: Any | None = None, cache: TopkCache | None = None,
    ):
        if (mentor is None) == (cache is None):
            raise ValueError("MentorKD needs exactly one of a mentor model (online) or a top-k cache")
        self.base, self.kd = base, kd
        self.mentor, self.cache = mentor, cache
        if mentor is not None:
            mentor.eval()
            for p in mentor.parameters():
                p.requires_grad_(False)
        self.name = getattr(base, "name", "std_cot") + "+kd"
        self.curriculum_epochs = base.curriculum_epochs
        # the cached top-k sit at the labels' positions in the batch ([B, T, K])
        self.per_token = base.per_token + (() if cache is None else ("kd_ids", "kd_logprobs", "kd_mask"))
        super().__init__(base.examples_for_epoch(0), base.pad_id)

    def examples_for_epoch(self, epoch: int) -> list[Example]:
        return self.base.examples_for_epoch(epoch)

    def stage_for_epoch(self, epoch: int) -> int:
        return self.base.stage_for_epoch(epoch)

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        batch = self.base.collate(examples)
        if self.cache is None:
            return batch
        labels = batch["labels"]  # [B, T]
        B, T = labels.shape
        K = max(self.cache.k, 1)
        kd_ids = torch.zeros((B, T, K), dtype=torch.long)
        kd_logp = torch.zeros((B, T, K), dtype=torch.float32)
        kd_mask = torch.zeros((B, T), dtype=torch.bool)  # labelled positions with a cached target
        for b, ex in enumerate(examples):
            ids, lps, have = self.cache.lookup(ex)
            where = (labels[b] != IGNORE).nonzero().squeeze(1)  # [n] label positions, in order
            kd_ids[b, where] = ids
            kd_logp[b, where] = lps
            kd_mask[b, where] = have
        batch["kd_ids"], batch["kd_logprobs"], batch["kd_mask"] = kd_ids, kd_logp, kd_mask
        return batch

    def _mentor_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """The frozen mentor's logits [B, T, V] on the student's batch, aligned like the student's."""
        device = batch["input_ids"].device
        if next(self.mentor.parameters()).device != device:
            self.mentor.to(device)
        with torch.no_grad():
            return aligned_logits(self.mentor, batch).logits

    def loss(
        self,
        nll_loss: torch.Tensor,
        parts: dict[str, torch.Tensor],
        batch: dict[str, Any],
        aligned: Aligned,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce, parts = self.base.loss(nll_loss, parts, batch, aligned)
        logits, labels = aligned.logits, aligned.labels
        if self.cache is None:
            kl = kd_kl(logits, self._mentor_logits(batch), labels, self.kd.tau)
        else:
            ids, lps = aligned.extras["kd_ids"], aligned.extras["kd_logprobs"]
            # positions without a cached target (teacher_topk: the answer sentence, mentor
            # rationales) leave the KL's mean, as padding does
            kd_labels = labels.masked_fill(~aligned.extras["kd_mask"].bool(), IGNORE)
            kl = kd_kl_topk(logits, ids, lps, kd_labels, self.kd.tau)
        return mix(ce, kl, self.kd.lam), {**parts, "kd": kl.detach()}


def with_mentor_kd(
    kd: "KdSettings", base: TrainMethod, student: Any, tokenizer: Any, questions: pa.Table,
    rationales: pa.Table, mentor_dir: Any = None, mentor_logits: pa.Table | None = None,
    teacher_logprobs: pa.Table | None = None,
) -> MentorKD:
    """Wrap the train stage's method with the KD term, per `mentor.kd.source`.

    online: loads the mentor from `mentor_dir` (vocabulary checked against the student's).
    cached_topk: `mentor_logits` holds the mentor's cached top-k log-probs; `questions`/`rationales` (the
    training rationales) give each cached rationale's full target tokens for alignment.
    teacher_topk: `teacher_logprobs` (the teacher stage's table) become rows of that format for
    the teacher's rationales, after the check that the student's tokenizer is the teacher's
    (`tasks.training.teacher_kd`); positions without them get no KD term.
    """
    from tasks.core.models import is_seq2seq

    seq2seq = is_seq2seq(student)
    if kd.source == "online":
        return MentorKD(base, kd, mentor=_online_mentor(mentor_dir, student, tokenizer, seq2seq))
    partial = kd.source == "teacher_topk"
    if partial:
        from tasks.training.teacher_kd import teacher_topk_table

        table = teacher_topk_table(tokenizer, questions, rationales, teacher_logprobs)
    else:
        table = mentor_logits
    full = _full_targets(tokenizer, questions, rationales, set(table.column("rationale_id").to_pylist()), seq2seq)
    return MentorKD(base, kd, cache=TopkCache(table, full, partial=partial))


def _online_mentor(mentor_dir: Any, student: Any, tokenizer: Any, seq2seq: bool) -> Any:
    """The mentor model, refused unless it shares the student's vocabulary and family."""
    from tasks.core.models import assert_same_vocab, is_seq2seq, load_model

    mentor, mtok = load_model(mentor_dir)
    assert_same_vocab(tokenizer, mtok, "mentor tokenizer")
    if is_seq2seq(mentor) != seq2seq:
        raise ValueError("the mentor and the student must both be decoder-only or both seq2seq for KD")
    vs, vm = student.get_output_embeddings().weight.shape[0], mentor.get_output_embeddings().weight.shape[0]
    if vs != vm:
        raise ValueError(f"mentor output vocabulary ({vm}) differs from the student's ({vs}): KD needs one vocabulary")
    return mentor


def _full_targets(
    tokenizer: Any, questions: pa.Table, rationales: pa.Table, cached: set[str], seq2seq: bool
) -> dict[str, list[int]]:
    """The full example's labelled token ids of each cached rationale (for alignment)."""
    from tasks.core.formatting import build_example

    qs = {q["question_id"]: q for q in questions.select(["question_id", "question", "answer"]).to_pylist()}
    full: dict[str, list[int]] = {}
    for r in rationales.select(["rationale_id", "question_id", "text"]).to_pylist():
        if r["rationale_id"] not in cached:
            continue
        q = qs[r["question_id"]]
        ex = build_example(tokenizer, q["question"], r["text"], q["answer"], seq2seq=seq2seq,
                           max_len=1 << 30, rationale_id=r["rationale_id"])
        full[r["rationale_id"]] = [t for t in ex.labels if t != IGNORE]
    return full
