"""`kpod-compare`: every (method, seed) pipeline of one config over one store, as one Prefect flow.

Parameters: the typed config (as `kpod`), `methods`, `seeds`, `store`, `runs_at_once` (pipelines
running side by side), `parallel` (stages at once inside each pipeline) and `report` (write the
comparison's HTML page when every run has ended, and attach it to the flow run as an artifact).

Each pipeline is a `kpod run` in a process of its own, reporting to the same Prefect API (so
the UI shows every run's DAG), with its config written beside the comparison
(`comparisons/<id>/runs/<run>.yaml`) and its output in `<run>.log`. Not threads of this process:
transformers builds a loaded model's modules on the meta device by patching torch globally, so
a model loaded in one thread while another thread builds modules breaks the other ("Cannot copy
out of meta tensor"); processes also give each run its own torch thread pool, sized
cores / runs_at_once unless OMP_NUM_THREADS is set.

Stages the runs share have one key, and the store's per-key lock makes a second run wait for the
first to commit such a stage instead of computing it again. The comparison's record and its
`comparisons` / `comparison_steps` tables (flows/comparison.py) are rewritten as each run ends,
so a killed comparison keeps every finished row, and rerunning it serves every finished stage
from the cache. A failed run fails the comparison only after every other run has ended.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows.comparison import check_request, job_config, jobs, run_rows, write_tables  # noqa: E402
from flows.kpod import error_tail  # noqa: E402
from flows.selection import new_run_id, utcnow  # noqa: E402
from storage.catalog import write_catalog_file  # noqa: E402
from storage.store import Store  # noqa: E402
from tasks.config.pipeline import PipelineConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_RUNS = 64  # the task runner's threads: an upper bound; runs_at_once is the real limit


@task(name="pipeline", cache_policy=NO_CACHE, task_run_name="{method} seed {seed}")
def pipeline(method: str, seed: int, config_path: str, store: str, parallel: int, run_id: str,
             env: dict[str, str], log_path: str) -> dict[str, Any]:
    """One (method, seed) run of the whole DAG in its own process; its run record, failed or not."""
    cmd = [sys.executable, "-m", "flows.cli", "--store", store, "run", config_path,
           "--run-id", run_id, "--parallel", str(parallel)]
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=REPO_ROOT).returncode
    try:
        run = Store(store).load_run(run_id)
    except FileNotFoundError:  # it died before recording anything: its log says why
        run = {"run_id": run_id, "status": "failed"}
    if rc != 0 or run.get("status") != "completed":
        tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-12:]
        run = dict(run, status="failed", error=run.get("error") or "\n".join(tail))
        get_run_logger().error("%s seed %s failed (exit %s); log: %s", method, seed, rc, log_path)
    return run


@flow(name="kpod-compare", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=MAX_RUNS))
def kpod_compare(
    config: PipelineConfig = PipelineConfig(),
    methods: list[str] = ["std_cot", "kpod"],  # noqa: B006 (Prefect copies parameters)
    seeds: list[int] = [0],  # noqa: B006
    store: str | None = None,
    runs_at_once: int = 2,
    parallel: int = 1,
    report: bool = True,
) -> dict[str, Any]:
    check_request(methods, seeds, runs_at_once)
    if len(jobs(methods, seeds)) > MAX_RUNS:
        raise ValueError(f"at most {MAX_RUNS} runs per comparison")
    st = Store(store)
    st.ensure_writable()
    configs = {job: job_config(config, *job) for job in jobs(methods, seeds)}  # all valid before any runs
    cid = "cmp_" + new_run_id()
    record = _new_record(cid, config, methods, seeds, runs_at_once)
    st.save_comparison(cid, record)
    failed: list[dict[str, Any]] = []
    try:
        _run_all(st, record, list(configs.values()), _child_env(runs_at_once), parallel)
        failed = [r for r in record["runs"] if r["status"] != "completed"]
        record["status"] = "failed" if failed else "completed"
    except BaseException as exc:
        record.update(status="failed", error=error_tail(exc))
        raise
    finally:
        record["finished_at"] = utcnow()
        st.save_comparison(cid, record)
        write_catalog_file(st)  # the comparison's views for any other DuckDB client
    if report:
        attach_report(st, cid)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(record['runs'])} runs failed: "
                           + ", ".join(f"{r['method']} seed {r['seed']} ({r['run_id']})" for r in failed))
    return record


def _run_all(st: Store, record: dict[str, Any], configs: list[PipelineConfig], env: dict[str, str],
             parallel: int) -> None:
    """Start runs in the record's order, at most `runs_at_once` at a time; as each ends, its
    record entry, its rows, both tables and the record are rewritten."""
    cid = record["comparison_id"]
    todo = list(zip(configs, record["runs"]))
    running: dict[Any, dict[str, Any]] = {}
    rows: list[dict] = []
    steps: list[dict] = []
    while todo or running:
        while todo and len(running) < record["runs_at_once"]:
            cfg, entry = todo.pop(0)
            entry["status"] = "running"
            path = st.comparison_file(cid, f"runs/{entry['run_id']}.yaml")
            path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            # absolute: the run's process works in the checkout, not in this process's directory
            log, root = str(path.resolve().with_suffix(".log")), str(st.root.resolve())
            running[pipeline.submit(entry["method"], entry["seed"], str(path.resolve()), root, parallel,
                                    entry["run_id"], env, log)] = entry
        fut = next(as_completed(list(running)))
        entry, run = running.pop(fut), fut.result()
        entry.update(status=run.get("status"), error=run.get("error"))
        row, step_rows = run_rows(st, cid, entry["method"], entry["seed"], run)
        rows, steps = rows + [row], steps + step_rows
        write_tables(st, cid, rows, steps)
        st.save_comparison(cid, record)
        print(f"{entry['method']} seed {entry['seed']}: {entry['status']} "
              f"(val {_fmt(row['val_accuracy'])}, test {_fmt(row['test_accuracy'])})")


def _child_env(runs_at_once: int) -> dict[str, str]:
    """What each run's process gets on top of this one's environment: this flow's Prefect API
    (a temporary server's included, so no run starts a server of its own) and, unless
    OMP_NUM_THREADS is set, a share of the cores (two runs with every core each are many times
    slower than with a share each on a small machine: docs/benchmarks.md)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        env = {"PREFECT_API_URL": str(client.api_url).rstrip("/")}
    if not os.environ.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // runs_at_once))
    return env


def _new_record(cid: str, config: PipelineConfig, methods: list[str], seeds: list[int], runs_at_once: int) -> dict:
    runs = [{"method": m, "seed": s, "run_id": f"{cid[4:]}_{m}_s{s}", "status": "pending", "error": None}
            for m, s in jobs(methods, seeds)]
    return {"comparison_id": cid, "name": config.name, "config": config.model_dump(mode="json"),
            "methods": list(methods), "seeds": list(seeds), "runs_at_once": runs_at_once,
            "started_at": utcnow(), "finished_at": None, "status": "running", "runs": runs}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def attach_report(st: Store, cid: str) -> None:
    """Write the comparison's page and attach its path and table to the flow run."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    from storage.catalog import query
    from tasks.core.report_data import write_report

    page = write_report(st, cid, None)
    create_link_artifact(key="kpod-compare-report", link=page.resolve().as_uri(),
                         link_text=f"kpod report {cid}", description=f"the page of comparison {cid}")
    cols, rows = query(st, f"select method, seed, val_accuracy, test_accuracy, status from comparisons "
                           f"where comparison_id = '{cid}' order by method, seed")
    create_table_artifact(key="kpod-compare-table", table=[dict(zip(cols, r)) for r in rows],
                          description=f"kpod compare {cid}")
    print(f"report: {page}")
