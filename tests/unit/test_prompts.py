"""Prompt templates: rendering, and that template name/version/text all reach the request id."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
from pydantic import ValidationError

from tasks.core import prompts
from tasks.core.prompts import Exemplar, chat_as_text, get_template
from tasks.teacher_backends.requests import build_requests
from tasks.config.teacher import TeacherConfig

EX = [
    Exemplar("Ann has 2 pens and buys 3 more. How many pens?", "2 + 3 = 5.", "5"),
    Exemplar("Bo has 9 cups and breaks 4. How many cups?", "9 - 4 = 5.", "5"),
]


def test_zero_shot_cot_is_kojima():
    r = get_template("zero_shot_cot").render("How many apples?  ")
    assert r.prompt == "Q: How many apples?\nA: Let's think step by step."
    assert r.messages == ({"role": "user", "content": r.prompt},)


def test_few_shot_cot_turns_and_text_agree():
    r = get_template("few_shot_cot").render("Cy has 4 hats. How many hats?", EX)
    roles = [m["role"] for m in r.messages]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert r.messages[1]["content"] == "2 + 3 = 5. Therefore, the answer is 5."
    # the text form holds the same turns, ending on an open answer slot
    assert r.prompt.endswith("Q: Cy has 4 hats. How many hats?\nA:")
    for m in r.messages:
        assert m["content"] in r.prompt
    assert r.prompt.count("Therefore, the answer is 5.") == 2


def test_few_shot_needs_exemplars_and_config_says_so():
    with pytest.raises(ValueError, match="exemplar"):
        get_template("few_shot_cot").render("q?", [])
    with pytest.raises(ValidationError, match="exemplar"):
        TeacherConfig(template="few_shot_cot")
    with pytest.raises(KeyError, match="zero_shot_cot"):
        get_template("nope")


def test_system_prompt_goes_first():
    r = get_template("zero_shot_cot").render("q?", system="Be brief.")
    assert r.messages[0] == {"role": "system", "content": "Be brief."}
    assert r.prompt.startswith("Be brief.\n\nQ: q?")
    assert chat_as_text(r.messages).startswith("[system]\nBe brief.\n\n[user]\nQ: q?")


def _questions():
    return pa.table(
        {
            "question_id": ["a", "b"],
            "split": ["train", "train"],
            "question": ["How many apples?", "How many pears?"],
            "meta": ["{}", "{}"],
        }
    )


def _ids(cfg):
    return [r.request_id for r in build_requests(_questions(), cfg)]


def test_template_version_and_text_enter_request_id(monkeypatch):
    base = _ids(TeacherConfig(backend="openai", model="m"))
    assert len(set(base)) == 2
    # same name, bumped version: every id changes
    bumped = dataclasses.replace(prompts.TEMPLATES["zero_shot_cot"], version="2")
    monkeypatch.setitem(prompts.TEMPLATES, "zero_shot_cot", bumped)
    assert set(_ids(TeacherConfig(backend="openai", model="m"))).isdisjoint(base)
    monkeypatch.undo()
    assert _ids(TeacherConfig(backend="openai", model="m")) == base
    # different rendered text (a system prompt, the few-shot template, the completions form)
    for cfg in (
        TeacherConfig(backend="openai", model="m", system_prompt="Be brief."),
        TeacherConfig(backend="openai", model="m", template="few_shot_cot", exemplars=[dataclasses.asdict(EX[0])]),
        TeacherConfig(backend="openai", model="m", api="completions"),
    ):
        assert set(_ids(cfg)).isdisjoint(base)


def test_stored_prompt_matches_api():
    chat = build_requests(_questions(), TeacherConfig(backend="openai", model="m"))[0]
    text = build_requests(_questions(), TeacherConfig(backend="openai", model="m", api="completions"))[0]
    assert chat.prompt == "[user]\nQ: How many apples?\nA: Let's think step by step."
    assert text.prompt == "Q: How many apples?\nA: Let's think step by step."
