"""Scale-out: 2 API processes and 3 worker processes over one PostgreSQL database and one S3 bucket.

Every process is a real `hidream serve --no-worker` or `hidream worker` on 127.0.0.1, with its own
HIDREAM_HOME (as on separate machines), sharing only HIDREAM_DATABASE_URL (a fresh PostgreSQL schema),
HIDREAM_STORAGE_URL (s3://<bucket>/run on moto's server, see test_s3.py) and HIDREAM_SECRET. One key is
created beforehand with `hidream keys create`. 200 small tasks are submitted, alternating between the
two APIs; while they run, a worker that holds a task is killed with SIGKILL. Then every task must be
completed exactly once (the killed worker's one on a second attempt, after its 2 s lease expired), be
read the same through either API, download from its presigned S3 URL, and be charged exactly once.

Needs HIDREAM_TEST_POSTGRES_URL (see databases.py); skipped without it. All processes are stopped by
fixture finalizers, before the schema is dropped and the moto server stops.
"""

from __future__ import annotations

import io
import secrets
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from hidream.service.tables import tasks, usage

try:  # tests/service as a package or as a plain directory on sys.path
    from . import server_util as su
    from .databases import SKIP_REASON, postgres_base_url, postgres_url  # noqa: F401 (a fixture)
    from .test_s3 import BUCKET, REGION, S3, s3  # noqa: F401 (a fixture)
except ImportError:
    import server_util as su
    from databases import SKIP_REASON, postgres_base_url, postgres_url  # noqa: F401 (a fixture)
    from test_s3 import BUCKET, REGION, S3, s3  # noqa: F401 (a fixture)

MODEL = "hidream-o1-image"
PRICE = 0.044
GENERATE = "/api/v1/model/generateImage"
N_TASKS = 200
N_APIS, N_WORKERS = 2, 3
PREFIX = "run"  # HIDREAM_STORAGE_URL=s3://<bucket>/run
LEASE_S = 2
# 256x256 is the smallest custom size; 2 steps take about 10 to 15 ms on the demo model with one thread.
REQUEST = {"model": MODEL, "prompt": "a lighthouse on a cliff at dusk", "image_size": "256x256",
           "num_inference_steps": 2}
DRAIN_TIMEOUT_S = 60

pytestmark = [pytest.mark.skipif(postgres_base_url() is None, reason=SKIP_REASON), pytest.mark.timeout(300)]


@dataclass
class Cluster:
    apis: list[su.Proc]
    workers: list[su.Proc]
    key: str
    db_url: str
    s3: S3

    def clients(self) -> list[httpx.Client]:
        return [su.client(api.base_url, self.key) for api in self.apis]


procs = su.procs  # the fixture: processes stopped when the test ends


@pytest.fixture
def cluster(postgres_url: str, s3: S3, demo_checkpoint: Path, procs: su.Processes, tmp_path: Path) -> Cluster:
    """One key, then 2 APIs (no worker) and 3 workers, started together and ready when this returns."""
    shared = {"database_url": postgres_url, "storage_url": f"s3://{BUCKET}/{PREFIX}",
              "s3_endpoint_url": s3.endpoint, "s3_region": REGION, "s3_access_key_id": "test",
              "s3_secret_access_key": "test", "secret": secrets.token_hex(32), "lease_s": LEASE_S,
              "max_queue": 10 * N_TASKS}  # the default (100) would turn part of a burst of 200 away with 429

    def env(name: str, **more: Any) -> dict[str, str]:
        e = su.service_env(tmp_path / name, demo_checkpoint, **shared, **more)
        e["AWS_EC2_METADATA_DISABLED"] = "true"  # never ask 169.254.169.254 for credentials
        return e

    # The key first (this also migrates the fresh schema): then no API makes a "first key" of its own.
    made = su.run_cli(["keys", "create", "--name", "scale-out"], env("keys"), timeout=120)
    assert made.returncode == 0, made.stderr
    key = made.stdout.split()[0]
    assert key.startswith("hd-"), made.stdout

    ports = [su.free_port() for _ in range(N_APIS)]
    while len(set(ports)) < N_APIS:
        ports = [su.free_port() for _ in range(N_APIS)]
    apis = [procs.serve(env(f"api{i}", public_url=f"http://127.0.0.1:{port}"), port=port, worker=False,
                        wait=False) for i, port in enumerate(ports)]
    workers = [procs.worker(env(f"worker{i}"), wait=False) for i in range(N_WORKERS)]
    for api in apis:
        api.wait_ready(worker=False, timeout=120)
        assert api.first_key() is None, api.output()  # a key existed: no "first key" was made
    for w in workers:
        w.wait_for_output("ready for", timeout=120)
    return Cluster(apis, workers, key, postgres_url, s3)


