"""`kpod report`: the HTML pages of a comparison and of a run, built from a real smoke store.

The store (tests/support/smoke_store.py) holds std_cot and kpod runs for seeds 0 and 1, a
failed mentor_kd run and a comparison of them; its numbers are read back here with SQL and
looked for on the pages. No Prefect.
"""

from __future__ import annotations

import base64
import io
import re
import sys

import pytest

from storage.catalog import query, schema_name
from tests.support import smoke_store

IMG = re.compile(r"<img alt='[^']*' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tasks.core.report_data import write_report

    b = smoke_store.shared(tmp_path_factory)
    store = b["store"]
    pages = {
        "cmp": write_report(store, "cmp_test").read_text(),
        "kpod": write_report(store, "20260101_000000_kpod_0").read_text(),
        "std_cot": write_report(store, "20260101_000000_std_cot_1").read_text(),
        "failed": write_report(store, b["failed"]).read_text(),
    }
    return dict(b, pages=pages)


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in IMG.findall(page)]


def _check_images(page: str, expected: int) -> None:
    from PIL import Image

    assert page.count("<img") == expected == len(_images(page))  # every <img> is an embedded PNG
    for png in _images(page):
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 100
            assert len(im.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 3  # a plot, not a blank


def test_comparison_page_shows_every_method_with_its_numbers(built) -> None:
    page = built["pages"]["cmp"]
    for method in ("std_cot", "kpod", "mentor_kd"):
        assert f"<td>{method}</td>" in page
    for (method, split), mean in built["means"].items():  # the summary's mean over seeds
        assert re.search(rf"<td>{method}</td><td class='n'>2/2</td>.*?{mean:.3f} ± ", page)
    for row in built["rows"]:
        if row["status"] == "completed":  # each run's accuracy with its interval, from the table
            cell = f"{row['test_accuracy']:.3f} [{row['test_ci_low']:.3f}, {row['test_ci_high']:.3f}]"
            assert cell in page
        for outcome in built["store"].load_run(row["run_id"])["outcomes"]:
            assert f"<td>{outcome['key']}</td>" in page  # the stage keys of every run
    assert "<td>mentor_kd</td><td class='n'>0/1</td>" in page  # the failed method: no accuracy
    _check_images(page, 4)  # accuracy, val per epoch, training loss, test by steps


def test_comparison_page_shows_test_accuracy_by_steps_from_its_table(built) -> None:
    page = built["pages"]["cmp"]
    _, rows = query(built["store"], "select method, n_steps, avg(accuracy) from comparison_steps "
                                    "where split = 'test' group by all")
    for method, n_steps, acc in rows:
        assert f"<th>{n_steps} steps</th>" in page
        assert re.search(rf"<tr><td>{method}</td>(<td class='n'>[^<]*</td>)*<td class='n'>{acc:.3f}</td>", page)


def test_run_pages_show_what_each_run_has_and_say_what_it_lacks(built) -> None:
    store = built["store"]
    kpod, std = built["pages"]["kpod"], built["pages"]["std_cot"]
    for run_id, page in (("20260101_000000_kpod_0", kpod), ("20260101_000000_std_cot_1", std)):
        _, metrics = query(store, f"select split, n, correct, accuracy, ci_low, ci_high from {schema_name(run_id)}.metrics")
        for split, n, correct, acc, lo, hi in metrics:
            assert f"<td>{split}</td><td class='n'>{n}</td><td class='n'>{correct}</td><td class='n'>{acc:.3f} [{lo:.3f}, {hi:.3f}]</td>" in page
        _, teacher = query(store, f"select count(*), sum(tokens_in), sum(tokens_out) from {schema_name(run_id)}.teacher_calls")
        calls, tin, tout = teacher[0]
        assert f"<td class='n'>{calls}</td><td class='n'>{tin}</td><td class='n'>{tout}</td>" in page
        for stage, key in store.load_run(run_id)["stages"].items():
            assert f"<td>{stage}</td><td>{key}</td>" in page
    assert "&quot;select_every&quot;: 1" in kpod  # the config its stages hashed
    # kpod: the schedule (budget and input steps) and its token weights, coloured by role
    assert "Progressive schedule</h2><img" in kpod and "Token weights by role</h2><img" in kpod
    assert kpod.count("<span class='t' style='background:rgb(") > 50
    assert "border-bottom:3px solid #1f4fbf" in kpod  # a core token underlined
    _check_images(kpod, 6)  # accuracy, val, loss, budget, input steps, weights by role
    # std_cot has neither: one line each, no crash
    assert "<p class='note'>This run has no schedule_stages table" in std
    assert "<p class='note'>This run has no token_weights table" in std
    _check_images(std, 3)


def test_a_failed_run_gets_a_page_of_notes(built) -> None:
    page = built["pages"]["failed"]
    for table in ("metrics", "val_selection", "train_log", "schedule_stages", "token_weights"):
        assert f"This run has no {table} table" in page
    assert "<td>scripted</td>" in page  # its teacher stage finished
    assert "not run" in page and "<img" not in page


def test_pages_are_self_contained_and_escaped(built) -> None:
    for page in built["pages"].values():
        assert "<script" not in page and "<link" not in page and "url(" not in page and "@import" not in page
        refs = re.findall(r"""(?:src|href)\s*=\s*['"]?([^'" >]*)""", page)
        assert all(r.startswith("data:image/png;base64,") for r in refs), refs
    cmp = built["pages"]["cmp"]
    assert "smoke &lt;&amp;&gt; test" in cmp and "<&>" not in cmp  # the comparison's name
    assert "RuntimeError: mentor &lt;b&gt;diverged&lt;/b&gt; &amp; stopped" in cmp and "<b>" not in cmp


def test_cli_writes_the_page_and_refuses_unknown_ids_in_one_line(built, tmp_path, capsys) -> None:
    from flows.cli import main

    had_prefect = "prefect" in sys.modules
    root = str(built["store"].root)
    out = tmp_path / "page.html"
    assert main(["--store", root, "report", "cmp_test", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.read_text().startswith("<!doctype html>")
    assert main(["--store", root, "report"]) == 0  # the latest completed run
    assert capsys.readouterr().out.strip() == str(built["store"].page_path("20260101_000000_kpod_1.html"))
    for target, says in (("cmp_nope", "no comparison 'cmp_nope'"), ("nope", "no run 'nope'")):
        assert main(["--store", root, "report", target]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["--store", str(tmp_path / "empty"), "report"]) == 2
    assert "no run recorded" in capsys.readouterr().err
    assert had_prefect or "prefect" not in sys.modules  # a command that runs no flow
