"""Teacher throughput: requests/s of the teacher stage's async orchestration vs a sequential loop.

The test server (tests/support/openai_server.py: FastAPI + uvicorn on 127.0.0.1) runs in a
child process with an injected latency per request (200 ms: a remote API's think time), so the
client and the server do not share one interpreter. The client side is what the teacher stage
runs: `tasks.teacher_backends.dispatcher.run_requests` driving the `openai` backend (the official async client)
with `concurrency` workers, each finished request appended to a real ledger. Levels of
concurrency 1, 16, 64, 256 each send `rounds * concurrency` requests; ideal requests/s is
concurrency / latency. The baseline is a plain sequential loop over the synchronous `openai`
client, one request after another (what the public KPOD re-implementation does).

The same orchestration is also run at the highest level with a backend that only sleeps the
latency (no HTTP), which separates the orchestration's own cost from the HTTP client stack's.
It reports requests/s, the fraction of ideal, the speed-up over the sequential loop, the CPU
time per request of the client and of the server (what bounds throughput once the latency is
hidden: a shared machine changes req/s but hardly CPU ms per request), and peak memory
(ru_maxrss) of the client and the server processes. Figures go to
bench/out/teacher_throughput.json; docs/benchmarks.md records them.

    .venv/bin/python bench/teacher_throughput.py                  # 200 ms, 1/16/64/256
    .venv/bin/python bench/teacher_throughput.py --rounds 4 --concurrency 1 16
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_s() -> float:
    """CPU seconds this process has used: a cost per request that a busy machine can't skew."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _server_main(latency_s: float, conn) -> None:
    """Child process: serve until told to stop, then report this process's peak memory."""
    sys.path.insert(0, str(ROOT))  # tests/ is not an installed package
    from tests.support.openai_server import FakeOpenAI, serve

    with serve(FakeOpenAI(latency_s=latency_s)) as server:
        conn.send(server.base_url)
        while conn.recv() == "cpu":  # the parent reads CPU seconds around each level
            conn.send(_cpu_s())
        conn.send({"requests": len(server.received), "peak_in_flight": server.peak_in_flight})
    conn.send(_rss_mib())


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
    base_url: str, concurrency: int, n: int, store_root: Path, sleep_s: float | None = None, flush_every: int = 32
) -> dict:
    """requests/s of `run_requests` at one concurrency level: through the openai backend, or
    (`sleep_s` given) through `SleepBackend`. The ledger flushes as the stage's defaults say
    unless `flush_every` is raised."""
    cfg = TeacherConfig(
        backend="openai",
        model="scripted",
        base_url=base_url,
        api_key_env=KEY_ENV,
        concurrency=concurrency,
        request_timeout_s=60.0,
        flush_every=flush_every,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-ms", type=float, default=200.0, help="server latency per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--rounds", type=int, default=8, help="requests per worker at each level")
    ap.add_argument("--sequential", type=int, default=15, help="requests of the sequential loop")
    args = ap.parse_args()
    os.environ[KEY_ENV] = "sk-bench"
    latency = args.latency_ms / 1000.0

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_server_main, args=(latency, child), daemon=True)
    proc.start()
    base_url = parent.recv()
    rows = []
    try:
        seq = sequential_loop(base_url, args.sequential)
        with tempfile.TemporaryDirectory(prefix="kpod-bench-") as tmp:
            orchestrated(base_url, 3, 6, Path(tmp) / "warm-up")  # first-call costs stay out of level 1
            for c in args.concurrency:
                parent.send("cpu")
                server_cpu0, cpu0 = parent.recv(), _cpu_s()
                r = orchestrated(base_url, c, c * args.rounds, Path(tmp))
                parent.send("cpu")
                server_cpu, cpu = parent.recv() - server_cpu0, _cpu_s() - cpu0
                ideal = c / latency
                r.update(
                    client_cpu_ms_per_request=round(1000 * cpu / r["requests"], 2),
                    # one event loop is one core: the most this client could do on an idle core
                    cpu_ceiling_req_per_s=round(r["requests"] / cpu, 1),
                    server_cpu_ms_per_request=round(1000 * server_cpu / r["requests"], 2),
                    concurrency=c,
                    ideal_req_per_s=ideal,
                    fraction_of_ideal=r["req_per_s"] / ideal,
                    speedup_vs_sequential=r["req_per_s"] / seq,
                    client_peak_rss_mib=round(_rss_mib(), 1),
                )
                rows.append(r)
                print(f"concurrency {c:4d}: {r['req_per_s']:8.1f} req/s ({r['fraction_of_ideal']:.0%} of ideal)", file=sys.stderr)
            # the same orchestration without HTTP, at the highest level: what it costs by itself,
            # with the default ledger flushes (every 32 results) and with (almost) none
            c = max(args.concurrency)
            bare = []
            for flush_every in (32, 1_000_000):
                cpu0 = _cpu_s()
                b = orchestrated(
                    base_url, c, c * args.rounds, Path(tmp) / f"no-http-{flush_every}", sleep_s=latency,
                    flush_every=flush_every,
                )
                b.update(
                    concurrency=c,
                    flush_every=flush_every,
                    fraction_of_ideal=b["req_per_s"] / (c / latency),
                    client_cpu_ms_per_request=round(1000 * (_cpu_s() - cpu0) / b["requests"], 2),
                )
                bare.append(b)
    finally:
        parent.send("stop")
        server_info = parent.recv()
        server_rss = parent.recv()
        proc.join(timeout=10)

    result = {
        "latency_ms": args.latency_ms,
        "sequential_req_per_s": seq,
        "levels": rows,
        "no_http": bare,
        "server": {**server_info, "peak_rss_mib": round(server_rss, 1)},
        "client_peak_rss_mib": round(_rss_mib(), 1),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.python_implementation()} {platform.python_version()}",
        "openai": openai.__version__,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))

    print(f"latency {args.latency_ms:.0f} ms; sequential loop {seq:.2f} req/s\n")
    print(
        "| concurrency | requests | req/s | ideal req/s | of ideal | vs sequential "
        "| client CPU ms/req | client CPU ceiling req/s | server CPU ms/req | client peak RSS MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['requests']} | {r['req_per_s']:.1f} | {r['ideal_req_per_s']:.0f} | "
            f"{r['fraction_of_ideal']:.1%} | {r['speedup_vs_sequential']:.1f}x | "
            f"{r['client_cpu_ms_per_request']:.2f} | {r['cpu_ceiling_req_per_s']:.0f} | "
            f"{r['server_cpu_ms_per_request']:.2f} | "
            f"{r['client_peak_rss_mib']:.0f} |"
        )
    for b in bare:
        print(
            f"\nwithout HTTP (a backend that only sleeps {args.latency_ms:.0f} ms), concurrency {b['concurrency']}, "
            f"ledger flush every {b['flush_every']}: {b['req_per_s']:.1f} req/s = {b['fraction_of_ideal']:.1%} "
            f"of ideal, {b['client_cpu_ms_per_request']:.2f} CPU ms/req",
            end="",
        )
    print()
    print(f"server peak RSS {server_rss:.0f} MiB, peak in flight {server_info['peak_in_flight']}; wrote {OUT}")


if __name__ == "__main__":
    main()
