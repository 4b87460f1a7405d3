"""Commands that run no flow stay light (issue 14): listing and planning stages (`kpod stages`,
`kpod status`, the plan of a fully cached `kpod run`) import neither Prefect nor torch, so they
answer in about a second instead of four or five."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv", [["stages"], ["status", "smoke"], ["status", "bench-arith-pretrained"]])
def test_planning_commands_import_neither_prefect_nor_torch(tmp_path: Path, argv: list[str]) -> None:
    code = (
        "import sys; from flows.cli import main; rc = main(['--store', sys.argv[1]] + sys.argv[2:]); "
        "print(rc, 'prefect' in sys.modules, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), *argv], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.splitlines()[-1] == "0 False False False", out.stdout[-2000:]


def test_plan_of_every_preset_and_method_loads_no_torch() -> None:
    """Every stage module is imported and every key computed (the import closure is read from
    source, never by importing a module to probe for a submodule)."""
    code = (
        "import sys\n"
        "from tasks.config.pipeline import load_config\n"
        "from tasks.stages.contract import plan\n"
        "from tasks.stages.registry import STAGES\n"
        "from flows.comparison import METHODS\n"
        "for m in METHODS:\n"
        "    plan(load_config('configs/bench-arith.yaml', ['train.method=' + m]), STAGES)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "False False"


def test_a_malformed_data_file_is_refused_before_prefect_starts(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "How many?", "answer": "3"}\nnot json\n')
    code = (
        "import sys; from flows.cli import main; "
        "rc = main(['--store', sys.argv[1], 'run', 'smoke', '--set', 'dataset.source=file', "
        "'--set', 'dataset.task=gsm8k', '--set', 'dataset.path=' + sys.argv[2]]); "
        "print(rc, 'prefect' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store"), str(bad)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "2 False"
    assert f"kpod: {bad}: line 2: not valid JSON" in out.stderr


def test_a_run_prints_its_own_accuracy_not_the_latest_runs(tmp_path: Path) -> None:
    """Runs sharing a store at once (kpod compare) finish in any order: the accuracy a run
    prints comes from its own evaluate key, even when another run is the latest completed."""
    import pyarrow as pa

    from flows.cli import _run_metrics
    from storage.store import Store

    store = Store(tmp_path)
    for key, method in (("mine", "kpod"), ("other", "std_cot")):
        with store.writing("evaluate", key, {}) as w:
            w.write_table("metrics", pa.table({
                "method": [method], "seed": [0], "split": ["test"], "n": [10], "correct": [3],
                "accuracy": [0.3], "ci_low": [0.1], "ci_high": [0.6],
            }))
    store.save_run("r_other", {"run_id": "r_other", "started_at": "2", "status": "completed",
                                "stages": {"evaluate": "other"}})
    rows = _run_metrics(str(tmp_path), [{"stage": "train", "key": "t"}, {"stage": "evaluate", "key": "mine"}])
    assert [r["method"] for r in rows] == ["kpod"]
    assert _run_metrics(str(tmp_path), [{"stage": "train", "key": "t"}]) == []  # no evaluate in this run
