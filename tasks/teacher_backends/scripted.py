"""The scripted teacher: offline rationales for the synthetic arithmetic questions.

It reads the problem from the question's `meta` (never from the prompt text), so every prompt
template works with it. Its randomness is seeded by the request id: the same request always
gets the same rationale (a resumed run is indistinguishable from an uninterrupted one), and
different samples of a question get different wording. For two-stage zero-shot-CoT
(`teacher.protocol`) it answers an answer-extraction request with the answer its reasoning, in
the prompt, states. With probability `error_rate` the
rationale miscalculates one step, so the rationales stage has wrong answers to filter.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

from tasks.core import answers
from tasks.core.synthetic import problem_from_meta, render_rationale
from tasks.teacher_backends.base import FatalTeacherError, TeacherRequest, TeacherResult

if TYPE_CHECKING:
    from tasks.config.teacher import TeacherConfig


class ScriptedBackend:
    def __init__(self, error_rate: float, delay_s: float = 0.0):
        self.error_rate, self.delay_s = error_rate, delay_s

    async def complete(self, request: TeacherRequest) -> TeacherResult:
        try:
            problem = problem_from_meta(request.meta)
        except ValueError as exc:
            raise FatalTeacherError(
                f"scripted teacher: question {request.question_id!r} is not a synthetic question "
                f"({exc}); use another teacher.backend for this dataset"
            ) from None
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # stands in for network latency
        if request.part == "answer":  # two-stage: read the answer off the reasoning in the prompt
            reasoning = request.prompt.rsplit("\n", 1)[0]
            text = f" {answers.extract(reasoning, 'numeric')}."
            return TeacherResult(text, "stop", len(request.prompt.split()), len(text.split()))
        rng = random.Random(f"scripted:{request.request_id}")
        wrong = rng.random() < self.error_rate
        text = render_rationale(problem, rng, error=wrong)
        return TeacherResult(
            completion=text,
            finish_reason="stop",
            tokens_in=len(request.prompt.split()),
            tokens_out=len(text.split()),
        )

    async def aclose(self) -> None:
        return None


def make_backend(cfg: "TeacherConfig") -> ScriptedBackend:
    return ScriptedBackend(cfg.error_rate, cfg.scripted_delay_s)
