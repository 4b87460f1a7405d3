"""Model selection on val: which epochs are scored, the best is kept, resume keeps history."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from tasks.training import selection
from tasks.core.models import build_student
from tasks.config.student import StudentConfig
from tasks.training.selection import ValSelection, best_record, due
from tests.unit.test_train import tiny_recipe

QUESTIONS = ["What is 1 + 1?", "What is 2 + 5?", "What is 9 - 3?"]
ANSWERS = ["2", "7", "6"]


def _val(split: str = "val") -> pa.Table:
    n = len(QUESTIONS)
    return pa.table({
        "question_id": [f"q{i}" for i in range(n)], "split": [split] * n, "question": QUESTIONS,
        "answer": ANSWERS, "answer_type": ["numeric"] * n, "meta": ["{}"] * n,
    })


@pytest.fixture(scope="module")
def student():
    corpus = [f"Q: {q}\nA: Therefore, the answer is {a}." for q, a in zip(QUESTIONS, ANSWERS)]
    return build_student(StudentConfig(hidden=16, layers=1, heads=2, intermediate=32, vocab_size=300), corpus)


def _recipe(model, step: int = 0):
    acc = SimpleNamespace(is_main_process=True, unwrap_model=lambda m: m, wait_for_everyone=lambda: None)
    return SimpleNamespace(accelerator=acc, model=model, global_step=step, seq2seq=False)


def test_due_scores_every_nth_epoch_and_the_last():
    assert [e for e in range(7) if due(e, 3, 7)] == [2, 5, 6]
    assert [e for e in range(4) if due(e, 1, 4)] == [0, 1, 2, 3]
    assert not any(due(e, 0, 5) for e in range(5))


def test_best_record_prefers_accuracy_then_the_later_epoch():
    h = [{"epoch": 0, "accuracy": 0.5}, {"epoch": 1, "accuracy": 0.7}, {"epoch": 2, "accuracy": 0.7},
         {"epoch": 3, "accuracy": 0.6}]
    assert best_record(h)["epoch"] == 2
    assert best_record([]) is None


def test_only_val_questions_are_accepted(student, tmp_path):
    _, tok = student
    with pytest.raises(ValueError, match="val questions only.*test"):
        ValSelection(_val("test"), tok, 1, 3, tmp_path, 8)


def test_keeps_the_best_epochs_weights_and_survives_a_restart(student, tmp_path, monkeypatch):
    model, tok = student
    # epoch e's "generation": how many of the three answers are right
    right_per_epoch = {0: 1, 1: 3, 2: 2}
    state = {"epoch": 0}
    seen = []

    def fake_generate(m, t, prompts, batch_size, max_new_tokens, progress=None):
        seen.append([t.decode(p, skip_special_tokens=True) for p in prompts])
        k = right_per_epoch[state["epoch"]]
        return [f"Therefore, the answer is {a if i < k else 999}." for i, a in enumerate(ANSWERS)]

    monkeypatch.setattr(selection, "generate_ids", fake_generate)
    sel = ValSelection(_val(), tok, 1, 3, tmp_path, 8)
    param = model.get_input_embeddings().weight
    snapshots = {}
    for epoch in (0, 1):
        state["epoch"] = epoch
        with torch.no_grad():
            param.fill_(float(epoch))  # stands in for an epoch of training
        snapshots[epoch] = param.detach().clone()
        sel(_recipe(model, step=10 * (epoch + 1)), epoch)
    assert seen[0] == [f"Q: {q}\nA:" for q in QUESTIONS]  # the training prompt format

    # a restart reads the history back from the work dir, then scores the last epoch
    again = ValSelection(_val(), tok, 1, 3, tmp_path, 8)
    assert [r["epoch"] for r in again.history] == [0, 1]
    state["epoch"] = 2
    with torch.no_grad():
        param.fill_(2.0)
    again(_recipe(model, step=30), 2)
    assert [(r["epoch"], r["correct"], r["step"]) for r in again.history] == [(0, 1, 10), (1, 3, 20), (2, 2, 30)]

    best = again.restore_best(model)
    assert best["epoch"] == 1 and best["accuracy"] == 1.0
    assert torch.equal(model.get_input_embeddings().weight, snapshots[1])
    table = again.table().to_pylist()
    assert [r["selected"] for r in table] == [False, True, False]


def test_recipe_calls_the_hook_at_each_epoch_end_and_after_an_end_of_epoch_resume(tmp_path):
    calls = []
    r = tiny_recipe(tmp_path, epochs=3, checkpoint_every=3)  # 3 steps per epoch: a checkpoint at each end
    r.on_epoch_end = lambda recipe, epoch: calls.append((epoch, recipe.global_step))
    r.setup()
    r.train()
    assert calls == [(0, 3), (1, 6), (2, 9)]

    # the newest checkpoint was taken at the end of the last epoch: a rerun scores it again,
    # in case the kill came between the checkpoint and the hook
    calls.clear()
    again = tiny_recipe(tmp_path, epochs=3, checkpoint_every=3)
    again.on_epoch_end = lambda recipe, epoch: calls.append((epoch, recipe.global_step))
    again.setup()
    again.train()
    assert calls == [(2, 9)]
