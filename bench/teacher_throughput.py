"""Teacher throughput: requests/s of the teacher stage's async orchestration vs a sequential loop.

The server runs in a child process with an injected latency per request (200 ms: a remote API's
think time), so the client and the server do not share one interpreter: the test server
(tests/support/openai_server.py: FastAPI + uvicorn on 127.0.0.1), or with `--server light` a
plain asyncio HTTP/1.1 server (bench/light_server.py, ~5x less CPU per request) that leaves
more of a small machine to the client. The client side is what the teacher stage runs:
`tasks.teacher_backends.dispatcher.run_requests` driving the `openai` backend (the official
async client over `teacher.http_client`: aiohttp or httpx, `--client`) with `concurrency`
workers, each finished request appended to a real ledger. Levels of concurrency 1, 16, 64, 256
each send `rounds * concurrency` requests; ideal requests/s is concurrency / latency. The
baseline is a plain sequential loop over the synchronous `openai` client, one request after
another (what the public KPOD re-implementation does).

The same orchestration is also run with a backend that only sleeps the latency (no HTTP) at
`--no-http-concurrency` (1,024) requests in flight, which separates the orchestration's own
cost from the HTTP client stack's. It reports requests/s, the fraction of ideal, the speed-up
over the sequential loop, the CPU time per request of the client and of the server (what bounds
throughput once the latency is hidden: a shared machine changes req/s but hardly CPU ms per
request), and peak memory (ru_maxrss) of the client and the server processes. Figures go to
bench/out/teacher_throughput.json; docs/benchmarks.md records them.

    .venv/bin/python bench/teacher_throughput.py                  # 200 ms, 1/16/64/256, both clients
    .venv/bin/python bench/teacher_throughput.py --client aiohttp --server fastapi light --concurrency 64 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai
import pyarrow as pa

from storage.store import Store
from tasks.teacher_backends.dispatcher import run_requests
from tasks.teacher_backends.requests import build_requests
from tasks.teacher_backends.teach import open_ledger
from tasks.config.teacher import TeacherConfig
from tasks.teacher_backends import openai_backend
from tasks.teacher_backends.base import TeacherRequest, TeacherResult

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "teacher_throughput.json"
KEY_ENV = "KPOD_BENCH_KEY"


def _rss_mib() -> float:
    """Peak RSS of this process in MiB: since the last `_reset_peak` where Linux allows it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _reset_peak() -> None:
    """Start a new peak RSS (VmHWM), so each level reports its own peak, not an earlier one's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _cpu_s() -> float:
    """CPU seconds this process has used: a cost per request that a busy machine can't skew."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _server_main(latency_s: float, kind: str, conn) -> None:
    """Child process: serve until told to stop, then report this process's peak memory."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # tests/ and bench/ are not installed packages
    from tests.support.openai_server import FakeOpenAI, serve, sum_responder

    if kind == "light":
        from light_server import serve as light_serve

        with light_serve(latency_s, sum_responder) as (url, counters):
            _answer_parent(conn, url, lambda: {"requests": counters.requests, "peak_in_flight": counters.peak_in_flight})
    else:
        with serve(FakeOpenAI(latency_s=latency_s)) as server:
            _answer_parent(conn, server.base_url, lambda: {"requests": len(server.received), "peak_in_flight": server.peak_in_flight})
    conn.send(_rss_mib())


def _answer_parent(conn, url: str, info) -> None:
    conn.send(url)
    while conn.recv() == "cpu":  # the parent reads CPU seconds around each level
        conn.send(_cpu_s())
    conn.send(info())


def _questions(n: int) -> pa.Table:
    return pa.table(
        {
            "question_id": [f"b{i}" for i in range(n)],
            "split": ["train"] * n,
            "question": [f"Item {i}: Ann has {i % 9 + 2} apples and buys {i % 7 + 3} more. How many?" for i in range(n)],
            "meta": ["{}"] * n,
        }
    )


def sequential_loop(base_url: str, n: int) -> float:
    """requests/s of a plain for-loop over the synchronous client."""
    client = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
    t0 = time.perf_counter()
    for i in range(n):
        resp = client.chat.completions.create(
            model="scripted",
            messages=[{"role": "user", "content": f"Q: Item {i}: Ann has 2 apples and buys 3 more.\nA:"}],
            temperature=0.7,
        )
        assert resp.choices[0].message.content
    took = time.perf_counter() - t0
    client.close()
    return n / took


class SleepBackend:
    """No HTTP at all: each request only waits the latency. Isolates the orchestration's cost."""

    def __init__(self, latency_s: float):
        self.latency_s = latency_s

    async def complete(self, request: TeacherRequest) -> TeacherResult:
        await asyncio.sleep(self.latency_s)
        return TeacherResult("Therefore, the answer is 5.", "stop", 10, 6)

    async def aclose(self) -> None:
        return None


