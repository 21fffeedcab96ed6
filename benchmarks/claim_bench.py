"""Benchmark of the task queue alone: how fast worker processes claim and complete tasks, no HTTP.

    python benchmarks/claim_bench.py --database-url postgresql://postgres@127.0.0.1:5432/test --tasks 2000

For each database (the PostgreSQL one given, in a fresh schema that is dropped at the end, and, for
comparison, a fresh SQLite file in WAL mode unless --no-sqlite), for each mode and for 1 and 4 worker
processes (--workers), it inserts N tasks (one bulk insert, not timed), starts the worker processes
(multiprocessing, spawn), lets them go at once and measures how long they take to drain the queue:

  loop    a tight loop of Store.claim + Store.complete (one image, one usage row): the queue's own cost
  worker  a real Worker (Worker.run) with an instant engine that returns a 64x64 image: everything the
          worker does per task besides the model (recover_expired, claim, the lease-renewing thread,
          progress, PNG encoding, the file written to a local storage directory, complete and charge,
          and the workers-table heartbeat)

The rate is N / (the last task's completed_at - the moment the processes were released), both read
on this machine's clock. Each run checks that every task was completed once and charged once.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

MODEL = "hidream-o1-image"
INPUT = {"prompt": "bench", "width": 64, "height": 64, "keep_original_aspect": False, "num_inference_steps": 1,
         "guidance_scale": 1.0, "seed": 0, "num_images": 1, "output_format": "png", "image_size": "64x64",
         "mode": "text-to-image", "reference_image_urls": []}
LEASE_S = 30.0
PRICE_MICRO_USD = 44_000


# --- the worker processes ------------------------------------------------------------------------


class InstantEngine:
    """Stands in for the model: a solid 64x64 image per requested image, at once."""

    device = "cpu"

    @dataclass
    class Result:
        images: list

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, request: Any, progress: Any = None, should_cancel: Any = None) -> Any:
        from PIL import Image

        self.calls += 1
        if progress is not None:
            progress(1, 1, None)
        return self.Result([Image.new("RGB", (request.width, request.height), (20, 120, 200))
                            for _ in range(request.num_images)])


def child(mode: str, url: str, storage_dir: str, ready: Any, go: Any, stop: Any, results: Any) -> None:
    """One worker process: set up, say ready, wait for `go`, drain, report."""
    from hidream.service.settings import Settings
    from hidream.service.storage import LocalStorage
    from hidream.service.store import Store, connect

    store = Store(connect(url))  # the schema is migrated already
    store.ping()  # the pool's first connection, before the clock starts
    worker_id = f"bench:{os.getpid()}:{secrets.token_hex(4)}"
    if mode == "loop":
        ready.put(os.getpid())
        go.wait()
        claims, completes = [], []
        while True:
            t0 = time.perf_counter()
            task = store.claim(worker_id, [MODEL], LEASE_S)
            t1 = time.perf_counter()
            if task is None:
                break
            claims.append(t1 - t0)
            assert store.complete(task["id"], worker_id, [f"outputs/{task['id']}/0.png"], 1, PRICE_MICRO_USD)
            completes.append(time.perf_counter() - t1)
        results.put({"pid": os.getpid(), "tasks": len(claims), "claim_ms": 1000 * statistics.fmean(claims or [0]),
                     "complete_ms": 1000 * statistics.fmean(completes or [0])})
    else:
        import hidream.engine.pipeline  # noqa: F401 (build_request imports it: torch; a real worker has it loaded)
        from hidream.service.worker import Worker

        settings = Settings(home=Path(storage_dir), storage_dir=Path(storage_dir), database_url=url,
                            lease_s=LEASE_S, price_usd=PRICE_MICRO_USD / 1e6)
        engine = InstantEngine()
        worker = Worker(settings, store, LocalStorage(Path(storage_dir)), lambda: engine, worker_id=worker_id)
        ready.put(os.getpid())
        go.wait()
        thread = threading.Thread(target=worker.run, name="worker")
        thread.start()
        stop.wait()
        worker.stop()
        thread.join()
        results.put({"pid": os.getpid(), "tasks": engine.calls})
    store.close()


# --- the benchmark -------------------------------------------------------------------------------


def sqlalchemy_url(url: str) -> str:
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def fill(store: Any, key_id: str, n: int) -> None:
    """Empty the tables, then queue `n` tasks in one bulk insert (created_at 1 µs apart: a strict order)."""
    from sqlalchemy import delete, insert

    from hidream.service.store import new_id, utcnow
    from hidream.service.tables import tasks, usage, workers

    base = utcnow()
    rows = [{"id": new_id(), "key_id": key_id, "model": MODEL, "status": "created", "input": INPUT | {"seed": i},
             "references": [], "outputs": [], "error": "", "created_at": base + timedelta(microseconds=i),
             "attempts": 0} for i in range(n)]
    with store.engine.begin() as conn:
        conn.execute(delete(usage))
        conn.execute(delete(tasks))
        conn.execute(delete(workers))
        for i in range(0, n, 1000):
            conn.execute(insert(tasks), rows[i:i + 1000])


def check_and_time(store: Any, n: int, go_at: Any) -> float:
    """Every task completed once and charged once; seconds from `go_at` to the last completion."""
    from sqlalchemy import func, select, text

    from hidream.service.tables import tasks

    with store.engine.connect() as conn:
        counts = dict(conn.execute(select(tasks.c.status, func.count()).group_by(tasks.c.status)).all())
        attempts = conn.execute(select(func.max(tasks.c.attempts))).scalar_one()
        last = conn.execute(select(func.max(tasks.c.completed_at))).scalar_one()
        charged, distinct = conn.execute(text(
            "SELECT count(*), count(DISTINCT task_id || ':' || image_index) FROM usage")).one()
    assert counts == {"completed": n}, counts
    assert attempts == 1 and charged == distinct == n, (attempts, charged, distinct)
    return (last - go_at).total_seconds()


def completed(store: Any) -> int:
    from sqlalchemy import func, select

    from hidream.service.tables import tasks

    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(tasks).where(tasks.c.status == "completed")).scalar_one()


def run_once(store: Any, url: str, key_id: str, mode: str, workers: int, n: int, storage_dir: str,
             timeout_s: float) -> dict[str, Any]:
    from hidream.service.store import utcnow

    fill(store, key_id, n)
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=child, args=(mode, url, storage_dir, ready, go, stop, results), daemon=True)
             for _ in range(workers)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        go_at = utcnow()
        go.set()
        deadline = time.monotonic() + timeout_s
        if mode == "loop":
            per = [results.get(timeout=timeout_s) for _ in procs]
        else:  # a Worker never ends by itself: stop it once the queue is drained
            while completed(store) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{mode}, {workers} workers: not drained after {timeout_s} s")
                time.sleep(0.02)
            stop.set()
            per = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    seconds = check_and_time(store, n, go_at)
    assert sum(r["tasks"] for r in per) == n, per
    out = {"mode": mode, "workers": workers, "tasks": n, "seconds": round(seconds, 3),
           "tasks_per_s": round(n / seconds, 1), "per_worker": sorted(r["tasks"] for r in per)}
    if mode == "loop":
        out["claim_ms"] = round(statistics.fmean(r["claim_ms"] for r in per), 2)
        out["complete_ms"] = round(statistics.fmean(r["complete_ms"] for r in per), 2)
    return out


def bench_database(label: str, url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from hidream.service.store import Store

    store = Store.open(url)
    key, _ = store.create_key("claim-bench")
    storage_dir = tempfile.mkdtemp(prefix="claim-bench-files-")
    out = []
    try:
        for mode in args.modes:
            for workers in args.workers:
                r = run_once(store, url, key.id, mode, workers, args.tasks, storage_dir, args.timeout) | {"db": label}
                extra = (f", claim {r['claim_ms']} ms, complete {r['complete_ms']} ms"
                         if mode == "loop" else "")
                print(f"{label:10} {mode:6} {workers} worker(s): {r['tasks']} tasks in {r['seconds']:.2f} s = "
                      f"{r['tasks_per_s']:.0f} tasks/s (per worker {r['per_worker']}{extra})", flush=True)
                out.append(r)
    finally:
        store.close()
        shutil.rmtree(storage_dir, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database-url", required=True, help="a PostgreSQL database this may create a schema in")
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--modes", nargs="+", choices=["loop", "worker"], default=["loop", "worker"])
    ap.add_argument("--no-sqlite", action="store_true", help="skip the SQLite comparison")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one run may take")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.pool import NullPool

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}", flush=True)
    results: list[dict[str, Any]] = []
    base = sqlalchemy_url(args.database_url)
    if not base.startswith("postgresql"):
        ap.error("--database-url: a postgresql:// URL")
    schema = f"claim_bench_{secrets.token_hex(4)}"
    admin = create_engine(base, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar_one()
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    print(f"PostgreSQL {version}, schema {schema} (dropped at the end)", flush=True)
    try:
        u = make_url(base)
        options = " ".join(filter(None, [u.query.get("options"), f"-csearch_path={schema}"]))
        pg_url = u.update_query_dict({"options": options}).render_as_string(hide_password=False)
        results += bench_database("postgresql", pg_url, args)
    finally:
        with admin.connect() as conn:
            conn.execute(text("SET lock_timeout = '10s'"))
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()
    if not args.no_sqlite:
        import sqlite3

        tmp = tempfile.mkdtemp(prefix="claim-bench-sqlite-")
        print(f"SQLite {sqlite3.sqlite_version} (WAL), {tmp}/queue.db", flush=True)
        try:
            results += bench_database("sqlite", f"sqlite:///{tmp}/queue.db", args)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
