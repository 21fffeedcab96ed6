"""Benchmark of the API layer on its own: the model is swapped for an engine that answers at once.

    python benchmarks/api_bench.py [--requests 500] [--concurrency 16] [--json FILE]

It starts a real server (uvicorn, one process, the worker in a thread of it, as `hidream serve` runs)
on 127.0.0.1 and a free port, over a fresh temporary home (SQLite database, storage directory), in a
child process (`api_bench.py --serve ...`) so that the load generator does not share its GIL. Then an
httpx load generator measures, against that server only:

  submit   POST /api/v1/model/generateImage (256x256, 1 step), N requests, C at a time
  poll     GET /api/v1/model/prediction/{id}, random ids among those, 4N requests, C at a time
  e2e      submit, then poll every --poll-ms until `completed`; N/2 tasks, C in flight
  sync     POST with enable_sync_mode=true; 2N/5 requests, C/2 at a time

and the queue's drain rate: how fast the worker completed the submit phase's tasks (from the tasks'
own started_at / completed_at). The server stops by itself: on SIGINT from this script, when this
script's process is gone, or after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

MODEL = "hidream-o1-image"
PATH_SUBMIT = "/api/v1/model/generateImage"
PATH_GET = "/api/v1/model/prediction/{}"


# --- the server side (child process) -------------------------------------------------------------


class InstantEngine:
    """Stands in for the model: a solid-colour image of the requested size, at once."""

    @dataclass
    class Result:
        images: list

    def generate(self, request: Any, progress: Callable | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> Any:
        from PIL import Image

        img = Image.new("RGB", (request.width, request.height), (request.seed % 256, 96, 160))
        if progress is not None:
            progress(1, 1, lambda: img)
        return InstantEngine.Result([img] * request.num_images)


def load_instant_engine() -> InstantEngine:
    # The worker builds each request with hidream.engine.pipeline (it imports torch): import it here,
    # at start-up, so that the first measured task does not pay for it.
    import hidream.engine.pipeline  # noqa: F401

    return InstantEngine()


def serve(home: Path, port: int, max_seconds: float, parent: int) -> int:
    import uvicorn

    from hidream.service.app import create_app
    from hidream.service.runtime import open_store
    from hidream.service.settings import Settings
    from hidream.service.storage import LocalStorage
    from hidream.service.worker import Worker

    settings = Settings(home=home, port=port, max_queue=10_000)
    store = open_store(settings)
    storage = LocalStorage(settings.files_dir)
    worker = Worker(settings, store, storage, load_instant_engine)
    app = create_app(settings, store, storage, worker)
    # As `hidream serve`: uvicorn's defaults, log level warning (so no access log).
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    started = time.monotonic()

    def watchdog() -> None:
        while not server.should_exit:
            if os.getppid() != parent or time.monotonic() - started > max_seconds:
                server.should_exit = True
                return
            time.sleep(0.5)

    threading.Thread(target=watchdog, name="watchdog", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it stopped on, after a clean shutdown
        pass
    return 0


# --- the load generator ------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    what: str
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies_ms)
        return {
            "phase": self.name, "what": self.what, "concurrency": self.concurrency, "ok": n,
            "errors": self.errors, "wall_s": round(self.wall_s, 3),
            "per_s": round(n / self.wall_s, 1) if self.wall_s else None,
            "p50_ms": round(self.pct(50), 1), "p99_ms": round(self.pct(99), 1),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 1) if n else None,
            "max_ms": round(max(self.latencies_ms), 1) if n else None,
            "server_cpu_pct": round(100 * self.server_cpu_s / self.wall_s) if self.wall_s else None,
            "client_cpu_pct": round(100 * self.client_cpu_s / self.wall_s) if self.wall_s else None,
            **self.extra,
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def parse_ts(s: str | None) -> datetime | None:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ") if s else None


async def run_phase(phase: Phase, n: int, one: Callable[[int], Awaitable[float | None]], server_pid: int) -> Phase:
    """Call one(i) for i in range(n), `phase.concurrency` at a time; one() returns its latency in ms."""
    next_i = 0

    async def lane() -> None:
        nonlocal next_i
        while next_i < n:
            i, next_i = next_i, next_i + 1
            try:
                ms = await one(i)
            except Exception as err:  # counted, not fatal: a benchmark reports what went wrong
                key = type(err).__name__
                phase.errors[key] = phase.errors.get(key, 0) + 1
                continue
            if ms is not None:
                phase.latencies_ms.append(ms)

    cpu0, scpu0, t0 = time.process_time(), proc_cpu_s(server_pid), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(phase.concurrency)))
    phase.wall_s = time.perf_counter() - t0
    phase.client_cpu_s = time.process_time() - cpu0
    phase.server_cpu_s = proc_cpu_s(server_pid) - scpu0
    return phase


async def bench(base: str, token: str, server_pid: int, n: int, c: int, poll_ms: float,
                deadline: float) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    body = {"model": MODEL, "prompt": "a lighthouse at dusk", "image_size": "256x256",
            "num_inference_steps": 1, "seed": 7}
    rng = random.Random(0)
    phases: list[Phase] = []

    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60.0) as client:

        def check_time() -> None:
            if time.monotonic() > deadline:
                raise TimeoutError("benchmark time limit")

        async def submit(extra: dict[str, Any] | None = None) -> tuple[float, dict[str, Any]]:
            check_time()
            t = time.perf_counter()
            r = await client.post(PATH_SUBMIT, json=body | (extra or {}))
            ms = (time.perf_counter() - t) * 1000
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            return ms, r.json()["data"]

        async def get(tid: str) -> tuple[float, dict[str, Any]]:
            check_time()
            t = time.perf_counter()
            r = await client.get(PATH_GET.format(tid))
            ms = (time.perf_counter() - t) * 1000
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            return ms, r.json()["data"]

        async def drain() -> None:
            """Wait until every task submitted so far is completed (the worker has caught up)."""
            while True:
                r = await client.get("/api/v1/predictions", params={"limit": 1})
                items = r.json()["data"]["items"]
                if not items or items[0]["status"] in ("completed", "failed"):
                    # newest is done; the queue is FIFO, so all older ones are too
                    return
                check_time()
                await asyncio.sleep(0.05)

        # Warm-up: connections, the first request's imports and caches; not measured.
        for _ in range(c):
            await submit({"enable_sync_mode": True})
        await drain()

        # (a) submit
        ids: list[str] = [""] * n

        async def one_submit(i: int) -> float:
            ms, data = await submit()
            ids[i] = data["id"]
            return ms

        a = await run_phase(Phase("submit", "POST generateImage (256x256, 1 step)", c), n, one_submit, server_pid)
        phases.append(a)
        ids = [x for x in ids if x]

        # (b) poll: random ids among those just submitted; the worker drains the queue meanwhile.
        picks = [rng.choice(ids) for _ in range(4 * n)]

        async def one_get(i: int) -> float:
            ms, _ = await get(picks[i])
            return ms

        b = await run_phase(Phase("poll", "GET prediction/{id} (random id of those)", c), 4 * n, one_get, server_pid)
        phases.append(b)

        # The queue's drain rate over the submit phase's tasks, from the tasks' own timestamps.
        t_drain = time.perf_counter()
        await drain()
        drain_wait_s = time.perf_counter() - t_drain
        rows = []
        for tid in ids:
            _, data = await get(tid)
            rows.append(data)
        started = [parse_ts(r["started_at"]) for r in rows if r["started_at"]]
        done = sorted(parse_ts(r["completed_at"]) for r in rows if r["status"] == "completed")
        span = (done[-1] - min(started)).total_seconds() if done and started else float("nan")
        queue = {
            "tasks": len(rows), "completed": len(done),
            "failed": sum(r["status"] == "failed" for r in rows),
            "span_s": round(span, 3), "completed_per_s": round(len(done) / span, 1) if span else None,
            "mean_inference_ms": round(statistics.fmean(r["timings"]["inference"] or 0 for r in rows), 2),
            "drain_wait_after_poll_s": round(drain_wait_s, 3),
        }

        # (c) end to end: submit, then poll until completed; C tasks in flight.
        ne = max(1, n // 2)

        async def one_e2e(i: int) -> float:
            t = time.perf_counter()
            _, data = await submit()
            polls = 0
            while data["status"] not in ("completed", "failed"):
                await asyncio.sleep(poll_ms / 1000)
                _, data = await get(data["id"])
                polls += 1
            if data["status"] != "completed":
                raise RuntimeError(f"task {data['id']} {data['status']}: {data['error']}")
            e2e_polls.append(polls)
            return (time.perf_counter() - t) * 1000

        e2e_polls: list[int] = []
        e = Phase("e2e", f"submit, poll every {poll_ms:g} ms until completed", c)
        await run_phase(e, ne, one_e2e, server_pid)
        e.extra["polls_per_task"] = round(statistics.fmean(e2e_polls), 1) if e2e_polls else None
        phases.append(e)

        # (c') the same with one task in flight: the floor of the latency.
        e1 = Phase("e2e-1", "as e2e, one task in flight", 1)
        e2e_polls = []
        await run_phase(e1, max(1, n // 10), one_e2e, server_pid)
        e1.extra["polls_per_task"] = round(statistics.fmean(e2e_polls), 1) if e2e_polls else None
        phases.append(e1)
        await drain()

        # (d) sync mode
        ns, cs = max(1, 2 * n // 5), max(1, c // 2)

        async def one_sync(i: int) -> float:
            ms, data = await submit({"enable_sync_mode": True})
            if data["status"] != "completed":
                raise RuntimeError(f"sync request returned {data['status']}")
            return ms

        d = await run_phase(Phase("sync", "POST with enable_sync_mode=true", cs), ns, one_sync, server_pid)
        phases.append(d)

    return {"phases": [p.summary() for p in phases], "queue": queue}


def table(result: dict[str, Any]) -> str:
    lines = ["| phase | what | concurrency | ok | errors | per s | p50 ms | p99 ms | max ms "
             "| server CPU | client CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["phases"]:
        errs = sum(p["errors"].values())
        lines.append(f"| {p['phase']} | {p['what']} | {p['concurrency']} | {p['ok']} | {errs} | {p['per_s']} "
                     f"| {p['p50_ms']} | {p['p99_ms']} | {p['max_ms']} | {p['server_cpu_pct']}% "
                     f"| {p['client_cpu_pct']}% |")
    q = result["queue"]
    lines.append("")
    lines.append(f"Queue drain (the submit phase's {q['tasks']} tasks, first started_at to last completed_at): "
                 f"{q['completed']} completed in {q['span_s']} s = **{q['completed_per_s']} tasks/s**; "
                 f"{q['failed']} failed; mean engine time {q['mean_inference_ms']} ms per task.")
    for p in result["phases"]:
        if p.get("polls_per_task") is not None:
            lines.append(f"{p['phase']}: {p['polls_per_task']} polls per task on average.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=500, help="N: submit requests (poll 4N, e2e N/2, sync 2N/5)")
    ap.add_argument("--concurrency", type=int, default=16, help="C: requests in flight (sync: C/2)")
    ap.add_argument("--poll-ms", type=float, default=50.0, help="e2e phase: time between two polls of a task")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="stop everything after this long")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve(args.home, args.port, args.max_seconds, args.parent)

    from hidream.service.runtime import open_store
    from hidream.service.settings import Settings

    t_start = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="hidream-api-bench-"))
    port = free_port()
    store = open_store(Settings(home=home))  # create the database and one key before the server starts
    _, token = store.create_key("bench")
    store.engine.dispose()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--home", str(home), "--port", str(port),
           "--parent", str(os.getpid()), "--max-seconds", str(args.max_seconds + 30)]
    env = dict(os.environ, HIDREAM_HOME=str(home))
    server = subprocess.Popen(cmd, env=env)
    try:
        import httpx

        ready_by = time.monotonic() + 120
        while True:  # until the server answers and its worker has loaded the engine
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode} before it was ready")
            try:
                if httpx.get(base + "/healthz", timeout=2).json()["data"]["worker"] == "idle":
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > ready_by:
                raise SystemExit("server not ready after 120 s")
            time.sleep(0.2)
        startup_s = time.monotonic() - t_start
        result = asyncio.run(bench(base, token, server.pid, args.requests, args.concurrency, args.poll_ms,
                                   deadline=t_start + args.max_seconds))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(home, ignore_errors=True)

    result["meta"] = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "requests": args.requests,
        "concurrency": args.concurrency, "poll_ms": args.poll_ms, "cpus": os.cpu_count(),
        "python": platform.python_version(), "startup_s": round(startup_s, 2),
        "total_s": round(time.monotonic() - t_start, 2),
    }
    print(table(result))
    print(f"\n{args.requests} requests, concurrency {args.concurrency}, {os.cpu_count()} CPUs, "
          f"server start-up {result['meta']['startup_s']} s, total {result['meta']['total_s']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
