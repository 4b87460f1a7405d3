"""Greedy generation whose finished work survives a crash: a rerun generates only what is left.

Evaluating a large split can take hours (hundreds of tokens per question on a CPU or a big
model). `generate_saved` runs `generation.generate_ids` over the same length-sorted batches
that one call would make, grouped into chunks of whole batches; each finished chunk's
completions go to a file in `saved` (the stage's work dir, which survives a failed run and is
cleared on commit). A rerun reads back every chunk whose prompts are unchanged (a digest of
their token ids) and generates the others.

Because a chunk is a run of whole batches of the global length-sorted order, and
`length_sorted_batches` sorts stably, `generate_ids` on a chunk makes exactly the batches the
single call would have made: the completions are the same whether the run was whole or resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

from tasks.core import generation

CHUNK_PROMPTS = 256  # about this many prompts (whole batches) per saved chunk


def chunks_of(lengths: Sequence[int], batch_size: int, chunk_prompts: int) -> list[list[int]]:
    """Prompt indices in chunks of ceil(chunk_prompts / batch_size) whole batches of the global
    length-sorted order (`generation.length_sorted_batches`)."""
    batches = generation.length_sorted_batches(lengths, batch_size)
    per = max(1, -(-chunk_prompts // batch_size))
    return [[i for b in batches[k : k + per] for i in b] for k in range(0, len(batches), per)]


def _digest(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> str:
    h = hashlib.sha256(str(max_new_tokens).encode())
    for p in prompts:
        h.update(b"|" + ",".join(map(str, p)).encode())
    return h.hexdigest()


def _read(path: Path, digest: str, n: int) -> list[str] | None:
    """A saved chunk's completions, or None when absent, unreadable or for other prompts."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    outputs = data.get("outputs") if isinstance(data, dict) else None
    if data.get("digest") != digest or not isinstance(outputs, list) or len(outputs) != n:
        return None
    return outputs


def _write(path: Path, digest: str, outputs: list[str]) -> None:
    """Write-then-rename, so a kill mid-write leaves no half chunk to read back."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"digest": digest, "outputs": outputs}))
    os.replace(tmp, path)


def generate_saved(
    model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int, saved: Path,
    progress: Callable[[int], object] | None = None, chunk_prompts: int | None = None,
) -> tuple[list[str], int]:
    """`generation.generate_ids`'s completions (same order, same tokens), chunk by chunk, each
    chunk saved in `saved`; returns (completions, how many were read back from an earlier run).
    `progress(n)` also counts the prompts read back; `chunk_prompts` defaults to CHUNK_PROMPTS."""
    chunk_prompts = CHUNK_PROMPTS if chunk_prompts is None else chunk_prompts
    saved.mkdir(parents=True, exist_ok=True)
    outputs = [""] * len(prompts)
    restored = 0
    for k, chunk in enumerate(chunks_of([len(p) for p in prompts], batch_size, chunk_prompts)):
        mine = [prompts[i] for i in chunk]
        digest, path = _digest(mine, max_new_tokens), saved / f"chunk-{k:05d}.json"
        got = _read(path, digest, len(chunk))
        if got is None:
            got = generation.generate_ids(model, tokenizer, mine, batch_size, max_new_tokens, progress=progress)
            _write(path, digest, got)
        else:
            restored += len(chunk)
            if progress is not None:
                progress(len(chunk))
        for i, text in zip(chunk, got):
            outputs[i] = text
    return outputs, restored
