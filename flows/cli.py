"""`kpod`: run the pipeline in-process, query its tables with SQL, see what is cached.

Every subcommand prints a one-line error (exit status 2) for bad input: an unknown config
field, a wrong type, an unknown stage, a malformed data file, SQL that writes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# a loaded 2-core machine can take longer than Prefect's 20 s to start its ephemeral server
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

REPO_ROOT = Path(__file__).resolve().parent.parent


def find_preset(name: str) -> Path:
    """A config path as given, or a preset name from configs/ (`demo`, `smoke`)."""
    p = Path(name)
    if p.is_file():
        return p
    for candidate in (REPO_ROOT / "configs" / f"{name}.yaml", REPO_ROOT / "configs" / name):
        if candidate.is_file():
            return candidate
    return p  # load_config names it in its error


def _stage_names() -> list[str]:
    from tasks.stages.registry import stage_names

    return stage_names()


def _load(args: argparse.Namespace):
    from tasks.config.pipeline import load_config

    path = find_preset(args.config) if args.config else None
    return load_config(path, args.set)


def _print_table(columns: list[str], rows: list[tuple], fmt: str) -> None:
    out = sys.stdout  # looked up per call: it may have been replaced (pytest's capture)
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")  # shell-friendly: no \r for `$(kpod sql ...)`
        w.writerow(columns)
        w.writerows(rows)
        return
    if fmt == "json":
        json.dump([dict(zip(columns, r)) for r in rows], out, default=str, indent=1)
        out.write("\n")
        return
    text = [[("NULL" if v is None else str(v)) for v in r] for r in rows]
    widths = [len(c) for c in columns]
    for r in text:
        widths = [min(max(w, len(v)), 60) for w, v in zip(widths, r)]

    def line(vals: Sequence[str]) -> str:
        return " | ".join(v[:60].ljust(w) for v, w in zip(vals, widths))

    out.write(line(columns) + "\n")
    out.write("-+-".join("-" * w for w in widths) + "\n")
    for r in text:
        out.write(line(r) + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def cached_run(cfg: Any, args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """When every stage the run would submit is complete and none is forced, record the run
    from the manifests without Prefect (seconds, not a server's start-up) and return its
    outcomes; else None. Stage names and `--parallel` are checked here, before any server."""
    from flows.selection import StageSelectionError, new_run_id, recorded_outcome, select_stages, utcnow
    from storage.catalog import write_catalog_file
    from storage.store import Store
    from tasks.stages.contract import plan
    from tasks.stages.registry import STAGES

    if args.parallel < 1:
        raise StageSelectionError(f"parallel must be at least 1 (stages at once), not {args.parallel}")
    store = Store(args.store)
    planned = plan(cfg, STAGES)
    todo = select_stages(planned, store, args.stages or None, list(args.force or []))
    # a corrupt stage is not complete: the flow recomputes it (tasks/stages/contract.py)
    if args.force or not all(store.is_complete(p.name, p.key) for p in todo):
        return None
    store.remove_dead_temps()
    run_id, started = getattr(args, "run_id", None) or new_run_id(), utcnow()
    outcomes = [recorded_outcome(store, p) for p in todo]
    store.save_run(run_id, {
        "run_id": run_id, "name": cfg.name, "started_at": started, "stages": {p.name: p.key for p in planned},
        "status": "completed", "finished_at": utcnow(), "outcomes": outcomes, "prefect": False,
    })
    write_catalog_file(store)
    print(f"kpod: every stage is cached; run {run_id} recorded without starting Prefect")
    return outcomes


def check_data_files(cfg: Any, store_root: str | None, force: list[str]) -> None:
    """Read a file dataset now when its stage will run, so a malformed file is one `kpod:` line
    (file and row) before Prefect's start-up (10-20 s), not after it."""
    if cfg.dataset.source != "file":
        return
    from storage.store import Store
    from tasks.stages.contract import plan
    from tasks.stages.dataset import check_source
    from tasks.stages.registry import STAGES

    key = next(p.key for p in plan(cfg, STAGES) if p.name == "dataset")
    if "dataset" in force or not Store(store_root).is_complete("dataset", key):
        check_source(cfg.dataset)


def cmd_run(args: argparse.Namespace) -> int:
    from storage.store import Store

    if getattr(args, "threads", None):
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the flow applies it (flows/threads.py)
    cfg = _load(args)
    Store(args.store).ensure_writable()  # before any stage or server: one clear line if not
    outcomes = cached_run(cfg, args)
    if outcomes is None:
        check_data_files(cfg, args.store, args.force or [])
        from flows.kpod import kpod
        from flows.server_guard import guard_temporary_server

        guard_temporary_server()  # a killed `kpod run` leaves no Prefect server behind
        outcomes = kpod(
            config=cfg, stages=args.stages or None, force=args.force or None, store=args.store,
            parallel=args.parallel, keep_work=args.keep_work, run_id=getattr(args, "run_id", None),
            dask=getattr(args, "dask", None),
        )
    _print_stage_table(outcomes)
    if getattr(args, "report", False):
        _print_report(args.store, outcomes)
    elif any(o["stage"] == "evaluate" for o in outcomes):
        # a run that evaluated always says how well the student did; --report adds more
        from tasks.core.report import accuracy_lines

        print()
        print("\n".join(accuracy_lines(_run_metrics(args.store, outcomes))))
    return 0


def _print_stage_table(outcomes: list[dict[str, Any]]) -> None:
    """One line per stage; start and end are seconds since the run's first stage started, so
    stages that ran at once (independent branches) show overlapping spans."""
    from datetime import datetime

    times = [(datetime.fromisoformat(o["started_at"]), datetime.fromisoformat(o["finished_at"])) for o in outcomes]
    t0 = min((start for start, _ in times), default=None)
    print()
    print(f"{'stage':<16}{'status':<10}{'key':<18}{'rows':>10}{'seconds':>10}{'start':>9}{'end':>9}")
    for o, (start, end) in zip(outcomes, times):
        print(
            f"{o['stage']:<16}{o['status'].upper():<10}{o['key']:<18}"
            f"{sum(o['rows'].values()):>10}{o['seconds']:>10.2f}"
            f"{(start - t0).total_seconds():>9.2f}{(end - t0).total_seconds():>9.2f}"
        )


def _run_metrics(store_root: str | None, outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `metrics` rows of this run's own evaluation (by its evaluate key, not "the latest
    completed run": runs that share a store at once, as `kpod compare` starts them, finish in
    any order); none when the run did not include evaluate."""
    from storage.store import Store

    key = next((o["key"] for o in outcomes if o["stage"] == "evaluate"), None)
    if key is None:
        return []
    return Store(store_root).read_table("evaluate", key, "metrics").to_pylist()


def _print_report(store_root: str | None, outcomes: list[dict[str, Any]]) -> None:
    from tasks.core.report import format_report

    print()
    print(format_report(outcomes, _run_metrics(store_root, outcomes)))


def cmd_demo(args: argparse.Namespace) -> int:
    args.config = args.config or "demo"
    args.report = True
    return cmd_run(args)


def existing_store(root: str | None) -> Any:
    """The store at `root`, which must exist: a command that only reads never creates one."""
    from storage.store import Store

    store = Store(root)
    if not store.root.is_dir():
        raise FileNotFoundError(f"no store at {store.root} (--store, or $KPOD_STORE)")
    return store


def cmd_sql(args: argparse.Namespace) -> int:
    from storage.catalog import default_run, query

    store = existing_store(args.store)
    cols, rows = query(store, args.query, run_id=args.run)
    # which run the plain names read, on stderr: stdout stays the result (csv/json pipe cleanly)
    run = args.run or default_run(store.list_runs())["run_id"]
    print(f"kpod: plain table names read run {run}", file=sys.stderr)
    _print_table(cols, rows, args.format)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from storage.store import Store
    from tasks.stages.registry import STAGES
    from tasks.stages.contract import plan

    cfg = _load(args)
    store = Store(args.store)
    print(f"store: {store.root}")
    print(f"{'stage':<16}{'key':<18}{'state':<10}{'rows':>10}")
    corrupt = []
    for p in plan(cfg, STAGES):
        check = store.integrity(p.name, p.key)  # sizes against the manifest: a stat per file
        rows: Any = "-"
        if check.served:
            rows = sum(v["rows"] for v in store.manifest(p.name, p.key)["tables"].values())
        state = {"ok": "complete", "unverified": "complete"}.get(check.state, check.state)
        if state == "missing" and not p.enabled:
            state = "unused"  # this config's method does not run it (it still runs by name)
        if state == "corrupt":
            corrupt.append(f"{p.name}: {check.problem}")
        print(f"{p.name:<16}{p.key:<18}{state:<10}{rows:>10}")
    for line in corrupt:
        print(f"corrupt {line}; `kpod run` recomputes it")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Every committed stage of the store against its manifest; exit 1 if any is corrupt."""
    store = existing_store(args.store)
    counts = {"ok": 0, "unverified": 0, "corrupt": 0}
    for stage, key in store.committed_stages():
        check = store.integrity(stage, key, deep=args.deep)
        counts[check.state] += 1
        if check.state == "corrupt":
            print(f"corrupt {stage} {key}: {check.problem}")
    what = "sizes and sha256" if args.deep else "sizes (--deep: sha256 too)"
    print(f"kpod verify: {sum(counts.values())} committed stages, {what}: {counts['ok']} ok, "
          f"{counts['corrupt']} corrupt, {counts['unverified']} unverifiable (manifests written "
          "before kpod recorded file hashes; served as before)")
    return 1 if counts["corrupt"] else 0


def cmd_stages(args: argparse.Namespace) -> int:
    from tasks.stages.registry import STAGES

    for s in STAGES:
        print(f"{s.name:<16}{s.description}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve
    from storage.store import Store

    return serve(args.host, args.port, Store(args.store), args.prefect_home)


def cmd_show(args: argparse.Namespace) -> int:
    from flows.errors import UsageError
    from storage.catalog import default_run
    from tasks.core.weights_view import show_weights

    store = existing_store(args.store)
    keys = (store.load_run(args.run) if args.run else default_run(store.list_runs()))["stages"]
    if not store.is_complete("weights", keys.get("weights", "")):
        raise FileNotFoundError(
            "this run has no complete weights stage; run `kpod run CONFIG --stages weights` first"
        )
    if args.rationale is not None:
        ids = set(store.read_table("weights", keys["weights"], "token_weights", columns=["rationale_id"])
                  .column("rationale_id").to_pylist())
        if args.rationale not in ids:
            raise UsageError(f"--rationale {args.rationale!r} has no token weights in this run "
                             f"(e.g. {min(ids)!r}; `kpod sql \"select distinct rationale_id from token_weights\"`)")
    html_path, png_path = show_weights(store, keys, rationale_id=args.rationale, limit=args.limit)
    print(f"html: {html_path}")
    print(f"png:  {png_path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from flows.comparison import check_request, job_config, jobs
    from storage.catalog import query
    from storage.store import Store

    cfg = _load(args)
    check_request(args.methods, args.seeds, args.runs_at_once)  # before any server starts
    for job in jobs(args.methods, args.seeds):
        job_config(cfg, *job)
    store = Store(args.store)
    store.ensure_writable()
    check_data_files(cfg, args.store, [])
    from flows.compare import kpod_compare
    from flows.server_guard import guard_temporary_server

    guard_temporary_server()
    record = kpod_compare(
        config=cfg, methods=args.methods, seeds=args.seeds, store=args.store,
        runs_at_once=args.runs_at_once, parallel=args.parallel, report=not args.no_report,
    )
    cid = record["comparison_id"]
    cols, rows = query(store, "select method, seed, status, val_accuracy, test_accuracy, train_seconds, run_id "
                              f"from comparisons where comparison_id = '{cid}' order by method, seed")
    print()
    _print_table(cols, rows, "table")
    print(f"comparison {cid}: `kpod sql \"select * from comparisons where comparison_id = '{cid}'\"`")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """One run as HF folders (datasets, model, cards); the Hub only with --push-to-hub."""
    from tasks.core.export import export_run, push_to_hub

    def progress(line: str) -> None:
        print(f"kpod export: {line}", file=sys.stderr, flush=True)

    store = existing_store(args.store)
    out = export_run(store, args.run, args.out, args.force, progress)
    if args.push_to_hub:
        repos = push_to_hub(out, args.push_to_hub, progress)
        progress(f"pushed to {repos['datasets']} (dataset) and {repos['model']} (model)")
    print(out)
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    """One question's path through a run: teacher calls -> rationales -> ... -> predictions."""
    from tasks.core.lineage import format_lineage, question_lineage

    columns, rows, trained_on = question_lineage(existing_store(args.store), args.question_id, args.run)
    if args.format == "table":
        print("\n".join(format_lineage(rows, trained_on)))
    else:
        _print_table(columns, [tuple(r[c] for c in columns) for r in rows], args.format)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tasks.core.report_data import write_report

    store = existing_store(args.store)
    print(write_report(store, args.target, Path(args.out) if args.out else None))
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a YAML config, or a preset name from configs/ (demo, smoke, ...)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one field, e.g. --set teacher.samples=3 (value read as YAML; repeatable)",
    )


def _parallel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--parallel", type=int, default=2, metavar="N",
        help="run at most N stages at once; independent branches (the mentor's beside "
        "weights -> difficulty -> schedule) run side by side (default 2; 1 = one at a time)",
    )


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=_positive, default=None, metavar="N",
        help="torch threads per process (sets OMP_NUM_THREADS; default: 1 for the embedded "
        "models, which a second thread slows down on a busy machine; torch's default for HF models)",
    )


