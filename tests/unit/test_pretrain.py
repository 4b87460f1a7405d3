"""The pretrained miniature (issue 13): corpus, contamination check, base checks, the stage, student.init."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storage.store import Store
from tasks.config.pipeline import ConfigError, load_config
from tasks.core import corpus
from tasks.core.forward import IGNORE
from tasks.core.synthetic import apply_op, generate, render_rationale

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
# smoke.yaml with a pretrained base small enough for a unit test
BASE = [
    "student.init=base", "pretrain.documents=240", "pretrain.tokenizer_documents=120",
    "pretrain.held_out=16", "pretrain.probes=16", "pretrain.batch_size=16", "pretrain.epochs=2",
    "pretrain.checkpoint_every=4", "pretrain.device=cpu",
]


# ---- the corpus ------------------------------------------------------------------------------
@pytest.mark.parametrize("n, words", [
    (0, "zero"), (13, "thirteen"), (40, "forty"), (42, "forty-two"), (100, "one hundred"),
    (305, "three hundred five"), (999, "nine hundred ninety-nine"),
])
def test_number_words(n, words):
    assert corpus.number_words(n) == words


def test_number_words_refuses_what_it_cannot_spell():
    with pytest.raises(ValueError, match="0..999"):
        corpus.number_words(1000)


def test_corpus_is_deterministic_per_seed_and_stream():
    a = list(corpus.documents(3, 300))
    assert a == list(corpus.documents(3, 300))
    assert a != list(corpus.documents(4, 300))
    held = [t for _, t in corpus.documents(3, 300, stream="held-out")]
    assert held != [t for _, t in a]
    train = {t for _, t in a}
    assert train & set(held)  # one-fact quizzes recur between streams ...
    clean = corpus.held_out_documents(3, 300, train)
    assert len(clean) == 300 and not train & set(clean)  # ... so the held-out set skips them
    assert clean == corpus.held_out_documents(3, 300, train)
    assert {k for k, _ in a} == set(corpus.KINDS)


def test_corpus_never_writes_the_task_format():
    text = "\n".join(t for _, t in corpus.documents(0, 3000, kinds=corpus.ALL_KINDS))
    assert "Therefore, the answer is" not in text and "answer is" not in text
    assert not re.search(r"(^|\n)Q:|\nA:", text)


def test_corpus_arithmetic_is_right():
    """Every symbol-form fact ("a op b = r") in the corpus and every probe is correct arithmetic."""
    text = "\n".join(t for _, t in corpus.documents(1, 2000))
    facts = re.findall(r"(\d+) ([-+*/x]) (\d+) = (\d+)", text)
    assert len(facts) > 500
    for a, op, b, r in facts:
        assert apply_op(int(a), "*" if op == "x" else op, int(b)) == int(r)
    for prompt, target in __import__("tasks.training.pretraining", fromlist=["x"]).operation_probes(0, 300, 200):
        a, op, b = re.fullmatch(r"(\d+) ([-+*/]) (\d+) =", prompt).groups()
        assert apply_op(int(a), op, int(b)) == int(target)


def _task_texts(preset: str) -> list[str]:
    """The questions of every split and three rationales of each (one wrong), as the teacher writes them."""
    cfg = load_config(ROOT / "configs" / preset)
    texts = []
    for p in generate(cfg.dataset.synthetic):
        rng = random.Random(p.question_id)
        texts += [p.question, render_rationale(p, rng), render_rationale(p, rng), render_rationale(p, rng, error=True)]
    return texts


@pytest.mark.parametrize("preset", ["demo.yaml", "bench-arith.yaml"])
def test_corpus_shares_no_8gram_with_the_task(preset):
    texts = _task_texts(preset)
    task = corpus.task_ngrams(texts)
    vocabulary = corpus.task_vocabulary(texts, drop=["Q", "A", "Therefore", "the", "answer", "is"])
    docs = [t for _, t in corpus.documents(0, 20_000, vocabulary=vocabulary, kinds=corpus.ALL_KINDS)]
    assert corpus.shared_ngrams(docs, task) == []
    # every word of the task is in the corpus, in documents of the `words` kind among others
    seen = {w for d in docs for w in re.findall(r"[A-Za-z]+", d)}
    assert set(vocabulary) <= seen
    assert "answer is" not in "\n".join(docs)


def test_retell_retells_the_one_persons_counts_in_order():
    """The retold list is the protagonist's counts in the order told, and no one else's (the
    protagonist's actions all name one noun, another person's another; the first is hers)."""
    rng = random.Random(5)
    action = re.compile(r"\b(?:%s) ([a-z-]+|\d+) ([a-z]+)" % "|".join(corpus.ACTIONS))
    for _ in range(300):
        doc = corpus.retell_doc(rng, 100)
        body, _, end = doc.rpartition(". ")
        acts = [(int(k) if k.isdigit() else corpus_number(k), noun) for k, noun in action.findall(body + ".")]
        told = [k for k, noun in acts if noun == acts[0][1]]
        retold = [int(k) for k in re.findall(r"(\d+)", end.split(":", 1)[1])]
        assert retold == told and 2 <= len(told) <= 5, doc


def corpus_number(word: str) -> int:
    return next(n for n in range(1000) if corpus.number_words(n) == word)


def test_corpus_kinds_are_checked_and_default_to_the_first_four():
    assert list(corpus.documents(0, 50)) == list(corpus.documents(0, 50, kinds=corpus.KINDS))
    assert {k for k, _ in corpus.documents(0, 200, kinds=["retell", "facts"])} == {"retell", "facts"}
    with pytest.raises(ValueError, match="corpus kinds"):
        list(corpus.documents(0, 5, kinds=["novels"]))


def test_task_vocabulary_is_the_distinct_words_minus_the_dropped():
    assert corpus.task_vocabulary(["Q: Tom's 3 apples.", "So, so SO apples"], drop=["Q"]) == ["SO", "So", "Tom", "apples", "s", "so"]


def test_shared_ngrams_finds_a_planted_task_sentence():
    texts = _task_texts("demo.yaml")[:50]
    task = corpus.task_ngrams(texts)
    planted = [t for _, t in corpus.documents(0, 50)] + ["prefix words " + texts[7] + " and more"]
    found = corpus.shared_ngrams(planted, task)
    assert found and all(g in task for g in found)
    assert found == sorted(set(corpus.ngrams(texts[7])) & set(found))


# ---- examples and the base's checks ------------------------------------------------------------
def _tokenizer():
    from tasks.core.models import train_tokenizer

    return train_tokenizer([t for _, t in corpus.documents(0, 300)], 400)


def test_document_and_probe_examples_label_only_their_targets():
    from tasks.training.pretraining import document_example, probe_example

    tok = _tokenizer()
    doc = document_example(tok, "Tom put 12 shells into a jar.", 64)
    ids = tok("Tom put 12 shells into a jar.", add_special_tokens=False)["input_ids"]
    assert doc.input_ids == [tok.bos_token_id, *ids, tok.eos_token_id]
    assert doc.labels == [IGNORE, *ids, tok.eos_token_id] and doc.weights[0] == 0 and sum(doc.weights) == len(ids) + 1
    assert len(document_example(tok, "word " * 500, 32).input_ids) == 32
    probe = probe_example(tok, "7 + 5 =", " 12")
    target = tok(" 12", add_special_tokens=False)["input_ids"]
    assert probe.labels[-len(target):] == target and set(probe.labels[:-len(target)]) == {IGNORE}


def test_evaluate_base_matches_a_naive_loop(one_thread):
    from tasks.config.student import EmbeddedShape
    from tasks.core.models import embedded_llama
    from tasks.training.pretraining import document_example, evaluate_base, probe_example

    tok = _tokenizer()
    model = embedded_llama(EmbeddedShape(hidden=32, layers=1, heads=2, intermediate=64, max_len=128), tok).eval()
    examples = [document_example(tok, t, 64) for _, t in corpus.documents(5, 7)]
    examples += [probe_example(tok, "3 + 4 =", " 7"), probe_example(tok, "9 * 2 =", " 18")]
    got = evaluate_base(model, examples, tok.pad_token_id, batch_size=3)
    nll, n, exact = 0.0, 0, 0
    with torch.no_grad():
        for e in examples:  # one unpadded sequence at a time, shifted by hand
            logits = model(torch.tensor([e.input_ids])).logits[0, :-1]
            labels = torch.tensor(e.labels[1:])
            keep = labels != IGNORE
            nll += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            n += int(keep.sum())
            exact += int((logits[keep].argmax(-1) == labels[keep]).all())
    assert got["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert got["exact"] == exact / len(examples)


# ---- the stage and the student from its base -------------------------------------------------
def _run(store: Store, *extra: str, stages=("dataset", "teacher", "rationales", "pretrain", "student")):
    from tasks.stages.contract import execute, plan
    from tasks.stages.registry import BY_NAME, STAGES

    cfg = load_config(SMOKE, BASE + list(extra))
    keys = {p.name: p.key for p in plan(cfg, STAGES)}
    return keys, {s: execute(BY_NAME[s], cfg, keys, store, show_progress=False) for s in stages}


def test_pretrain_stage_and_student_init_base(tmp_path, one_thread):
    from storage.catalog import query
    from tasks.core.models import load_model

    store = Store(tmp_path / "store")
    keys, out = _run(store)
    summary = out["pretrain"].summary
    assert summary["corpus_task_8grams_shared"] == 0
    assert summary["student"]["steps"] == 2 * 15  # 240 docs / 16, twice
    assert summary["student"]["final_loss"] < summary["student"]["first_loss"]
    store.save_run("r", {"run_id": "r", "stages": keys, "status": "completed"})
    _, rows = query(store, "select model, metric from pretrain_eval order by model, metric")
    assert rows == [("corpus", "task_8grams_shared"), ("student", "heldout_nll"),
                    ("student", "heldout_perplexity"), ("student", "operation_accuracy")]
    _, rows = query(store, "select model, count(*), max(step) from pretrain_log group by model")
    assert rows == [("student", 30, 30)]

    base, base_tok = load_model(store.file_path("pretrain", keys["pretrain"], "base"))
    student, tok = load_model(store.file_path("student", keys["student"], "model"))
    assert tok.get_vocab() == base_tok.get_vocab()
    b, s = base.state_dict(), student.state_dict()
    assert b.keys() == s.keys() and all(torch.equal(b[k], s[k]) for k in b)
    # the shared tokenizer knows every task token: no task word falls back to raw bytes it never merged
    assert out["student"].summary["init"] == "base"
    assert summary["vocabulary_words"] == 0  # pretrain.task_vocabulary is off by default


def test_tokenizer_task_weight_and_base_mix(tmp_path, one_thread):
    """The tokenizer is trained on the corpus head plus the task text k times (against a naive
    retraining); `student.base_mix` m starts the student at m * base + (1 - m) * fresh init."""
    from tasks.core.models import embedded_llama, load_model, train_tokenizer
    from tasks.stages.sources import tokenizer_corpus

    store = Store(tmp_path / "store")
    keys, out = _run(store, "pretrain.tokenizer_task_weight=3", "student.base_mix=0.25")
    cfg = load_config(SMOKE, BASE + ["pretrain.tokenizer_task_weight=3"])
    task = tokenizer_corpus(store.read_table("dataset", keys["dataset"], "questions"),
                            store.read_table("rationales", keys["rationales"], "rationales"))
    docs = [t for _, t in corpus.documents(cfg.pretrain.seed, cfg.pretrain.documents, cfg.pretrain.max_value)]
    naive = train_tokenizer(docs[: cfg.pretrain.tokenizer_documents] + task + task + task, cfg.student.vocab_size)
    base, tok = load_model(store.file_path("pretrain", keys["pretrain"], "base"))
    assert tok.get_vocab() == naive.get_vocab()
    assert tok.get_vocab() != train_tokenizer(docs[: cfg.pretrain.tokenizer_documents] + task, cfg.student.vocab_size).get_vocab()

    student, _ = load_model(store.file_path("student", keys["student"], "model"))
    fresh = embedded_llama(load_config(SMOKE, BASE).student, tok).state_dict()
    b, s = base.state_dict(), student.state_dict()
    for k in b:
        assert torch.allclose(s[k], 0.25 * b[k] + 0.75 * fresh[k], atol=1e-6), k
    assert out["student"].summary["base_mix"] == 0.25


def test_mix_weights_mixes_each_tensor_once():
    from types import SimpleNamespace

    from tasks.core.models import embedded_llama, mix_weights, train_tokenizer

    tok = train_tokenizer(["a b c d 1 2 3"] * 5, 300)
    shape = SimpleNamespace(hidden=16, layers=1, heads=2, intermediate=32, max_len=32, seed=0)
    a, b = embedded_llama(shape, tok), embedded_llama(SimpleNamespace(**{**vars(shape), "seed": 1}), tok)
    before_a = {k: v.clone() for k, v in a.state_dict().items()}
    before_b = {k: v.clone() for k, v in b.state_dict().items()}
    mix_weights(a, b, 0.3)
    for k, v in a.state_dict().items():  # the tied lm_head is the embedding, mixed once, not twice
        assert torch.allclose(v, 0.3 * before_a[k] + 0.7 * before_b[k], atol=1e-6), k
    assert all(torch.equal(v, before_b[k]) for k, v in b.state_dict().items())
    with pytest.raises(ValueError, match="mix must be in"):
        mix_weights(a, b, 1.5)


def test_task_vocabulary_documents_put_every_task_word_in_the_corpus(tmp_path, one_thread):
    from tasks.stages.sources import tokenizer_corpus

    store = Store(tmp_path / "store")
    keys, out = _run(store, "pretrain.task_vocabulary=true", "pretrain.epochs=1")
    task = tokenizer_corpus(store.read_table("dataset", keys["dataset"], "questions"),
                            store.read_table("rationales", keys["rationales"], "rationales"))
    words = corpus.task_vocabulary(task, drop=["Q", "A", "Therefore", "the", "answer", "is"])
    summary = out["pretrain"].summary
    assert summary["vocabulary_words"] == len(words) > 20 and summary["corpus_task_8grams_shared"] == 0


def test_the_base_is_shared_by_methods_and_seeds_not_by_shapes():
    from tasks.stages.contract import plan
    from tasks.stages.registry import STAGES

    def key(*extra):
        return {p.name: p.key for p in plan(load_config(SMOKE, BASE + list(extra)), STAGES)}

    a = key()
    assert key("train.method=kpod", "train.seed=3", "weights.predictor=base")["pretrain"] == a["pretrain"]
    assert key("student.hidden=64")["pretrain"] != a["pretrain"]
    assert key("pretrain.lr=0.001")["student"] != a["student"]  # the student is the base
    scratch = {p.name: p for p in plan(load_config(SMOKE), STAGES)}
    assert not scratch["pretrain"].enabled and "pretrain" not in scratch["student"].upstream


def test_predictor_and_reference_base_need_the_base_tokenizer():
    for field in ("weights.predictor=base", "difficulty.reference=base"):
        with pytest.raises(ConfigError, match="needs the base's tokenizer"):
            load_config(SMOKE, [field])
        load_config(SMOKE, [field, "student.tokenizer=base"])  # a scratch student on the base's tokenizer
    with pytest.raises(ConfigError, match="student.init 'base' needs student.kind 'embedded'"):
        load_config(SMOKE, ["student.init=base", "student.kind=hf", "student.name_or_path=x"])
    with pytest.raises(ConfigError, match="student.init 'base' needs the base's tokenizer"):
        load_config(SMOKE, ["student.init=base", "student.tokenizer=task"])
    with pytest.raises(ConfigError, match="student.base_mix below 1 needs student.init 'base'"):
        load_config(SMOKE, ["student.base_mix=0.5"])


def test_scratch_student_on_the_base_tokenizer_with_the_base_as_predictor_and_reference(tmp_path, one_thread):
    """student.tokenizer=base: fresh weights on the shared tokenizer; the weights stage predicts with the
    base and the difficulty stage scores with it."""
    from tasks.core.models import load_model
    from tasks.stages.contract import execute, plan
    from tasks.stages.registry import BY_NAME, STAGES

    sets = [s for s in BASE if s != "student.init=base"] + [
        "student.tokenizer=base", "weights.predictor=base", "difficulty.reference=base", "train.method=kpod"]
    cfg = load_config(SMOKE, sets)
    planned = {p.name: p for p in plan(cfg, STAGES)}
    assert planned["pretrain"].enabled and "pretrain" in planned["difficulty"].upstream
    keys = {n: p.key for n, p in planned.items()}
    store = Store(tmp_path / "store")
    out = {s: execute(BY_NAME[s], cfg, keys, store, show_progress=False)
           for s in ("dataset", "teacher", "rationales", "pretrain", "student", "weights", "difficulty")}
    base, btok = load_model(store.file_path("pretrain", keys["pretrain"], "base"))
    student, stok = load_model(store.file_path("student", keys["student"], "model"))
    assert stok.get_vocab() == btok.get_vocab() and out["student"].summary["tokenizer"] == "base"
    b, s = base.state_dict(), student.state_dict()
    assert not all(torch.equal(b[k], s[k]) for k in b)  # not the base's weights
    assert out["difficulty"].summary["reference"] == "base"
    assert "pretrain" in planned["weights"].upstream
    import tasks.stages.weights as weights_stage

    _, _, predictor = weights_stage._models(_context(store, planned["weights"], cfg), cfg.weights)
    p = predictor.state_dict()
    assert all(torch.equal(p[k], b[k]) for k in b)  # the predictor is the base, not the random student
    # the base scores the rationales better than the (random) initial student does: it knows the words
    cfg_init = load_config(SMOKE, sets[:-2] + ["difficulty.reference=init", "train.method=kpod"])
    keys_init = {p.name: p.key for p in plan(cfg_init, STAGES)}
    assert keys_init["student"] == keys["student"] and keys_init["difficulty"] != keys["difficulty"]
    init = execute(BY_NAME["difficulty"], cfg_init, keys_init, store, show_progress=False).summary
    assert init["reference"] == "init"
    assert out["difficulty"].summary["mean_token_nll"] < init["mean_token_nll"] - 0.3


def test_difficulty_reference_auto_is_the_base_itself():
    from tasks.config.methods import effective_reference

    assert effective_reference(load_config(SMOKE, BASE)) == "init"
    assert effective_reference(load_config(SMOKE)) == "warmup"
    # a student mixed with a fresh init is not the pretrained one: the base scores instead
    assert effective_reference(load_config(SMOKE, BASE + ["student.base_mix=0.3"])) == "base"
    assert effective_reference(load_config(SMOKE, BASE + ["student.base_mix=0.3", "difficulty.reference=init"])) == "init"


def _context(store, planned, cfg):
    from tasks.stages.contract import StageContext
    from tasks.stages.registry import BY_NAME

    spec = BY_NAME[planned.name]
    return StageContext(store=store, spec=spec, key=planned.key, inputs=spec.inputs(cfg),
                        upstream=planned.upstream, writer=None)


CHILD = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
import tasks.training.recipe as recipe
from storage.store import Store
from tests.unit.test_pretrain import _run
log_row = recipe.Recipe._log_row
def killing(self, *a, **kw):
    row = log_row(self, *a, **kw)
    if row["step"] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9, between two checkpoints
    return row
recipe.Recipe._log_row = killing
_run(Store({store!r}))
"""


