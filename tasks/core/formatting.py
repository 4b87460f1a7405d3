"""One serialization for every method (METHODS.md §0) and its token-level training examples.

    Q: {question}\\nA: {rationale} Therefore, the answer is {answer}.

The student is trained on the part after "A:". A decoder-only student sees
`<bos> prompt target <eos>` with labels IGNORE on `<bos> prompt`; a seq2seq student gets
`prompt <eos>` in the encoder and `target <eos>` as decoder labels. Prompt and target are
tokenized separately, so the prompt's tokens are exactly those `encode_prompt` gives at
generation time.

KPOD's progressive schedule (§2.3) moves the first c steps of the rationale into the input:
the prompt becomes "Q: ...\\nA: step1 ... stepc" and labels cover only the remaining steps and
the answer. KPOD's token weights (§2.3, Eq. 15) are given on rationale character spans and
carried to the target's tokens through the fast tokenizer's offset mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

# The label of positions that carry no loss (prompt, padding). It is also PyTorch's default
# `ignore_index` and what HF seq2seq models replace with the pad token, so keep it -100. Defined
# here, where examples are built, so that code that only lists or plans stages loads no torch;
# tasks.core.forward re-exports it beside the teacher-forced forward.
IGNORE = -100

ANSWER_PHRASE = "Therefore, the answer is"


def prompt_text(question: str, rationale_head: str = "") -> str:
    """The input text: the question, then "A:" and (KPOD) the rationale steps given as input."""
    head = rationale_head.strip()
    return f"Q: {question.strip()}\nA:" + (f" {head}" if head else "")


def serialize(question: str, rationale: str, answer: str) -> str:
    """The whole training text of one rationale (what the embedded tokenizer is trained on)."""
    return f"{prompt_text(question)} {rationale.strip()} {ANSWER_PHRASE} {answer}."


@dataclass
class Example:
    """One training sequence.

    Decoder-only: `labels` and `weights` align with `input_ids` (labels IGNORE on the prompt).
    Seq2seq: `input_ids` is the encoder input; `labels`/`weights` are the decoder targets.
    `weights` is 0 where the label is IGNORE, else the token's loss weight (1 for Std-CoT).
    `extra` carries per-example data a method needs in its loss (e.g. KD targets).
    """

    input_ids: list[int]
    labels: list[int]
    weights: list[float]
    seq2seq: bool = False
    rationale_id: str = ""
    input_steps: int = 0
    truncated: bool = False
    # labelled tokens before any truncation: where a cut target sits inside the whole one
    target_len: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Tokens the model computes on (encoder + decoder for seq2seq)."""
        return len(self.input_ids) + (len(self.labels) if self.seq2seq else 0)

    @property
    def target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def encode_prompt(tokenizer: Any, question: str, seq2seq: bool, rationale_head: str = "") -> list[int]:
    """Token ids the model is given at generation time: exactly a training example's prompt."""
    ids = tokenizer(prompt_text(question, rationale_head), add_special_tokens=False)["input_ids"]
    if seq2seq:
        return ids + [_eos(tokenizer)]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids


def split_rationale(
    rationale: str, input_steps: int, step_spans: Sequence[tuple[int, int]] | None
) -> tuple[str, int, int]:
    """(head given as input, start and end of the target body) in `rationale` characters.

    The head is steps 1..c (c = input_steps); the body runs from the end of the head's text
    (so the whitespace before step c+1 stays with the target) to the end of the rationale,
    without surrounding whitespace.
    """
    lead = len(rationale) - len(rationale.lstrip())
    end = len(rationale.rstrip())
    if input_steps == 0:
        return "", lead, max(end, lead)
    if step_spans is None:
        raise ValueError("input_steps > 0 needs the rationale's step spans")
    n = len(step_spans)
    if input_steps > n:
        raise ValueError(f"input_steps={input_steps} but the rationale has only {n} steps")
    boundary = step_spans[input_steps][0] if input_steps < n else end
    boundary = min(max(boundary, lead), end)
    head = rationale[lead:boundary].rstrip()
    return head, lead + len(head), end


def target_text(body: str, answer: str) -> tuple[str, int]:
    """The labelled text of a rationale body (before EOS), and where `body` starts in it."""
    prefix = "" if body[:1].isspace() else " "
    return f"{prefix}{body} {ANSWER_PHRASE} {answer.strip()}.", len(prefix)


def _eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the student tokenizer has no EOS token; generation could not stop")
    return tokenizer.eos_token_id


