"""The synthetic arithmetic generator, its rationales and its keypoint truth."""

from __future__ import annotations

import operator
import random
import re

import pytest
from pydantic import ValidationError

from tasks.core.synthetic import (
    NOUNS,
    NUMBER_WORDS,
    OPERATION_WORDS,
    ROLES,
    SyntheticConfig,
    filler_vocabulary,
    generate,
    keypoint_terms,
    label_words,
    problem_from_meta,
    render_rationale,
    word_roles,
)

SMALL = dict(n_train=120, n_val=30, n_test=40)
NAIVE_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
FINAL = re.compile(r"the answer is (-?\d+)\.$")


@pytest.fixture(scope="module")
def problems():
    return generate(SyntheticConfig(seed=3, **SMALL))


def test_same_seed_same_data_other_seed_other_data():
    a = generate(SyntheticConfig(seed=1, **SMALL))
    b = generate(SyntheticConfig(seed=1, **SMALL))
    c = generate(SyntheticConfig(seed=2, **SMALL))
    assert [(p.question, p.meta_json()) for p in a] == [(p.question, p.meta_json()) for p in b]
    assert [p.question for p in a] != [p.question for p in c]


def test_test_split_does_not_depend_on_train_size():
    small = generate(SyntheticConfig(seed=5, n_train=10, n_val=5, n_test=20))
    big = generate(SyntheticConfig(seed=5, n_train=200, n_val=5, n_test=20))
    assert [p.question for p in small if p.split == "test"] == [p.question for p in big if p.split == "test"]


def test_ids_sizes_and_no_question_shared_between_splits(problems):
    by_split = {s: [p for p in problems if p.split == s] for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in by_split.items()} == {"train": 120, "val": 30, "test": 40}
    for split, ps in by_split.items():
        assert [p.question_id for p in ps] == [f"syn-{split}-{i}" for i in range(len(ps))]
    assert len({p.question for p in problems}) == len(problems)


def test_steps_and_numbers_within_bounds():
    cfg = SyntheticConfig(seed=7, n_train=300, n_val=0, n_test=0, min_steps=3, max_steps=5,
                          max_operand=12, max_factor=3, max_value=40, ops=["+", "-", "/"],
                          max_distractors=1)
    ps = generate(cfg)
    assert {p.n_steps for p in ps} == {3, 4, 5}
    for p in ps:
        assert 2 <= p.start <= 12
        assert len(p.distractors) <= 1
        for s in p.steps:
            assert s.op in {"+", "-", "/"}
            assert 2 <= s.result <= 40
            assert 2 <= s.right <= (12 if s.op in "+-" else 3)


def test_answer_is_the_solution_evaluated_and_the_question_states_its_numbers(problems):
    for p in problems:
        value = p.start
        for s in p.steps:
            assert s.left == value and s.quantity == p.noun
            value = NAIVE_OPS[s.op](value, s.right)
            assert value == int(value) and s.result == value  # exact, integral division
        assert p.answer == value
        # the question's numbers are the start, the operands, and the distractors, in story
        # order: the solution numbers form a subsequence and nothing else is there
        nums = [int(x) for x in re.findall(r"\d+", p.question)]
        assert len(nums) == 1 + p.n_steps + len(p.distractors)
        it = iter(nums)
        assert all(any(n == want for n in it) for want in [p.start] + [s.right for s in p.steps])
        assert p.noun in p.question


def test_meta_round_trip(problems):
    import json

    p = problems[5]
    meta = json.loads(p.meta_json())
    assert meta["n_steps"] == p.n_steps == len(meta["steps"])
    assert set(meta["steps"][0]) == {"left", "op", "right", "result", "quantity"}
    q = problem_from_meta(p.meta_json(), question=p.question, question_id=p.question_id, split=p.split)
    assert q == p
    with pytest.raises(ValueError, match="meta"):
        problem_from_meta('{"kind": "other"}')


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=\.) ", text)


def test_render_rationale_correct_and_varied(problems):
    rng = random.Random(0)
    for p in problems[:60]:
        text = render_rationale(p, rng)
        assert int(FINAL.search(text).group(1)) == p.answer
        sentences = _sentences(text)
        assert len(sentences) == p.n_steps + 1
        for sentence, s in zip(sentences, p.steps):
            assert f"{s.left} {s.op} {s.right} = {s.result}" in sentence
    p = problems[0]
    assert len({render_rationale(p, random.Random(i)) for i in range(20)}) > 10


