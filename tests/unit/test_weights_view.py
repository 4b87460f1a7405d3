"""Rendering token weights as HTML / PNG pages, and `show_weights` over a store."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from storage.store import Store
from tasks.core.weights_view import examples_markdown, render_html, render_png, show_weights


def rows_for(rid: str, text: str, weights: list[float]) -> list[dict]:
    out = []
    for i, m in enumerate(re.finditer(r"\S+", text)):
        out.append(dict(rationale_id=rid, pos=i, token=m.group(), char_start=m.start(), char_end=m.end(),
                        step=0 if i < 3 else 1, weight=weights[i]))
    return out


ROWS = rows_for("q1:teacher:0", "Tom has 3 <apples> . He eats", [0.1, 0.2, 0.95, 0.6, 0.0, 0.3, 0.8]) + \
    rows_for("q2:teacher:0", "So 5 + 3 = 8", [0.2, 0.9, 0.7, 0.9, 0.5, 1.0])


def test_html_shades_each_token_by_its_weight(tmp_path):
    page = render_html(ROWS, tmp_path / "w.html").read_text()
    spans = re.findall(r"<span class='t' style='background:rgb\(255,(\d+),(\d+)\)' title='w=([0-9.]+)[^']*'>([^<]*)</span>", page)
    assert len(spans) == len(ROWS)
    for (g, b, w, tok), row in zip(spans, ROWS):
        assert float(w) == pytest.approx(row["weight"], abs=1e-3)
        assert int(g) == int(b) == round(255 - 200 * row["weight"])  # darker = heavier
    assert "&lt;apples&gt;" in page and "<apples>" not in page  # escaped
    assert page.count("class='s'") == 1 + 1  # one step boundary per rationale
    assert "q2:teacher:0" in page


def test_png_is_written(tmp_path):
    path = render_png(ROWS, tmp_path / "w.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_markdown_bolds_heavy_tokens():
    md = examples_markdown(ROWS, limit=1)
    assert md == "`q1:teacher:0`: Tom has **3** **<apples>** . He **eats**"


def test_show_weights_reads_the_run_table(tmp_path):
    store = Store(tmp_path / "store")
    with store.writing("weights", "k1", {}) as w:
        w.write_table("token_weights", pa.Table.from_pylist(ROWS))
    html_path, png_path = show_weights(store, {"weights": "k1"}, limit=1)
    page = html_path.read_text()
    assert "q1:teacher:0" in page and "q2:teacher:0" not in page
    assert png_path.is_file() and html_path.parent == png_path.parent
    html_path, _ = show_weights(store, {"weights": "k1"}, rationale_id="q2:teacher:0")
    assert "q2:teacher:0" in html_path.read_text()
    with pytest.raises(KeyError):
        show_weights(store, {"weights": "k1"}, rationale_id="nope")
    with pytest.raises(KeyError):
        show_weights(store, {"dataset": "x"})


def test_show_weights_marks_word_roles(tmp_path):
    store = Store(tmp_path / "store")
    with store.writing("weights", "k1", {}) as w:
        w.write_table("token_weights", pa.Table.from_pylist(ROWS))
    words = [  # q2 "So 5 + 3 = 8": filler, then core words
        dict(rationale_id="q2:teacher:0", word=i, char_start=s, char_end=e, text=t, keypoint=r == "core", role=r)
        for i, (s, e, t, r) in enumerate([(0, 2, "So", "filler"), (3, 4, "5", "core"), (5, 6, "+", "core")])
    ]
    from storage.schemas import schema_for

    with store.writing("rationales", "r1", {}) as w:
        w.write_table("word_labels", pa.Table.from_pylist(words, schema=schema_for("word_labels")))
    html_path, png_path = show_weights(store, {"weights": "k1", "rationales": "r1"}, rationale_id="q2:teacher:0")
    page = html_path.read_text()
    roles = re.findall(r"title='w=[^']*' data-role='(\w+)'>([^<]*)</span>", page)
    assert roles == [("filler", "So"), ("core", "5"), ("core", "+")]
    assert page.count("border-bottom:3px solid #1f4fbf") == 2 + 1  # two core tokens + the legend
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    # without word labels (real data) the page has no roles
    html_path, _ = show_weights(store, {"weights": "k1"}, rationale_id="q2:teacher:0")
    assert "data-role" not in html_path.read_text()
