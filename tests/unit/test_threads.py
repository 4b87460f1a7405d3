"""The torch thread default (flows/threads.py, issue 14): one thread for the small embedded
models, torch's default for HF or large ones, OMP_NUM_THREADS (or --threads) always wins."""

from __future__ import annotations

import pytest

from flows.threads import ENV, SMALL_PARAMS, apply_threads, embedded_params, thread_default
from tasks.config.pipeline import load_config


def test_embedded_params_counts_an_llama_shape() -> None:
    cfg = load_config("configs/smoke.yaml").student  # hidden 32, 1 layer, intermediate 64, vocab 300
    assert embedded_params(cfg, 300) == 2 * 300 * 32 + 1 * (4 * 32 * 32 + 3 * 32 * 64)


def test_small_embedded_gets_one_thread_big_and_hf_keep_torch_default(monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert thread_default(load_config("configs/demo.yaml")) == 1
    big = load_config(None, ["student.hidden=4096", "student.layers=4", "student.heads=32", "student.intermediate=11008"])
    assert embedded_params(big.student, big.student.vocab_size) > SMALL_PARAMS
    assert thread_default(big) is None
    hf = load_config(None, ["student.kind=hf", "student.name_or_path=/some/model"])
    assert thread_default(hf) is None


@pytest.mark.parametrize(("env", "want"), [("3", 3), ("1", 1), ("0", 1), ("many", 1)])
def test_the_environment_wins_when_it_names_a_count(monkeypatch, env: str, want: int) -> None:
    monkeypatch.setenv(ENV, env)
    assert thread_default(load_config("configs/demo.yaml")) == want  # "0" and junk: the default


def test_apply_threads_sets_torch_and_the_environment(monkeypatch) -> None:
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv(ENV, raising=False)
    try:
        apply_threads(None)
        assert torch.get_num_threads() == before
        apply_threads(1)
        assert torch.get_num_threads() == 1 and __import__("os").environ[ENV] == "1"
    finally:
        torch.set_num_threads(before)
