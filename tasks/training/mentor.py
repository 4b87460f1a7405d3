"""Mentor-KD's model and data (METHODS.md §3), called by the three mentor stages.

- `build_mentor`: an intermediate-size model of the student's family on the student's
  tokenizer (embedded: a bigger LLaMA; hf: any model directory whose vocabulary equals the
  student's, else refused).
- `augment_rows`: the mentor's sampled rationales, graded and segmented exactly as the
  teacher's (`tasks.core.rationale_rows.build_rows`).
- `kd_targets`: the rationales the student trains on, which the KD cache must cover.
- `mentor_logits_table`: the mentor's top-k log-probs at every target token of those
  rationales (the `mentor_logits` table), teacher-forced through `tasks.core.forward`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from storage.schemas import schema_for
from tasks.config.mentor import MentorModel
from tasks.core.formatting import Example, build_example
from tasks.core.forward import IGNORE, aligned_logits, is_seq2seq
from tasks.core.kd import topk_logprobs
from tasks.core.models import assert_same_vocab, embedded_llama, load_model
from tasks.core.rationale_rows import RationaleRows, build_rows
from tasks.training.data import collate_examples


# ---- the mentor model ------------------------------------------------------------------------
def build_mentor(cfg: MentorModel, student_tokenizer: Any) -> tuple[Any, Any]:
    """(mentor model, tokenizer): embedded on the student's tokenizer, or an HF model whose
    vocabulary must equal the student's (ValueError naming the mentor otherwise)."""
    if cfg.kind == "hf":
        model, tok = load_model(cfg.name_or_path)
        assert_same_vocab(student_tokenizer, tok, f"mentor tokenizer (mentor.model.name_or_path={cfg.name_or_path!r})")
        return model, student_tokenizer
    return embedded_llama(cfg, student_tokenizer), student_tokenizer


# ---- augmentation ----------------------------------------------------------------------------
def augment_rows(
    questions: list[dict], completions: list[list[str]], min_steps: int
) -> tuple[list[RationaleRows], dict[str, int]]:
    """`RationaleRows` of the mentor's samples: completions[i][s] is sample s of questions[i].

    Every sample is graded against the question's gold answer by `tasks.core.answers` (through
    `build_rows`, which strips the answer sentence the student format ends with). Empty
    completions and rationales with fewer than `min_steps` steps are not stored (counted);
    incorrect ones are stored with correct=false. Returns (rows, counts).
    """
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


def kd_targets(questions: dict[str, dict], rationales: list[dict]) -> list[dict]:
    """The rationales the student trains on: correct ones of training questions, by id."""
    out = [
        r for r in rationales
        if r["correct"] and r["question_id"] in questions and questions[r["question_id"]]["split"] == "train"
    ]
    return sorted(out, key=lambda r: r["rationale_id"])


# ---- the top-k cache -------------------------------------------------------------------------
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
    seq2seq = is_seq2seq(model)
    max_len = int(getattr(model.config, "max_position_embeddings", None) or 1_000_000)
    examples = [
        build_example(
            tokenizer, questions[r["question_id"]]["question"], r["text"], questions[r["question_id"]]["answer"],
            seq2seq=seq2seq, max_len=max_len, rationale_id=r["rationale_id"],
        )
        for r in targets
    ]
    rows: list[tuple[str, np.ndarray, np.ndarray]] = []
    model.eval()
    starts = range(0, len(examples), batch_size)
    with torch.inference_mode():
        for start in progress(starts, desc="mentor_logits") if progress else starts:
            chunk = examples[start : start + batch_size]
            rows.extend(_topk_rows(model, chunk, tokenizer.pad_token_id, k, device))
    return _topk_table(rows, k)


def _topk_rows(
    model: Any, chunk: list[Example], pad_id: int, k: int, device: torch.device
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per example of one batch: (rationale_id, ids [T_b, k] int32, logprobs [T_b, k] float32)
    at its T_b labelled positions, in order."""
    batch = {key: v.to(device) for key, v in collate_examples(chunk, pad_id).items()}
    out = aligned_logits(model, batch)  # logits [B, T, V], labels [B, T]
    rows = []
    for b, ex in enumerate(chunk):
        sel = out.labels[b] != IGNORE
        ids, lp = topk_logprobs(out.logits[b][sel], k)  # [T_b, k]
        rows.append((ex.rationale_id, ids.cpu().numpy().astype(np.int32), lp.cpu().numpy().astype(np.float32)))
    return rows


def _topk_table(rows: list[tuple[str, np.ndarray, np.ndarray]], k: int) -> pa.Table:
    """The `mentor_logits` table of `_topk_rows` results: one row per (rationale, pos)."""
    rids = [rid for rid, ids, _ in rows for _ in range(ids.shape[0])]
    kk = rows[0][1].shape[1] if rows else min(k, 1)
    poss = [np.arange(ids.shape[0], dtype=np.int64) for _, ids, _ in rows]
    flat_ids = np.concatenate([ids for _, ids, _ in rows]).reshape(-1) if rows else np.zeros(0, np.int32)
    flat_lp = np.concatenate([lp for _, _, lp in rows]).reshape(-1) if rows else np.zeros(0, np.float32)
    offsets = pa.array(np.arange(0, len(rids) * kk + 1, kk, dtype=np.int32))
    return pa.table(
        {
            "rationale_id": pa.array(rids, pa.string()),
            "pos": pa.array(np.concatenate(poss) if poss else np.zeros(0, np.int64)),
            "token_ids": pa.ListArray.from_arrays(offsets, pa.array(flat_ids)),
            "logprobs": pa.ListArray.from_arrays(offsets, pa.array(flat_lp)),
        }
    ).cast(schema_for("mentor_logits"))