def _keep_work_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep-work", action="store_true",
        help="keep each computed stage's checkpoints in the store's work/ dir (default: "
        "deleted once the stage commits; a stage resumes from them only until then)",
    )


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run the pipeline in-process (no server needed)")
    _config_args(p)
    p.add_argument("--stages", nargs="+", metavar="STAGE", help="run only these stages (and any missing upstream)")
    p.add_argument(
        "--force", nargs="+", metavar="STAGE",
        help="recompute these stages from nothing although cached (their checkpoints are cleared)",
    )
    _parallel_arg(p)
    _keep_work_arg(p)
    _threads_arg(p)
    p.add_argument("--run-id", default=None, metavar="ID",
                   help="record the run under this id (kpod compare names its runs; default: a new one)")
    p.add_argument(
        "--dask", default=None, metavar="ADDRESS",
        help="run the teacher's shards (teacher.shards > 1) on a Dask cluster: a scheduler address "
        "(tcp://HOST:8786), or local:N for N worker processes on this machine (needs kpod[dask])",
    )
    p.add_argument(
        "--report", action="store_true",
        help="also print the wall time per stage and example SQL queries at the end (the "
        "accuracy table is printed whenever the run includes the evaluate stage)",
    )
    p.set_defaults(func=cmd_run)


