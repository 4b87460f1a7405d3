import pytest

from tasks.core.formatting import (
    ANSWER_PHRASE,
    IGNORE,
    build_example,
    encode_prompt,
    prompt_text,
    serialize,
    split_rationale,
)
from tasks.core.models import train_tokenizer
from tasks.core.steps import segment

Q = "Tom has 12 apples. He buys 5 more and eats 3. How many apples does he have?"
R = "Tom starts with 12 apples. He buys 5, so 12 + 5 = 17 apples.\nThen he eats 3, so 17 - 3 = 14 apples."
A = "14"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([serialize(Q, R, A)] * 4 + ["Q: other question\nA: x"], 320)


def test_serialization_is_the_methods_format():
    assert serialize(Q, R, A) == f"Q: {Q}\nA: {R} Therefore, the answer is 14."
    assert prompt_text(Q) == f"Q: {Q}\nA:"


def test_decoder_only_labels_are_ignored_on_the_prompt(tok):
    ex = build_example(tok, Q, R, A, seq2seq=False, max_len=512)
    prompt = encode_prompt(tok, Q, seq2seq=False)
    assert ex.input_ids[: len(prompt)] == prompt  # generation sees training's exact prefix
    assert prompt[0] == tok.bos_token_id
    assert ex.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert ex.labels[len(prompt) :] == ex.input_ids[len(prompt) :]
    assert ex.input_ids[-1] == tok.eos_token_id
    assert len(ex.input_ids) == len(ex.labels) == len(ex.weights)
    assert ex.weights == [0.0] * len(prompt) + [1.0] * (len(ex.labels) - len(prompt))
    # the whole sequence decodes to the serialization
    assert tok.decode(ex.input_ids, skip_special_tokens=True) == serialize(Q, R, A)
    target = tok.decode([t for t in ex.labels if t != IGNORE], skip_special_tokens=True)
    assert target == f" {R} {ANSWER_PHRASE} {A}."


def test_seq2seq_puts_the_prompt_in_the_encoder(tok):
    ex = build_example(tok, Q, R, A, seq2seq=True, max_len=512)
    assert ex.input_ids == encode_prompt(tok, Q, seq2seq=True)
    assert ex.input_ids[-1] == tok.eos_token_id and IGNORE not in ex.labels
    assert tok.decode(ex.labels, skip_special_tokens=True) == f" {R} {ANSWER_PHRASE} {A}."
    assert ex.length == len(ex.input_ids) + len(ex.labels)


def test_input_steps_move_the_first_steps_into_the_prompt(tok):
    spans = segment(R)
    assert len(spans) == 3
    for c in range(len(spans) + 1):
        ex = build_example(tok, Q, R, A, seq2seq=False, max_len=512, input_steps=c, step_spans=spans)
        n_prompt = sum(1 for t in ex.labels if t == IGNORE)
        prompt = tok.decode(ex.input_ids[:n_prompt], skip_special_tokens=True)
        target = tok.decode(ex.labels[n_prompt:], skip_special_tokens=True)
        given = R[: spans[c - 1][1]] if c else ""
        assert prompt == prompt_text(Q, given)
        rest = R[spans[c][0]:] if c < len(spans) else ""
        assert target.strip() == f"{rest} {ANSWER_PHRASE} {A}.".strip()
        assert ex.input_steps == c
        # the two parts rebuild the whole text (the step separator stays with the target)
        assert (prompt + target).replace("\n", " ").split() == serialize(Q, R, A).replace("\n", " ").split()
    with pytest.raises(ValueError, match="only 3 steps"):
        build_example(tok, Q, R, A, seq2seq=False, max_len=512, input_steps=4, step_spans=spans)
    with pytest.raises(ValueError, match="step spans"):
        build_example(tok, Q, R, A, seq2seq=False, max_len=512, input_steps=1)


def test_split_rationale_keeps_newline_with_the_target():
    spans = segment(R)
    head, start, end = split_rationale(R, 2, spans)
    assert head == R[: spans[1][1]] and R[start:end].startswith("\nThen")


def naive_token_weight(tok_span, weight_spans):
    hits = [w for s, e, w in weight_spans if min(tok_span[1], e) > max(tok_span[0], s)]
    return sum(hits) / len(hits) if hits else 1.0


@pytest.mark.parametrize("seq2seq", [False, True])
@pytest.mark.parametrize("c", [0, 2])
def test_token_weights_align_through_offsets(tok, seq2seq, c):
    # weights from a tokenization of the rationale alone (what the weights stage stores)
    enc = tok(R, add_special_tokens=False, return_offsets_mapping=True)
    spans_w = [(s, e, 0.1 + 0.8 * (i % 5) / 4) for i, (s, e) in enumerate(enc["offset_mapping"])]
    steps = segment(R)
    ex = build_example(
        tok, Q, R, A, seq2seq=seq2seq, max_len=512, input_steps=c, step_spans=steps, token_weights=spans_w
    )
    head, body_start, body_end = split_rationale(R, c, steps)
    body = R[body_start:body_end]
    prefix = "" if body[:1].isspace() else " "
    target = f"{prefix}{body} {ANSWER_PHRASE} {A}."
    tenc = tok(target, add_special_tokens=False, return_offsets_mapping=True)
    want = []
    for s, e in tenc["offset_mapping"]:
        lo, hi = max(s, len(prefix)), min(e, len(prefix) + len(body))
        if hi > lo:
            shift = body_start - len(prefix)
            want.append(naive_token_weight((lo + shift, hi + shift), spans_w))
        else:
            want.append(1.0)
    got = [w for w, y in zip(ex.weights, ex.labels) if y != IGNORE]
    assert got[:-1] == pytest.approx(want)
    assert got[-1] == 1.0  # EOS
    assert any(w != 1.0 for w in got)  # the rationale's weights did arrive
    # answer phrase tokens carry weight 1
    n_answer = len(tok(f" {ANSWER_PHRASE} {A}.", add_special_tokens=False)["input_ids"])
    assert got[-1 - n_answer : -1] == [1.0] * n_answer


def test_same_tokenization_gives_weights_one_to_one(tok):
    enc = tok(" " + R, add_special_tokens=False, return_offsets_mapping=True)
    # spans in rationale chars (the leading space belongs to no rationale char)
    spans_w = [(max(s - 1, 0), e - 1, float(i)) for i, (s, e) in enumerate(enc["offset_mapping"])]
    ex = build_example(tok, Q, R, A, seq2seq=False, max_len=512, token_weights=spans_w)
    got = [w for w, y in zip(ex.weights, ex.labels) if y != IGNORE]
    assert got[: len(spans_w)] == [float(i) for i in range(len(spans_w))]


def test_truncation_is_flagged(tok):
    ex = build_example(tok, Q, R, A, seq2seq=False, max_len=20)
    assert ex.truncated and len(ex.input_ids) == len(ex.labels) == len(ex.weights) == 20
    assert not build_example(tok, Q, R, A, seq2seq=False, max_len=512).truncated
