"""Teacher log-probs (`teacher.top_logprobs`) end to end on a real OpenAI-compatible server on
127.0.0.1 through the real `openai` client: asked for, ledgered, tabled (`teacher_logprobs`),
and used as the KD targets of `mentor.kd.source: teacher_topk` for a student whose tokenizer is
the (fake) teacher's, against a naive reference computed by hand from the stored log-probs."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from storage.store import Store
from tasks.config.teacher import TeacherConfig
from tasks.stages.contract import execute
from tasks.stages.teacher import SPEC
from tasks.teacher_backends.requests import build_requests
from tests.support.openai_server import FakeOpenAI, fake_tokens, item_questions, serve

@pytest.fixture(scope="module")
def server():
    with serve(FakeOpenAI()) as state:
        yield state


def _cfg(server, **kw) -> TeacherConfig:
    base = dict(backend="openai", model="scripted", base_url=server.base_url, api_key_env=None,
                concurrency=4, max_retries=0, request_timeout_s=5.0, seed=0, top_logprobs=3)
    return TeacherConfig(**{**base, **kw})


def _run(store: Store, cfg: TeacherConfig, key: str = "t0", n: int = 3):
    """Commit the dataset (once) and run the teacher stage under stage key `key`."""
    if not store.is_complete("dataset", "d0"):
        with store.lock("dataset", "d0"), store.writing("dataset", "d0", {}) as w:
            w.write_table("questions", item_questions(n))
    return execute(SPEC, SimpleNamespace(teacher=cfg), {"dataset": "d0", "teacher": key}, store, show_progress=False)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_rows_stored_per_generated_token_with_k_alternatives(server, tmp_path, api):
    store = Store(tmp_path)
    start = len(server.received)
    out = _run(store, _cfg(server, api=api, top_logprobs=3))
    sent = server.received[start:]
    assert len(sent) == 3
    want = {"logprobs": True, "top_logprobs": 3} if api == "chat" else {"logprobs": 3}
    assert all({k: r.params.get(k) for k in want} == want for r in sent)
    calls = store.read_table("teacher", "t0", "teacher_calls").to_pylist()
    rows = store.read_table("teacher", "t0", "teacher_logprobs").to_pylist()
    assert out.rows["teacher_logprobs"] == len(rows) == sum(len(fake_tokens(c["completion"])) for c in calls)
    for call in calls:
        mine = [r for r in rows if r["request_id"] == call["request_id"]]
        assert [r["pos"] for r in mine] == list(range(len(mine)))
        assert "".join(r["token"] for r in mine) == call["completion"]
        for i, r in enumerate(mine):
            assert len(r["top_tokens"]) == len(r["top_logprobs"]) == 3  # k respected
            assert r["top_tokens"][0] == r["token"]
            assert r["top_logprobs"] == pytest.approx([-1 - 0.01 * (i % 7), -2 - 0.01 * (i % 7), -3 - 0.01 * (i % 7)])
            assert (r["question_id"], r["sample"], r["part"]) == (call["question_id"], 0, "completion")


def test_request_id_names_top_logprobs_only_when_set(server):
    qs = item_questions(2)
    ids = {k: [r.request_id for r in build_requests(qs, _cfg(server, top_logprobs=k))] for k in (None, 3, 5)}
    assert len({tuple(v) for v in ids.values()}) == 3  # each k asks for a different answer
    off = build_requests(qs, _cfg(server, top_logprobs=None))
    assert all("top_logprobs" not in r.params for r in off)  # ids made before the field stay valid


def test_server_without_logprobs_gives_no_rows_and_one_warning(tmp_path, caplog):
    with serve(FakeOpenAI(logprobs=False)) as plain, caplog.at_level(logging.WARNING, logger="kpod.teacher"):
        out = _run(Store(tmp_path), _cfg(plain))
    assert out.rows == {"teacher_calls": 3, "teacher_logprobs": 0}
    warnings = [r.getMessage() for r in caplog.records if "without log-probs" in r.getMessage()]
    assert warnings == ["teacher: 3 of 3 successful calls came back without log-probs (the server ignored "
                        "teacher.top_logprobs=3); teacher_logprobs has no rows for them"]


def test_rerun_sends_nothing_and_keeps_the_rows(server, tmp_path):
    store = Store(tmp_path)
    _run(store, _cfg(server))
    first = store.read_table("teacher", "t0", "teacher_logprobs")
    start = len(server.received)
    _run(store, _cfg(server, concurrency=1), key="t1")  # a new stage key over the same ledger
    assert len(server.received) == start
    assert store.read_table("teacher", "t1", "teacher_logprobs").equals(first)


def test_batch_body_asks_and_its_output_line_parses():
    from tasks.teacher_backends.openai_batch import request_body, result_from_body

    cfg = TeacherConfig(backend="openai_batch", model="m", top_logprobs=2, api="completions", api_key_env=None)
    req = build_requests(item_questions(1), cfg)[0]
    assert request_body(req, "completions")["logprobs"] == 2
    assert request_body(req, "chat")["top_logprobs"] == 2 and request_body(req, "chat")["logprobs"] is True
    body = {"choices": [{"index": 0, "text": "a b", "finish_reason": "stop", "logprobs": {
        "tokens": ["a", " b"], "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"a": -0.5, "c": -1.5}, {" b": -0.25, " d": -2.0}], "text_offset": [7, 8]}}]}
    res = result_from_body(body, req, "completions", 1.0)
    assert res.logprobs == [
        {"token": "a", "logprob": -0.5, "top_tokens": ["a", "c"], "top_logprobs": [-0.5, -1.5]},
        {"token": " b", "logprob": -0.25, "top_tokens": [" b", " d"], "top_logprobs": [-0.25, -2.0]},
    ]


def test_top_logprobs_is_refused_for_backends_without_a_server():
    with pytest.raises(ValueError, match="top_logprobs needs backend 'openai' or 'openai_batch'"):
        TeacherConfig(top_logprobs=3)
    with pytest.raises(ValueError, match="less than or equal to 20"):
        TeacherConfig(backend="openai", top_logprobs=21)


# ---- the student side: the tokenizer check and the KD term --------------------------------
def _tokenizer(texts: list[str], split: str = r"\s*\S+|\s+"):
    """A word-level tokenizer that splits as the fake teacher does (or by `split`), with every
    piece of `texts` in its vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = sorted({p for t in texts for p in __import__("re").findall(split, t)})
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *pieces])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(split), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def taught(server, tmp_path_factory):
    """A teacher run with log-probs, its rationales, and a student tokenizer of the teacher's."""
    from tasks.config.rationales import RationalesConfig
    from tasks.stages.rationales import build

    store = Store(tmp_path_factory.mktemp("taught"))
    _run(store, _cfg(server, top_logprobs=4), n=3)
    qs = item_questions(3)
    calls = store.read_table("teacher", "t0", "teacher_calls")
    rats = build(qs, calls, RationalesConfig())["rationales"]
    lp = store.read_table("teacher", "t0", "teacher_logprobs")
    answers = qs.column("answer").to_pylist()
    targets = [f" {t} Therefore, the answer is {a}." for t, a in zip(rats.column("text").to_pylist(), answers)]
    texts = calls.column("completion").to_pylist() + targets
    return SimpleNamespace(questions=qs, rationales=rats, logprobs=lp, tokenizer=_tokenizer(texts), texts=texts)