def _add_compare(sub: Any) -> None:
    from flows.comparison import METHODS

    p = sub.add_parser(
        "compare", help="run every (method, seed) pipeline of one config over one store; "
        "shared stages are computed once; writes the `comparisons` table and a report page",
    )
    _config_args(p)
    p.add_argument("--methods", nargs="+", default=["std_cot", "kpod"], metavar="METHOD",
                   help=f"train.method values (default: std_cot kpod); one of: {', '.join(METHODS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="train.seed values (default: 0)")
    p.add_argument("--runs-at-once", type=int, default=2, metavar="N",
                   help="pipelines running side by side (default 2); each gets cores/N torch threads "
                   "unless OMP_NUM_THREADS is set")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="stages at once inside each pipeline (default 1)")
    p.add_argument("--no-report", action="store_true", help="do not write the comparison's HTML page at the end")
    p.set_defaults(func=cmd_compare)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the embedded default (configs/demo.yaml) and print a report")
    _config_args(p)
    _parallel_arg(p)
    _keep_work_arg(p)
    _threads_arg(p)
    p.set_defaults(func=cmd_demo, stages=None, force=None)


def _add_sql(sub: Any) -> None:
    p = sub.add_parser(
        "sql", help="one read-only SELECT over every table (DuckDB; only the store's files are readable)"
    )
    p.add_argument("query", help='e.g. "select count(*) from steps"')
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--run", default=None, help="query this run's tables instead of the latest completed run's")
    p.set_defaults(func=cmd_sql)