def test_render_rationale_with_error_has_one_wrong_step_and_a_wrong_answer(problems):
    rng = random.Random(1)
    for p in problems[:80]:
        text = render_rationale(p, rng, error=True)
        assert int(FINAL.search(text).group(1)) != p.answer
        eqs = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", text)
        assert len(eqs) == p.n_steps
        wrong = [e for e in eqs if NAIVE_OPS[e[1]](int(e[0]), int(e[2])) != int(e[3])]
        assert len(wrong) == 1
        # the chain is followed: each step starts from the previous (possibly wrong) result
        for prev, cur in zip(eqs, eqs[1:]):
            assert cur[0] == prev[3]


def test_keypoint_terms_are_the_solution_vocabulary(problems):
    for p in problems[:50]:
        terms = dict(keypoint_terms(p))
        nums = {str(p.start)} | {str(s.right) for s in p.steps} | {str(s.result) for s in p.steps}
        ops = {s.op for s in p.steps} | {"="}
        assert set(terms) == nums | ops | {p.noun}
        assert {t for t, k in terms.items() if k == "result"} == {str(s.result) for s in p.steps}
        assert {t for t, k in terms.items() if k == "operator"} == ops
        assert terms[p.noun] == "quantity"


def test_label_words_spans_and_tokenisation():
    text = "Let's see, 5+3 = 8 apples; it costs 1.50 dollars (i.e. cheap)."
    words = label_words(text, {"5", "3", "8", "+", "=", "Apples"})
    assert [w for _, _, w, _ in words] == [
        "Let's", "see", "5", "+", "3", "=", "8", "apples", "it", "costs", "1.50", "dollars",
        "i", "e", "cheap",
    ]
    for start, end, word, _ in words:
        assert text[start:end] == word
    assert {w for _, _, w, k in words if k} == {"5", "+", "3", "=", "8", "apples"}


def test_filler_never_labelled_keypoint_and_solution_words_always(problems):
    filler = filler_vocabulary()
    assert not filler & set(NOUNS)
    assert not filler & NUMBER_WORDS
    rng = random.Random(2)
    for p in problems[:80]:
        terms = {t for t, _ in keypoint_terms(p)}
        text = render_rationale(p, rng)
        for start, end, word, key in label_words(text, terms):
            if word.lower() in filler:
                assert not key, (word, text)
            elif word[0].isdigit() or word in "+-*/=" or word == p.noun:
                assert key, (word, text)  # every number/operator/noun of a correct rationale
            else:
                pytest.fail(f"word {word!r} is neither filler nor keypoint in: {text}")


def test_every_rationale_word_has_one_role_and_numbers_are_core(problems):
    rng = random.Random(5)
    seen = {r: set() for r in ROLES}
    for p in problems[:80]:
        kinds = dict(keypoint_terms(p))
        text = render_rationale(p, rng)
        labelled = word_roles(text, kinds)
        assert [(s, e, w) for s, e, w, _, _ in labelled] == [(s, e, w) for s, e, w, _ in label_words(text, set(kinds))]
        for _, _, word, key, role in labelled:
            assert role in ROLES
            seen[role].add(word.lower())
            if word[0].isdigit() or word in "+-*/=":
                assert role == "core", (word, text)
            if word == p.noun or word == p.name:
                assert role == "context", (word, text)
            if key and word != p.noun:
                assert role == "core", (word, text)  # every number/operator term of the solution
    # operation words decide the operation: core, not filler; hedges stay filler
    assert {"add", "subtract", "times", "divide"} <= seen["core"]
    assert {"basically", "okay", "so", "we"} <= seen["filler"]
    assert not seen["filler"] & (set(OPERATION_WORDS) | set(NOUNS))


def test_gives_is_core_only_in_gives_away():
    roles = {w: r for _, _, w, _, r in word_roles("Tom gives away 3 apples", {"3": "number", "apples": "quantity"})}
    assert roles == {"Tom": "context", "gives": "core", "away": "core", "3": "core", "apples": "context"}
    roles = {w: r for _, _, w, _, r in word_roles("adding 2 gives us 5", {"2": "number", "5": "result"})}
    assert roles["gives"] == "filler" and roles["us"] == "filler" and roles["adding"] == "core"


def test_config_bounds():
    with pytest.raises(ValidationError):
        SyntheticConfig(min_steps=5, max_steps=3)
    with pytest.raises(ValidationError):
        SyntheticConfig(ops=["*", "/"])
    with pytest.raises(ValidationError):
        SyntheticConfig(unknown=1)
