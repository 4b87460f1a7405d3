"""`kpod compare` (the kpod-compare flow) on configs/smoke.yaml under the Prefect test harness:
issue 17's acceptance command, the comparison's tables, shared stages computed once, and a
failed run that neither stops the others nor loses their rows."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from storage.catalog import query
from storage.store import Store

pytestmark = pytest.mark.e2e

METHODS = ["std_cot", "kpod", "mentor_kd"]
SHARED = ("dataset", "teacher", "rationales", "student")  # every method's runs have these keys


@pytest.fixture(scope="module")
def compared(prefect_harness, tmp_path_factory) -> tuple[str, int, str]:
    """The acceptance command, once: (store, exit status, stdout)."""
    import contextlib
    import io

    from flows.cli import main

    store = str(tmp_path_factory.mktemp("compare") / "store")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["--store", store, "compare", "configs/smoke.yaml", "--methods", *METHODS, "--seeds", "0", "1"])
    return store, rc, out.getvalue()


def test_compare_writes_one_row_per_run(compared) -> None:
    store, rc, out = compared
    assert rc == 0, out
    record = Store(store).list_comparisons()[0]  # the acceptance command's (others follow)
    assert record["status"] == "completed" and len(record["runs"]) == 6
    cid = record["comparison_id"]
    assert cid in out
    cols, rows = query(Store(store), f"select method, seed, status, val_accuracy, test_accuracy, train_tokens, run_id "
                                     f"from comparisons where comparison_id = '{cid}' order by method, seed")
    assert [(r[0], r[1], r[2]) for r in rows] == [(m, s, "completed") for m in sorted(METHODS) for s in (0, 1)]
    assert all(0.0 <= r[3] <= 1.0 and 0.0 <= r[4] <= 1.0 and r[5] > 0 for r in rows), rows
    # each row is its run's own evaluation: the same figures as that run's metrics table
    for method, seed, _, val, test, _, run_id in rows:
        _, metrics = query(Store(store), "select split, accuracy, method, seed from metrics", run_id)
        got = {sp: (a, m, s) for sp, a, m, s in metrics}
        assert got["val"] == (val, method, seed) and got["test"] == (test, method, seed)
    _, steps = query(Store(store), f"select method, seed, split, sum(n) from comparison_steps "
                                   f"where comparison_id = '{cid}' group by all")
    assert len(steps) == 12 and {r[3] for r in steps} == {12}  # smoke: 12 val and 12 test questions


def test_shared_stages_are_computed_once(compared) -> None:
    store, _, _ = compared
    st = Store(store)
    runs = [st.load_run(r["run_id"]) for r in st.list_comparisons()[0]["runs"]]
    for stage in SHARED:
        assert len({r["stages"][stage] for r in runs}) == 1  # one key for every run
        computed = [r for r in runs for o in r["outcomes"] if o["stage"] == stage and o["status"] == "computed"]
        assert len(computed) == 1, (stage, [r["run_id"] for r in computed])
    # mentor_kd's seeds share the mentor; no other method has it
    mentor = [o["status"] for r in runs for o in r["outcomes"] if o["stage"] == "mentor_train"]
    assert sorted(mentor) == ["cached", "computed"]


def test_runs_at_once_is_a_bound(compared) -> None:
    store, _, _ = compared
    st = Store(store)
    spans = [(datetime.fromisoformat(r["started_at"]), datetime.fromisoformat(r["finished_at"]))
             for r in (st.load_run(e["run_id"]) for e in st.list_comparisons()[0]["runs"])]
    for start, _ in spans:  # runs under way at each run's start (itself included)
        assert sum(a <= start < b for a, b in spans) <= 2, spans


def test_a_failed_run_keeps_the_others(compared) -> None:
    from flows.compare import kpod_compare
    from tasks.config.pipeline import load_config

    store, _, _ = compared
    # a predictor directory that does not exist: the kpod run's weights stage fails; std_cot
    # has no weights stage and completes
    cfg = load_config("configs/smoke.yaml", ["weights.predictor=/nonexistent/predictor"])
    with pytest.raises(RuntimeError, match="1 of 2 runs failed: kpod seed 0"):
        kpod_compare(config=cfg, methods=["kpod", "std_cot"], seeds=[0], store=store, runs_at_once=1, report=False)
    record = Store(store).load_comparison()
    assert record["status"] == "failed" and [r["status"] for r in record["runs"]] == ["failed", "completed"]
    _, rows = query(Store(store), f"select method, status, test_accuracy from comparisons "
                                  f"where comparison_id = '{record['comparison_id']}' order by method")
    assert rows[0][:2] == ("kpod", "failed") and rows[0][2] is None
    assert "/nonexistent/predictor" in record["runs"][0]["error"]  # the run's own error tail
    assert rows[1][:2] == ("std_cot", "completed") and rows[1][2] is not None


def test_bad_requests_are_one_line_before_any_run(tmp_path: Path, capsys) -> None:
    from flows.cli import main

    store = str(tmp_path / "store")
    for argv, message in [
        (["--methods", "std_cot", "kpood"], "unknown method 'kpood'"),
        (["--seeds", "0", "0"], "each method and each seed may be named once"),
        (["--runs-at-once", "0"], "runs_at_once must be at least 1"),
    ]:
        assert main(["--store", store, "compare", "smoke", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (Path(store) / "runs").exists()  # refused before anything ran


def test_acceptance_report_export_lineage(compared, tmp_path: Path, capsys) -> None:
    """Issue 17's acceptance on the comparison's store: the page the flow wrote renders in
    Chromium, one run exports to folders HF loads, and one test question's lineage is queryable."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from flows.cli import main
    from storage.catalog import schema_name
    from tests.e2e.prefect_ui import render_page

    store, _, _ = compared
    st = Store(store)
    record = st.list_comparisons()[0]
    page = st.root / "reports" / f"{record['comparison_id']}.html"
    html = page.read_text()
    assert all(m in html for m in METHODS)
    seen = render_page(page.as_uri(), tmp_path / "comparison.png")
    assert seen["errors"] == [] and seen["images"]
    assert all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen["images"]
    assert (tmp_path / "comparison.png").stat().st_size > 10_000

    kpod_run = next(r["run_id"] for r in record["runs"] if r["method"] == "kpod")
    out = tmp_path / "export"
    assert main(["--store", store, "export", "--run", kpod_run, "--out", str(out)]) == 0
    capsys.readouterr()
    assert len(load_from_disk(str(out / "datasets" / "token_weights"))) > 0
    assert AutoModelForCausalLM.from_pretrained(str(out / "model")).num_parameters() > 0

    sch = schema_name(kpod_run)
    _, rows = query(st, f"select question_id from {sch}.predictions where split = 'test' limit 1", kpod_run)
    qid = rows[0][0]
    _, lineage = query(st, f"select prediction_correct, evaluate_key from {sch}.lineage where question_id = '{qid}'",
                       kpod_run)
    assert lineage and lineage[0][0] is not None and lineage[0][1] == st.load_run(kpod_run)["stages"]["evaluate"]
    assert main(["--store", store, "lineage", qid, "--run", kpod_run]) == 0
    assert qid in capsys.readouterr().out
