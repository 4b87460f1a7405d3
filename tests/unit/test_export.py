"""`kpod export`: HF folders from one recorded run (the smoke store, no Prefect), loadable back
with `datasets.load_from_disk` and `AutoModelForCausalLM.from_pretrained`, cards without secrets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from storage.store import Store
from tasks.core.export import MARK, export_run
from tests.support.export_store import KEY_ENV, SENTINEL, SmokeStore, smoke_store


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> SmokeStore:
    return smoke_store(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(smoke: SmokeStore, tmp_path_factory) -> Path:
    """The default run (run_kpod) exported, with the sentinel key in the environment."""
    out = tmp_path_factory.mktemp("export") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, SENTINEL)
        mp.setenv("OPENAI_API_KEY", SENTINEL)
        return export_run(smoke.store, out=out)


def _table(smoke: SmokeStore, run: str, stage: str, table: str):
    return smoke.store.read_table(stage, smoke.keys[run][stage], table)


@pytest.mark.parametrize("table,stage", [("rationales", "rationales"), ("steps", "rationales"), ("token_weights", "weights")])
def test_datasets_load_back_with_the_tables_rows_and_columns(smoke, exported, table, stage) -> None:
    from datasets import load_from_disk

    want = _table(smoke, "run_kpod", stage, table)
    got = load_from_disk(str(exported / "datasets" / table))
    assert got.num_rows == want.num_rows > 0
    assert got.column_names == want.column_names
    assert got[0] == want.slice(0, 1).to_pylist()[0]


def test_model_loads_with_auto_classes_and_computes_the_students_logits(smoke, exported, one_thread) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.core.models import load_model

    model = AutoModelForCausalLM.from_pretrained(str(exported / "model")).eval()
    tok = AutoTokenizer.from_pretrained(str(exported / "model"))
    ref, ref_tok = load_model(smoke.store.file_path("train", smoke.keys["run_kpod"]["train"], "model"))
    text = "Q: Tom has 3 apples and buys 4 more. How many apples does he have?\nA:"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        got, want = model(ids).logits, ref.eval()(ids).logits
    assert got.shape == want.shape and torch.equal(got, want)
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def test_cards_state_the_run_metrics_and_teacher_and_no_secret(smoke, exported) -> None:
    metrics = {r["split"]: r for r in _table(smoke, "run_kpod", "evaluate", "metrics").to_pylist()}
    calls = _table(smoke, "run_kpod", "teacher", "teacher_calls")
    for card in (exported / "model" / "README.md", exported / "datasets" / "README.md"):
        text = card.read_text()
        assert "run_kpod" in text and smoke.keys["run_kpod"]["train"] in text
        for split in ("val", "test"):
            m = metrics[split]
            assert f"| {split} | {m['n']} | {m['accuracy']:.3f} | [{m['ci_low']:.3f}, {m['ci_high']:.3f}] |" in text
        assert f"{sum(calls.column('tokens_in').to_pylist())} tokens in" in text
        assert "`scripted`" in text and "sha256 `" in text and "method: kpod" in text
    assert json.loads((exported / MARK).read_text())["stages"]["train"] == smoke.keys["run_kpod"]["train"]
    files = [p for p in exported.rglob("*") if p.is_file()]
    assert len(files) > 10
    assert not [p for p in files if SENTINEL.encode() in p.read_bytes()]


def test_std_cot_run_has_no_token_weights(smoke, tmp_path, capsys) -> None:
    assert main(["--store", str(smoke.store.root), "export", "--run", "run_std", "--out", str(tmp_path / "x")]) == 0
    assert sorted(p.name for p in (tmp_path / "x" / "datasets").iterdir()) == ["README.md", "rationales", "steps"]
    assert capsys.readouterr().out.strip() == str(tmp_path / "x")


def _fails(argv: list[str], capsys) -> str:
    capsys.readouterr()  # drop what earlier commands printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kpod: ")
    return err


def test_refusals_are_one_line(smoke, tmp_path, capsys) -> None:
    root = str(smoke.store.root)
    (tmp_path / "empty-store").mkdir()
    assert "no run recorded" in _fails(["--store", str(tmp_path / "empty-store"), "export"], capsys)
    assert "no run 'nope'" in _fails(["--store", root, "export", "--run", "nope"], capsys)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert "holds no kpod export" in _fails(["--store", root, "export", "--out", str(other), "--force"], capsys)
    assert (other / "notes.txt").read_text() == "keep me"


def test_an_existing_export_is_replaced_only_with_force(smoke, tmp_path, capsys) -> None:
    root, out = str(smoke.store.root), str(tmp_path / "e")
    assert main(["--store", root, "export", "--run", "run_std", "--out", out]) == 0
    assert "--force" in _fails(["--store", root, "export", "--out", out], capsys)
    assert main(["--store", root, "export", "--out", out, "--force"]) == 0
    assert json.loads((Path(out) / MARK).read_text())["run_id"] == "run_kpod"
    assert not list(tmp_path.glob(".*"))  # no temp or old export left beside it


def test_a_run_without_a_trained_student_is_refused(tmp_path, smoke, capsys) -> None:
    store = Store(tmp_path / "s")
    keys = dict(smoke.keys["run_std"], train="0000000000000000")
    store.save_run("half", {"run_id": "half", "started_at": "1", "stages": keys, "status": "completed"})
    assert "no complete dataset, teacher, rationales, train" in _fails(["--store", str(store.root), "export"], capsys)


def test_the_cli_module_and_export_do_not_import_prefect() -> None:
    code = "import sys, flows.cli, tasks.core.export; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def test_push_without_a_token_stops_before_any_request(exported, monkeypatch) -> None:
    """The push path is never run against the Hub in tests; without a token it is refused first."""
    import huggingface_hub

    from tasks.core.export import ExportError, push_to_hub

    # whatever login this machine has: the test must never reach the Hub
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ExportError, match="needs a Hugging Face token"):
        push_to_hub(exported, "someone/kpod-test")
