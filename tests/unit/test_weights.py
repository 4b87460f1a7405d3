"""`tasks.training.weighting`: encoding/alignment, training determinism, quality, saving."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.core.mask_model import auroc
from tasks.core.models import train_tokenizer
from tasks.core.steps import segment
from tasks.core.synthetic import generate, keypoint_terms, label_words, render_rationale
from tasks.config.dataset import SyntheticConfig
from tasks.config.weights import WeightsConfig
from tasks.core.mask_model import WeightGenerator
from tasks.core.synthetic import token_roles
from tasks.training.weighting import (
    Encoded,
    PredictorCannotReadAnswers,
    answer_lead_ids,
    encode_rationale,
    load_generator,
    oracle_masks,
    probe_predictor,
    quality_rows,
    role_quality_rows,
    save_generator,
    score,
    split_probe,
    token_keypoints,
    token_weights_table,
    train_weighting,
)

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="module")
def synthetic():
    probs = generate(SyntheticConfig(seed=1, n_train=12, n_val=0, n_test=0))
    rng = random.Random(0)
    texts = [render_rationale(p, rng).rsplit(" Therefore", 1)[0] for p in probs]
    corpus = [p.question for p in probs] + texts + ["Therefore, the answer is 12."]
    tok = train_tokenizer(corpus, 400)
    return probs, texts, tok


def encode_all(probs, texts, tok):
    out = []
    for i, (p, t) in enumerate(zip(probs, texts)):
        spans = segment(t)
        out.append(encode_rationale(tok, f"r{i}", t, spans, list(range(len(spans))), p.question, str(p.answer)))
    return out


def tiny_predictor(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
    ))


def test_encoding_offsets_and_steps_follow_the_text(synthetic):
    probs, texts, tok = synthetic
    for e, t in zip(encode_all(probs, texts, tok), texts):
        spans = segment(t)
        assert len(e.ids) == len(e.offsets) == len(e.steps)
        # tokens cover the text in order; decoding the ids gives back " " + text
        assert tok.decode(e.ids) == " " + t
        assert e.offsets[0][0] == 0 and e.offsets[-1][1] == len(t)
        assert e.steps == sorted(e.steps) and set(e.steps) == set(range(len(spans)))
        for (s, en), k in zip(e.offsets, e.steps):
            if en > s and not t[s:en].isspace():
                a, b = spans[k]
                s2 = s + len(t[s:en]) - len(t[s:en].lstrip())  # a leading space may precede the step
                assert a <= s2 and en <= b, (t[s:en], k)
        assert e.prompt[0] == tok.bos_token_id
        assert tok.decode(e.answer).strip() == str(probs[texts.index(t)].answer)


def test_alignment_on_gsm8k_text_with_decimals():
    if not GSM8K.is_file():
        pytest.skip(f"real data absent: {GSM8K}")
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:200]]
    texts = [r["answer"].split("####")[0].strip() for r in rows]
    with_decimal = [t for t in texts if any(c.isdigit() and "." in t[i:i + 2] for i, c in enumerate(t))]
    text = next(t for t in with_decimal if "0.2" in t or ".5" in t)
    tok = train_tokenizer(texts, 600)
    spans = segment(text)
    e = encode_rationale(tok, "g", text, spans, [10 + k for k in range(len(spans))], "q?", "10")
    assert tok.decode(e.ids) == " " + text
    # one step per line: decimals do not cut steps, and every token maps into its line
    assert len(spans) == text.count("\n") + 1
    line_of = []
    for i, ch in enumerate(text):
        line_of.append(text[:i].count("\n"))
    for (s, en), k in zip(e.offsets, e.steps):
        body = [i for i in range(s, en) if not text[i].isspace()]
        if body:
            assert k - 10 == line_of[body[0]], (text[s:en], k)
    # the step numbers written are the steps table's values, not 0-based indices
    assert min(e.steps) == 10 and max(e.steps) == 10 + len(spans) - 1


def test_token_keypoints_by_overlap():
    words = [(0, 5, False), (6, 8, True), (9, 10, True)]
    offsets = [(0, 3), (3, 5), (5, 6), (5, 8), (8, 9), (9, 10), (11, 12)]
    assert token_keypoints(offsets, words) == [False, False, None, True, None, True, None]


def test_quality_rows_match_naive():
    weights = [[0.9, 0.2, 0.5], [0.8, 0.1]]
    truth = [[True, False, None], [True, False]]
    rows = {r["metric"]: r for r in quality_rows(weights, truth)}
    assert rows["auroc"]["value"] == 1.0 and rows["auroc"]["tokens"] == 4
    assert rows["mean_weight_keypoint"]["value"] == pytest.approx(0.85)
    assert rows["mean_weight_filler"]["value"] == pytest.approx(0.15)
    assert auroc([0.9, 0.2, 0.8, 0.1], [False, True, True, False]) == pytest.approx(0.5)


def small_cfg(**kw) -> WeightsConfig:
    base = dict(predictor_warmup_steps=2, steps=3, batch_size=4, heads=2, mlp_hidden=8, seed=3)
    base.update(kw)
    return WeightsConfig(**base)


def test_training_is_seeded_and_weights_cover_every_token(synthetic):
    probs, texts, tok = synthetic
    ex = encode_all(probs, texts, tok)
    lead = answer_lead_ids(tok)
    runs = []
    for _ in range(2):
        pred = tiny_predictor(len(tok), seed=0)
        emb = pred.get_input_embeddings().weight.detach().clone()
        tr = train_weighting(ex, emb, pred, lead, small_cfg(), tok.pad_token_id)
        runs.append((score(tr.generator, ex, tok.pad_token_id), tr.log))
    (w1, log1), (w2, log2) = runs
    assert w1 == w2 and log1 == log2
    assert [len(w) for w in w1] == [len(e.ids) for e in ex]
    flat = [x for w in w1 for x in w]
    assert all(0 < x < 1 for x in flat)
    assert [r["phase"] for r in log1] == ["warmup"] * 2 + ["joint"] * 3
    # warmup_lm: the warm-up loss adds next-token NLL on the rationale tokens to Lp
    assert all(r["loss"] > r["lp"] for r in log1[:2])
    assert all(0 <= r["kept_ratio"] <= 1 for r in log1)
    joint = log1[-1]
    assert joint["loss"] == pytest.approx(joint["lp"] + 0.5 * joint["lm"], rel=1e-6)
    # a different seed gives different weights
    pred = tiny_predictor(len(tok), seed=0)
    tr = train_weighting(ex, pred.get_input_embeddings().weight.detach().clone(), pred, lead,
                         small_cfg(seed=4), tok.pad_token_id)
    assert score(tr.generator, ex, tok.pad_token_id) != w1


def test_warmup_without_lm_term_trains_on_the_answer_alone(synthetic):
    probs, texts, tok = synthetic
    ex = encode_all(probs, texts, tok)[:4]
    pred = tiny_predictor(len(tok), seed=0)
    tr = train_weighting(ex, pred.get_input_embeddings().weight.detach().clone(), pred,
                         answer_lead_ids(tok), small_cfg(warmup_lm=False, steps=1), tok.pad_token_id)
    assert all(r["loss"] == r["lp"] for r in tr.log if r["phase"] == "warmup")


def test_joint_phase_moves_the_generator_through_the_answer_loss(synthetic):
    """alpha = 0: only Lp can change the generator; its weights must still move."""
    probs, texts, tok = synthetic
    ex = encode_all(probs, texts, tok)
    pred = tiny_predictor(len(tok), seed=0)
    emb = pred.get_input_embeddings().weight.detach().clone()
    tr = train_weighting(ex, emb, pred, answer_lead_ids(tok), small_cfg(alpha=0.0, predictor_warmup_steps=0),
                         tok.pad_token_id)
    from tasks.core.mask_model import WeightGenerator

    torch.manual_seed(3)
    init = WeightGenerator(emb, 2, 8)
    assert not torch.equal(init.mlp[2].weight, tr.generator.mlp[2].weight)


def test_a_frozen_predictor_is_unchanged_by_the_joint_phase_and_the_generator_still_learns(synthetic):
    """joint_predictor=frozen: the predictor after 1 or 3 joint steps is the same (the warm-up's);
    with train it is not. The frozen predictor still passes Lp's gradient to the generator."""
    from tasks.core.mask_model import WeightGenerator

    probs, texts, tok = synthetic
    ex = encode_all(probs, texts, tok)

    def run(mode: str, steps: int):
        pred = tiny_predictor(len(tok), seed=0)
        emb = pred.get_input_embeddings().weight.detach().clone()
        cfg = small_cfg(joint_predictor=mode, steps=steps, alpha=0.0)  # prefixes=all: no sampling
        tr = train_weighting(ex, emb, pred, answer_lead_ids(tok), cfg, tok.pad_token_id)
        return {k: v.clone() for k, v in pred.state_dict().items()}, tr, emb

    (f1, _, _), (f3, tr, emb) = run("frozen", 1), run("frozen", 3)
    assert all(torch.equal(f1[k], f3[k]) for k in f1)
    (t1, _, _), (t3, _, _) = run("train", 1), run("train", 3)
    assert any(not torch.equal(t1[k], t3[k]) for k in t1)
    torch.manual_seed(3)
    init = WeightGenerator(emb, 2, 8)
    assert not torch.equal(init.mlp[2].weight, tr.generator.mlp[2].weight)


def test_save_and_load_generator_round_trip(tmp_path, synthetic):
    probs, texts, tok = synthetic
    ex = encode_all(probs, texts, tok)[:3]
    pred = tiny_predictor(len(tok), seed=0)
    tr = train_weighting(ex, pred.get_input_embeddings().weight.detach().clone(), pred,
                         answer_lead_ids(tok), small_cfg(steps=1), tok.pad_token_id)
    save_generator(tr.generator, tmp_path / "m.safetensors", tmp_path / "m.json")
    back = load_generator(tmp_path / "m.safetensors", tmp_path / "m.json")
    assert score(back, ex, tok.pad_token_id) == score(tr.generator, ex, tok.pad_token_id)


def test_token_weights_table_rows(synthetic):
    probs, texts, tok = synthetic
    ex = encode_all(probs, texts, tok)[:2]
    w = [[0.5] * len(e.ids) for e in ex]
    t = token_weights_table(ex, texts[:2], w).to_pylist()
    assert len(t) == sum(len(e.ids) for e in ex)
    r = t[3]
    assert r["token"] == texts[0][r["char_start"]:r["char_end"]] and r["pos"] == 3
    # synthetic keypoint truth maps onto tokens: every digit token is a keypoint
    p = probs[0]
    words = [(s, e, k) for s, e, _, k in label_words(texts[0], {t for t, _ in keypoint_terms(p)})]
    kp = token_keypoints(ex[0].offsets, words)
    digits = [k for (s, e), k in zip(ex[0].offsets, kp) if texts[0][s:e].strip().isdigit()]
    assert digits and all(digits)


class _Counter(torch.nn.Module):
    """A predictor that 'reads' the rationale: its logits at every position are the counts of
    the tokens seen so far (one-hot embeddings, scaled by the mask), so it answers the token
    the rationale repeats most, and nothing once the rationale is masked away."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.emb.weight.copy_(torch.eye(vocab))

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.emb

    def forward(self, inputs_embeds, **kw):
        return type("Out", (), {"logits": 10 * inputs_embeds.cumsum(dim=1)})()


def _counted(rid: str, answer: int) -> Encoded:
    # prompt 1 2, rationale repeats the answer 3 times, suffix 3 (once): the answer wins the count
    ids = [answer, 6, answer, answer]
    return Encoded(rid, ids, [(i, i + 1) for i in range(4)], [1, 1, 2, 2], [1, 2], [answer])


def test_probe_a_reader_answers_unmasked_and_not_masked():
    examples = [_counted(f"r{i}", a) for i, a in enumerate([5, 7, 8, 9])]
    out = probe_predictor(_Counter(12), examples, [3], 0, torch.device("cpu"), batch_size=3)
    assert out["unmasked_accuracy"] == 1.0
    assert out["masked_accuracy"] == 0.0  # only prompt and suffix left: it answers token 1
    assert out["masked_nll"] > out["unmasked_nll"]
    gen = WeightGenerator(torch.eye(12), 2, 8)
    learned = probe_predictor(_Counter(12), examples, [3], 0, torch.device("cpu"), generator=gen)
    assert 0.0 <= learned["learned_kept"] <= 1.0 and 0.0 <= learned["learned_accuracy"] <= 1.0


def test_probe_oracle_masks_read_like_their_naive_twins():
    examples = [_counted(f"r{i}", a) for i, a in enumerate([5, 7, 8, 9])]
    dev = torch.device("cpu")
    n = [len(e.ids) for e in examples]
    oracles = {
        "ones": [[1.0] * k for k in n],  # the unmasked rationale
        "zeros": [[0.0] * k for k in n],  # the fully masked one
        "answer_only": [[float(t == e.answer[0]) for t in e.ids] for e in examples],  # what a counter needs
        "filler_only": [[float(t == 6) for t in e.ids] for e in examples],
    }
    out = probe_predictor(_Counter(12), examples, [3], 0, dev, batch_size=3, oracles=oracles)
    assert out["ones_accuracy"] == out["unmasked_accuracy"] == 1.0
    assert out["ones_nll"] == pytest.approx(out["unmasked_nll"])
    assert out["zeros_accuracy"] == out["masked_accuracy"] == 0.0
    assert out["zeros_nll"] == pytest.approx(out["masked_nll"])
    assert out["answer_only_accuracy"] == 1.0 and out["filler_only_accuracy"] == 0.0
    assert out["ones_kept"] == 1.0 and out["zeros_kept"] == 0.0 and out["answer_only_kept"] == 0.75


def test_oracle_masks_follow_roles_and_steps():
    # tokens: "Add" "3" "so" "=" "5" over two steps; words carry the synthetic roles
    e = Encoded("r0", [1, 2, 3, 4, 5], [(0, 3), (4, 5), (6, 8), (9, 10), (11, 12)], [1, 1, 2, 2, 2], [9], [5])
    words = {"r0": [(0, 3, False, "core"), (4, 5, True, "core"), (6, 8, False, "filler"), (9, 10, True, "core"), (11, 12, True, "core")]}
    got = oracle_masks([e], words)
    assert got["core_only"] == [[1.0, 1.0, 0.0, 1.0, 1.0]]
    assert got["filler_only"] == [[0.0, 0.0, 1.0, 0.0, 0.0]]
    assert got["final_step_only"] == [[0.0, 0.0, 1.0, 1.0, 1.0]]
    assert got["without_final_step"] == [[1.0, 1.0, 0.0, 0.0, 0.0]]
    assert got["final_step_core"] == [[0.0, 0.0, 0.0, 1.0, 1.0]]
    assert oracle_masks([e], None) == {} and oracle_masks([e], {"other": []}) == {}


def test_split_probe_holds_out_at_most_a_fifth():
    examples = [_counted(f"r{i}", 5) for i in range(23)]
    train, held = split_probe(examples, 64, seed=0)
    assert len(held) == 4 and len(train) == 19
    assert {e.rationale_id for e in train}.isdisjoint({e.rationale_id for e in held})
    assert split_probe(examples, 64, seed=0)[1] == held  # seeded
    assert split_probe(examples, 0, seed=0) == (examples, [])


def test_a_predictor_that_cannot_read_answers_stops_the_stage(synthetic):
    probs, texts, tok = synthetic
    examples, pred = encode_all(probs, texts, tok), tiny_predictor(len(tok))
    cfg = small_cfg(probe_rationales=2, min_predictor_accuracy=1.0, max_warmup_steps=4, probe_every=1)
    with pytest.raises(PredictorCannotReadAnswers, match=r"after 4 warm-up steps, below weights.min_predictor_accuracy"):
        train_weighting(examples, pred.get_input_embeddings().weight.detach().clone(), pred,
                        answer_lead_ids(tok), cfg, tok.pad_token_id)


def test_the_probe_is_recorded_before_and_after_the_joint_phase(synthetic):
    probs, texts, tok = synthetic
    examples, pred = encode_all(probs, texts, tok), tiny_predictor(len(tok))
    trained = train_weighting(examples, pred.get_input_embeddings().weight.detach().clone(), pred,
                              answer_lead_ids(tok), small_cfg(steps=2, probe_rationales=8), tok.pad_token_id)
    p = trained.probe
    assert p["warmup_steps"] == 2 and p["probe_rationales"] == len(examples) // 5
    for k in ("unmasked_accuracy", "unmasked_nll", "masked_accuracy", "masked_nll"):
        assert f"probe_before_{k}" in p and f"probe_after_{k}" in p
    assert "probe_after_learned_accuracy" in p and 0 <= p["probe_after_learned_kept"] <= 1
    assert [r["phase"] for r in trained.log] == ["warmup"] * 2 + ["joint"] * 2


def test_a_crash_in_the_joint_phase_resumes_from_the_saved_warm_predictor(synthetic, tmp_path, monkeypatch):
    """With `saved`, the predictor that passed the gate is kept: a rerun after a crash in the
    joint phase warms up no step again and ends where an uninterrupted run ends (sampled
    prefixes, so the batch generator's state matters too)."""
    from tasks.training import weighting

    probs, texts, tok = synthetic
    examples = encode_all(probs, texts, tok)
    cfg = small_cfg(prefixes="sampled", n_sampled=2, probe_rationales=2, min_predictor_accuracy=0.0)

    def train(saved=None):
        pred = tiny_predictor(len(tok), seed=0)
        tr = train_weighting(examples, pred.get_input_embeddings().weight.detach().clone(), pred,
                             answer_lead_ids(tok), cfg, tok.pad_token_id, saved=saved)
        return score(tr.generator, examples, tok.pad_token_id), tr.log, tr.probe

    whole = train()
    real_joint, real_warm = weighting._joint_step, weighting._warmup_step
    joint_calls, warm_calls = [], []

    def joint_dies_at_the_second_step(*args, **kw):
        joint_calls.append(1)
        if len(joint_calls) == 2:
            raise RuntimeError("killed")
        return real_joint(*args, **kw)

    monkeypatch.setattr(weighting, "_joint_step", joint_dies_at_the_second_step)
    with pytest.raises(RuntimeError, match="killed"):
        train(tmp_path)
    assert (tmp_path / "warm_predictor.pt").exists()
    monkeypatch.setattr(weighting, "_joint_step", real_joint)
    monkeypatch.setattr(weighting, "_warmup_step", lambda *a, **k: warm_calls.append(1) or real_warm(*a, **k))
    resumed = train(tmp_path)
    assert warm_calls == []  # the warm-up is read back, not run again
    assert resumed[0] == whole[0] and resumed[1] == whole[1] and resumed[2] == whole[2]


def test_token_roles_take_the_strongest_overlapping_word():
    words = [(0, 5, "filler"), (6, 8, "core"), (9, 15, "context")]
    assert token_roles([(0, 3), (4, 7), (5, 6), (9, 12), (16, 17)], words) == ["filler", "core", None, "context", None]


def test_role_quality_rows_match_naive():
    weights = [[0.9, 0.1, 0.5, 0.8], [0.2, 0.7, 0.3]]
    roles = [["core", "filler", "context", "core"], ["filler", None, "core"]]
    rows = {r["metric"]: r for r in role_quality_rows(weights, roles)}
    core, filler, ctx_ = [0.9, 0.8, 0.3], [0.1, 0.2], [0.5]
    naive_cf = sum((c > f) + 0.5 * (c == f) for c in core for f in filler) / (len(core) * len(filler))
    rest = filler + ctx_
    naive_cr = sum((c > r) + 0.5 * (c == r) for c in core for r in rest) / (len(core) * len(rest))
    assert rows["auroc_core_vs_filler"]["value"] == pytest.approx(naive_cf)
    assert rows["auroc_core_vs_rest"]["value"] == pytest.approx(naive_cr) and rows["auroc_core_vs_rest"]["tokens"] == 6
    assert rows["mean_weight_role_core"]["value"] == pytest.approx(sum(core) / 3)
    assert rows["mean_weight_role_context"]["value"] == pytest.approx(0.5)
    assert rows["mean_weight_role_filler"]["value"] == pytest.approx(0.15)


def test_the_stage_scores_in_chunks_and_its_outputs_do_not_depend_on_the_chunk(tmp_path, monkeypatch):
    """The scoring pass writes `token_weights` a chunk of rationales at a time and gathers the
    quality inputs as it goes: chunks of 3 give the tables and summary of one chunk for all."""
    import pyarrow.parquet as pq

    from storage.store import Store
    from tasks.config.pipeline import load_config
    from tasks.stages import weights as stage
    from tasks.stages.contract import execute, plan
    from tasks.stages.registry import BY_NAME, STAGES
    from tasks.training import weighting

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml", ["train.method=kpod"])
    keys = {p.name: p.key for p in plan(cfg, STAGES)}
    store = Store(tmp_path)
    for name in ("dataset", "teacher", "rationales", "student"):
        execute(BY_NAME[name], cfg, keys, store, show_progress=False)

    def weights_outputs():
        out = execute(stage.SPEC, cfg, keys, store, force=True, show_progress=False)
        tables = store.stage_dir("weights", keys["weights"]) / "tables"
        read = {t: pq.read_table(tables / f"{t}.parquet") for t in ("token_weights", "weights_quality")}
        return out.summary, read

    whole_summary, whole = weights_outputs()
    assert 64 < whole_summary["rationales"] <= stage.SCORE_CHUNK  # one chunk at the default
    monkeypatch.setattr(stage, "SCORE_CHUNK", 64)  # two chunks, the same scoring batches: equal
    summary, chunked = weights_outputs()
    assert chunked["token_weights"].equals(whole["token_weights"])
    assert chunked["weights_quality"].equals(whole["weights_quality"])
    assert {k: v for k, v in summary.items() if k != "train_seconds"} == {
        k: v for k, v in whole_summary.items() if k != "train_seconds"}
    assert whole["weights_quality"].num_rows > 10  # the keypoint and role rows are there
    metrics = set(whole["weights_quality"]["metric"].to_pylist())
    for when in ("before", "after"):  # the probe read answers through each role mask too
        assert {f"probe_{when}_{o}_{k}" for o in weighting.ORACLES for k in ("accuracy", "nll")} <= metrics
    monkeypatch.setattr(stage, "SCORE_CHUNK", 3)  # other batches pad differently: equal to rounding
    _, small = weights_outputs()
    tw, ref = small["token_weights"], whole["token_weights"]
    assert tw.drop_columns(["weight"]).equals(ref.drop_columns(["weight"]))
    assert tw["weight"].to_pylist() == pytest.approx(ref["weight"].to_pylist(), abs=1e-6)
    assert small["weights_quality"]["value"].to_pylist() == pytest.approx(
        whole["weights_quality"]["value"].to_pylist(), abs=1e-4)


def _tied(rid: str, answer: int) -> Encoded:
    # the rationale holds the answer twice and the filler 6 twice: read whole it is a tie
    # (answer NLL log 2); without the filler the answer wins; without an answer token it ties
    # with the prompt and suffix tokens (log 4), so every answer token is needed, no 6 is
    ids = [answer, 6, answer, 6]
    return Encoded(rid, ids, [(i, i + 1) for i in range(4)], [1, 1, 2, 2], [1, 2], [answer])


@pytest.mark.parametrize("joint_predictor", ["frozen", "train"])
def test_the_score_function_estimator_keeps_what_the_reader_needs(joint_predictor):
    """With the score-function estimator the generator learns to keep every token the
    counting reader needs and to drop every one that misleads it (seeded; 150 joint steps)."""
    examples = [_tied(f"r{i}", a) for i, a in enumerate([5, 7, 8, 9, 10, 11, 4, 2])]
    cfg = small_cfg(estimator="score_function", samples=4, joint_predictor=joint_predictor, alpha=0.1,
                    predictor_warmup_steps=0, steps=150, lr=0.03, predictor_lr=1e-4, prefixes="final",
                    warmup_lm=False, probe_rationales=0)
    tr = train_weighting(examples, torch.eye(12), _Counter(12), [3], cfg, pad_id=0)
    w = score(tr.generator, examples, 0, torch.device("cpu"))
    keep = [t == e.answer[0] for e in examples for t in e.ids]
    flat = [x for row in w for x in row]
    assert min(x for x, k in zip(flat, keep) if k) > 0.9 and max(x for x, k in zip(flat, keep) if not k) < 0.1
    assert {r["phase"] for r in tr.log} == {"joint"} and len(tr.log) == 150
    assert tr.log[-1]["lp"] < tr.log[0]["lp"]
