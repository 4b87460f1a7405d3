"""The one interface every teacher backend implements.

The teacher stage renders prompts, computes request ids, skips requests already in the ledger,
and hands the rest to a backend concurrently. A backend only talks to its model; it never
touches storage. Errors it can classify become `TeacherResult.error`; `FatalTeacherError`
(bad key, unknown model, malformed request) stops the stage at once because retrying cannot help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class TeacherRequest:
    request_id: str  # hash(model, rendered messages, params, sample index)
    question_id: str
    sample: int  # sample index, 0..samples-1
    messages: tuple[dict[str, str], ...]  # chat messages after template rendering
    prompt: str  # the rendered prompt as one text (what `teacher_calls.prompt` stores)
    model: str
    params: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, max_tokens, ...
    meta: str = "{}"  # the question's meta JSON (the scripted teacher reads the problem here)
    part: str = "completion"  # completion (one stage) | reasoning | answer (two-stage zero-shot-CoT)


@dataclass
class TeacherResult:
    completion: str | None
    finish_reason: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    error: str | None = None  # None means success
    # what a released file records beside the completion (replay): the teacher's answer as its
    # own field (Kojima et al.'s second call) and the authors' correctness flag
    teacher_answer: str | None = None
    source_correct: bool | None = None
    # teacher.top_logprobs: per generated token {token, logprob, top_tokens, top_logprobs}
    # (tasks/teacher_backends/logprobs.py); None when none were asked for or returned
    logprobs: list[dict[str, Any]] | None = None


class FatalTeacherError(RuntimeError):
    """A request that can never succeed as configured (401, 404, 400): stop, don't retry."""


class TeacherInputError(ValueError):
    """The teacher's inputs do not fit its config (a recorded file it cannot read, no question
    to ask, a missing model directory): the user's to fix; `kpod` prints its one line."""


class RetryableTeacherError(RuntimeError):
    """A transient failure (429, 5xx, timeout, dropped connection, malformed body): retry later.

    `retry_after` is the server's Retry-After in seconds when it sent one; the stage waits at
    least that long before the next attempt. `failover`: the backend has another endpoint that
    can take the call now (teacher.base_urls), so the stage retries without waiting.
    """

    def __init__(self, message: str, retry_after: float | None = None, failover: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.failover = failover


class Backend(Protocol):
    async def complete(self, request: TeacherRequest) -> TeacherResult: ...

    async def aclose(self) -> None:
        """Release what the running event loop holds (connections); the backend stays usable,
        and a later call, from this loop or another, opens what it needs again."""
        ...


class MultiChoiceBackend(Backend, Protocol):
    """A backend that can return several samples of one prompt in one call (the API's `n`).

    It may return fewer than `n` results (servers that ignore `n` return one); the stage sends
    the remaining samples as single requests.
    """

    async def complete_n(self, request: TeacherRequest, n: int) -> list[TeacherResult]: ...
