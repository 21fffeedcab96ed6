"""A database that is down at start-up or goes away mid-run: clear errors, retries, nothing lost."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from hidream.service.errors import ServiceError
from hidream.service.runtime import open_store
from hidream.service.settings import Settings
from hidream.service.storage import LocalStorage
from hidream.service.store import Store
from hidream.service.worker import Worker, WorkerState
from test_worker import INPUT, SolidEngine


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_database_at_start_up_is_a_clear_error_after_retries(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"postgresql://hidream:s3cret@127.0.0.1:{closed_port()}/none"
    started = time.monotonic()
    with pytest.raises(ServiceError) as err:
        open_store(Settings(home=tmp_path, database_url=url), wait_s=1.5)
    message = err.value.message
    assert message.startswith("HIDREAM_DATABASE_URL: cannot connect to postgresql://hidream:***@127.0.0.1:")
    assert "s3cret" not in message
    assert time.monotonic() - started >= 0.4  # it waited and retried before giving up
    assert any("retrying in" in r.getMessage() for r in caplog.records)


def test_a_slow_first_try_still_gets_a_retry_before_the_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tries: list[float] = []

    def refused(url: str) -> Store:
        tries.append(time.monotonic())
        if len(tries) == 1:
            time.sleep(0.8)  # a loaded machine: the first try alone eats most of the window
        raise OperationalError("connect", {}, Exception("connection refused"))

    monkeypatch.setattr(Store, "open", staticmethod(refused))
    started = time.monotonic()
    with pytest.raises(ServiceError):
        open_store(Settings(home=tmp_path, database_url="postgresql://h@127.0.0.1:1/none"), wait_s=1.0)
    assert len(tries) >= 2  # the wait before the deadline was cut short, not skipped
    assert time.monotonic() - started < 1.6


def test_worker_keeps_going_while_the_database_is_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(home=tmp_path, lease_s=1.0)
    store = Store.open(settings.db_url)
    key, _ = store.create_key()
    tid = store.insert_task(key.id, "hidream-o1-image", INPUT, [], max_queue=10)["id"]
    real_claim, failures = store.claim, []

    def flaky_claim(*args, **kwargs):
        if len(failures) < 2:  # the database is "down" for the first two attempts
            failures.append(1)
            raise OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(store, "claim", flaky_claim)
    monkeypatch.setattr("hidream.service.worker.DB_RETRY_FIRST_S", 0.05)
    worker = Worker(settings, store, LocalStorage(settings.files_dir), SolidEngine)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while store.get_task(tid)["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.stop()
    thread.join(5)
    assert len(failures) == 2
    assert store.get_task(tid)["status"] == "completed" and store.charges(tid) == 2
    assert worker.state is WorkerState.STOPPED


def test_api_answers_503_while_the_database_is_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from hidream.service.app import create_app

    settings = Settings(home=tmp_path)
    store = Store.open(settings.db_url)
    _, token = store.create_key()
    client = TestClient(create_app(settings, store, LocalStorage(settings.files_dir)), raise_server_exceptions=False)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/usage", headers=headers).status_code == 200

    def down(*args, **kwargs):
        raise OperationalError("SELECT", {}, Exception("could not connect to server"))

    monkeypatch.setattr(store, "key_for_token", down)
    r = client.get("/api/v1/usage", headers=headers)
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.json() == {"code": 503, "message": "the database is unavailable; retry shortly", "data": None}
