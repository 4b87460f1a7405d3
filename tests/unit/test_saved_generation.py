"""Generation that survives a crash (evaluate, mentor_augment): `generate_saved` equals one
`generate_ids` / `sample_ids` call, and a rerun after a kill generates only the chunks not saved."""

from __future__ import annotations

import pytest
import torch

from tasks.config.student import StudentConfig
from tasks.core import generation
from tasks.core.models import build_student
from tasks.core.saved_generation import chunks_of, generate_saved, model_stamp
from tasks.core.sampling import sample_ids


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = build_student(StudentConfig(hidden=16, layers=1, heads=2, intermediate=32, vocab_size=300),
                               ["Q: what is 1 + 2?\nA: 3", "Q: a b c d e f\nA: g"])
    prompts = [generation.prompt_ids(tok, f"Q: what is {i} + {'1 ' * (i % 4)}?\nA:", False) for i in range(11)]
    return model, tok, prompts


def test_chunks_are_whole_batches_of_the_global_order():
    lengths = [3, 9, 9, 1, 5, 7, 7, 2]
    batches = generation.length_sorted_batches(lengths, 3)
    chunks = chunks_of(lengths, 3, chunk_batches=2)
    assert chunks == [batches[0] + batches[1], batches[2]]
    assert sorted(i for c in chunks for i in c) == list(range(8))
    # a chunk re-sorted by generate_ids makes the very batches of the single call
    for chunk in chunks:
        again = generation.length_sorted_batches([lengths[i] for i in chunk], 3)
        assert [[chunk[j] for j in b] for b in again] == [b for b in batches if b[0] in chunk]


def greedy(model, tok, prompts, max_new_tokens=6):
    def generate(idx, progress):
        return generation.generate_ids(model, tok, [prompts[i] for i in idx], 2, max_new_tokens, progress=progress)
    return generate


def test_saved_generation_equals_one_call_and_resumes_after_a_kill(tiny, tmp_path, monkeypatch):
    model, tok, prompts = tiny
    whole = generation.generate_ids(model, tok, prompts, 2, 6)
    real, calls = generation.generate_ids, []

    def dies_on_the_third_chunk(m, t, ps, *args, **kw):
        calls.append(len(ps))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped mid-evaluation
        return real(m, t, ps, *args, **kw)

    monkeypatch.setattr(generation, "generate_ids", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        generate_saved(greedy(model, tok, prompts), prompts, 2, tmp_path, chunk_batches=2)
    assert calls == [4, 4, 3] and len(list(tmp_path.glob("chunk-*.json"))) == 2
    monkeypatch.setattr(generation, "generate_ids", lambda m, t, ps, *a, **k: calls.append(len(ps)) or real(m, t, ps, *a, **k))
    calls.clear()
    seen = []
    outputs, restored = generate_saved(greedy(model, tok, prompts), prompts, 2, tmp_path, progress=seen.append,
                                       chunk_batches=2)
    assert calls == [3] and restored == 8 and sum(seen) == 11  # only the unsaved chunk is generated
    assert outputs == whole


def test_a_saved_chunk_for_other_prompts_is_generated_again(tiny, tmp_path):
    model, tok, prompts = tiny
    generate_saved(greedy(model, tok, prompts), prompts, 2, tmp_path, chunk_batches=2, fingerprint="6")
    (tmp_path / "chunk-00001.json").write_text("{half a file")  # a torn write is never read back
    (tmp_path / "chunk-00002.json").write_text("[1, 2]")  # nor a file of another shape
    changed = [p + [p[-1]] for p in prompts]  # other prompts, same lengths order
    outputs, restored = generate_saved(greedy(model, tok, changed), changed, 2, tmp_path, chunk_batches=2,
                                       fingerprint="6")
    assert restored == 0 and outputs == generation.generate_ids(model, tok, changed, 2, 6)
    _, restored = generate_saved(greedy(model, tok, prompts, 7), prompts, 2, tmp_path, chunk_batches=2,
                                 fingerprint="7")
    assert restored == 0  # the fingerprint (here max_new_tokens) is part of what a chunk was made for


def test_sampled_chunks_resume_with_the_same_samples(tiny, tmp_path):
    """Sampling with a seed per prompt (mentor_augment): a resumed run gives one call's samples;
    other seeds are other samples, never read back."""
    model, tok, prompts = tiny
    seeds = list(range(100, 111))

    def sampler(seeds):
        return lambda idx, progress: sample_ids(model, tok, [prompts[i] for i in idx], [seeds[i] for i in idx],
                                                1.0, 20, 6, 2, progress=progress)

    whole = sample_ids(model, tok, prompts, seeds, 1.0, 20, 6, 2)
    first, _ = generate_saved(sampler(seeds), prompts, 2, tmp_path, tags=seeds, chunk_batches=2)
    for path in sorted(tmp_path.glob("chunk-*.json"))[1:]:
        path.unlink()  # as if killed after the first chunk
    again, restored = generate_saved(sampler(seeds), prompts, 2, tmp_path, tags=seeds, chunk_batches=2)
    assert first == again == whole and restored == 4
    other = [s + 1000 for s in seeds]
    _, restored = generate_saved(sampler(other), prompts, 2, tmp_path, tags=other, chunk_batches=2)
    assert restored == 0


def test_a_model_written_again_changes_its_stamp(tiny, tmp_path):
    """The stamp enters the fingerprint: a model saved again under the same key (`--force train`)
    never reads back the chunks its predecessor generated."""
    import os

    from tasks.core.models import save_model

    model, tok, _ = tiny
    save_model(model, tok, tmp_path / "m")
    first = model_stamp(tmp_path / "m")
    assert first == model_stamp(tmp_path / "m") and "safetensors" in first
    weights = next((tmp_path / "m").rglob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert model_stamp(tmp_path / "m") != first
