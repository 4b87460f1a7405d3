"""Progressive KPOD samples (Eq. 14-15) and what each ablation switch changes."""

from __future__ import annotations

import pytest

from tasks.core.formatting import IGNORE, prompt_text
from tasks.core.models import train_tokenizer
from tasks.training.progressive import KpodMethod, Rationale
from tasks.core.steps import segment

QUESTION = "Tom has 3 apples and buys 4 more. He gives 2 away. How many are left?"
TEXT = "Tom starts with 3 apples.\nHe buys 4 more, so 3 + 4 = 7.\nHe gives 2 away, so 7 - 2 = 5."
ANSWER = "5"


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [f"Q: {QUESTION}\nA: {TEXT} Therefore, the answer is {ANSWER}."] * 3
    return train_tokenizer(corpus, vocab_size=320)


def _weight_spans(tokenizer):
    """A distinct weight per token of ' ' + TEXT, as the weights stage writes them."""
    enc = tokenizer(" " + TEXT, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(max(s - 1, 0), max(e - 1, 0)) for s, e in enc["offset_mapping"]]
    return [(s, e, 0.01 + 0.9 * j / len(spans)) for j, (s, e) in enumerate(spans)]


def _rationale(tokenizer, schedule=(2, 1, 0)):
    return Rationale(
        rationale_id="q0:teacher:0", question=QUESTION, text=TEXT, answer=ANSWER,
        step_spans=segment(TEXT), weight_spans=_weight_spans(tokenizer), input_steps=list(schedule),
    )


def _method(tokenizer, method, schedule=(2, 1, 0), weight_floor=0.0, warmup_epochs=0, input_weight=0.0):
    return KpodMethod(
        [_rationale(tokenizer, schedule)], tokenizer, seq2seq=False, max_len=512,
        pad_id=tokenizer.pad_token_id, method=method, stages=len(schedule) - 1, weight_floor=weight_floor,
        warmup_epochs=warmup_epochs, input_weight=input_weight,
    )


def _parts(tokenizer, ex):
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE)
    prompt = tokenizer.decode(ex.input_ids[1:first])  # without BOS
    target_ids = ex.labels[first:]
    return prompt, target_ids, ex.weights[first:]


def test_input_holds_exactly_the_first_c_steps(tokenizer):
    m = _method(tokenizer, "kpod")
    steps = [TEXT[s:e] for s, e in segment(TEXT)]
    assert len(steps) == 3
    for epoch, c in [(0, 2), (1, 1), (2, 0), (5, 0)]:
        ex = m.examples_for_epoch(epoch)[0]
        assert ex.input_steps == c
        assert m.stage_for_epoch(epoch) == min(epoch, 2)
        prompt, target_ids, _ = _parts(tokenizer, ex)
        head = TEXT[: segment(TEXT)[c - 1][1]] if c else ""
        assert prompt == prompt_text(QUESTION, head)
        # labels only on the rest: the remaining steps, the answer sentence and EOS
        assert target_ids[-1] == tokenizer.eos_token_id
        target = tokenizer.decode(target_ids[:-1])
        # the whitespace between step c and step c+1 stays with the target
        rest = TEXT[segment(TEXT)[c - 1][1] :] if c else " " + TEXT
        assert rest.strip().startswith(steps[c])
        assert target == f"{rest} Therefore, the answer is {ANSWER}."
        assert all(t == IGNORE for t in ex.labels[: len(ex.labels) - len(target_ids)])


def test_weights_align_with_output_tokens(tokenizer):
    m = _method(tokenizer, "kpod")
    spans = _weight_spans(tokenizer)
    full_ids = tokenizer(" " + TEXT, add_special_tokens=False)["input_ids"]
    answer_tail = tokenizer(f" Therefore, the answer is {ANSWER}.", add_special_tokens=False)["input_ids"]
    for epoch in range(3):
        ex = m.examples_for_epoch(epoch)[0]
        _, target_ids, w = _parts(tokenizer, ex)
        n_rat = len(target_ids) - len(answer_tail) - 1
        # the target's rationale tokens are the last n_rat tokens of the full rationale,
        # each with its own w_j; the answer sentence and EOS weigh 1
        assert target_ids[:n_rat] == full_ids[len(full_ids) - n_rat :]
        assert w[:n_rat] == pytest.approx([s[2] for s in spans[len(spans) - n_rat :]])
        assert w[n_rat:] == [1.0] * (len(answer_tail) + 1)
        assert all(x == 0.0 for x in ex.weights[: len(ex.weights) - len(w)])  # prompt: no loss


def test_curriculum_warmup_trains_whole_rationales_first(tokenizer):
    """W = 2: epochs 0-1 on whole rationales (stage T), then stages 0..T, then whole again;
    the naive reading of the option, epoch by epoch."""
    m = _method(tokenizer, "kpod", warmup_epochs=2)
    naive = {0: 2, 1: 2, 2: 0, 3: 1, 4: 2, 5: 2, 9: 2}  # epoch -> stage (T = 2)
    for epoch, stage in naive.items():
        assert m.stage_for_epoch(epoch) == stage
        assert m.examples_for_epoch(epoch)[0].input_steps == (2, 1, 0)[stage]
    plain = _method(tokenizer, "kpod")
    assert [plain.stage_for_epoch(e) for e in range(4)] == [0, 1, 2, 2]  # W = 0: the paper
    assert _method(tokenizer, "kpod_no_progressive", warmup_epochs=2).stage_for_epoch(0) == 0
    # the epochs a held learning rate spans (train.curriculum_lr = hold): W + T, or none
    assert m.curriculum_epochs == 4 and plain.curriculum_epochs == 2
    assert _method(tokenizer, "kpod_no_progressive", warmup_epochs=2).curriculum_epochs == 0


