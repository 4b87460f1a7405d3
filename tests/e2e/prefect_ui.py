"""What a Prefect server recorded of a flow run, and a headless Chromium screenshot of its UI page.

Plain HTTP to the server's REST API (no Prefect client: in the same pytest session the test
harness's settings point the client at another server). Task runs reach the server as events,
so a read right after the flow returns may miss some: `settled_task_runs` polls.

`chromium --screenshot` shoots at the load event, before the UI app has fetched the run and
drawn its graph (a WebGL canvas), so `screenshot` drives Chromium over the DevTools protocol:
navigate, wait until the page shows some text and a canvas, let the graph settle, then shoot
the run's header and graph. Everything talks to 127.0.0.1 only.

`render_page` opens a static page (a `kpod report` file) the same way and keeps what a reader
would be shown or not: console errors, uncaught exceptions, images that did not load.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def flow_run_of_deployment(api: str, deployment: str) -> dict[str, Any]:
    """The one flow run of `deployment` ("flow/name")."""
    dep = httpx.get(f"{api}/deployments/name/{deployment}", timeout=30).raise_for_status().json()
    body = {"deployments": {"id": {"any_": [dep["id"]]}}}
    runs = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30).raise_for_status().json()
    assert len(runs) == 1, [r["id"] for r in runs]
    return runs[0]


def settled_task_runs(api: str, flow_run_id: str, expect: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The flow run's task runs, once `expect` of them are there and every one has ended."""
    body = {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    deadline = time.monotonic() + timeout
    while True:
        runs = httpx.post(f"{api}/task_runs/filter", json=body, timeout=30).raise_for_status().json()
        if len(runs) >= expect and all(r["state_type"] in TERMINAL for r in runs):
            return runs
        assert time.monotonic() < deadline, [(r["name"], r["state_type"]) for r in runs]
        time.sleep(0.5)


def task_input_edges(runs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """{(upstream task run, task run, how)}: `how` is the task_inputs key that recorded the
    dependency ('wait_for', or the name of a parameter Prefect found an upstream result in)."""
    name = {r["id"]: r["name"] for r in runs}
    assert len(set(name.values())) == len(name), sorted(name.values())
    return {
        (name[i["id"]], r["name"], how)
        for r in runs
        for how, inputs in r["task_inputs"].items()
        if how != "__parents__"
        for i in inputs
        if i.get("input_type") == "task_run"
    }


def graph_edges(api: str, flow_run_id: str) -> set[tuple[str, str]]:
    """The edges of the graph the UI draws (GET /flow_runs/{id}/graph-v2), by node label."""
    g = httpx.get(f"{api}/flow_runs/{flow_run_id}/graph-v2", timeout=30).raise_for_status().json()
    label = {nid: node["label"] for nid, node in g["nodes"]}
    return {(label[p["id"]], node["label"]) for _, node in g["nodes"] for p in node["parents"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_chromium() -> str:
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed: the deployment test screenshots the Prefect UI (`make browser`)"
    return exe


@contextmanager
def chromium(width: int, height: int) -> Iterator[str]:
    """A headless Chromium; yields the DevTools websocket URL of its blank page."""
    exe = require_chromium()
    port, profile = _free_port(), tempfile.mkdtemp(prefix="kpod-chromium-")
    proc = subprocess.Popen(
        [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
         f"--window-size={width},{height}", f"--remote-debugging-port={port}",
         "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}", "--no-first-run",
         "--disable-extensions", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.2)
        yield pages[0]["webSocketDebuggerUrl"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


async def _shoot(ws_url: str, url: str, wait_text: str, timeout: float, settle: float) -> tuple[bytes, dict]:
    import websockets

    async with websockets.connect(ws_url, max_size=64 * 2**20) as ws:
        ids = iter(range(1, 1_000_000))

        async def cdp(method: str, **params: Any) -> dict[str, Any]:
            my = next(ids)
            await ws.send(json.dumps({"id": my, "method": method, "params": params}))
            while (msg := json.loads(await ws.recv())).get("id") != my:
                pass  # events
            assert "error" not in msg, (method, msg["error"])
            return msg.get("result", {})

        await cdp("Page.enable")
        await cdp("Page.navigate", url=url)
        probe = (
            "(() => { const c = document.querySelector('canvas');"
            f" const ok = !!c && document.body.innerText.includes({json.dumps(wait_text)});"
            " return JSON.stringify(ok ? c.getBoundingClientRect() : null); })()"
        )
        deadline = time.monotonic() + timeout
        while (rect := json.loads((await cdp("Runtime.evaluate", expression=probe, returnByValue=True))["result"]["value"])) is None:
            assert time.monotonic() < deadline, f"{url}: no graph with {wait_text!r} after {timeout:.0f}s"
            await asyncio.sleep(0.5)
        await asyncio.sleep(settle)  # the graph fetches its nodes, lays them out and animates
        # the run's header (name, state) and its graph, without the navigation bar
        clip = {"x": max(0, rect["left"] - 16), "y": 0, "width": rect["width"] + 32, "height": rect["bottom"] + 16, "scale": 1}
        shot = await cdp("Page.captureScreenshot", format="png", clip=clip)
        canvas = {"x": rect["x"] - clip["x"], "y": rect["y"], "width": rect["width"], "height": rect["height"]}
        return base64.b64decode(shot["data"]), canvas


def screenshot(url: str, out: Path, wait_text: str, timeout: float = 120.0, settle: float = 5.0) -> dict[str, float]:
    """Save a PNG of the page's header and graph; returns the graph canvas's box in the PNG."""
    with chromium(1440, 900) as ws_url:
        png, canvas = asyncio.run(_shoot(ws_url, url, wait_text, timeout, settle))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    return canvas


async def _render(ws_url: str, url: str, timeout: float) -> tuple[bytes, dict[str, Any]]:
    """Load `url`, keeping every console error, uncaught exception and error log entry the page
    raises; then its images' state and a screenshot of the whole page (beyond the viewport)."""
    import websockets

    errors: list[str] = []

    def note(event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")

    async with websockets.connect(ws_url, max_size=256 * 2**20) as ws:
        ids = iter(range(1, 1_000_000))

        async def cdp(method: str, **params: Any) -> dict[str, Any]:
            my = next(ids)
            await ws.send(json.dumps({"id": my, "method": method, "params": params}))
            while (msg := json.loads(await asyncio.wait_for(ws.recv(), timeout))).get("id") != my:
                note(msg)  # an event
            assert "error" not in msg, (method, msg["error"])
            return msg.get("result", {})

        for domain in ("Page", "Runtime", "Log"):
            await cdp(f"{domain}.enable")
        await cdp("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        # poll until every image has decoded ("complete"); events are noted while we wait
        while (await cdp("Runtime.evaluate", expression="document.readyState", returnByValue=True))["result"]["value"] != "complete":
            assert time.monotonic() < deadline, f"{url} did not load in {timeout:.0f}s"
            await asyncio.sleep(0.1)
        probe = ("JSON.stringify(Array.from(document.images).map(i => "
                 "({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight, alt: i.alt})))")
        images = json.loads((await cdp("Runtime.evaluate", expression=probe, returnByValue=True))["result"]["value"])
        size = (await cdp("Page.getLayoutMetrics"))["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = await cdp("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        await cdp("Runtime.evaluate", expression="1")  # drain events the screenshot raised
        return base64.b64decode(shot["data"]), {"errors": errors, "images": images, "size": size}


def render_page(url: str, out: Path, width: int = 1200, height: int = 900, timeout: float = 60.0) -> dict[str, Any]:
    """Open a page (a file:// URL of a report) in headless Chromium and save a PNG of all of it.
    Returns {"errors": console errors, exceptions and error log entries; "images": each <img>'s
    complete, width, height (natural) and alt; "size": the page's CSS size}."""
    with chromium(width, height) as ws_url:
        png, seen = asyncio.run(_render(ws_url, url, timeout))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    return seen
