"""The `hf` teacher: a local transformers causal LM sampling rationales.

The model directory (`teacher.hf_model`) is loaded once, offline (`local_files_only`: a
teacher run never downloads). `generate` runs in a worker thread (`asyncio.to_thread`) so the
stage's event loop keeps its async interface; one generation runs at a time (a lock), because
concurrent generations on one CPU model only fight over the same cores.

Sampling follows the request's params (temperature, top_p, max_tokens, stop, seed). Each
request seeds its own RNG, from `seed` when the config gives one and from the request id
otherwise, so a request always yields the same text: a resumed run equals an uninterrupted one,
and sample indices (which differ in id and seed) differ in text.

Chat requests use the tokenizer's chat template; a model without one is a configuration error
(`teacher.api: completions` sends the rendered text prompt instead).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from tasks.teacher_backends.base import FatalTeacherError, TeacherInputError, TeacherRequest, TeacherResult

if TYPE_CHECKING:
    from tasks.config.teacher import TeacherConfig


def request_seed(request: TeacherRequest) -> int:
    """The RNG seed of one request: its `seed` param, else a hash of its id (63 bits)."""
    seed = request.params.get("seed")
    if seed is not None:
        return int(seed)
    return int.from_bytes(hashlib.sha256(request.request_id.encode()).digest()[:8], "big") >> 1


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop sequence, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class HFBackend:
    def __init__(self, model: Any, tokenizer: Any, chat: bool):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat = chat
        self._lock = threading.Lock()
        if chat and not getattr(tokenizer, "chat_template", None):
            raise FatalTeacherError(
                "hf teacher: the model's tokenizer has no chat template; "
                "set teacher.api=completions to send the rendered text prompt"
            )

    def _input_ids(self, request: TeacherRequest) -> torch.Tensor:
        if self.chat:
            ids = self.tokenizer.apply_chat_template(
                list(request.messages), add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer versions
                ids = ids["input_ids"]
            return torch.tensor([list(ids)], dtype=torch.long)
        return self.tokenizer(request.prompt, return_tensors="pt").input_ids

    def generate(self, request: TeacherRequest) -> TeacherResult:
        """One completion, synchronously (called in a worker thread)."""
        p = request.params
        max_new = int(p.get("max_tokens") or 256)
        temperature = float(p.get("temperature", 1.0))
        input_ids = self._input_ids(request)  # (1, T)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        kw: dict[str, Any] = dict(max_new_tokens=max_new, pad_token_id=pad, eos_token_id=eos)
        if temperature > 0:
            # top_k=0: OpenAI semantics (no top-k cut), not transformers' default of 50
            kw.update(do_sample=True, temperature=temperature, top_p=float(p.get("top_p", 1.0)), top_k=0)
        else:
            kw.update(do_sample=False)
        t0 = time.monotonic()
        with self._lock, torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(request_seed(request))  # inside fork_rng: the global RNG is untouched
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw
            )
        new = out[0, input_ids.shape[1] :].tolist()  # (N,) generated ids, eos included
        ended = eos is not None and len(new) > 0 and new[-1] == eos
        if ended:
            new = new[:-1]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, list(p.get("stop") or []))
        finish = "stop" if (ended or stopped) else "length"  # else it ran to max_new tokens
        return TeacherResult(
            completion=text,
            finish_reason=finish,
            tokens_in=int(input_ids.shape[1]),
            tokens_out=len(new) + int(ended),
            latency_s=time.monotonic() - t0,
        )

    async def complete(self, request: TeacherRequest) -> TeacherResult:
        return await asyncio.to_thread(self.generate, request)

    async def aclose(self) -> None:
        return None


def make_backend(cfg: "TeacherConfig") -> HFBackend:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not cfg.hf_model:
        raise TeacherInputError("teacher.hf_model: the hf backend needs a local model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.hf_model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(cfg.hf_model, local_files_only=True)
    except OSError as exc:
        raise FatalTeacherError(f"teacher.hf_model: cannot load {cfg.hf_model!r}: {exc}") from None
    return HFBackend(model, tokenizer, chat=cfg.api == "chat")
