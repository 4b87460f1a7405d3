"""The teacher's own top-k log-probs as the KD targets (`mentor.kd.source: teacher_topk`).

The teacher stage stores, with `teacher.top_logprobs: k`, each generated token of a completion
and the k most likely tokens at its position (`teacher_logprobs`). Where the student shares the
teacher's tokenizer, those are soft labels for the student's own target tokens of the teacher's
rationale: this module turns them into rows of the `mentor_logits` format (rationale_id, pos,
token_ids, logprobs), which the cached-top-k KD path (`tasks.training.mentor_kd.TopkCache`,
`tasks.core.kd.kd_kl_topk`) reads as it reads the mentor's.

Which student positions get teacher targets (`align_teacher_tokens`, the tokenizer check):
- the rationale is the completion, whitespace-trimmed and maybe cut before its answer sentence
  (`tasks.core.rationale_rows`); the student's target is " {rationale} Therefore, the answer is
  {answer}." + EOS (`tasks.core.formatting`). The student tokens that lie in the part of the
  rationale the teacher wrote verbatim, up to the teacher's last token boundary there, must be
  the teacher's tokens one for one: the same boundaries and the same token (the teacher's text
  looked up in the student's vocabulary). Anything else is "student tokenizer is not the
  teacher's", naming the first rationale and position that differ.
- the one exception is the first token, which the student sees after "A: " and the teacher at
  the start of its answer: a difference in leading whitespace only (" Tom" against "Tom") gives
  that position no target instead of an error.
- the answer sentence, EOS, and what the rationales stage rewrote (a "." closing a cut sentence)
  get no target; nor do mentor rationales.
At each covered position the targets are the server's top-k tokens, plus the generated token
when it is not among them (its log-prob is known too), padded to one width with entries that
carry no mass (`PAD_LOGPROB`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from storage.schemas import schema_for
from tasks.core.formatting import split_rationale, target_text
from tasks.training.mentor import kd_targets

MISMATCH = "student tokenizer is not the teacher's"
# a padding entry's log-prob: its softmax(PAD / tau) weight is below 1e-40 for any tau <= 100
# (the kd config's cap), and unlike -inf it keeps q * (log q - log p) finite
PAD_LOGPROB = -1.0e4
ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids spells tokens by id


def vocab_surfaces(tokenizer: Any) -> dict[str, int]:
    """Each token's text as a server returns it -> its id; the lowest id wins when two tokens
    decode alike (`token_surface`)."""
    out: dict[str, int] = {}
    anchor = _anchor(tokenizer)
    for i in range(len(tokenizer)):
        out.setdefault(token_surface(tokenizer, i, anchor), i)
    return out


def _anchor(tokenizer: Any) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])


def token_surface(tokenizer: Any, token: int, anchor: list[str] | None = None) -> str:
    """The text token id `token` adds when decoded after other text: what a server streams for
    it (vLLM decodes each new token against the ones before it). Decoded alone, a SentencePiece
    token that starts a word ("▁the") loses its space, because the decoder strips the start of
    a text; after an `anchor` ("a") it reads " the". A tokenizer without a decoder spells each
    token as itself (its `convert_tokens_to_string` would join pieces with spaces)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    alone = tokenizer.convert_tokens_to_string([piece])
    if getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", True) is None:
        return alone
    anchor = _anchor(tokenizer) if anchor is None else anchor
    head = tokenizer.convert_tokens_to_string(anchor)
    both = tokenizer.convert_tokens_to_string([*anchor, piece])
    return both[len(head):] if both.startswith(head) else alone


def token_id(surfaces: dict[str, int], token: str) -> int | None:
    """The student id of a teacher token (its text, or vLLM's "token_id:N"), None when absent."""
    if token.startswith(ID_PREFIX) and token[len(ID_PREFIX):].isdigit():
        return int(token[len(ID_PREFIX):])
    return surfaces.get(token)


def _teacher_ends(tokens: list[str], body: str) -> tuple[dict[int, int], int, int]:
    """The teacher's token boundaries in `body` characters: ({end: token index}, index of the
    first token that reaches into the body, the last end within the part of `body` the
    completion holds verbatim)."""
    completion = "".join(tokens)
    lead = len(completion) - len(completion.lstrip())
    rest = completion[lead:]
    same = next((i for i, (a, b) in enumerate(zip(body, rest)) if a != b), min(len(body), len(rest)))
    ends, first, cutoff, at = {}, None, 0, -lead
    for j, tok in enumerate(tokens):
        at += len(tok)
        if at > 0 and first is None:
            first = j
        if 0 < at <= same:
            ends[at], cutoff = j, at
    return ends, (len(tokens) if first is None else first), cutoff


