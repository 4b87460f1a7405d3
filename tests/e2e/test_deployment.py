"""`make serve` then `prefect deployment run kpod/full --watch`, against a real Prefect server.

The test starts `kpod serve` (server on 127.0.0.1, the deployments of prefect.yaml, a process
worker) in its own process group, runs the deployments through the real `prefect` CLI with the
smoke config (KPOD + Mentor-KD with cached soft labels: the mentor branch beside weights) as the
parameter, checks that the server recorded exactly the DAG's edges, screenshots the run's graph
in the UI (with KPOD_DOCS_IMAGES=1 also for the docs, docs/img/dag-graph.png), and stops everything by pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from storage.catalog import query
from storage.store import Store
from tasks.config.pipeline import PipelineConfig, load_config
from tasks.stages.contract import plan
from tasks.stages.registry import STAGES
from tests.e2e import prefect_ui
from tests.e2e.conftest import SMOKE

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCS_IMAGE = REPO / "docs" / "img" / "dag-graph.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def dag_edges(cfg: PipelineConfig, ran: set[str]) -> set[tuple[str, str]]:
    """(upstream stage, stage) for every declared dependency between stages that ran."""
    return {(up, p.name) for p in plan(cfg, STAGES) if p.name in ran for up in p.upstream if up in ran}


def check_recorded_dag(api: str, cfg: PipelineConfig) -> str:
    """The server holds one task run per stage of the default run, linked exactly as the DAG
    (only through wait_for: no edge made up from a parameter); returns the flow run's id."""
    flow_run = prefect_ui.flow_run_of_deployment(api, "kpod/full")
    expected_stages = {p.name for p in plan(cfg, STAGES) if p.enabled}
    runs = prefect_ui.settled_task_runs(api, flow_run["id"], expect=len(expected_stages))
    ran = {r["name"] for r in runs}
    assert ran == expected_stages
    edges = prefect_ui.task_input_edges(runs)
    expected = dag_edges(cfg, ran)
    print(f"\nrecorded {len(edges)} edges (kinds {sorted({how for *_, how in edges})}), the DAG has {len(expected)}:")
    print("\n".join(f"  {up} -> {stage}" for up, stage in sorted(expected)))
    assert {(up, stage) for up, stage, _ in edges} == expected
    assert {how for *_, how in edges} == {"wait_for"}
    assert prefect_ui.graph_edges(api, flow_run["id"]) == expected  # what the UI draws
    return flow_run["id"]


def check_graph_screenshot(api: str, flow_run_id: str, tmp_path: Path) -> None:
    """Shoot the run's page; the graph must show its (green: completed) stage nodes."""
    from PIL import Image

    name = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30).raise_for_status().json()["name"]
    shot = tmp_path / "dag-graph.png"
    box = prefect_ui.screenshot(f"{api.removesuffix('/api')}/runs/flow-run/{flow_run_id}", shot, wait_text=name)
    image = Image.open(shot).convert("RGB")
    graph = image.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"])))
    colours = graph.getcolors(maxcolors=1 << 24)
    green = sum(n for n, (r, g, b) in colours if g > 120 and g > r + 50 and g > b + 30)
    assert len(colours) > 16 and green > 2000, (len(colours), green, str(shot))
    # KPOD_DOCS_IMAGES=1 refreshes the docs' picture (a test never writes into the checkout
    # otherwise); a 64-colour palette keeps it small and the text sharp
    if os.environ.get("KPOD_DOCS_IMAGES") == "1":
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        image.quantize(colors=64).save(DOCS_IMAGE, optimize=True)


def check_compare_deployment(store: Store, env: dict[str, str], cfg, tmp_path: Path) -> None:
    """kpod-compare/compare on the same store: its runs reuse every shared stage."""
    params = json.dumps({"config": cfg.model_dump(mode="json"), "methods": ["std_cot"], "seeds": [0]})
    run = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "kpod-compare/compare", "--params", params, "--watch"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, (f"{run.stdout[-1500:]}{run.stderr[-1500:]}\n--- serve.log:\n"
                                 f"{(tmp_path / 'serve.log').read_text()[-3000:]}")
    record = store.load_comparison()
    assert record["status"] == "completed" and [r["method"] for r in record["runs"]] == ["std_cot"]
    run_record = store.load_run(record["runs"][0]["run_id"])
    assert {o["stage"]: o["status"] for o in run_record["outcomes"]}["rationales"] == "cached"
    assert (store.root / "reports" / f"{record['comparison_id']}.html").is_file()


def test_deployment_run_full_watch(tmp_path: Path) -> None:
    # the mentor branch (mentor_cache) beside weights: a DAG with two branches to see
    cfg = load_config(SMOKE, ["train.method=kpod_mentor", "mentor.kd.source=cached_topk"])
    prefect_ui.require_chromium()  # before minutes of pipeline, not after
    store = Store(tmp_path / "store")
    port = free_port()
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(
        [str(BIN / "kpod"), "--store", str(store.root), "serve", "--port", str(port),
         "--prefect-home", str(tmp_path / "prefect-home")],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    record_path = store.serve_record_path()
    try:
        deadline = time.monotonic() + 300
        while not record_path.exists():
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "kpod serve did not become ready"
            time.sleep(1)
        record = json.loads(record_path.read_text())
        assert record["api_url"] == f"http://127.0.0.1:{port}/api"

        client_env = dict(env, PREFECT_API_URL=record["api_url"])
        params = json.dumps({"config": cfg.model_dump(mode="json")})
        for deployment in ("kpod/full", "kpod/rationales"):
            run = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", deployment, "--params", params, "--watch"],
                cwd=REPO, env=client_env, capture_output=True, text=True, timeout=600,
            )
            if run.returncode != 0:  # the worker's side of the failure, not only the states
                runs = store.list_runs()
                pytest.fail(f"{deployment} failed:\n{run.stdout[-1500:]}{run.stderr[-1500:]}\n--- run record error:\n"
                            f"{runs[-1].get('error') if runs else 'no run record'}\n--- serve.log:\n"
                            f"{(tmp_path / 'serve.log').read_text()[-3000:]}")

        # the worker ran the flow against the store it was given
        _, rows = query(store, "select count(*) from steps")
        assert rows[0][0] > 0
        runs = store.list_runs()
        assert len(runs) == 2 and all(r["status"] == "completed" for r in runs)
        last = {o["stage"]: o["status"] for o in runs[-1]["outcomes"]}
        assert last == {"rationales": "cached"}
        # Prefect's results went to the store, not to the worker's ~/.prefect
        assert any(store.prefect_results_dir().glob("kpod-rationales-*"))

        check_compare_deployment(store, client_env, cfg, tmp_path)
        flow_run_id = check_recorded_dag(record["api_url"], cfg)
        check_graph_screenshot(record["api_url"], flow_run_id, tmp_path)
    finally:
        pids = []
        if record_path.exists():
            rec = json.loads(record_path.read_text())
            pids = [rec["server_pid"], rec["worker_pid"]]
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(10)
        log.close()
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(pid_alive(p) for p in pids), "server or worker still running after stop"