def test_tokenizer_check_passes_for_the_teachers_tokenizer(taught):
    from tasks.training.teacher_kd import align_teacher_tokens, vocab_surfaces

    r = taught.rationales.to_pylist()[0]
    tokens = [row["token"] for row in taught.logprobs.to_pylist() if row["question_id"] == r["question_id"]]
    pairs = align_teacher_tokens(taught.tokenizer, vocab_surfaces(taught.tokenizer), r["rationale_id"],
                                 r["text"], "5", tokens)
    # "We add the numbers. 0 + 2 + 3 = 5." is 11 tokens; the first (" We" after "A:", "We" for the
    # teacher) differs in its leading space only, so it gets no target
    assert pairs == [(i, i) for i in range(1, 11)]


def _sp_tokenizer(texts: list[str]):
    """A SentencePiece-style tokenizer (Llama's, T5's): a word-initial space is the piece's "▁",
    which the decoder turns back into a space except at the start of a text. Word-level over
    the words of `texts`, so its boundaries are the fake teacher's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import re

    words = {w for t in texts for w in re.findall(r"\s*\S+", t)}  # a newline stays in its word
    pieces = sorted({w.strip() for w in words} | {"\u2581" + w[1:] if w.startswith(" ") else w for w in words})
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *pieces])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def test_a_sentencepiece_students_pieces_read_as_the_servers_tokens(taught):
    """The server streams " add" for the piece "▁add" (decoded after the text before it); decoded
    alone the piece reads "add", which once made every SentencePiece student fail the check."""
    from tasks.training.teacher_kd import teacher_topk_table, token_surface, vocab_surfaces

    sp = _sp_tokenizer(taught.texts)
    surfaces = vocab_surfaces(sp)
    assert sp.convert_tokens_to_string(["\u2581add"]) == "add"  # the decoder drops a text's first space
    assert surfaces[" add"] == sp.convert_tokens_to_ids("\u2581add")
    assert token_surface(sp, sp.convert_tokens_to_ids("add")) == "add"
    got = teacher_topk_table(sp, taught.questions, taught.rationales, taught.logprobs)
    ref = teacher_topk_table(taught.tokenizer, taught.questions, taught.rationales, taught.logprobs)
    assert got.num_rows == ref.num_rows > 0
    assert got.column("pos").to_pylist() == ref.column("pos").to_pylist()
    assert got.column("logprobs").to_pylist() == ref.column("logprobs").to_pylist()

    def spelled(tok, table):  # each target's token as the server spells it
        by_id = {i: t for t, i in vocab_surfaces(tok).items()}
        return [[by_id[i] for i, lp in zip(ids, lps) if lp > -1e3]
                for ids, lps in zip(table.column("token_ids").to_pylist(), table.column("logprobs").to_pylist())]

    assert spelled(sp, got) == spelled(taught.tokenizer, ref)


def test_tokenizer_check_names_the_first_rationale_and_position_that_differ(taught):
    from tasks.training.teacher_kd import teacher_topk_table

    other = _tokenizer(taught.texts, split=r"\s*[^\s.]+|\.|\s+")  # a "." is a token of its own
    with pytest.raises(ValueError) as err:
        teacher_topk_table(other, taught.questions, taught.rationales, taught.logprobs)
    assert str(err.value) == ("student tokenizer is not the teacher's: rationale 'q0:teacher:0' position 3: "
                              "student token ' numbers', teacher token ' numbers.'")


def _naive_teacher_kl(student_logits, positions, tau):
    """KL(q || p_student^tau) averaged over the covered positions, written out in float64.
    `positions`: (batch row, aligned position, [(student id, teacher logprob)])."""
    total = 0.0
    for b, t, pairs in positions:
        s = [x / tau for x in student_logits[b, t].tolist()]
        zs = math.log(sum(math.exp(x) for x in s))
        q = [lp / tau for _, lp in pairs]
        zq = math.log(sum(math.exp(x) for x in q))
        total += sum(math.exp(qi - zq) * ((qi - zq) - (s[i] - zs)) for (i, _), qi in zip(pairs, q))
    return total / len(positions)


def test_teacher_topk_kd_term_equals_a_naive_reference(taught):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.config.mentor import KdSettings
    from tasks.core.forward import IGNORE, aligned_logits
    from tasks.core.losses import weighted_token_nll
    from tasks.training.data import TrainMethod
    from tasks.training.mentor_kd import with_mentor_kd
    from tasks.training.recipe import std_cot_examples

    tok, kd = taught.tokenizer, KdSettings(source="teacher_topk", tau=2.0, lam=0.3)
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                                           max_position_embeddings=128))
    examples = std_cot_examples(taught.questions, taught.rationales, tok, False, 128, sources=("teacher",))
    method = with_mentor_kd(kd, TrainMethod(examples, tok.pad_token_id), student, tok, taught.questions,
                            taught.rationales, teacher_logprobs=taught.logprobs)
    batch = method.collate(examples)
    aligned = aligned_logits(student, batch, extra=method.per_token)
    nll, parts = weighted_token_nll(aligned.logits, aligned.labels, aligned.extras["weights"])
    loss, parts = method.loss(nll, parts, batch, aligned)
    # the reference, from the stored rows: target position p of example b sits at aligned
    # position (first label) + p; its targets are the server's top-k mapped by token text
    vocab, rows = tok.get_vocab(), taught.logprobs.to_pylist()
    positions = []
    for b, ex in enumerate(examples):
        qid = ex.rationale_id.split(":")[0]
        mine = [r for r in rows if r["question_id"] == qid]
        first = next(t for t, lab in enumerate(aligned.labels[b].tolist()) if lab != IGNORE)
        for p in range(1, 11):  # the covered positions (the test above)
            pairs = [(vocab[t], lp) for t, lp in zip(mine[p]["top_tokens"], mine[p]["top_logprobs"])]
            positions.append((b, first + p, pairs))
    want = _naive_teacher_kl(aligned.logits.detach(), positions, kd.tau)
    assert math.isfinite(parts["kd"].item()) and parts["kd"].item() > 0
    assert parts["kd"].item() == pytest.approx(want, rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * nll.item() + 0.3 * want, rel=1e-5)


def test_teacher_topk_needs_top_logprobs_and_makes_train_read_the_teacher():
    from tasks.config.pipeline import PipelineConfig
    from tasks.stages.train import SPEC as TRAIN

    kd = {"kd": {"source": "teacher_topk"}}
    with pytest.raises(ValueError, match="mentor.kd.source 'teacher_topk' needs teacher.top_logprobs"):
        PipelineConfig(mentor=kd, train={"method": "mentor_kd"})
    cfg = PipelineConfig(mentor=kd, train={"method": "mentor_kd"},
                         teacher={"backend": "openai", "top_logprobs": 5, "api_key_env": None})
    ups = TRAIN.upstream(cfg)
    assert "teacher" in ups and "mentor_cache" not in ups and "mentor_train" not in ups


def test_generated_token_joins_the_top_k_and_padding_carries_no_mass():
    from tasks.core.kd import kd_kl_topk
    from tasks.training.teacher_kd import PAD_LOGPROB, position_targets

    surfaces = {"a": 4, " b": 5, " c": 6}
    row = {"token": " c", "logprob": -3.0, "top_tokens": ["a", " b"], "top_logprobs": [-0.5, -1.0]}
    assert position_targets(surfaces, "r", 0, row) == ([4, 5, 6], [-0.5, -1.0, -3.0])
    with pytest.raises(ValueError, match="teacher token ' z' \\(of its top-k\\) is not in the student's vocabulary"):
        position_targets(surfaces, "r", 0, {**row, "top_tokens": ["a", " z"]})
    g = torch.Generator().manual_seed(0)
    student, labels = torch.randn(1, 1, 8, generator=g), torch.tensor([[4]])
    ids, lps = torch.tensor([[[4, 5]]]), torch.tensor([[[-0.5, -1.0]]])
    padded = kd_kl_topk(student, torch.tensor([[[4, 5, 0]]]), torch.tensor([[[-0.5, -1.0, PAD_LOGPROB]]]), labels, 100.0)
    assert torch.isfinite(padded) and torch.allclose(padded, kd_kl_topk(student, ids, lps, labels, 100.0))
