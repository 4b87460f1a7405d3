"""The hf teacher on a tiny random LLaMA and a tokenizer trained here (nothing downloaded).

Generation is checked token for token against naive loops over the model's logits: argmax for
temperature 0, and softmax(logits / T) -> multinomial from the same seed for sampling.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from storage.store import Store
from tasks.teacher_backends.requests import build_requests
from tasks.teacher_backends.teach import teach
from tasks.config.teacher import TeacherConfig
from tasks.teacher_backends.base import FatalTeacherError, TeacherRequest
from tasks.teacher_backends.hf import HFBackend, cut_at_stop, make_backend, request_seed

CORPUS = [
    "Q: Ann has 3 apples and buys 4 more. How many apples does she have?",
    "A: Let's think step by step. 3 + 4 = 7. Therefore, the answer is 7.",
    "Q: Bob had 10 pears and ate 2. How many are left? A: 10 - 2 = 8.",
] * 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _cfg(model_dir: Path, **kw) -> TeacherConfig:
    base = dict(backend="hf", model="tiny", hf_model=str(model_dir), api="completions", max_tokens=8, temperature=1.0)
    base.update(kw)
    return TeacherConfig(**base)


def _req(prompt: str, rid: str = "r0", sample: int = 0, **params) -> TeacherRequest:
    p = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 8, "seed": None, "stop": []}
    p.update(params)
    return TeacherRequest(rid, "q0", sample, ({"role": "user", "content": prompt},), prompt, "tiny", p)


def _naive(backend: HFBackend, prompt: str, steps: int, temperature: float, seed: int) -> list[int]:
    """Reference decoding: full forward each step, argmax (T=0) or multinomial of softmax(l/T)."""
    ids = backend.tokenizer(prompt, return_tensors="pt").input_ids
    eos = backend.tokenizer.eos_token_id
    out: list[int] = []
    gen = torch.manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            logits = backend.model(ids).logits[0, -1].float()  # (V,)
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            out.append(nxt)
            if nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_greedy_and_sampled_generation_match_naive_loops(model_dir):
    backend = make_backend(_cfg(model_dir))
    prompt = "Q: Ann has 3 apples. A:"
    tok = backend.tokenizer
    for temperature, seed in [(0.0, 0), (1.0, 11), (0.7, 5)]:
        res = asyncio.run(backend.complete(_req(prompt, temperature=temperature, seed=seed)))
        ref = _naive(backend, prompt, 8, temperature, seed)
        ended = ref[-1] == tok.eos_token_id
        want = tok.decode(ref[:-1] if ended else ref, skip_special_tokens=True)
        assert res.completion == want, (temperature, seed)
        assert res.tokens_in == len(tok(prompt).input_ids)
        assert res.tokens_out == len(ref)
        assert res.finish_reason == ("stop" if ended else "length")
        assert res.error is None


def test_same_request_same_text_and_samples_differ(model_dir):
    backend = make_backend(_cfg(model_dir))
    torch.manual_seed(123)
    before = torch.rand(1)
    a = asyncio.run(backend.complete(_req("Q: Bob had 10 pears. A:", rid="id-a")))
    a2 = asyncio.run(backend.complete(_req("Q: Bob had 10 pears. A:", rid="id-a")))
    others = [asyncio.run(backend.complete(_req("Q: Bob had 10 pears. A:", rid=f"id-{i}"))).completion for i in range(4)]
    assert a.completion == a2.completion
    assert len({a.completion, *others}) > 1
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # generation left the global RNG alone
    assert request_seed(_req("x", rid="id-a")) == request_seed(_req("y", rid="id-a"))
    assert request_seed(_req("x", seed=42)) == 42


def test_stop_sequences_cut_the_text():
    assert cut_at_stop("a b\nQ: c", ["\nQ:", "zz"]) == ("a b", True)
    assert cut_at_stop("a b Q: c \nQ:", ["\nQ:", "Q:"]) == ("a b ", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    assert cut_at_stop("abc", []) == ("abc", False)


def test_chat_needs_a_chat_template(model_dir):
    with pytest.raises(FatalTeacherError, match="no chat template; set teacher.api=completions"):
        make_backend(_cfg(model_dir, api="chat"))
    backend = make_backend(_cfg(model_dir))
    backend.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    chat = HFBackend(backend.model, backend.tokenizer, chat=True)
    res = asyncio.run(chat.complete(_req("Q: Ann has 3 apples. A:", temperature=0.0)))
    templated = "user: Q: Ann has 3 apples. A:\nassistant:"
    assert res.tokens_in == len(backend.tokenizer(templated).input_ids)
    ref = _naive(backend, templated, 8, 0.0, 0)
    assert res.completion == backend.tokenizer.decode(
        ref[:-1] if ref[-1] == backend.tokenizer.eos_token_id else ref, skip_special_tokens=True
    )


def test_a_missing_model_directory_fails_fast(tmp_path):
    with pytest.raises(FatalTeacherError, match="cannot load"):
        make_backend(_cfg(tmp_path / "nope"))


def test_the_teacher_stage_runs_the_hf_backend(model_dir, tmp_path):
    questions = pa.table(
        {
            "question_id": ["a", "b", "c"],
            "split": ["train"] * 3,
            "question": ["Ann has 3 apples and buys 4.", "Bob had 10 pears.", "Cy has 2 and 2."],
            "meta": ["{}"] * 3,
        }
    )
    cfg = _cfg(model_dir, samples=2, concurrency=4)
    table, stats, summary = teach(questions, cfg, Store(tmp_path / "store"))
    assert table.num_rows == 6 and summary["errors"] == 0 and stats.calls == 6
    # the stage's table holds exactly what the backend gives for each request
    backend = make_backend(cfg)
    by_id = dict(zip(table.column("request_id").to_pylist(), table.column("completion").to_pylist()))
    for req in build_requests(questions, cfg):
        assert by_id[req.request_id] == asyncio.run(backend.complete(req)).completion