# --- helpers ------------------------------------------------------------------------------------------------


def process_state(pid: int) -> str:
    """The state letter in /proc/<pid>/stat (R, S, T for stopped, Z, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def kill_one_mid_task(engine, workers: list[su.Proc], timeout: float = 30) -> tuple[str, str, su.Proc]:
    """SIGKILL a worker while it holds a task: (task id, worker id, process).

    A worker that holds a `processing` task (its lease_owner is host:pid:random) is frozen with SIGSTOP
    first, so that the task cannot finish between the check and the kill; if it did finish before the
    freeze, the worker is let go (SIGCONT) and another try is made.
    """
    by_pid = {w.popen.pid: w for w in workers}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            held = conn.execute(select(tasks.c.id, tasks.c.lease_owner)
                                .where(tasks.c.status == "processing")).all()
        for task_id, owner in held:
            proc = by_pid.get(int(owner.split(":")[-2]))
            if proc is None or not proc.alive():
                continue
            proc.signal(signal.SIGSTOP)
            try:
                stopped_by = time.monotonic() + 5
                while process_state(proc.popen.pid) not in ("T", "Z"):  # stopped for sure, not just signalled
                    assert time.monotonic() < stopped_by, f"worker {proc.popen.pid} did not stop on SIGSTOP"
                    time.sleep(0.001)
                with engine.connect() as conn:
                    row = conn.execute(select(tasks.c.status, tasks.c.lease_owner, tasks.c.attempts)
                                       .where(tasks.c.id == task_id)).one()
                if row.status == "processing" and row.lease_owner == owner:
                    assert row.attempts == 1, row
                    proc.signal(signal.SIGKILL)
                    assert proc.wait_exit(10) == -signal.SIGKILL
                    return task_id, owner, proc
            finally:
                proc.signal(signal.SIGCONT)  # no effect once it is dead
        time.sleep(0.002)
    raise AssertionError(f"no worker was seen holding a task within {timeout} s")


def wait_all_completed(engine, ids: set[str], timeout: float) -> dict[str, int]:
    """Until every task is completed (failing at once on a failed one); the counts per status."""
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            counts = dict(conn.execute(select(tasks.c.status, func.count()).group_by(tasks.c.status)).all())
            failed = conn.execute(select(tasks.c.id, tasks.c.error).where(tasks.c.status == "failed")).all()
        assert not failed, f"failed tasks: {failed[:5]}"
        if counts.get("completed", 0) == len(ids):
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"not all {len(ids)} tasks completed after {timeout} s: {counts}")
        time.sleep(0.1)


def stripped(url: str) -> str:
    """A presigned URL without its query (the signature and date differ between two signings)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def comparable(pred: dict[str, Any]) -> dict[str, Any]:
    """A prediction less what depends on the API that renders it (its own URL, the URLs' signatures)."""
    return {k: v for k, v in pred.items() if k != "urls"} | {"outputs": [stripped(u) for u in pred["outputs"]]}


# --- the test -----------------------------------------------------------------------------------------------