def _add_status(sub: Any) -> None:
    p = sub.add_parser(
        "status", help="each stage of a config: key, complete, missing, corrupt or unused (by its method), rows"
    )
    _config_args(p)
    p.set_defaults(func=cmd_status)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="start a local Prefect server, the deployments of prefect.yaml and a worker (foreground)",
    )
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=4200, help="server port (default 4200)")
    p.add_argument("--prefect-home", default=None, help="PREFECT_HOME for the server's database (default: Prefect's)")
    p.set_defaults(func=cmd_serve)


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_show(sub: Any) -> None:
    p = sub.add_parser("show", help="render a table for people: `show weights` shades tokens by weight")
    p.add_argument("what", choices=["weights"], help="what to show")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--rationale", default=None, metavar="ID", help="one rationale, e.g. syn-train-3:teacher:0")
    group.add_argument("--limit", type=_positive, default=5, metavar="N", help="the first N rationales (default 5)")
    p.add_argument("--run", default=None, help="a run id (default: the latest completed run)")
    p.set_defaults(func=cmd_show)


def _add_report(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="write one self-contained HTML page (plots embedded) of a run or a comparison"
    )
    p.add_argument(
        "target", nargs="?", default=None, metavar="RUN|COMPARISON",
        help="a run id, or a comparison id (cmp_...); default: the latest completed run",
    )
    p.add_argument("--out", default=None, metavar="FILE", help="where to write it (default: <store>/reports/<id>.html)")
    p.set_defaults(func=cmd_report)