def orchestrated(
    base_url: str, concurrency: int, n: int, store_root: Path, sleep_s: float | None = None, flush_every: int = 32,
    http_client: str = "aiohttp",
) -> dict:
    """requests/s of `run_requests` at one concurrency level: through the openai backend over
    `http_client`, or (`sleep_s` given) through `SleepBackend`. The ledger flushes as the
    stage's defaults say unless `flush_every` is raised."""
    cfg = TeacherConfig(
        backend="openai",
        model="scripted",
        base_url=base_url,
        api_key_env=KEY_ENV,
        concurrency=concurrency,
        request_timeout_s=60.0,
        flush_every=flush_every,
        http_client=http_client,
        seed=concurrency,  # a new request id per level: nothing comes from the ledger
    )
    requests = build_requests(_questions(n), cfg)
    ledger = open_ledger(Store(store_root), cfg)

    async def go():
        backend = SleepBackend(sleep_s) if sleep_s is not None else openai_backend.make_backend(cfg)
        try:
            t0 = time.perf_counter()
            stats = await run_requests(requests, backend, ledger, cfg)
            return stats, time.perf_counter() - t0
        finally:
            await backend.aclose()

    stats, took = asyncio.run(go())
    if stats.ok != n or stats.retries:
        raise RuntimeError(f"concurrency {concurrency}: {stats.ok}/{n} ok, {stats.retries} retries: {stats.last_error}")
    return {"requests": n, "seconds": round(took, 3), "req_per_s": n / took}


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def one_level(parent, base_url: str, client: str, c: int, args, latency: float, seq: float, tmp: Path) -> dict:
    """One concurrency level through one HTTP client, with both processes' CPU per request."""
    _reset_peak()
    parent.send("cpu")
    server_cpu0, cpu0 = parent.recv(), _cpu_s()
    r = orchestrated(base_url, c, c * args.rounds, tmp / f"{client}-{c}", http_client=client)
    parent.send("cpu")
    server_cpu, cpu = parent.recv() - server_cpu0, _cpu_s() - cpu0
    ideal = c / latency
    r.update(
        client=client,
        concurrency=c,
        client_cpu_ms_per_request=round(1000 * cpu / r["requests"], 2),
        # one event loop is one core: the most this client could do on an idle core
        cpu_ceiling_req_per_s=round(r["requests"] / cpu, 1),
        server_cpu_ms_per_request=round(1000 * server_cpu / r["requests"], 2),
        ideal_req_per_s=ideal,
        fraction_of_ideal=r["req_per_s"] / ideal,
        speedup_vs_sequential=r["req_per_s"] / seq,
        client_peak_rss_mib=round(_rss_mib(), 1),
        loadavg=_loadavg(),
    )
    print(
        f"{client:7s} concurrency {c:4d}: {r['req_per_s']:8.1f} req/s ({r['fraction_of_ideal']:.0%} of ideal), "
        f"client {r['client_cpu_ms_per_request']:.2f} CPU ms/req, load {r['loadavg']}", file=sys.stderr,
    )
    return r