def _span_weights(
    token_spans: list[tuple[int, int]], weight_spans: Sequence[tuple[int, int, float]]
) -> list[float]:
    """Weight of each token = mean weight of the weight spans its characters overlap.

    Both lists are in rationale characters and sorted by start. A token that overlaps no span
    (it only covers whitespace the weight tokenizer had no token for) gets weight 1.
    """
    out: list[float] = []
    lo = 0
    for s, e in token_spans:
        while lo < len(weight_spans) and weight_spans[lo][1] <= s:
            lo += 1
        hits = []
        j = lo
        while j < len(weight_spans) and weight_spans[j][0] < e:
            ws, we, w = weight_spans[j]
            if min(e, we) > max(s, ws):
                hits.append(w)
            j += 1
        out.append(sum(hits) / len(hits) if hits else 1.0)
    return out


def build_example(
    tokenizer: Any,
    question: str,
    rationale: str,
    answer: str,
    *,
    seq2seq: bool,
    max_len: int,
    input_steps: int = 0,
    step_spans: Sequence[tuple[int, int]] | None = None,
    token_weights: Sequence[tuple[int, int, float]] | None = None,
    rationale_id: str = "",
) -> Example:
    """Tokenize one rationale into an `Example`.

    input_steps: steps 1..c of the rationale go into the input (needs `step_spans`, the
        (char_start, char_end) of each step in `rationale`); labels cover the rest + answer.
    token_weights: (char_start, char_end, weight) spans in `rationale` characters (KPOD's
        per-token w_j); each target token of the rationale gets the mean weight of the spans
        it overlaps; the answer phrase, the answer and EOS get weight 1. None: all 1.
    max_len: longer sequences are cut at the right (flagged `truncated`).
    """
    head, body_start, body_end = split_rationale(rationale, input_steps, step_spans)
    body = rationale[body_start:body_end]
    target, body_at = target_text(body, answer)
    prompt_ids = tokenizer(prompt_text(question, head), add_special_tokens=False)["input_ids"]
    enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    target_ids = list(enc["input_ids"])
    if token_weights is None:
        target_w = [1.0] * len(target_ids)
    else:
        # target chars [body_at, body_at + len(body)) are rationale chars from body_start
        body_chars = (body_at, body_at + len(body))
        target_w = _target_weights(enc["offset_mapping"], body_chars, body_start, token_weights)
    input_ids, labels, weights = _frame(tokenizer, prompt_ids, target_ids, target_w, seq2seq)
    truncated = len(input_ids) > max_len or len(labels) > max_len
    return Example(
        input_ids=input_ids[:max_len],
        labels=labels[:max_len],
        weights=weights[:max_len],
        seq2seq=seq2seq,
        rationale_id=rationale_id,
        input_steps=input_steps,
        truncated=truncated,
        target_len=sum(t != IGNORE for t in labels),
    )


def _target_weights(
    offsets: Sequence[tuple[int, int]],
    body_chars: tuple[int, int],
    body_start: int,
    token_weights: Sequence[tuple[int, int, float]],
) -> list[float]:
    """The weight of each target token: `_span_weights` over the rationale characters it covers.

    offsets: each target token's (start, end) in target characters; body_chars: the target
    characters that are rationale text, starting at rationale character `body_start`. A token
    outside them (the answer phrase, the answer) gets weight 1.
    """
    lo, hi = body_chars
    shift = body_start - lo
    spans, inside = [], []
    for s, e in offsets:
        s2, e2 = max(s, lo), min(e, hi)
        inside.append(e2 > s2)
        spans.append((s2 + shift, e2 + shift) if e2 > s2 else (0, 0))
    ws = sorted((int(a), int(b), float(w)) for a, b, w in token_weights)
    mapped = _span_weights([sp for sp, ok in zip(spans, inside) if ok], ws)
    it = iter(mapped)
    return [next(it) if ok else 1.0 for ok in inside]


def _frame(
    tokenizer: Any, prompt_ids: list[int], target_ids: list[int], target_w: list[float], seq2seq: bool
) -> tuple[list[int], list[int], list[float]]:
    """(input_ids, labels, weights) of prompt + target with the model family's special tokens.

    Decoder-only: `<bos> prompt target <eos>`, labels IGNORE (weight 0) on `<bos> prompt`.
    Seq2seq: encoder `prompt <eos>`, decoder labels `target <eos>`. EOS has weight 1.
    """
    eos = _eos(tokenizer)
    if seq2seq:
        return prompt_ids + [eos], target_ids + [eos], target_w + [1.0]
    bos = tokenizer.bos_token_id
    lead = ([bos] if bos is not None else []) + prompt_ids
    input_ids = lead + target_ids + [eos]
    labels = [IGNORE] * len(lead) + target_ids + [eos]
    weights = [0.0] * len(lead) + target_w + [1.0]
    return input_ids, labels, weights
