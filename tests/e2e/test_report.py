"""`kpod report` pages in a real browser: headless Chromium (the system's) opens the comparison
page and a run page from file:// URLs; each shows no console error, every image loads, and the
screenshot (kept in the test's tmp dir) is a page with plots, not a blank. No Prefect."""

from __future__ import annotations

import io

import pytest

from tests.e2e.prefect_ui import render_page
from tests.support import smoke_store

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return smoke_store.shared(tmp_path_factory)["store"]


@pytest.mark.parametrize(("target", "plots"), [("cmp_test", 4), ("20260101_000000_kpod_0", 6)])
def test_report_page_renders_in_chromium(store, tmp_path, target: str, plots: int) -> None:
    from PIL import Image

    from tasks.core.report_data import write_report

    page = write_report(store, target, tmp_path / f"{target}.html")
    shot = tmp_path / f"{target}.png"
    seen = render_page(page.as_uri(), shot)
    assert seen["errors"] == []
    assert len(seen["images"]) == plots
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in seen["images"]), seen["images"]
    with Image.open(io.BytesIO(shot.read_bytes())) as im:
        rgb = im.convert("RGB")
        assert rgb.height > 1500  # the whole page, below the first screen too
        small = rgb.resize((rgb.width // 4, rgb.height // 4))
        colours = small.getcolors(1 << 20)
        assert colours is not None and len(colours) > 50  # text, lines and bars, not one flat colour
        white = max(n for n, c in colours if c == (255, 255, 255))
        assert white / (small.width * small.height) < 0.97  # something drawn on it
