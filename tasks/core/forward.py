"""The one teacher-forced forward pass, shared by every stage that scores targets.

Training, difficulty scoring and mentor logits all need "the model's prediction for each
labelled token". Decoder-only and seq2seq models produce it differently:

  decoder-only: logits[:, t] predicts input_ids[:, t + 1], so logits and labels are shifted
                against each other by one position;
  seq2seq:      the decoder is fed the labels shifted right (start token first), so
                logits[:, t] already predicts labels[:, t].

Getting the shift wrong silently trains on the wrong targets, so it lives here, once, and
callers receive *aligned* tensors: logits[b, t] is the prediction for labels[b, t].

Shapes: B batch, S input length, T target length, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tasks.core.formatting import IGNORE  # noqa: F401 (re-exported: the label of "no loss here")


class Aligned(NamedTuple):
    """Outputs of `aligned_logits`: logits[b, t] is the prediction for labels[b, t].

    logits: [B, T, V] float (T = S - 1 for decoder-only models).
    labels: [B, T] long, IGNORE where no loss.
    extras: per-token tensors [B, T, ...] from the batch, aligned exactly as labels.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    extras: dict[str, torch.Tensor]


def resolve_device(choice: str) -> torch.device:
    """Map a config choice ("auto", "cpu", "cuda", "cuda:N", "mps") to a torch.device.

    "auto" picks CUDA when present, else the CPU. An explicit "cuda" or "cuda:N" without CUDA
    fails loudly rather than silently running on the CPU for hours.
    """
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice in ("cpu", "mps"):
        return torch.device(choice)
    if choice == "cuda" or _is_cuda_index(choice):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {choice!r} was chosen but CUDA is not available on this machine")
        return torch.device(choice)
    raise ValueError(f"unknown device choice {choice!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def _is_cuda_index(choice: str) -> bool:
    head, _, index = choice.partition(":")
    return head == "cuda" and index.isdigit()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP / accelerate wrap the HF model in `.module`; the config and the decoder-input helper
    # live on the inner model, while the forward call still goes through the wrapper.
    return getattr(model, "module", model)


def is_seq2seq(model: torch.nn.Module) -> bool:
    """True for encoder-decoder models (T5, BART, ...), False for decoder-only ones."""
    config = getattr(_unwrap(model), "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))


def aligned_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, extra: tuple[str, ...] = ()
) -> Aligned:
    """Run one teacher-forced forward pass and return logits aligned with their labels.

    batch:
      input_ids      [B, S] long, right-padded.
      attention_mask [B, S] 0/1, 0 on padding.
      labels         decoder-only: [B, S], IGNORE on the prompt and padding;
                     seq2seq:      [B, T], IGNORE on padding.
      extra names    per-token tensors [B, T, ...] whose first two dims are labels' (loss
                     weights [B, T]; a mentor's cached top-k ids [B, T, K]).

    Returns Aligned(logits, labels, extras):
      decoder-only: logits [B, S-1, V], labels [B, S-1] and extras [B, S-1, ...] (dropped
                    first label, which nothing predicts; dropped last logit, which predicts
                    past the end).
      seq2seq:      logits [B, T, V], labels [B, T] and extras unchanged.
    Only slicing, no copies, so the caller decides about dtype and memory.
    """
    labels = batch["labels"]
    for name in extra:
        if batch[name].shape[:2] != labels.shape:
            raise ValueError(
                f"aligned_logits: extra {name!r} has shape {tuple(batch[name].shape)}, "
                f"labels have {tuple(labels.shape)}"
            )
    extras = {name: batch[name] for name in extra}

    if is_seq2seq(model):
        # Start token + labels[:, :-1] (IGNORE turned into pad): the decoder at position t has
        # seen exactly the targets before t, so its output is already aligned with labels[t].
        decoder_input_ids = _unwrap(model).prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=decoder_input_ids,
        ).logits
        return Aligned(logits, labels, extras)

    if labels.shape != batch["input_ids"].shape:
        raise ValueError(
            f"aligned_logits: a decoder-only model needs labels shaped like input_ids; got "
            f"{tuple(labels.shape)} vs {tuple(batch['input_ids'].shape)}"
        )
    # Labels are not passed to the model: HF would compute (and we would discard) a loss.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # position t predicts token t + 1
    shifted = {name: x[:, 1:] for name, x in extras.items()}
    return Aligned(logits[:, :-1], labels[:, 1:], shifted)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of aligned logits.

    logits: [B, T, V] any float dtype; labels: [B, T] long, IGNORE where no loss.
    Returns [B, T] float32, -log softmax(logits)[label] at labelled positions and 0 at IGNORE.
    Computed in float32: a bf16 log-softmax over a large vocabulary loses most of its digits.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"token_nll: expected logits [B,T,V] and labels [B,T]; got "
            f"{tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    B, T, V = logits.shape
    nll = F.cross_entropy(
        logits.float().reshape(B * T, V), labels.reshape(B * T), ignore_index=IGNORE, reduction="none"
    )
    return nll.view(B, T)
