"""bench/methods.py: the job order and the per-method summary of the method table."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "bench" / "methods.py"


@pytest.fixture(scope="module")
def methods():
    spec = importlib.util.spec_from_file_location("bench_methods", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_job_order_starts_each_seed_with_the_stage_builders(methods):
    jobs = methods.job_order(["std_cot", "kpod", "mentor_kd", "kpod_no_weights"], [0, 1])
    assert jobs == [("kpod", 0), ("mentor_kd", 0), ("std_cot", 0), ("kpod_no_weights", 0),
                    ("kpod", 1), ("mentor_kd", 1), ("std_cot", 1), ("kpod_no_weights", 1)]
    assert methods.job_order(["std_cot"], [2]) == [("std_cot", 2)]


def test_summary_mean_and_sample_std_per_split(methods):
    rows = [("a", 0, "test", 0.40), ("a", 1, "test", 0.50), ("a", 2, "test", 0.60),
            ("a", 0, "val", 0.30), ("b", 0, "test", 0.25)]
    out = methods.summarise(rows)
    t = out["a"]["splits"]["test"]
    assert t["n_seeds"] == 3 and t["mean"] == pytest.approx(0.5)
    # sample standard deviation (n - 1), as the paper-style "mean +- std" over seeds
    assert t["std"] == pytest.approx(math.sqrt(((0.1) ** 2 + 0 + (0.1) ** 2) / 2))
    assert out["a"]["splits"]["val"] == {"n_seeds": 1, "mean": 0.30, "std": 0.0}
    assert out["a"]["seeds"][1] == {"test": 0.50}
    assert out["b"]["splits"]["test"]["n_seeds"] == 1


def test_per_step_and_per_epoch_means_over_seeds_and_the_figure(methods, tmp_path):
    rows = [("a", 2, 0.5), ("a", 2, 0.7), ("a", 3, 0.1), ("b", 2, 1.0)]  # (method, steps, acc) per seed
    assert methods.mean_by(rows) == {("a", 2): pytest.approx(0.6), ("a", 3): 0.1, ("b", 2): 1.0}
    out = tmp_path / "val.png"
    methods.plot_curves({("a", 2): 0.3, ("a", 4): 0.5, ("b", 2): 0.2}, ["a", "b"], out)
    from PIL import Image

    image = Image.open(out).convert("RGB")
    assert image.size[0] > 300 and len(image.getcolors(maxcolors=1 << 20)) > 10  # drawn, not blank