def _add_verify(sub: Any) -> None:
    p = sub.add_parser(
        "verify", help="check every committed stage's files against its manifest (sizes; --deep: sha256)"
    )
    p.add_argument("--deep", action="store_true", help="also compare each file's sha256 (reads every byte)")
    p.set_defaults(func=cmd_verify)


def _add_stages(sub: Any) -> None:
    p = sub.add_parser("stages", help="list the stages of the DAG")
    p.set_defaults(func=cmd_stages)


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="write a run's rationales, steps, token weights (datasets) and student (model) as HF folders with cards"
    )
    p.add_argument("--run", default=None, help="a run id (default: the latest completed run)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: <store>/exports/<run id>)")
    p.add_argument("--force", action="store_true", help="replace DIR when it holds an earlier kpod export")
    p.add_argument(
        "--push-to-hub", default=None, metavar="REPO_PREFIX",
        help="also push to the Hugging Face Hub: REPO_PREFIX-data (datasets) and REPO_PREFIX-student "
        "(model); the token is huggingface_hub's (HF_TOKEN or a login)",
    )
    p.set_defaults(func=cmd_export)


def _add_lineage(sub: Any) -> None:
    p = sub.add_parser(
        "lineage", help="one question's teacher calls, rationales, steps, token weights, schedule and predictions"
    )
    p.add_argument("question_id", help="e.g. syn-train-3 (`kpod sql \"select distinct question_id from lineage\"`)")
    p.add_argument("--run", default=None, help="a run id (default: the latest completed run)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="table: a summary for people; csv, json: the question's rows of the lineage view")
    p.set_defaults(func=cmd_lineage)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kpod",
        description=(
            "Distil chain-of-thought from a teacher LLM into a small student (KPOD, Mentor-KD, "
            "Std-CoT). Every stage is cached by content in the store; every table is queryable "
            "with SQL."
        ),
        epilog="Store: --store PATH, else $KPOD_STORE, else ./kpod-store.",
    )
    parser.add_argument("--store", default=None, help="artifact store root (default: $KPOD_STORE or ./kpod-store)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_compare, _add_demo, _add_sql, _add_status, _add_verify, _add_serve, _add_show,
                _add_report, _add_export, _add_lineage, _add_stages):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows.errors import user_error

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("kpod: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - only errors a user caused are turned into one line
        message = user_error(exc)
        if message is None:
            raise
        print(f"kpod: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