def against_server(kind: str, args, latency: float) -> dict[str, Any]:
    """The sequential loop and every (client, concurrency) level against one server process."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_server_main, args=(latency, kind, child), daemon=True)
    proc.start()
    base_url = parent.recv()
    rows = []
    try:
        seq = sequential_loop(base_url, args.sequential)
        with tempfile.TemporaryDirectory(prefix="kpod-bench-") as tmp:
            for client in args.client:
                orchestrated(base_url, 3, 6, Path(tmp) / f"warm-up-{client}", http_client=client)  # first-call costs
                rows += [one_level(parent, base_url, client, c, args, latency, seq, Path(tmp)) for c in args.concurrency]
    finally:
        parent.send("stop")
        info = parent.recv()
        rss = parent.recv()
        proc.join(timeout=10)
    return {"server": kind, "sequential_req_per_s": seq, "levels": rows, **info, "server_peak_rss_mib": round(rss, 1)}


def no_http(args, latency: float) -> list[dict]:
    """The orchestration alone (a backend that sleeps the latency) at `--no-http-concurrency`,
    with the default ledger flushes (every 32 results) and with (almost) none."""
    c = args.no_http_concurrency
    out = []
    with tempfile.TemporaryDirectory(prefix="kpod-bench-") as tmp:
        for flush_every in (32, 1_000_000):
            _reset_peak()
            cpu0 = _cpu_s()
            b = orchestrated("http://127.0.0.1:9/v1", c, c * args.rounds, Path(tmp) / f"no-http-{flush_every}",
                             sleep_s=latency, flush_every=flush_every)
            b.update(
                concurrency=c,
                flush_every=flush_every,
                fraction_of_ideal=b["req_per_s"] / (c / latency),
                client_cpu_ms_per_request=round(1000 * (_cpu_s() - cpu0) / b["requests"], 2),
                client_peak_rss_mib=round(_rss_mib(), 1),
                loadavg=_loadavg(),
            )
            out.append(b)
    return out


def print_tables(result: dict) -> None:
    print(
        "| server | client | concurrency | requests | req/s | ideal req/s | of ideal | vs sequential "
        "| client CPU ms/req | client CPU ceiling req/s | server CPU ms/req | client peak RSS MiB | load |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for s in result["servers"]:
        for r in s["levels"]:
            print(
                f"| {s['server']} | {r['client']} | {r['concurrency']} | {r['requests']} | {r['req_per_s']:.1f} | "
                f"{r['ideal_req_per_s']:.0f} | {r['fraction_of_ideal']:.1%} | {r['speedup_vs_sequential']:.1f}x | "
                f"{r['client_cpu_ms_per_request']:.2f} | {r['cpu_ceiling_req_per_s']:.0f} | "
                f"{r['server_cpu_ms_per_request']:.2f} | {r['client_peak_rss_mib']:.0f} | {r['loadavg']} |"
            )
    for s in result["servers"]:
        print(
            f"\n{s['server']} server: sequential loop {s['sequential_req_per_s']:.2f} req/s, peak RSS "
            f"{s['server_peak_rss_mib']:.0f} MiB, peak in flight {s['peak_in_flight']}", end="",
        )
    for b in result["no_http"]:
        print(
            f"\nwithout HTTP (a backend that only sleeps {result['latency_ms']:.0f} ms), concurrency {b['concurrency']}, "
            f"ledger flush every {b['flush_every']}: {b['req_per_s']:.1f} req/s = {b['fraction_of_ideal']:.1%} "
            f"of ideal, {b['client_cpu_ms_per_request']:.2f} CPU ms/req, client peak RSS {b['client_peak_rss_mib']:.0f} MiB, "
            f"load {b['loadavg']}",
            end="",
        )
    print(f"\nwrote {OUT}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-ms", type=float, default=200.0, help="server latency per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--client", nargs="+", default=["aiohttp", "httpx"], choices=["aiohttp", "httpx"],
                    help="teacher.http_client values to measure")
    ap.add_argument("--server", nargs="+", default=["fastapi"], choices=["fastapi", "light"],
                    help="fastapi: the test server; light: bench/light_server.py")
    ap.add_argument("--no-http-concurrency", type=int, default=1024, help="in flight for the orchestration alone")
    ap.add_argument("--rounds", type=int, default=8, help="requests per worker at each level")
    ap.add_argument("--sequential", type=int, default=15, help="requests of the sequential loop")
    args = ap.parse_args()
    os.environ[KEY_ENV] = "sk-bench"
    latency = args.latency_ms / 1000.0

    servers = [against_server(kind, args, latency) for kind in args.server]
    bare = no_http(args, latency)
    result = {
        "latency_ms": args.latency_ms,
        "servers": servers,
        "no_http": bare,
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.python_implementation()} {platform.python_version()}",
        "openai": openai.__version__,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print_tables(result)


if __name__ == "__main__":
    main()
