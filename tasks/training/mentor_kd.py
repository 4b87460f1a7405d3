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
    """Per rationale: the cached (ids [T, K], logprobs [T, K]) and the full target's token ids."""

    def __init__(self, table: pa.Table, full_targets: dict[str, list[int]]):
        table = table.sort_by([("rationale_id", "ascending"), ("pos", "ascending")])
        rids = table.column("rationale_id").to_pylist()
        k = len(table.column("token_ids")[0].as_py()) if table.num_rows else 0
        ids = np.array(table.column("token_ids").combine_chunks().flatten(), dtype=np.int64).reshape(-1, k or 1)
        lps = np.array(table.column("logprobs").combine_chunks().flatten(), dtype=np.float32).reshape(-1, k or 1)
        self.k = k
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        start = 0
        for i in range(1, len(rids) + 1):
            if i == len(rids) or rids[i] != rids[start]:
                self.rows[rids[start]] = (torch.from_numpy(ids[start:i]), torch.from_numpy(lps[start:i]))
                start = i
        self.full = full_targets
        for rid, (cid, _) in self.rows.items():
            if rid in full_targets and len(full_targets[rid]) != cid.shape[0]:
                raise ValueError(
                    f"mentor_logits: rationale {rid!r} has {cid.shape[0]} cached positions, its "
                    f"target has {len(full_targets[rid])} tokens"
                )

    def lookup(self, ex: Example) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (ids [n, K], logprobs [n, K]) for the example's n labelled tokens."""
        if ex.rationale_id not in self.rows:
            raise ValueError(f"mentor_logits: no cached rows for training rationale {ex.rationale_id!r}")
        labels = [t for t in ex.labels if t != IGNORE]
        off = cache_offset(ex.rationale_id, labels, self.full[ex.rationale_id], ex.input_steps, ex.target_len)
        ids, lps = self.rows[ex.rationale_id]
        return ids[off : off + len(labels)], lps[off : off + len(labels)]


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
        self.per_token = base.per_token + (() if cache is None else ("kd_ids", "kd_logprobs"))
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
        K = self.cache.k
        kd_ids = torch.zeros((B, T, K), dtype=torch.long)
        kd_logp = torch.zeros((B, T, K), dtype=torch.float32)
        for b, ex in enumerate(examples):
            ids, lps = self.cache.lookup(ex)
            where = (labels[b] != IGNORE).nonzero().squeeze(1)  # [n] label positions, in order
            kd_ids[b, where] = ids
            kd_logp[b, where] = lps
        batch["kd_ids"], batch["kd_logprobs"] = kd_ids, kd_logp
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
            kl = kd_kl_topk(logits, ids, lps, labels, self.kd.tau)
        return mix(ce, kl, self.kd.lam), {**parts, "kd": kl.detach()}


def with_mentor_kd(
    kd: "KdSettings", base: TrainMethod, student: Any, tokenizer: Any, questions: pa.Table,
    rationales: pa.Table, mentor_dir: Any = None, mentor_logits: pa.Table | None = None,
) -> MentorKD:
    """Wrap the train stage's method with the KD term, per `mentor.kd.source`.

    online: loads the mentor from `mentor_dir` (vocabulary checked against the student's).
    cached_topk: `mentor_logits` holds the mentor's cached top-k log-probs; `questions`/`rationales` (the
    training rationales) give each cached rationale's full target tokens for alignment.
    """
    from tasks.core.formatting import build_example
    from tasks.core.models import assert_same_vocab, is_seq2seq, load_model

    seq2seq = is_seq2seq(student)
    if kd.source == "online":
        mentor, mtok = load_model(mentor_dir)
        assert_same_vocab(tokenizer, mtok, "mentor tokenizer")
        if is_seq2seq(mentor) != seq2seq:
            raise ValueError("the mentor and the student must both be decoder-only or both seq2seq for KD")
        vs, vm = student.get_output_embeddings().weight.shape[0], mentor.get_output_embeddings().weight.shape[0]
        if vs != vm:
            raise ValueError(f"mentor output vocabulary ({vm}) differs from the student's ({vs}): KD needs one vocabulary")
        return MentorKD(base, kd, mentor=mentor)
    table = mentor_logits
    qs = {q["question_id"]: q for q in questions.select(["question_id", "question", "answer"]).to_pylist()}
    cached = set(table.column("rationale_id").to_pylist())
    full: dict[str, list[int]] = {}
    for r in rationales.select(["rationale_id", "question_id", "text"]).to_pylist():
        if r["rationale_id"] not in cached:
            continue
        q = qs[r["question_id"]]
        ex = build_example(tokenizer, q["question"], r["text"], q["answer"], seq2seq=seq2seq,
                           max_len=1 << 30, rationale_id=r["rationale_id"])
        full[r["rationale_id"]] = [t for t in ex.labels if t != IGNORE]
    return MentorKD(base, kd, cache=TopkCache(table, full))