def test_pretrain_resumes_after_kill_with_the_same_losses(tmp_path, one_thread):
    from storage.catalog import query

    store = tmp_path / "killed"
    script = CHILD.format(root=str(ROOT), store=str(store), kill_at=10)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    keys, out = _run(Store(store))
    assert out["pretrain"].summary["student"]["resumed_from"] == 8  # checkpoints every 4 steps; killed at 10
    ref_keys, _ = _run(Store(tmp_path / "ref"))
    assert ref_keys == keys
    losses = []
    for root in (store, tmp_path / "ref"):
        s = Store(root)
        s.save_run("r", {"run_id": "r", "stages": keys, "status": "completed"})
        losses.append(query(s, "select step, loss from pretrain_log order by step")[1])
    assert [r[0] for r in losses[0]] == list(range(1, 31))
    assert [r[1] for r in losses[0]] == pytest.approx([r[1] for r in losses[1]], abs=1e-6)
    base = json.loads((Store(store).stage_dir("pretrain", keys["pretrain"]) / "manifest.json").read_text())
    assert base["summary"]["student"]["steps"] == 30


def test_mentor_from_its_base(tmp_path, one_thread):
    """pretrain.models=[student, mentor]: one tokenizer, two bases; mentor_train starts from the mentor's."""
    from tasks.core.models import load_model
    from tasks.stages.contract import execute, plan
    from tasks.stages.registry import BY_NAME, STAGES

    extra = ["pretrain.models=[student, mentor]", "mentor.model.init=base", "train.method=mentor_kd",
             "mentor.training.epochs=1", "mentor.training.val_limit=2", "mentor.augment.max_new_tokens=8"]
    cfg = load_config(SMOKE, BASE + extra)
    planned = {p.name: p for p in plan(cfg, STAGES)}
    assert "pretrain" in planned["mentor_train"].upstream
    keys = {n: p.key for n, p in planned.items()}
    store = Store(tmp_path / "store")
    for s in ("dataset", "teacher", "rationales", "pretrain", "student"):
        execute(BY_NAME[s], cfg, keys, store, show_progress=False)
    student, stok = load_model(store.file_path("student", keys["student"], "model"))
    mentor, mtok = load_model(store.file_path("pretrain", keys["pretrain"], "base_mentor"))
    assert mtok.get_vocab() == stok.get_vocab()
    assert mentor.config.hidden_size == cfg.mentor.model.hidden != student.config.hidden_size
    import tasks.training.recipe as mt  # the mentor_train stage imports Recipe from here when it runs

    seen = {}
    original = mt.Recipe

    class Spy(original):  # the weights the mentor's training starts from
        def setup(self):
            seen.update({k: v.clone() for k, v in self.model.state_dict().items()})
            super().setup()

    mt.Recipe = Spy
    try:
        execute(BY_NAME["mentor_train"], cfg, keys, store, show_progress=False)
    finally:
        mt.Recipe = original
    base = mentor.state_dict()
    assert seen.keys() == base.keys() and all(torch.equal(seen[k], base[k]) for k in base)
    with pytest.raises(ConfigError, match="'mentor' in pretrain.models"):
        load_config(SMOKE, BASE + ["mentor.model.init=base"])
    with pytest.raises(ConfigError, match="needs an embedded mentor and the base's tokenizer"):
        load_config(SMOKE, ["mentor.model.init=base"])


