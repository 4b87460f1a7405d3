"""Versioned prompt templates for the teacher.

A template turns a question (and, for few-shot, worked exemplars) into chat messages and into
one prompt text (what a legacy completions endpoint receives and what `teacher_calls.prompt`
stores). The template's name, its version and the rendered text all enter the request id, so
editing a template's wording must bump its `version`: old requests then stay valid history and
the new wording sends new requests instead of silently mixing two prompts in one table.

Both templates end the answer part with the serialization of METHODS.md §0 in mind: few-shot
exemplars are written as `Q: ...\\nA: <rationale> Therefore, the answer is <answer>.`, so the
teacher imitates the phrase the answer extractor looks for first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from tasks.config.teacher import TEMPLATE_MIN_EXEMPLARS

Message = dict[str, str]


@dataclass(frozen=True)
class Exemplar:
    """One worked example for few-shot prompting."""

    question: str
    rationale: str
    answer: str


@dataclass(frozen=True)
class Rendered:
    messages: tuple[Message, ...]  # for chat endpoints
    prompt: str  # one text: the completions prompt, and the stored `prompt` column


@dataclass(frozen=True)
class Template:
    name: str
    version: str
    description: str
    min_exemplars: int
    _render: Callable[[str, Sequence[Exemplar], str | None], Rendered]

    def render(
        self, question: str, exemplars: Sequence[Exemplar] = (), system: str | None = None
    ) -> Rendered:
        if len(exemplars) < self.min_exemplars:
            raise ValueError(
                f"prompt template {self.name!r} needs at least {self.min_exemplars} exemplar(s), "
                f"got {len(exemplars)} (set teacher.exemplars)"
            )
        return self._render(question, exemplars, system)


def _exemplar_answer(ex: Exemplar) -> str:
    return f"{ex.rationale.strip()} Therefore, the answer is {ex.answer.strip()}."


def _with_system(system: str | None, messages: list[Message], prompt: str) -> Rendered:
    """Prepend the optional system text: a system message for chat, a first paragraph for text."""
    if system:
        messages = [{"role": "system", "content": system}, *messages]
        prompt = f"{system}\n\n{prompt}"
    return Rendered(tuple(messages), prompt)


def _zero_shot_cot(question: str, exemplars: Sequence[Exemplar], system: str | None) -> Rendered:
    # Kojima et al. 2022: the answer slot opened with "Let's think step by step."
    text = f"Q: {question.strip()}\nA: Let's think step by step."
    return _with_system(system, [{"role": "user", "content": text}], text)


def _few_shot_cot(question: str, exemplars: Sequence[Exemplar], system: str | None) -> Rendered:
    # Wei et al. 2022: worked exemplars, then the question with an open answer slot. Chat
    # endpoints get the exemplars as prior user/assistant turns, which chat models follow better
    # than one long user message; the text form concatenates the same turns.
    messages: list[Message] = []
    blocks: list[str] = []
    for ex in exemplars:
        q = f"Q: {ex.question.strip()}"
        a = _exemplar_answer(ex)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        blocks.append(f"{q}\nA: {a}")
    q = f"Q: {question.strip()}"
    messages.append({"role": "user", "content": q})
    blocks.append(f"{q}\nA:")
    return _with_system(system, messages, "\n\n".join(blocks))


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "zero_shot_cot",
            "1",
            "Zero-shot chain of thought: 'Q: ...\\nA: Let's think step by step.'",
            TEMPLATE_MIN_EXEMPLARS["zero_shot_cot"],
            _zero_shot_cot,
        ),
        Template(
            "few_shot_cot",
            "1",
            "Few-shot chain of thought: worked exemplars, then 'Q: ...\\nA:'",
            TEMPLATE_MIN_EXEMPLARS["few_shot_cot"],
            _few_shot_cot,
        ),
    )
}


# Kojima et al. 2022, Table 9: the answer trigger of the answer-extraction request, per answer type
_TRIGGERS = {
    "numeric": "Therefore, the answer (arabic numerals) is",
    "yesno": "Therefore, the answer (Yes or No) is",
    "string": "Therefore, the answer is",
}
_CHOICE_LETTERS = re.compile(r"\(([A-Z])\)")


def choice_letters(question: str) -> list[str]:
    """The letters of a multiple-choice question's "(A) ..." choices, sorted; A-E when it names none."""
    return sorted(set(_CHOICE_LETTERS.findall(question))) or ["A", "B", "C", "D", "E"]


def answer_trigger(answer_type: str, question: str) -> str:
    """The answer trigger for two-stage zero-shot-CoT; multiple choice names the question's letter
    range ("Therefore, among A through E, the answer is"), read from its "(A) ..." choices."""
    if answer_type == "choice":
        letters = choice_letters(question)
        return f"Therefore, among {letters[0]} through {letters[-1]}, the answer is"
    return _TRIGGERS.get(answer_type, _TRIGGERS["string"])


def with_reasoning(rendered: Rendered, reasoning: str, trigger: str) -> Rendered:
    """The answer-extraction request of two-stage zero-shot-CoT: the reasoning request's prompt,
    its reasoning and the trigger, as one continued text (Kojima et al.'s second prompt); for chat,
    the last user message is that text."""
    tail = f" {reasoning.strip()}\n{trigger}"
    messages = list(rendered.messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last] = {"role": "user", "content": messages[last]["content"] + tail}
    return Rendered(tuple(messages), rendered.prompt + tail)


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}") from None


def chat_as_text(messages: Sequence[Message]) -> str:
    """A readable single text of chat messages (the stored prompt for chat requests)."""
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)
