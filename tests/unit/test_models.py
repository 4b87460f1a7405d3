import pytest
import torch

from tasks.core.formatting import serialize
from tasks.core.models import (
    StudentConfig,
    assert_same_vocab,
    build_student,
    is_seq2seq,
    load_model,
    save_model,
    train_tokenizer,
)

CORPUS = [
    serialize(f"Ann has {a} pens and buys {b} more. How many pens?", f"{a} + {b} = {a + b} pens.", str(a + b))
    for a, b in [(12, 7), (30, 45), (8, 9), (101, 23)]
]
TINY = dict(hidden=32, layers=1, heads=2, intermediate=64, max_len=128, vocab_size=320)


def test_tokenizer_splits_digits_and_round_trips():
    tok = train_tokenizer(CORPUS * 3, 320)
    text = "Ann has 1234 pens.\nA: 12 + 7 = 19"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == text  # byte-level: exact decode, newlines kept
    digits = [p.strip() for p in pieces if any(ch.isdigit() for ch in p)]
    assert all(len(d) == 1 for d in digits), digits  # one digit per token
    assert tok.pad_token_id is not None and tok.bos_token_id is not None and tok.eos_token_id is not None


def test_tokenizer_training_is_deterministic():
    a, b = train_tokenizer(CORPUS, 320), train_tokenizer(list(CORPUS), 320)
    assert a.get_vocab() == b.get_vocab()


def test_embedded_student_is_seeded_and_saves_and_loads(tmp_path):
    cfg = StudentConfig(**TINY, seed=3)
    m1, tok = build_student(cfg, CORPUS)
    m2, _ = build_student(cfg, CORPUS)
    for (n, p), (_, q) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p, q), n
    assert m1.config.vocab_size == len(tok) and not is_seq2seq(m1)
    save_model(m1, tok, tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").is_file()
    m3, tok3 = load_model(tmp_path / "student")
    assert type(m3).__name__ == "LlamaForCausalLM"
    assert tok3.get_vocab() == tok.get_vocab() and tok3.pad_token_id == tok.pad_token_id
    ids = torch.tensor([tok(CORPUS[0])["input_ids"]])
    m1.eval(), m3.eval()
    with torch.no_grad():
        assert torch.allclose(m1(ids).logits, m3(ids).logits, atol=1e-6)


def test_seq2seq_detected_from_config(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    tok = train_tokenizer(CORPUS, 320)
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    )
    save_model(t5, tok, tmp_path / "t5")
    model, _ = load_model(tmp_path / "t5")
    assert is_seq2seq(model) and type(model).__name__ == "T5ForConditionalGeneration"
    # an hf student is loaded, not built
    hf, _ = build_student(StudentConfig(kind="hf", name_or_path=str(tmp_path / "t5")), [])
    assert is_seq2seq(hf)


def test_vocab_guard():
    a = train_tokenizer(CORPUS, 320)
    assert_same_vocab(a, train_tokenizer(CORPUS, 320), "mentor tokenizer")
    b = train_tokenizer(CORPUS + ["zebra quokka xylophone " * 5], 330)
    with pytest.raises(ValueError, match=r"mentor tokenizer differs from the student's: vocab size"):
        assert_same_vocab(a, b, "mentor tokenizer")


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="name_or_path is required"):
        StudentConfig(kind="hf")
    with pytest.raises(ValueError, match="divisible"):
        StudentConfig(hidden=30, heads=4)
    with pytest.raises(FileNotFoundError, match="cannot load a model config"):
        load_model(tmp_path / "nothing-here")


def test_tokenizer_corpus_is_training_text_only():
    import pyarrow as pa

    from tasks.stages.sources import tokenizer_corpus

    questions = pa.table({
        "question_id": ["a", "b"], "split": ["train", "test"],
        "question": ["Ann has 3 pens?", "Secret test question?"], "answer": ["3", "4"],
    })
    rationales = pa.table({
        "question_id": ["a", "a", "b"], "text": ["She has 3.", "She has 9.", "It is 4."],
        "correct": [True, False, True],
    })
    assert tokenizer_corpus(questions, rationales) == [
        "Q: Ann has 3 pens?\nA:",
        "Q: Ann has 3 pens?\nA: She has 3. Therefore, the answer is 3.",
    ]