def align_teacher_tokens(
    tokenizer: Any, surfaces: dict[str, int], rationale_id: str, text: str, answer: str, tokens: list[str],
) -> list[tuple[int, int]]:
    """(student target position, teacher token index) of every position that gets a teacher
    target (see the module docstring). `text` is the rationale, `tokens` the teacher's tokens of
    its completion. Raises ValueError "student tokenizer is not the teacher's: ..." naming the
    rationale and the first position whose token differs."""
    _, start, end = split_rationale(text, 0, None)
    body = text[start:end]
    target, at = target_text(body, answer)
    enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    ends, j_next, cutoff = _teacher_ends(tokens, body)
    out: list[tuple[int, int]] = []
    first = True
    for pos, (sid, (_, e)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        e -= at  # in body characters
        if e <= 0:
            continue  # the space before the body
        if e > cutoff:
            break  # past what the teacher wrote verbatim
        j = ends.get(e)
        if j != j_next:  # the teacher ends no token here, or has a boundary inside this one
            got = repr(tokens[j_next]) if j_next < len(tokens) else "nothing"
            raise ValueError(f"{MISMATCH}: rationale {rationale_id!r} position {pos}: student token "
                             f"{target[enc['offset_mapping'][pos][0]:e + at]!r}, teacher token {got}")
        j_next = j + 1
        if token_id(surfaces, tokens[j]) == sid:
            out.append((pos, j))
        elif not (first and _same_but_space(tokenizer, sid, tokens[j])):
            raise ValueError(f"{MISMATCH}: rationale {rationale_id!r} position {pos}: student token id {sid} "
                             f"({tokenizer.convert_ids_to_tokens(sid)!r}), teacher token {tokens[j]!r}")
        first = False
    return out


def _same_but_space(tokenizer: Any, sid: int, teacher: str) -> bool:
    """The first token: does the student's differ from the teacher's in leading whitespace only?"""
    student = token_surface(tokenizer, sid)
    return student.lstrip() == teacher.lstrip() and student != teacher


def position_targets(
    surfaces: dict[str, int], rationale_id: str, pos: int, row: dict[str, Any]
) -> tuple[list[int], list[float]]:
    """One position's (student ids, log-probs): the server's top-k, plus the generated token
    when it is not among them. A top-k token the student's vocabulary lacks is a mismatch."""
    ids: list[int] = []
    lps: list[float] = []
    pairs = list(zip(row["top_tokens"] or [], row["top_logprobs"] or []))
    if row["logprob"] is not None:
        pairs.append((row["token"], row["logprob"]))
    for tok, lp in pairs:
        tid = token_id(surfaces, tok)
        if tid is None:
            raise ValueError(f"{MISMATCH}: rationale {rationale_id!r} position {pos}: teacher token {tok!r} "
                             "(of its top-k) is not in the student's vocabulary")
        if tid not in ids and lp is not None:
            ids.append(tid)
            lps.append(float(lp))
    return ids, lps


def _tokens_by_call(teacher_logprobs: pa.Table) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """(question_id, sample) -> its rationale call's token rows in order (answer calls left out)."""
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    rows = teacher_logprobs.sort_by([("question_id", "ascending"), ("sample", "ascending"), ("pos", "ascending")])
    for row in rows.to_pylist():
        if row["part"] != "answer":
            out.setdefault((row["question_id"], row["sample"]), []).append(row)
    return out


def teacher_topk_table(
    tokenizer: Any, questions: pa.Table, rationales: pa.Table, teacher_logprobs: pa.Table
) -> pa.Table:
    """`mentor_logits`-format rows of the teacher's top-k at the student's target positions of
    every teacher rationale the student trains on (correct, train split) that has log-probs.
    Positions without a teacher target have no row; each row is padded to one width K."""
    qs = {q["question_id"]: q for q in questions.select(["question_id", "split", "question", "answer"]).to_pylist()}
    cols = ["rationale_id", "question_id", "source", "sample", "text", "correct"]
    targets = kd_targets(qs, [r for r in rationales.select(cols).to_pylist() if r["source"] == "teacher"])
    by_call = _tokens_by_call(teacher_logprobs)
    surfaces = vocab_surfaces(tokenizer)
    rows: list[tuple[str, int, list[int], list[float]]] = []
    for r in targets:
        calls = by_call.get((r["question_id"], r["sample"]))
        if not calls:
            continue
        rid, answer = r["rationale_id"], qs[r["question_id"]]["answer"]
        tokens = [c["token"] for c in calls]
        for pos, j in align_teacher_tokens(tokenizer, surfaces, rid, r["text"], answer, tokens):
            rows.append((rid, pos, *position_targets(surfaces, rid, pos, calls[j])))
    # the cache holds one width K: shorter rows (a server that sent fewer, the generated token
    # added) are padded with entries of no mass
    width = max((len(ids) for *_, ids, _ in rows), default=1)
    data = {
        "rationale_id": [r[0] for r in rows], "pos": [r[1] for r in rows],
        "token_ids": [ids + [0] * (width - len(ids)) for *_, ids, _ in rows],
        "logprobs": [lps + [PAD_LOGPROB] * (width - len(lps)) for *_, lps in rows],
    }
    return pa.Table.from_pydict(data, schema=schema_for("mentor_logits"))
