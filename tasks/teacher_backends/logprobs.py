"""The teacher's token log-probabilities (`teacher.top_logprobs`): parsed, ledgered, tabled.

A request with `top_logprobs: k` asks the server for the log-probability of every generated
token and of the k most likely tokens at its position. The two OpenAI formats:
- chat: `choice.logprobs.content[i]` = {token, logprob, bytes, top_logprobs: [{token, logprob}]};
- completions: `choice.logprobs` = {tokens, token_logprobs, top_logprobs: [{token: logprob}],
  text_offset}.
Both become one list per choice of `{token, logprob, top_tokens, top_logprobs}` (`parse`), kept
in the ledger record of the call (`teacher_calls.logprobs`), so they are as durable as the call
itself and a rerun never pays for them again. `text_offset` is not kept: servers disagree on
where it counts from (the prompt's start or the completion's), and the tokens' texts give it.

`LogprobRows` spreads those lists into the table `teacher_logprobs`, one row per generated
token. A server that ignores the request (it returns no logprobs) leaves its calls without rows
and the stage says so in one warning.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from storage.schemas import schema_for

log = logging.getLogger("kpod.teacher")

Token = dict[str, Any]  # {token: str, logprob: float | None, top_tokens: [str], top_logprobs: [float]}


def _get(obj: Any, name: str) -> Any:
    """A field of a parsed response (pydantic object of the openai client) or of its JSON (a dict)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _chat_tokens(content: list[Any]) -> list[Token]:
    out = []
    for item in content:
        top = _get(item, "top_logprobs") or []
        out.append({
            "token": str(_get(item, "token")),
            "logprob": _get(item, "logprob"),
            "top_tokens": [str(_get(t, "token")) for t in top],
            "top_logprobs": [_get(t, "logprob") for t in top],
        })
    return out


def _completion_tokens(lp: Any) -> list[Token]:
    tokens = _get(lp, "tokens") or []
    values = _get(lp, "token_logprobs") or [None] * len(tokens)
    tops = _get(lp, "top_logprobs") or [None] * len(tokens)
    out = []
    for token, value, top in zip(tokens, values, tops):
        top = top or {}  # {token: logprob}; a server may send null for a position
        out.append({
            "token": str(token),
            "logprob": value,
            "top_tokens": [str(t) for t in top],
            "top_logprobs": list(top.values()),
        })
    return out


def parse(choice: Any, api: str) -> list[Token] | None:
    """The token log-probs of one choice (`api`: chat | completions), or None when it has none
    (the server ignored the request, or none was made). `choice` is the client's object or the
    JSON dict of a Batch API output line."""
    lp = _get(choice, "logprobs")
    if lp is None:
        return None
    if api == "chat":
        content = _get(lp, "content")
        return _chat_tokens(content) if content else None
    return _completion_tokens(lp) or None


class LogprobRows:
    """`teacher_logprobs` from `teacher_calls`, batch by batch (the teacher stage streams it):
    `add` gives a batch's rows, one per generated token of each successful call that carries
    log-probs, in call order; `warn`, once all are seen, counts the successful calls that came
    back without them in one warning when `requested` (teacher.top_logprobs) is set (the
    answer-extraction calls of two_stage never ask for them)."""

    def __init__(self, requested: int | None):
        self.requested, self.missing, self.asked = requested, 0, 0

    def add(self, calls: pa.Table | pa.RecordBatch) -> pa.Table:
        cols = ["request_id", "question_id", "sample", "part", "error", "logprobs"]
        rows = []
        for rid, qid, sample, part, error, tokens in zip(*(calls.column(c).to_pylist() for c in cols)):
            if error is not None or part == "answer":
                continue
            self.asked += 1
            if tokens is None:
                self.missing += 1
                continue
            for pos, t in enumerate(tokens):
                rows.append({"request_id": rid, "question_id": qid, "sample": sample, "part": part, "pos": pos, **t})
        return pa.Table.from_pylist(rows, schema=schema_for("teacher_logprobs"))

    def warn(self) -> None:
        if self.requested is not None and self.missing:
            log.warning(
                "teacher: %d of %d successful calls came back without log-probs (the server ignored "
                "teacher.top_logprobs=%d); teacher_logprobs has no rows for them", self.missing, self.asked,
                self.requested,
            )
