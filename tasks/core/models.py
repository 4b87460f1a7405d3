"""Student models: the embedded LLaMA-shaped default or any HF model, with its tokenizer.

The embedded student is built from a config (no download): a byte-level BPE tokenizer trained
by the `tokenizers` library on the training text, with every digit its own token (an optional
leading space kept, " 1" "2") so that arithmetic is learnable digit by digit, and a small
`LlamaForCausalLM` initialised from a seed. An HF student is any model directory or hub name;
causal LM or seq2seq (T5 family) is read from its config. Models are saved with
`save_pretrained` (safetensors) next to their tokenizer, so one directory is a whole student.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tasks.config.student import EmbeddedShape, StudentConfig
# re-exported for the callers that load a model and then ask its kind; one definition
from tasks.core.forward import is_seq2seq  # noqa: F401

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


# ---- tokenizer -------------------------------------------------------------------------------
def train_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE trained on `corpus`, digits split one per token, wrapped for transformers.

    Byte-level means no unknown tokens and an exact decode (spaces, newlines); the fast
    tokenizer gives character offsets, which step and weight alignment rely on.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not corpus:
        raise ValueError("cannot train the student tokenizer on an empty corpus")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            # after the byte-level map a space is "Ġ": keep it on the first digit only, so
            # "Ġ12" -> "Ġ1" "2" and a number is always spelled digit by digit
            pre_tokenizers.Split(Regex("Ġ?[0-9]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


# ---- building, saving, loading ---------------------------------------------------------------
def build_student(cfg: StudentConfig, corpus: list[str]) -> tuple[Any, Any]:
    """The student model and tokenizer: built from `cfg` (embedded) or loaded (hf).

    `corpus` is the training text the embedded tokenizer is trained on; unused for hf.
    """
    if cfg.kind == "hf":
        return load_model(cfg.name_or_path)
    tokenizer = train_tokenizer(corpus, cfg.vocab_size)
    return embedded_llama(cfg, tokenizer), tokenizer


def embedded_llama(cfg: EmbeddedShape, tokenizer: Any) -> Any:
    """The embedded LLaMA for `tokenizer`, initialised from `cfg.seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_len,
        tie_word_embeddings=True,  # a tiny model spends too much of its budget on the output layer
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # the init reads the global torch RNG: fork it so building a student leaves callers' RNG as is
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config)


def mix_weights(base: Any, fresh: Any, mix: float) -> Any:
    """`base` with every parameter set to mix * base + (1 - mix) * fresh (shrink and perturb).

    Both models have one shape (each tensor the same [*dims]); `fresh` is left as it was. With
    tied embeddings the shared tensor is mixed once. Returns `base`.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    fresh_params = dict(fresh.named_parameters())
    with torch.no_grad():
        for name, p in base.named_parameters():
            q = fresh_params[name]
            if p.shape != q.shape:
                raise ValueError(f"cannot mix {name}: base {tuple(p.shape)} vs fresh {tuple(q.shape)}")
            p.mul_(mix).add_(q, alpha=1.0 - mix)
    return base


def save_model(model: Any, tokenizer: Any, directory: str | Path) -> None:
    """Weights as safetensors (`save_pretrained`) and the tokenizer, in one directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def load_model(name_or_path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a directory or hub name; seq2seq vs causal LM from the config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    source = str(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load a model config from {source!r}: {exc}") from None
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        # GPT-2-like tokenizers have no pad token; the EOS id is only used under attention mask
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_tokenizer(directory: Any) -> Any:
    """The tokenizer saved with a model directory, its pad token set as `load_model` sets it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same_vocab(tok_a: Any, tok_b: Any, what: str) -> None:
    """Raise if `tok_b` differs from the student's `tok_a`; `what` names tok_b ("mentor tokenizer").

    Token-level losses between two models (KD, weights, difficulty) index one vocabulary, so a
    mismatch must stop construction rather than crash (or silently mislead) mid-training.
    """
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va == vb:
        return
    if len(va) != len(vb):
        detail = f"vocab size {len(vb)} vs the student's {len(va)}"
    else:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        detail = f"same size {len(va)} but different token ids, e.g. {diff}"
    raise ValueError(
        f"{what} differs from the student's: {detail}; both models must share the student's "
        f"tokenizer (build the other model from the student's tokenizer directory)"
    )