def test_two_apis_three_workers_one_killed(cluster: Cluster) -> None:
    t0 = time.monotonic()
    engine = create_engine(cluster.db_url, poolclass=NullPool)
    clients = cluster.clients()
    try:
        # 1. Submit, alternating between the APIs, 8 at a time; meanwhile kill a worker that holds a task.
        def submit(i: int) -> tuple[int, dict[str, Any]]:
            api = i % N_APIS
            return api, su.ok(clients[api].post(GENERATE, json=REQUEST | {"seed": i}))

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(submit, i) for i in range(N_TASKS)]
            killed_task, killed_owner, killed = kill_one_mid_task(engine, cluster.workers)
            submitted = [f.result() for f in futures]
        t_submitted = time.monotonic()
        ids = {pred["id"] for _, pred in submitted}
        assert len(ids) == N_TASKS
        for api, pred in submitted:
            assert pred["urls"]["get"] == f"{cluster.apis[api].base_url}/api/v1/model/prediction/{pred['id']}"
        assert killed_task in ids
        assert sum(w.alive() for w in cluster.workers) == N_WORKERS - 1

        # 2. Everything completes: the killed worker's task once its lease expired, on another worker.
        counts = wait_all_completed(engine, ids, DRAIN_TIMEOUT_S)
        t_drained = time.monotonic()
        assert counts == {"completed": N_TASKS}, counts

        # 3. The database: each task completed once, the killed one on its second attempt; one charge per image.
        with engine.connect() as conn:
            rows = {r["id"]: dict(r) for r in conn.execute(select(tasks)).mappings()}
            n_usage, n_distinct = conn.execute(
                text("SELECT count(*), count(DISTINCT (task_id, image_index)) FROM usage")).one()
            per_task = dict(conn.execute(select(usage.c.task_id, func.count()).group_by(usage.c.task_id)).all())
            charged_keys = conn.execute(select(func.count(func.distinct(usage.c.key_id)))).scalar_one()
        assert set(rows) == ids
        for tid, row in rows.items():
            assert row["status"] == "completed" and row["attempts"] >= 1, row
            assert row["lease_owner"] is None and row["lease_expires_at"] is None, row
            assert row["outputs"] == [f"outputs/{tid}/0.png"], row
            assert row["started_at"] <= row["completed_at"], row
        assert rows[killed_task]["attempts"] == 2, rows[killed_task]
        attempts = sorted(r["attempts"] for r in rows.values())
        assert n_usage == n_distinct == N_TASKS * 1  # tasks x images (one image each)
        assert per_task == {tid: 1 for tid in ids}
        assert charged_keys == 1
        # One object per image in the bucket: a retried task rewrote its own key, nothing else.
        listed = cluster.s3.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/outputs/", MaxKeys=1000)
        assert sorted(o["Key"] for o in listed.get("Contents", [])) == sorted(
            f"{PREFIX}/outputs/{tid}/0.png" for tid in ids)

        # 4. Every prediction reads the same through either API, and its image downloads from S3.
        def check(tid: str) -> tuple[int, int]:
            preds = [su.ok(c.get(f"/api/v1/model/prediction/{tid}")) for c in clients]
            for api, pred in zip(cluster.apis, preds, strict=True):
                assert pred["urls"]["get"] == f"{api.base_url}/api/v1/model/prediction/{tid}"
                assert pred["status"] == "completed" and pred["error"] == "", pred
            assert comparable(preds[0]) == comparable(preds[1]), preds
            assert preds[0]["outputs"][0].startswith(f"{cluster.s3.endpoint}/{BUCKET}/{PREFIX}/outputs/{tid}/0.png?")
            bodies = []
            for pred in preds:  # each API's presigned URL, no credentials, no key
                got = httpx.get(pred["outputs"][0], timeout=30)
                assert got.status_code == 200 and got.headers["content-type"] == "image/png", (got, got.text[:300])
                bodies.append(got.content)
            assert bodies[0] == bodies[1]
            img = Image.open(io.BytesIO(bodies[0]))
            assert (img.format, img.size) == ("PNG", (256, 256))
            return len(bodies[0]), preds[0]["input"]["seed"]

        with ThreadPoolExecutor(8) as pool:
            checked = list(pool.map(check, sorted(ids)))
        assert sorted(seed for _, seed in checked) == list(range(N_TASKS))

        # 5. The usage ledger, through either API.
        for c in clients:
            u = su.ok(c.get("/api/v1/usage"))
            assert u["images"] == N_TASKS * 1, u
            assert u["amount_usd"] == pytest.approx(N_TASKS * PRICE)
            assert sum(d["images"] for d in u["days"]) == N_TASKS
        t_checked = time.monotonic()

        for proc in [*cluster.apis, *(w for w in cluster.workers if w is not killed)]:
            assert proc.alive(), proc.output()[-3000:]
        print(f"\nscale-out: {N_TASKS} tasks submitted in {t_submitted - t0:.1f} s, all completed "
              f"{t_drained - t0:.1f} s after the first submit, checked in {t_checked - t_drained:.1f} s; "
              f"killed worker {killed_owner} holding task {killed_task}; "
              f"tasks per attempt count: {dict(sorted(Counter(attempts).items()))}")
    finally:
        for c in clients:
            c.close()
        engine.dispose()