def test_weight_floor_lifts_rationale_weights_only(tokenizer):
    raw = _method(tokenizer, "kpod").examples_for_epoch(2)[0]
    floored = _method(tokenizer, "kpod", weight_floor=0.8).examples_for_epoch(2)[0]
    assert floored.labels == raw.labels
    n_answer = len(tokenizer(f" Therefore, the answer is {ANSWER}.", add_special_tokens=False)["input_ids"]) + 1
    labelled = [i for i, t in enumerate(raw.labels) if t != IGNORE]
    rat, ans = labelled[:-n_answer], labelled[-n_answer:]
    assert [floored.weights[i] for i in rat] == pytest.approx([0.8 + 0.2 * raw.weights[i] for i in rat])
    assert [floored.weights[i] for i in ans] == [1.0] * n_answer
    assert min(floored.weights[i] for i in rat) >= 0.8


def test_soft_curriculum_keeps_the_head_in_the_target_down_weighted(tokenizer):
    """train.curriculum_input_weight = lambda: at every stage the target is the whole rationale
    (the stage-T example's ids and labels); a token of the first c_i(s) steps weighs lambda times
    its stage-T weight, every other token its stage-T weight. Naive reference: the head's tokens
    are those whose characters end by the end of step c's text."""
    lam = 0.3
    full_ids = tokenizer(" " + TEXT, add_special_tokens=False, return_offsets_mapping=True)
    for method in ("kpod", "kpod_no_weights"):
        soft = _method(tokenizer, method, input_weight=lam)
        whole = _method(tokenizer, method).examples_for_epoch(2)[0]  # stage T: the full target
        for epoch, c in [(0, 2), (1, 1), (2, 0)]:
            ex = soft.examples_for_epoch(epoch)[0]
            assert (ex.input_ids, ex.labels) == (whole.input_ids, whole.labels)
            head_end = segment(TEXT)[c - 1][1] if c else 0
            # " " + TEXT offsets: character k of TEXT is k + 1
            in_head = [e - 1 <= head_end and c > 0 for _, e in full_ids["offset_mapping"]]
            first = next(i for i, t in enumerate(ex.labels) if t != IGNORE)
            for j, head in enumerate(in_head):
                want = whole.weights[first + j] * (lam if head else 1.0)
                assert ex.weights[first + j] == pytest.approx(want)
            tail = len(ex.labels) - first - len(in_head)  # the answer sentence and EOS
            assert ex.weights[-tail:] == [1.0] * tail
    # lambda = 0 is the paper: the head moves into the prompt
    assert _method(tokenizer, "kpod", input_weight=0.0).examples_for_epoch(0)[0].input_steps == 2
    with pytest.raises(ValueError, match="input weight"):
        _method(tokenizer, "kpod", input_weight=1.5)


def test_each_ablation_changes_only_what_it_names(tokenizer):
    kpod = _method(tokenizer, "kpod")
    no_w = _method(tokenizer, "kpod_no_weights")
    no_prog = _method(tokenizer, "kpod_no_progressive", schedule=(2, 1, 0))
    for epoch in range(4):
        a, b = kpod.examples_for_epoch(epoch)[0], no_w.examples_for_epoch(epoch)[0]
        # no_weights: same inputs and labels, weight 1 on every label
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
        assert b.weights == [0.0 if t == IGNORE else 1.0 for t in b.labels]
        assert a.weights != b.weights
        # no_progressive: the full rationale every epoch, with kpod's weights
        c = no_prog.examples_for_epoch(epoch)[0]
        full = kpod.examples_for_epoch(10)[0]
        assert c.input_steps == 0
        assert (c.input_ids, c.labels, c.weights) == (full.input_ids, full.labels, full.weights)
    # no_diversity and no_weight_in_difficulty train exactly like kpod on a given schedule
    for name in ("kpod_no_diversity", "kpod_no_weight_in_difficulty"):
        other = _method(tokenizer, name)
        for epoch in range(4):
            a, b = kpod.examples_for_epoch(epoch)[0], other.examples_for_epoch(epoch)[0]
            assert (a.input_ids, a.labels, a.weights) == (b.input_ids, b.labels, b.weights)


def test_bad_schedule_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="has 3 stages, want 5"):
        KpodMethod(
            [_rationale(tokenizer)], tokenizer, False, 512, tokenizer.pad_token_id, "kpod", stages=4
        )
    with pytest.raises(ValueError, match="not a KPOD method"):
        _method(tokenizer, "std_cot")


def test_ablation_methods_change_exactly_the_stage_keys_they_name():
    from tasks.config.pipeline import load_config
    from tasks.stages.registry import STAGES
    from tasks.stages.contract import plan

    def keys(method):
        planned = plan(load_config(None, [f"train.method={method}"]), STAGES)
        return {p.name: p.key for p in planned if p.enabled}  # the stages a default run computes

    base = keys("kpod")
    assert {"weights", "difficulty", "schedule"} <= set(base)
    changed = {
        m: sorted(n for n in base if keys(m).get(n) != base[n])
        for m in ["kpod_no_weights", "kpod_no_weight_in_difficulty", "kpod_no_diversity", "kpod_no_progressive"]
    }
    assert changed["kpod_no_weights"] == ["evaluate", "train"]  # the loss only
    assert changed["kpod_no_weight_in_difficulty"] == ["difficulty", "evaluate", "schedule", "train"]
    assert changed["kpod_no_diversity"] == ["evaluate", "schedule", "train"]  # beta only
    nop = keys("kpod_no_progressive")
    assert "schedule" not in nop and "difficulty" not in nop and nop["weights"] == base["weights"]
    assert "difficulty" not in keys("std_cot")
