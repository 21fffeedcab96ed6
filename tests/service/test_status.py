"""Workers' heartbeat table, `Store.status`, `hidream status`, and the /livez, /readyz probes.

The store's tests run on SQLite and PostgreSQL (HIDREAM_TEST_POSTGRES_URL), through `store_url`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect, text, update

from hidream.cli import main
from hidream.service.app import create_app
from hidream.service.settings import Settings
from hidream.service.status import describe_engine, render_status, stale_after_s
from hidream.service.storage import LocalStorage
from hidream.service.store import Store, utcnow
from hidream.service.tables import metadata, tasks, workers
from hidream.service.worker import Worker, WorkerState, heartbeat_interval_s

try:  # tests/service as a package or as a plain directory on sys.path
    from .databases import key, postgres_url, sqlite_url, store, store_url  # noqa: F401 - fixtures
    from .test_worker import INPUT, SolidEngine
except ImportError:
    from databases import key, postgres_url, sqlite_url, store, store_url  # noqa: F401 - fixtures
    from test_worker import INPUT, SolidEngine

MODEL = "hidream-o1-image"



def submit(store: Store, key: str, model: str) -> str:
    return store.insert_task(key, model, {"num_images": 1, "prompt": "p"}, [], 10_000)["id"]


def set_heartbeat(store: Store, worker_id: str, at: datetime) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(workers).where(workers.c.id == worker_id).values(heartbeat_at=at))


def set_completed_at(store: Store, task_id: str, at: datetime) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(completed_at=at))


# --- schema --------------------------------------------------------------------------------------------


def test_the_workers_migration_matches_the_tables(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0004"]
    assert diff == []
    assert "workers" in inspect(store.engine).get_table_names()
    columns = {c["name"]: c["nullable"] for c in inspect(store.engine).get_columns("workers")}
    assert columns == {"id": False, "host": False, "pid": False, "models": False, "device": False,
                       "state": False, "started_at": False, "heartbeat_at": False, "current_task": True,
                       "engine": True}


# --- the store's worker registry -------------------------------------------------------------------------


def test_register_heartbeat_remove(store: Store) -> None:
    before = utcnow()
    store.register_worker("w1", "gpu-box", 4242, ["m1", "m2"], "cuda:0")
    [w] = store.list_workers()
    assert (w["id"], w["host"], w["pid"], w["models"], w["device"]) == ("w1", "gpu-box", 4242, ["m1", "m2"], "cuda:0")
    assert w["state"] == "idle" and w["current_task"] is None
    assert before <= w["started_at"] == w["heartbeat_at"] <= utcnow()

    set_heartbeat(store, "w1", w["heartbeat_at"] - timedelta(minutes=5))
    assert store.worker_heartbeat("w1", "running", "t" * 32)
    [w2] = store.list_workers()
    assert w2["state"] == "running" and w2["current_task"] == "t" * 32
    assert w2["heartbeat_at"] >= before and w2["started_at"] == w["started_at"]
    assert store.worker_heartbeat("w1", "idle", None)
    assert store.list_workers()[0]["current_task"] is None
    assert not store.worker_heartbeat("nobody", "idle", None)  # unknown: nothing written

    store.register_worker("w0", "other", 1, ["m3"], "cpu")
    store.register_worker("w1", "gpu-box", 4243, ["m1"], "cuda:1")  # the same id again replaces its row
    listed = {w["id"]: w for w in store.list_workers()}
    assert set(listed) == {"w0", "w1"} and listed["w1"]["pid"] == 4243 and listed["w1"]["models"] == ["m1"]

    assert store.remove_worker("w1")
    assert not store.remove_worker("w1")
    assert [w["id"] for w in store.list_workers()] == ["w0"]


FP8_ENGINE = {"precision": "bf16", "quantize": "fp8", "offload": "layers", "variant": "dev"}


def test_a_worker_row_carries_how_its_engine_runs(store: Store) -> None:
    store.register_worker("w-fp8", "gpu-box", 1, ["m"], "cuda:0", FP8_ENGINE)
    store.register_worker("w-old", "old-box", 2, ["m"], "cpu")  # an older worker: says nothing of its engine
    listed = {w["id"]: w for w in store.list_workers()}
    assert listed["w-fp8"]["engine"] == FP8_ENGINE and listed["w-old"]["engine"] is None
    with store.engine.connect() as conn:  # SQL NULL, not the JSON null
        assert conn.execute(text("SELECT COUNT(*) FROM workers WHERE engine IS NULL")).scalar_one() == 1
    assert store.worker_heartbeat("w-fp8", "running", None)  # a beat keeps it
    status = {w["id"]: w for w in store.status(stale_after_s=30)["workers"]}
    assert status["w-fp8"]["engine"] == FP8_ENGINE and status["w-old"]["engine"] is None
    store.register_worker("w-fp8", "gpu-box", 1, ["m"], "cuda:0", FP8_ENGINE | {"quantize": None})  # again: replaced
    assert {w["id"]: w for w in store.list_workers()}["w-fp8"]["engine"]["quantize"] is None


def test_live_workers_are_the_beating_ones_not_stopping(store: Store) -> None:
    for wid in ("w-live", "w-stale", "w-stopping"):
        store.register_worker(wid, "box", 1, ["m"], "cpu", FP8_ENGINE)
    set_heartbeat(store, "w-stale", utcnow() - timedelta(seconds=120))
    store.worker_heartbeat("w-stopping", "stopping", None)
    assert [w["id"] for w in store.live_workers(stale_after_s=30)] == ["w-live"]
    assert store.live_workers(stale_after_s=30)[0]["engine"] == FP8_ENGINE
    assert {w["id"] for w in store.live_workers(stale_after_s=3600)} == {"w-live", "w-stale"}


def test_status(store: Store, key: str) -> None:
    now = utcnow()
    a1, a2, a3 = (submit(store, key, "a") for _ in range(3))
    b1 = submit(store, key, "b")
    submit(store, key, "c")
    store.register_worker("wa", "host-a", 10, ["a"], "cuda:0")
    store.register_worker("wb", "host-b", 11, ["b", "c"], "cuda:1")
    set_heartbeat(store, "wb", now - timedelta(seconds=120))  # stale: it serves nothing any more

    running = store.claim("wa", ["a"], lease_s=60)
    assert running["id"] == a1
    store.progress(a1, "wa", 3, 10)
    store.worker_heartbeat("wa", "running", a1)
    # Throughput: finished 20 s, 3 min, 10 min and 20 min ago.
    for tid, ago, ok in ((a2, 20, True), (a3, 180, True), (b1, 600, False)):
        assert store.claim("x", [store.get_task(tid)["model"]], lease_s=60)["id"] == tid
        assert store.complete(tid, "x", [], 1, 0) if ok else store.fail(tid, "x", "boom")
        set_completed_at(store, tid, now - timedelta(seconds=ago))
    old = submit(store, key, "a")
    store.claim("x", ["a"], lease_s=60)
    store.complete(old, "x", [], 1, 0)
    set_completed_at(store, old, now - timedelta(minutes=20))  # out of every window
    queued_a = [submit(store, key, "a") for _ in range(2)]

    status = store.status(stale_after_s=30)
    assert status["queue"] == {"a": 2, "c": 1}
    [run] = status["running"]
    assert (run["id"], run["model"], run["worker"], run["step"], run["total"]) == (a1, "a", "wa", 3, 10)
    assert run["started_at"] is not None and run["running_s"] >= 0
    by_id = {w["id"]: w for w in status["workers"]}
    assert set(by_id) == {"wa", "wb"}
    assert by_id["wa"]["alive"] and by_id["wa"]["models"] == ["a"] and by_id["wa"]["state"] == "running"
    assert by_id["wa"]["current_task"] == a1 and by_id["wa"]["heartbeat_age_s"] < 30
    assert not by_id["wb"]["alive"] and by_id["wb"]["heartbeat_age_s"] >= 119
    assert status["throughput"] == {"1m": {"completed": 1, "failed": 0}, "5m": {"completed": 2, "failed": 0},
                                    "15m": {"completed": 2, "failed": 1}}
    # "c" waits and its only worker is stale; "a" has a live worker; "b" has nothing waiting.
    assert status["stuck"] == [{"model": "c", "tasks": 1}]

    store.worker_heartbeat("wb", "idle", None)  # wb is back: nothing is stuck
    assert store.status(stale_after_s=30)["stuck"] == []
    store.worker_heartbeat("wb", "stopping", None)  # alive, but leaving: it serves no more tasks
    assert store.status(stale_after_s=30)["stuck"] == [{"model": "c", "tasks": 1}]
    store.remove_worker("wa")
    assert store.status(stale_after_s=30)["stuck"] == [{"model": "a", "tasks": len(queued_a)},
                                                       {"model": "c", "tasks": 1}]
    assert store.status(stale_after_s=3600)["workers"][0]["alive"]  # the threshold is the caller's


def test_status_of_an_empty_database(store: Store) -> None:
    status = store.status(stale_after_s=30)
    assert (status["queue"], status["running"], status["workers"], status["stuck"]) == ({}, [], [], [])
    assert status["throughput"] == {w: {"completed": 0, "failed": 0} for w in ("1m", "5m", "15m")}


# --- the text rendering ------------------------------------------------------------------------------------


def test_render_status_shows_every_fact(store: Store, key: str) -> None:
    for _ in range(2):
        submit(store, key, "lonely-model")
    tid = submit(store, key, "served")
    store.register_worker("worker-1", "gpu-box", 7, ["served", "other"], "cuda:0", FP8_ENGINE)
    store.register_worker("worker-2", "old-box", 8, ["lonely-model"], "cpu")
    set_heartbeat(store, "worker-2", utcnow() - timedelta(minutes=10))
    store.claim("worker-1", ["served"], lease_s=60)
    store.progress(tid, "worker-1", 7, 28)
    store.worker_heartbeat("worker-1", "running", tid)
    done = submit(store, key, "served")
    store.claim("worker-1", ["served"], lease_s=60)
    store.complete(done, "worker-1", [], 1, 0)
    submit(store, key, "served")

    out = render_status(store.status(stale_after_s=30))
    lines = out.splitlines()
    assert any("lonely-model" in ln and ln.split()[-1] == "2" for ln in lines)  # queue depth per model
    assert any(ln.split()[:2] == ["served", "1"] for ln in lines)
    running = next(ln for ln in lines if ln.strip().startswith(tid))
    assert "served" in running and "worker-1" in running and "7/28 (25%)" in running
    w1 = next(ln for ln in lines if ln.strip().startswith("worker-1"))
    assert "served, other" in w1 and "cuda:0" in w1 and "running" in w1 and tid in w1 and "s ago" in w1
    assert "  bf16, fp8 weights, offload layers  " in w1
    header = next(ln for ln in lines if ln.strip().startswith("worker "))
    assert header.index("engine") == w1.index("bf16")  # under its column
    w2 = next(ln for ln in lines if ln.strip().startswith("worker-2"))
    assert "NO (stale)" in w2 and "10 min ago" in w2
    assert w2[header.index("engine"):].startswith("- ")  # registered without engine facts
    assert any(ln.split()[:4] == ["1", "min", "1", "0"] for ln in lines)  # throughput: completed / failed
    assert "  2 task(s) for lonely-model wait: no live worker serves it" in lines
    assert "task(s) for served" not in out


@pytest.mark.parametrize(("engine", "shown"), [
    ({"precision": "bf16", "quantize": "fp8", "offload": "layers", "variant": "full"}, "bf16, fp8 weights, offload layers"),
    ({"precision": "bf16-fp32acc", "quantize": None, "offload": "none", "variant": "full"}, "bf16-fp32acc"),
    ({"precision": "fp32", "quantize": None, "offload": "layers"}, "fp32, offload layers"),
    ({"precision": None, "quantize": "fp8", "offload": None}, "fp8 weights"),
    ({"precision": None, "quantize": None, "offload": None, "variant": None}, "-"),
    (None, "-"),
])
def test_describe_engine(engine: dict | None, shown: str) -> None:
    assert describe_engine(engine) == shown


def test_render_status_of_nothing() -> None:
    out = render_status({"queue": {}, "running": [], "workers": [], "stuck": [], "stale_after_s": 30,
                         "throughput": {w: {"completed": 0, "failed": 0} for w in ("1m", "5m", "15m")}})
    assert "(empty)" in out and "(none registered)" in out and "wait:" not in out


# --- the worker advertises itself ----------------------------------------------------------------------------


class DeviceEngine(SolidEngine):
    device = "cuda:3"  # what str(engine.device) gives on a real engine


class Fp8OffloadEngine(DeviceEngine):
    """An engine as Engine.load returns it with quantize="fp8", offload="auto" (resolved to layers)."""

    precision, quantize, offload, variant = "bf16", "fp8", "layers", "dev"


@pytest.fixture
def worker_service(tmp_path: Path):
    settings = Settings(home=tmp_path, lease_s=1.0, max_attempts=2, model_ids=("m1", "m2"))
    store = Store.open(settings.db_url)
    yield settings, store, LocalStorage(settings.files_dir), store.create_key()[0].id
    store.close()


def wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_the_worker_registers_beats_and_leaves(worker_service) -> None:
    settings, store, storage, key_id = worker_service
    settings = replace(settings, lease_s=30.0)  # periodic beats every 10 s: the ones seen below are the state's
    worker = Worker(settings, store, storage, lambda: DeviceEngine(step_s=0.01), worker_id="w-test")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    wait(lambda: len(store.list_workers()) == 1)
    [w] = store.list_workers()
    assert (w["id"], w["models"], w["device"]) == ("w-test", ["m1", "m2"], "cuda:3")
    assert (w["host"], w["pid"]) == (socket.gethostname(), os.getpid())
    assert w["state"] == "idle" and w["current_task"] is None
    assert w["engine"] == {"precision": None, "quantize": None, "offload": None, "variant": None}  # says nothing

    tid = store.insert_task(key_id, "m2", INPUT | {"num_inference_steps": 300}, [], max_queue=10)["id"]
    # A state change is reported at once, not at the next periodic beat.
    wait(lambda: store.list_workers()[0]["state"] == "running", timeout=heartbeat_interval_s(settings.lease_s) / 2)
    assert store.list_workers()[0]["current_task"] == tid
    assert store.status(stale_after_s(settings))["workers"][0]["alive"]

    worker.stop()
    thread.join(10)
    assert worker.state is WorkerState.STOPPED
    assert store.list_workers() == []
    assert store.get_task(tid)["status"] == "created"  # released, as before


@contextmanager
def running_worker(worker_service, engine, worker_id: str) -> Iterator[Worker]:
    """A worker for `engine` running on a thread for the block, stopped after it."""
    settings, store, storage, _ = worker_service
    worker = Worker(settings, store, storage, engine, worker_id=worker_id)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(10)


def test_a_worker_without_a_device_says_unknown_and_registers_again_if_removed(worker_service) -> None:
    settings, store, storage, _ = worker_service
    with running_worker(worker_service, SolidEngine, "w-plain"):
        wait(lambda: len(store.list_workers()) == 1)
        assert store.list_workers()[0]["device"] == "unknown"
        assert store.list_workers()[0]["engine"] == {"precision": None, "quantize": None, "offload": None,
                                                     "variant": None}
        first = store.list_workers()[0]["heartbeat_at"]
        wait(lambda: store.list_workers()[0]["heartbeat_at"] > first, timeout=5)  # the periodic beat (1 s)
        store.remove_worker("w-plain")  # e.g. a clean-up by hand: the next beat advertises it again
        wait(lambda: len(store.list_workers()) == 1, timeout=heartbeat_interval_s(settings.lease_s) + 5)
    assert store.list_workers() == []


def test_the_worker_records_its_engines_precision_quantize_and_offload(worker_service) -> None:
    settings, store, storage, _ = worker_service
    with running_worker(worker_service, Fp8OffloadEngine, "w-fp8"):
        wait(lambda: len(store.list_workers()) == 1)
        [w] = store.list_workers()
        assert (w["device"], w["engine"]) == ("cuda:3", {"precision": "bf16", "quantize": "fp8", "offload": "layers",
                                                         "variant": "dev"})
        store.remove_worker("w-fp8")  # registered again by the next beat: with its engine again
        wait(lambda: len(store.list_workers()) == 1, timeout=heartbeat_interval_s(settings.lease_s) + 5)
        assert store.list_workers()[0]["engine"]["quantize"] == "fp8"


def test_a_worker_whose_model_fails_to_load_never_registers(worker_service) -> None:
    settings, store, storage, _ = worker_service

    def broken():
        raise OSError("no such checkpoint")

    worker = Worker(settings, store, storage, broken)
    worker.run()
    assert worker.state is WorkerState.STOPPED and store.list_workers() == []


# --- hidream status --------------------------------------------------------------------------------------------


def test_hidream_status_json_and_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HIDREAM_HOME", str(tmp_path / "home"))
    url = f"sqlite:///{tmp_path}/status.sqlite"
    store = Store.open(url)
    try:
        key = store.create_key()[0].id
        for _ in range(3):
            submit(store, key, "nobody-serves-me")
        submit(store, key, "hidream-o1-image")
        store.register_worker("w9", "box", 9, ["hidream-o1-image"], "cpu",
                              {"precision": "fp32", "quantize": "fp8", "offload": "layers", "variant": "full"})
    finally:
        store.close()

    assert main(["status", "--json", "--database-url", url]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["queue"] == {"hidream-o1-image": 1, "nobody-serves-me": 3}
    assert status["stuck"] == [{"model": "nobody-serves-me", "tasks": 3}]
    [w] = status["workers"]
    assert w["id"] == "w9" and w["alive"] and w["models"] == ["hidream-o1-image"]
    assert w["heartbeat_at"].endswith("Z") and status["stale_after_s"] == stale_after_s(Settings())
    assert w["engine"] == {"precision": "fp32", "quantize": "fp8", "offload": "layers", "variant": "full"}

    assert main(["status", "--database-url", url]) == 0
    out = capsys.readouterr().out
    assert "3 task(s) for nobody-serves-me wait: no live worker serves it" in out and "w9" in out
    assert "fp32, fp8 weights, offload layers" in next(ln for ln in out.splitlines() if "w9" in ln)

    assert main(["status"]) == 0  # HIDREAM_HOME's default database: created, empty
    assert "(empty)" in capsys.readouterr().out and (tmp_path / "home" / "hidream.db").is_file()


# --- /livez, /readyz, /healthz ----------------------------------------------------------------------------------


def probe_client(tmp_path: Path, store: Store, worker: Worker | None = None) -> TestClient:
    settings = Settings(home=tmp_path / "home", database_url=str(store.engine.url))
    return TestClient(create_app(settings, store, LocalStorage(tmp_path / "files"), worker),
                      raise_server_exceptions=False)


def test_livez_and_readyz(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path}/db.sqlite")
    try:
        client = probe_client(tmp_path, store)
        r = client.get("/livez")
        assert r.status_code == 200 and r.json() == {"code": 200, "message": "success", "data": {"alive": True}}
        for path in ("/readyz", "/healthz"):  # /healthz is /readyz
            r = client.get(path)
            assert r.status_code == 200, r.text
            assert r.json() == {"code": 200, "message": "success", "data": {"ready": True, "worker": None}}
        paths = client.get("/openapi.json").json()["paths"]
        assert not {"/livez", "/readyz", "/healthz"} & set(paths)
    finally:
        store.close()


def test_readyz_is_503_when_the_database_does_not_answer(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the database's directory should be")  # unopenable, even for root
    store = Store(create_engine(f"sqlite:///{blocker}/db.sqlite"))
    try:
        client = probe_client(tmp_path, store)
        for path in ("/readyz", "/healthz"):
            r = client.get(path)
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["code"] == 503 and body["message"].startswith("database unreachable: OperationalError")
            assert body["data"] == {"ready": False, "worker": None}
        assert client.get("/livez").status_code == 200  # the process still serves
    finally:
        store.close()


def test_readyz_is_503_when_the_in_process_worker_has_no_model(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path}/db.sqlite")
    try:
        def broken():
            raise OSError("no such checkpoint: /nowhere")

        worker = Worker(Settings(home=tmp_path), store, LocalStorage(tmp_path / "files"), broken)
        worker.run()  # fails to load; the client below starts no lifespan, so it is not run again
        client = probe_client(tmp_path, store, worker)
        for path in ("/readyz", "/healthz"):
            r = client.get(path)
            assert r.status_code == 503
            assert r.json()["message"] == "no model loaded: OSError: no such checkpoint: /nowhere"
            assert r.json()["data"] == {"ready": False, "worker": "stopped"}
        assert client.get("/livez").json()["data"] == {"alive": True}
    finally:
        store.close()


def test_readyz_with_a_loaded_in_process_worker(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path}/db.sqlite")
    try:
        worker = Worker(Settings(home=tmp_path, lease_s=1.0), store, LocalStorage(tmp_path / "files"), SolidEngine)
        with probe_client(tmp_path, store, worker) as client:  # the lifespan runs the worker
            wait(lambda: worker.state is WorkerState.IDLE)
            r = client.get("/readyz")
            assert r.status_code == 200 and r.json()["data"] == {"ready": True, "worker": "idle"}
            assert [w["id"] for w in store.list_workers()] == [worker.id]
        assert store.list_workers() == []  # the app's shutdown stopped the worker, which left the table
    finally:
        store.close()
