"""Mentor-KD (tasks/training/mentor.py, tasks/stages/mentor_*.py): augmentation filtering, the vocabulary guard, seeded
sampling, and an end-to-end `mentor_kd` run of the stages through `tasks.stages.contract.execute`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from storage.store import Store
from tasks.training.mentor import augment_rows, build_mentor, kd_targets
from tasks.config.mentor import MentorModel
from tasks.core.models import build_student, save_model, train_tokenizer
from tasks.config.student import StudentConfig

CORPUS = [
    "Q: Tom has 3 apples and buys 4 more. How many apples?\nA: 3 + 4 = 7. Therefore, the answer is 7.",
    "Q: A box holds 12 pens; 5 are red. How many are not red?\nA: 12 - 5 = 7. Therefore, the answer is 7.",
] * 5


def test_augment_rows_keeps_exactly_the_correct_samples_for_training():
    questions = [
        {"question_id": "q1", "split": "train", "question": "3 + 4?", "answer": "7", "answer_type": "numeric"},
        {"question_id": "q2", "split": "train", "question": "2 * 5?", "answer": "10", "answer_type": "numeric"},
    ]
    completions = [
        ["3 + 4 = 7. Therefore, the answer is 7.", "3 + 4 = 8. Therefore, the answer is 8.", ""],
        ["2 * 5 = 10. Therefore, the answer is 10.", "2 * 5 = 10.0 so the answer is 10.0", "I do not know."],
    ]
    rows, counts = augment_rows(questions, completions, min_steps=1)
    got = {r.rationale["rationale_id"]: r.rationale["correct"] for r in rows}
    assert got == {
        "q1:mentor:0": True, "q1:mentor:1": False,  # the empty sample 2 is not stored
        "q2:mentor:0": True, "q2:mentor:1": True, "q2:mentor:2": False,
    }
    assert counts == dict(sampled=6, correct=3, empty=1, dropped_short=0)
    assert all(r.rationale["source"] == "mentor" for r in rows)
    # the stored text lost its answer sentence (the student format appends its own), steps kept
    first = rows[0]
    assert first.rationale["text"] == "3 + 4 = 7." and first.rationale["n_steps"] == len(first.steps) == 1
    # training reads exactly the correct ones, teacher's and mentor's together
    teacher = [{"rationale_id": "q1:teacher:0", "question_id": "q1", "correct": False},
               {"rationale_id": "q2:teacher:0", "question_id": "q2", "correct": True}]
    qs = {q["question_id"]: q for q in questions}
    picked = [r["rationale_id"] for r in kd_targets(qs, teacher + [r.rationale for r in rows])]
    assert picked == ["q1:mentor:0", "q2:mentor:0", "q2:mentor:1", "q2:teacher:0"]


def test_a_mentor_with_another_vocabulary_is_refused(tmp_path):
    student_tok = train_tokenizer(CORPUS, 300)
    other_tok = train_tokenizer(CORPUS + ["zebra quokka axolotl narwhal"] * 20, 320)
    model, _ = build_student(StudentConfig(hidden=16, layers=1, heads=2, intermediate=32, vocab_size=320), CORPUS)
    model.resize_token_embeddings(len(other_tok))
    save_model(model, other_tok, tmp_path / "mentor")
    cfg = MentorModel(kind="hf", name_or_path=str(tmp_path / "mentor"))
    with pytest.raises(ValueError, match=r"mentor tokenizer .*differs from the student's.*vocab size"):
        build_mentor(cfg, student_tok)
    # the same directory with the student's own tokenizer is accepted
    save_model(model, student_tok, tmp_path / "same")
    mentor, tok = build_mentor(MentorModel(kind="hf", name_or_path=str(tmp_path / "same")), student_tok)
    assert tok.get_vocab() == student_tok.get_vocab()


def test_embedded_mentor_is_built_on_the_student_tokenizer():
    tok = train_tokenizer(CORPUS, 300)
    mentor, mtok = build_mentor(MentorModel(hidden=24, layers=2, heads=2, intermediate=48), tok)
    assert mtok is tok and mentor.config.vocab_size == len(tok) and mentor.config.hidden_size == 24


def test_mentor_shape_is_checked_and_named_like_its_section():
    # the mentor shares the student's shape fields and checks, with its own defaults and names
    assert (MentorModel().hidden, MentorModel().layers) == (192, 3)
    with pytest.raises(ValueError, match=r"mentor\.model\.hidden \(100\) must be divisible by mentor\.model\.heads \(6\)"):
        MentorModel(hidden=100)
    with pytest.raises(ValueError, match=r"mentor\.model\.name_or_path is required"):
        MentorModel(kind="hf")
    with pytest.raises(ValueError, match="vocab_size"):  # the tokenizer is the student's
        MentorModel(vocab_size=500)


def test_sampling_is_per_completion_reproducible_and_batch_independent():
    from tasks.core.formatting import encode_prompt
    from tasks.core.sampling import completion_seed, sample_ids

    tok = train_tokenizer(CORPUS, 300)
    mentor, _ = build_mentor(MentorModel(hidden=16, layers=1, heads=2, intermediate=32), tok)
    prompts = [encode_prompt(tok, q, False) for q in ["Tom has 3 apples.", "A box holds 12 pens; 5 are red. How many?"]]
    seeds = [completion_seed(0, "a", 0), completion_seed(0, "b", 0)]
    together = sample_ids(mentor, tok, prompts, seeds, 1.0, 50, 12, batch_size=2)
    alone = [sample_ids(mentor, tok, [p], [s], 1.0, 50, 12, batch_size=1)[0] for p, s in zip(prompts, seeds)]
    assert together == alone
    other = sample_ids(mentor, tok, prompts, [completion_seed(1, "a", 0), completion_seed(1, "b", 0)], 1.0, 50, 12, 2)
    assert other != together  # a random model at temperature 1: other seeds, other text
    # top_k = 1 is greedy
    from tasks.core.generation import generate_ids

    assert sample_ids(mentor, tok, prompts, seeds, 0.7, 1, 12, 2) == generate_ids(mentor, tok, prompts, 2, 12)


SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
# smoke.yaml, smaller still: this test runs eight stages on 2 shared cores
TINY = [
    "dataset.synthetic.n_train=24", "dataset.synthetic.n_val=6", "dataset.synthetic.n_test=6",
    "dataset.synthetic.max_steps=2", "teacher.samples=1",
    "mentor.training.batch_size=16", "mentor.training.val_limit=2", "mentor.augment.max_new_tokens=32",
    "mentor.kd.source=cached_topk", "mentor.kd.topk=8",
    "train.method=mentor_kd", "train.epochs=1", "train.batch_size=16",
    "evaluate.max_new_tokens=16", "evaluate.limit=2",
]


def _config(*extra: str):
    from tasks.config.pipeline import load_config

    return load_config(SMOKE, TINY + list(extra))


def test_mentor_kd_runs_end_to_end_through_the_stages(tmp_path):
    """dataset -> teacher -> rationales -> student -> mentor_train -> mentor_augment -> train ->
    evaluate, no Prefect; the train key covers kd but not the mentor's sampling of a new lam."""
    from storage.catalog import query
    from tasks.stages.registry import STAGES
    from tasks.stages.contract import execute, plan

    torch.manual_seed(0)
    cfg = _config()
    planned = plan(cfg, STAGES)
    keys = {p.name: p.key for p in planned}
    assert planned[[p.name for p in planned].index("train")].upstream.keys() >= {"mentor_augment", "mentor_cache"}
    store = Store(tmp_path / "store")
    needed = ["dataset", "teacher", "rationales", "student", "mentor_train", "mentor_augment", "mentor_cache",
              "train", "evaluate"]
    by_name = {s.name: s for s in STAGES}
    outcomes = {name: execute(by_name[name], cfg, keys, store, show_progress=False) for name in needed}

    mt = outcomes["mentor_train"].summary
    assert 0 <= mt["val_accuracy"] <= 1 and mt["val_n"] == 2 and mt["parameters"] > 0
    aug = outcomes["mentor_augment"]
    assert aug.summary["sampled"] == 24 * 2
    assert aug.summary["augmentation_yield"] == round(aug.summary["correct"] / 48, 4)
    mentor_rat = store.read_table("mentor_augment", keys["mentor_augment"], "rationales").to_pylist()
    assert all(r["source"] == "mentor" and r["rationale_id"] == f"{r['question_id']}:mentor:{r['sample']}"
               for r in mentor_rat)
    # the cache covers every training target: correct teacher + correct mentor rationales
    cached = set(store.read_table("mentor_cache", keys["mentor_cache"], "mentor_logits").column("rationale_id").to_pylist())
    teacher = store.read_table("rationales", keys["rationales"], "rationales").to_pylist()
    qs = {q["question_id"]: q for q in store.read_table("dataset", keys["dataset"], "questions").to_pylist()}
    want = {r["rationale_id"] for r in kd_targets(qs, teacher + mentor_rat)}
    assert cached == want
    tr = outcomes["train"].summary
    assert tr["method"] == "mentor_kd" and tr["examples"] == len(want)
    log = store.read_table("train", keys["train"], "train_log").to_pylist()
    assert log and all(r["kd"] is not None and r["kd"] >= 0 for r in log)
    assert "accuracy" in outcomes["evaluate"].summary

    # one query shows teacher and mentor rows (the catalog unions same-named tables)
    store.save_run("r1", {"run_id": "r1", "started_at": "1", "stages": {n: keys[n] for n in needed}})
    _, rows = query(store, "select source, count(*), avg(correct::int) from rationales group by source order by source")
    assert [r[0] for r in rows] == ["mentor", "teacher"] and rows[0][1] == len(mentor_rat)

    # a new lambda retrains the student only; the mentor and its samples are reused
    cfg2 = _config("mentor.kd.lam=0.5")
    keys2 = {p.name: p.key for p in plan(cfg2, STAGES)}
    assert keys2["mentor_train"] == keys["mentor_train"] and keys2["mentor_augment"] == keys["mentor_augment"]
    assert keys2["train"] != keys["train"]
    # switching to the online KD drops the cache stage and never resamples
    planned5 = plan(_config("mentor.kd.source=online"), STAGES)
    keys5 = {p.name: p.key for p in planned5}
    assert "mentor_cache" not in {p.name for p in planned5 if p.enabled}
    assert keys5["mentor_augment"] == keys["mentor_augment"]
    online = execute(by_name["train"], _config("mentor.kd.source=online"), keys5, store,
                     show_progress=False)
    assert online.summary["method"] == "mentor_kd" and online.summary["examples"] == len(want)
    # mentor_augment_only: the same mentor rationales (no resampling), no KD term, no cache
    planned6 = plan(_config("train.method=mentor_augment_only"), STAGES)
    keys6 = {p.name: p.key for p in planned6}
    assert keys6["mentor_augment"] == keys["mentor_augment"]
    assert {p.name for p in planned6 if p.enabled} >= {"mentor_train", "mentor_augment"}
    assert "mentor_cache" not in {p.name for p in planned6 if p.enabled}
    assert set(planned6[[p.name for p in planned6].index("train")].upstream) == {
        "dataset", "rationales", "mentor_augment", "student"}
    data_only = execute(by_name["train"], _config("train.method=mentor_augment_only"), keys6, store,
                        show_progress=False)
    assert data_only.summary["method"] == "mentor_augment_only" and data_only.summary["examples"] == len(want)
    log6 = store.read_table("train", keys6["train"], "train_log").to_pylist()
    assert log6 and all(r["kd"] is None for r in log6)
    # and std_cot does not depend on the mentor at all
    planned3 = plan(_config("train.method=std_cot"), STAGES)
    keys3 = {p.name: p.key for p in planned3}
    assert not {"mentor_train", "mentor_augment", "mentor_cache"} & {p.name for p in planned3 if p.enabled}
    keys4 = {p.name: p.key for p in plan(_config("train.method=std_cot", "mentor.kd.lam=0.9"), STAGES)}
    assert keys4["train"] == keys3["train"]


def test_kpod_stages_read_mentor_rationales_only_under_kpod_mentor():
    from tasks.stages.registry import STAGES
    from tasks.stages.contract import plan

    def planned(*extra):
        return {p.name: p for p in plan(_config(*extra), STAGES)}

    mixed = planned("train.method=kpod_mentor")
    for name in ("weights", "difficulty", "schedule", "train"):
        assert "mentor_augment" in mixed[name].upstream, name
    kpod, kpod2 = planned("train.method=kpod"), planned("train.method=kpod", "mentor.augment.samples=5")
    for name in ("weights", "difficulty", "schedule", "train"):
        assert "mentor_augment" not in kpod[name].upstream
        assert kpod[name].key == kpod2[name].key  # plain KPOD never depends on the mentor section
    assert not any(kpod[n].enabled for n in ("mentor_train", "mentor_augment", "mentor_cache"))
    # under kpod_mentor, the mentor's sampling settings reach the KPOD stages through their upstream
    mixed2 = planned("train.method=kpod_mentor", "mentor.augment.samples=5")
    assert all(mixed2[n].key != mixed[n].key for n in ("mentor_augment", "weights", "difficulty", "schedule", "train"))
    assert mixed2["mentor_train"].key == mixed["mentor_train"].key
