"""Generation whose finished work survives a crash: a rerun generates only what is left.

Evaluating a large split, or sampling a mentor's rationales, can take hours (hundreds of tokens
per prompt on a CPU or a big model). `generate_saved` runs the caller's generation (greedy
`generation.generate_ids`, or `sampling.sample_ids` with a seed per prompt) over the
length-sorted batches that one call would make, grouped into chunks of whole batches; each
finished chunk's completions go to a file in `saved` (the stage's work dir, which survives a
failed run and is cleared on commit). A rerun reads back every chunk whose prompts are
unchanged (a digest of their token ids, seeds, settings and the model's files) and generates
the others.

Because a chunk is a run of whole batches of the global length-sorted order, and
`length_sorted_batches` sorts stably, generation on a chunk makes exactly the batches the
single call would have made: the completions are the same whether the run was whole or resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

from tasks.core import generation

# batches per saved chunk: one, so a crash loses at most the batch in flight (a file per batch
# costs about a millisecond; a batch of a large model, minutes)
CHUNK_BATCHES = 1


def model_stamp(model_dir: Path) -> str:
    """Name, size and mtime of every file of a saved model, for a fingerprint: a model written
    again under the same key (`kpod run --force train`) makes the saved chunks stale."""
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file())
    return ";".join(f"{p.relative_to(model_dir)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def chunks_of(lengths: Sequence[int], batch_size: int, chunk_batches: int) -> list[list[int]]:
    """Prompt indices in chunks of `chunk_batches` whole batches of the global length-sorted
    order (`generation.length_sorted_batches`)."""
    batches = generation.length_sorted_batches(lengths, batch_size)
    per = max(1, chunk_batches)
    return [[i for b in batches[k : k + per] for i in b] for k in range(0, len(batches), per)]


def _digest(prompts: Sequence[Sequence[int]], tags: Sequence[object], fingerprint: str) -> str:
    """What a chunk was generated for: its prompts' token ids, each prompt's tag (a sampling
    seed) and the caller's fingerprint (max_new_tokens, temperature, ...)."""
    h = hashlib.sha256(fingerprint.encode())
    for p, tag in zip(prompts, tags):
        h.update(f"|{tag}|".encode() + ",".join(map(str, p)).encode())
    return h.hexdigest()


def _read(path: Path, digest: str, n: int) -> list[str] | None:
    """A saved chunk's completions, or None when absent, unreadable or for other prompts."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("digest") != digest:
        return None
    outputs = data.get("outputs")
    return outputs if isinstance(outputs, list) and len(outputs) == n else None


def _write(path: Path, digest: str, outputs: list[str]) -> None:
    """Write-then-rename, so a kill mid-write leaves no half chunk to read back."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"digest": digest, "outputs": outputs}))
    os.replace(tmp, path)


# generate(indices, progress): the completions of prompts[i] for i in indices, in that order
Generate = Callable[[list[int], Callable[[int], object] | None], list[str]]


def generate_saved(
    generate: Generate, prompts: Sequence[Sequence[int]], batch_size: int, saved: Path,
    progress: Callable[[int], object] | None = None, fingerprint: str = "",
    tags: Sequence[object] | None = None, chunk_batches: int | None = None,
) -> tuple[list[str], int]:
    """The completions `generate` gives for every prompt (same order, same tokens as one call
    over all of them), chunk by chunk, each chunk saved in `saved`; returns (completions, how
    many were read back from an earlier run). `generate` must batch as `generation.generate_ids`
    does (`length_sorted_batches`, `batch_size`). `progress(n)` also counts the prompts read
    back; `chunk_batches` defaults to CHUNK_BATCHES."""
    chunk_batches = CHUNK_BATCHES if chunk_batches is None else chunk_batches
    tags = [""] * len(prompts) if tags is None else tags
    saved.mkdir(parents=True, exist_ok=True)
    outputs = [""] * len(prompts)
    restored = 0
    for k, chunk in enumerate(chunks_of([len(p) for p in prompts], batch_size, chunk_batches)):
        digest = _digest([prompts[i] for i in chunk], [tags[i] for i in chunk], fingerprint)
        path = saved / f"chunk-{k:05d}.json"
        got = _read(path, digest, len(chunk))
        if got is None:
            got = generate(chunk, progress)
            _write(path, digest, got)
        else:
            restored += len(chunk)
            if progress is not None:
                progress(len(chunk))
        for i, text in zip(chunk, got):
            outputs[i] = text
    return outputs, restored