def test_packed_examples_keep_every_token_once_in_order():
    from tasks.training.pretraining import document_example, packed_examples

    tok = _tokenizer()
    texts = [t for _, t in corpus.documents(2, 40)]
    assert packed_examples(tok, texts, 64, 0) == [document_example(tok, t, 64) for t in texts]
    packed = packed_examples(tok, texts, 64, 50)
    stream = []
    for t in texts:  # the naive stream: each document cut to 62 tokens, then </s>
        stream += tok(t, add_special_tokens=False)["input_ids"][:62] + [tok.eos_token_id]
    assert all(len(e.input_ids) == 50 and e.input_ids[0] == tok.bos_token_id for e in packed)
    assert [i for e in packed for i in e.input_ids[1:]] == stream[: 49 * len(packed)]
    assert len(stream) - 49 * len(packed) < 49  # only a last partial sequence is dropped
    assert all(e.labels == [IGNORE, *e.input_ids[1:]] for e in packed)


@pytest.mark.parametrize("lora", [False, True])
def test_train_from_the_base_full_or_lora(tmp_path, one_thread, lora):
    """The train stage fine-tunes the base (all weights, or LoRA adapters merged back) and evaluates."""
    from tasks.core.models import load_model

    extra = ["train.epochs=1", "evaluate.limit=2", "evaluate.max_new_tokens=8"]
    if lora:
        extra.append("train.lora={r: 4, alpha: 8, targets: [q_proj, v_proj]}")
    keys, out = _run(Store(tmp_path / "s"), *extra,
                     stages=("dataset", "teacher", "rationales", "pretrain", "student", "train", "evaluate"))
    store = Store(tmp_path / "s")
    base = load_model(store.file_path("pretrain", keys["pretrain"], "base"))[0].state_dict()
    tuned = load_model(store.file_path("train", keys["train"], "model"))[0].state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed
    if lora:  # only the adapted projections moved (merged adapters), nothing else
        assert all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert out["evaluate"].summary
