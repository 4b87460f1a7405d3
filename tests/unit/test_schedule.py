"""The schedule stage's core: tables from step difficulties, embeddings and clusters."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from storage.schemas import conform
from tasks.core.curriculum import budget
from tasks.core.embeddings import kmeans_clusters, student_mean_embeddings, tfidf_embeddings
from tasks.core.schedule_tables import build_schedule
from tasks.config.schedule import ScheduleConfig


def _step_difficulty(rng, n):
    rows = {"rationale_id": [], "step": [], "difficulty": [], "tokens": []}
    for i in range(n):
        for k in range(int(rng.integers(1, 6))):
            rows["rationale_id"].append(f"q{i}:teacher:0")
            rows["step"].append(k)
            rows["difficulty"].append(float(rng.uniform(0.1, 4.0)))
            rows["tokens"].append(3)
    return pa.table(rows)


def test_build_schedule_tables():
    rng = np.random.default_rng(0)
    sd = _step_difficulty(rng, 25)
    rids = sorted(set(sd["rationale_id"].to_pylist()))
    question_of = {r: r.split(":")[0] for r in rids}
    cluster_of = {q: i % 3 for i, q in enumerate(sorted(question_of.values()))}
    cfg = ScheduleConfig(stages=4)
    clusters, sched, stages = build_schedule(sd, question_of, cluster_of, cfg)
    for name, t in [("clusters", clusters), ("schedule", sched), ("schedule_stages", stages)]:
        conform(name, t)  # matches the declared schema
    assert clusters.num_rows == 25
    assert sched.num_rows == 5 * 25  # every stage 0..T, every rationale
    assert stages["stage"].to_pylist() == [0, 1, 2, 3, 4]
    n_steps = {r: sd["rationale_id"].to_pylist().count(r) for r in rids}
    rows = sched.to_pylist()
    by = {(r["stage"], r["rationale_id"]): r for r in rows}
    B = sum(sd["difficulty"].to_pylist())
    for t in range(5):  # output_steps: the steps in the targets at stage t, counted naively
        want = sum(n_steps[r] - by[(t, r)]["input_steps"] for r in rids)
        assert stages["output_steps"].to_pylist()[t] == want
    assert stages["output_steps"].to_pylist()[0] == 25 and stages["output_steps"].to_pylist()[4] == sum(n_steps.values())
    for r in rids:
        assert by[(0, r)]["input_steps"] == n_steps[r] - 1
        assert by[(4, r)]["input_steps"] == 0
        ds = [d for rid, d in zip(sd["rationale_id"].to_pylist(), sd["difficulty"].to_pylist()) if rid == r]
        for t in range(5):
            c = by[(t, r)]["input_steps"]
            assert by[(t, r)]["output_difficulty"] == pytest.approx(sum(ds[c:]))
    for s in stages.to_pylist():
        assert s["budget"] == pytest.approx(budget(s["stage"], 4, B))
        used = sum(by[(s["stage"], r)]["output_difficulty"] for r in rids)
        assert s["used"] == pytest.approx(used)
        assert sum(json.loads(s["cluster_counts"]).values()) == s["selected"]


def test_beta_zero_changes_only_the_diversity_choice():
    rng = np.random.default_rng(1)
    sd = _step_difficulty(rng, 30)
    rids = sorted(set(sd["rationale_id"].to_pylist()))
    question_of = {r: r.split(":")[0] for r in rids}
    cluster_of = {q: i % 5 for i, q in enumerate(sorted(question_of.values()))}
    _, a, sa = build_schedule(sd, question_of, cluster_of, ScheduleConfig(stages=5))
    _, b, sb = build_schedule(sd, question_of, cluster_of, ScheduleConfig(stages=5, beta=0.0))
    assert sa["budget"].to_pylist() == sb["budget"].to_pylist()  # same budgets
    assert a.filter(pa.compute.equal(a["stage"], 0)).equals(b.filter(pa.compute.equal(b["stage"], 0)))
    assert a.filter(pa.compute.equal(a["stage"], 5)).equals(b.filter(pa.compute.equal(b["stage"], 5)))
    assert a["input_steps"].to_pylist() != b["input_steps"].to_pylist()  # the selection differs


def test_unknown_rationale_is_an_error():
    sd = pa.table({"rationale_id": ["x"], "step": [0], "difficulty": [1.0], "tokens": [1]})
    with pytest.raises(ValueError, match="'x' is not in the rationales table"):
        build_schedule(sd, {}, {}, ScheduleConfig())


def test_tfidf_and_kmeans_separate_topics():
    qs = [f"Tom has {i} apples and buys apples" for i in range(6)] + [
        f"A train travels {i} miles per hour for hours" for i in range(6)
    ]
    x = tfidf_embeddings(qs)
    assert x.shape[0] == 12
    labels = kmeans_clusters(x, 2, seed=0)
    assert len(set(labels[:6])) == 1 and len(set(labels[6:])) == 1 and labels[0] != labels[6]
    assert (kmeans_clusters(x, 2, seed=0) == labels).all()  # seeded
    assert kmeans_clusters(x[:1], 5, seed=0).tolist() == [0]  # K capped by distinct points


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) % 7 for ch in text]}


class _Model:
    def __init__(self):
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(7, 4)

    def get_input_embeddings(self):
        return self.emb


def test_student_mean_embedding_is_the_mean_of_rows():
    m = _Model()
    x = student_mean_embeddings(m, _Tok(), ["ab", "c"])
    w = m.emb.weight.detach()
    want0 = (w[ord("a") % 7] + w[ord("b") % 7]) / 2
    assert x.shape == (2, 4)
    assert np.allclose(x[0], want0.numpy(), atol=1e-6)
    assert np.allclose(x[1], w[ord("c") % 7].numpy(), atol=1e-6)


def test_difficulty_and_schedule_stages_on_a_tiny_pipeline(tmp_path):
    """dataset -> ... -> weights -> difficulty -> schedule with a tiny embedded student."""
    from storage.store import Store
    from tasks.config.pipeline import load_config
    from tasks.stages.registry import STAGES
    from tasks.stages.contract import execute, plan

    torch.manual_seed(0)
    cfg = load_config(None, [
        "train.method=kpod", "dataset.synthetic.n_train=24", "dataset.synthetic.n_val=2",
        "dataset.synthetic.n_test=2", "student.hidden=16", "student.layers=1", "student.heads=2",
        "student.intermediate=32", "student.vocab_size=300", "student.max_len=1024", "student.max_prompt_tokens=384", "weights.predictor_warmup_steps=1",
        "weights.steps=1", "weights.batch_size=4", "difficulty.warmup_epochs=1",
        "schedule.stages=3", "schedule.k_clusters=2",
    ])
    planned = plan(cfg, STAGES)
    keys = {p.name: p.key for p in planned}
    enabled = {p.name for p in planned if p.enabled}
    store = Store(tmp_path)
    for spec in STAGES:
        if spec.name not in enabled:  # not needed by this config (e.g. the mentor stages)
            continue
        execute(spec, cfg, keys, store, show_progress=False)
        if spec.name == "schedule":
            break
    rat = store.read_table("rationales", keys["rationales"], "rationales").to_pylist()
    qs = store.read_table("dataset", keys["dataset"], "questions").to_pylist()
    train_q = {q["question_id"] for q in qs if q["split"] == "train"}
    trained = {r["rationale_id"]: r["n_steps"] for r in rat if r["correct"] and r["question_id"] in train_q}
    sd = store.read_table("difficulty", keys["difficulty"], "step_difficulty").to_pylist()
    assert sd and {r["rationale_id"] for r in sd} == set(trained)
    assert len(sd) == sum(trained.values())  # one row per step
    tw = store.read_table("weights", keys["weights"], "token_weights").to_pylist()
    for rid in list(trained)[:5]:  # tokens per step add up to the weighted tokens
        assert sum(r["tokens"] for r in sd if r["rationale_id"] == rid) == sum(1 for r in tw if r["rationale_id"] == rid)
    assert all(r["difficulty"] > 0 for r in sd if r["tokens"] > 0)
    sched = store.read_table("schedule", keys["schedule"], "schedule").to_pylist()
    assert len(sched) == 4 * len(trained)
    for r in sched:
        if r["stage"] == 0:
            assert r["input_steps"] == trained[r["rationale_id"]] - 1
        if r["stage"] == 3:
            assert r["input_steps"] == 0
    stages = store.read_table("schedule", keys["schedule"], "schedule_stages").to_pylist()
    assert [s["stage"] for s in stages] == [0, 1, 2, 3]
    assert all(s["used"] <= max(s["budget"], stages[0]["used"]) + 1e-9 for s in stages)
