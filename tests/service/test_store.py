"""The store on SQLite: the tasks table as a queue (claim, leases, recovery), the usage ledger, keys, migrations."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import delete, func, inspect, select, text, update

from hidream.service.errors import TooManyRequests
from hidream.service.store import Store, utcnow
from hidream.service.tables import api_keys, metadata, tasks, usage

STATUSES = {"created", "processing", "completed", "failed"}
PRICE = 44_000  # micro-USD per image


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/db.sqlite"


@pytest.fixture
def store(db_url: str):
    s = Store.open(db_url)
    yield s
    s.engine.dispose()


@pytest.fixture
def key(store: Store) -> str:
    return store.create_key("test")[0].id


def submit(store: Store, key: str, model: str = "m", n: int = 1, max_queue: int = 10_000) -> str:
    return store.insert_task(key, model, {"num_images": n, "prompt": "p"}, [], max_queue)["id"]


def outputs(task_id: str, n: int) -> list[str]:
    return [f"outputs/{task_id}/{i}.png" for i in range(n)]


def set_created_at(store: Store, task_id: str, at: datetime) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(created_at=at))


def expire_lease(store: Store, task_id: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == task_id)
                     .values(lease_expires_at=utcnow() - timedelta(seconds=1)))


# --- claim ------------------------------------------------------------------------------------------


def test_claim_oldest_first(store: Store, key: str) -> None:
    a, b, c = (submit(store, key) for _ in range(3))
    base = datetime(2025, 1, 1)
    for tid, minutes in ((a, 2), (b, 0), (c, 1)):  # b is the oldest, then c, then a
        set_created_at(store, tid, base + timedelta(minutes=minutes))
    before = utcnow()
    first = store.claim("w1", ["m"], 30)
    assert first is not None and first["id"] == b
    assert first["status"] == "processing" and first["lease_owner"] == "w1" and first["attempts"] == 1
    assert before + timedelta(seconds=29) <= first["lease_expires_at"] <= utcnow() + timedelta(seconds=31)
    assert first["started_at"] is not None and first["progress_step"] == 0
    assert store.get_task(b)["status"] == "processing"
    assert store.claim("w2", ["m"], 30)["id"] == c
    assert store.claim("w1", ["m"], 30)["id"] == a
    assert store.claim("w1", ["m"], 30) is None


def test_claim_honours_models(store: Store, key: str) -> None:
    ta = submit(store, key, model="a")
    tb = submit(store, key, model="b")
    assert store.claim("w", ["c"], 30) is None
    assert store.claim("w", [], 30) is None
    assert store.claim("w", ["b"], 30)["id"] == tb
    assert store.claim("w", ["b"], 30) is None
    assert store.claim("w", ["a", "b"], 30)["id"] == ta


def test_claim_concurrent_each_task_once(store: Store, key: str, db_url: str) -> None:
    ids = {submit(store, key) for _ in range(50)}
    workers = [Store.open(db_url) for _ in range(4)]  # one engine each, as separate processes
    got: dict[str, list[str]] = {f"w{i}": [] for i in range(4)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run(name: str, st: Store) -> None:
        try:
            barrier.wait()
            while (task := st.claim(name, ["m"], 30)) is not None:
                got[name].append(task["id"])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(f"w{i}", st)) for i, st in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for st in workers:
        st.engine.dispose()
    assert not errors, errors
    claimed = [tid for lst in got.values() for tid in lst]
    assert len(claimed) == len(set(claimed)) == 50 and set(claimed) == ids
    for name, lst in got.items():
        for tid in lst:
            row = store.get_task(tid)
            assert (row["lease_owner"], row["attempts"]) == (name, 1)


# --- leases -----------------------------------------------------------------------------------------


def test_renew_extends_and_fails_after_takeover(store: Store, key: str) -> None:
    tid = submit(store, key)
    first = store.claim("w1", ["m"], 5)
    assert store.renew(tid, "w1", 120)
    assert store.get_task(tid)["lease_expires_at"] > first["lease_expires_at"] + timedelta(seconds=100)
    assert not store.renew(tid, "w2", 120)  # not w2's
    expire_lease(store, tid)
    assert store.recover_expired(3) == (1, 0)
    assert store.claim("w2", ["m"], 30)["attempts"] == 2
    assert not store.renew(tid, "w1", 30)
    assert store.renew(tid, "w2", 30)


def test_recover_expired_requeues_then_fails(store: Store, key: str) -> None:
    tid = submit(store, key)
    live = submit(store, key)
    set_created_at(store, live, utcnow() + timedelta(seconds=1))  # claimed second
    assert store.claim("w1", ["m"], 0.01)["id"] == tid
    assert store.claim("w2", ["m"], 60)["id"] == live
    time.sleep(0.05)
    assert store.recover_expired(2) == (1, 0)
    row = store.get_task(tid)
    assert (row["status"], row["lease_owner"], row["lease_expires_at"], row["attempts"]) == ("created", None, None, 1)
    assert store.get_task(live)["status"] == "processing"  # a live lease is left alone
    assert store.claim("w3", ["m"], 0.01)["attempts"] == 2
    time.sleep(0.05)
    assert store.recover_expired(2) == (0, 1)
    row = store.get_task(tid)
    assert row["status"] == "failed" and row["lease_owner"] is None and row["completed_at"] is not None
    assert "stopped responding 2 times" in row["error"]
    assert store.charges(tid) == 0
    assert store.recover_expired(2) == (0, 0)
    assert not store.complete(tid, "w3", outputs(tid, 1), 1, PRICE)  # the dead worker wakes up: no charge
    assert store.charges(tid) == 0


def test_progress_only_by_holder(store: Store, key: str) -> None:
    tid = submit(store, key)
    store.claim("w1", ["m"], 30)
    store.progress(tid, "w1", 3, 10)
    store.progress(tid, "w2", 9, 10)
    row = store.get_task(tid)
    assert (row["progress_step"], row["progress_total"]) == (3, 10)


# --- complete, fail, release: the ledger ------------------------------------------------------------


def test_complete_charges_each_image_once(store: Store, key: str) -> None:
    tid = submit(store, key, n=3)
    store.claim("w1", ["m"], 30)
    assert store.complete(tid, "w1", outputs(tid, 3), 1234, PRICE)
    row = store.get_task(tid)
    assert row["status"] == "completed" and row["outputs"] == outputs(tid, 3) and row["inference_ms"] == 1234
    assert row["lease_owner"] is None and row["completed_at"] is not None
    assert store.charges(tid) == 3
    assert not store.complete(tid, "w1", outputs(tid, 3), 1, PRICE)  # again, same worker
    assert not store.complete(tid, "w2", outputs(tid, 3), 1, PRICE)  # another worker
    assert not store.fail(tid, "w1", "late")
    assert not store.release(tid, "w1")
    assert store.charges(tid) == 3
    with store.engine.connect() as conn:
        rows = conn.execute(select(usage).where(usage.c.task_id == tid).order_by(usage.c.image_index)).mappings().all()
    assert [(r["key_id"], r["image_index"], r["amount_micro_usd"]) for r in rows] == [(key, i, PRICE) for i in range(3)]
    assert store.get_task(tid)["status"] == "completed"


def test_complete_after_lease_lost(store: Store, key: str) -> None:
    tid = submit(store, key, n=2)
    store.claim("w1", ["m"], 30)
    expire_lease(store, tid)
    store.recover_expired(3)
    assert not store.complete(tid, "w1", outputs(tid, 2), 1, PRICE)  # requeued: w1 no longer holds it
    assert store.charges(tid) == 0 and store.get_task(tid)["status"] == "created"
    store.claim("w2", ["m"], 30)
    assert not store.complete(tid, "w1", outputs(tid, 2), 1, PRICE)  # w2 holds it now
    assert store.charges(tid) == 0
    assert store.complete(tid, "w2", outputs(tid, 2), 1, PRICE)
    assert store.charges(tid) == 2


def test_complete_unclaimed_is_refused(store: Store, key: str) -> None:
    tid = submit(store, key)
    assert not store.complete(tid, "w1", outputs(tid, 1), 1, PRICE)
    assert not store.complete("0" * 32, "w1", outputs(tid, 1), 1, PRICE)
    assert store.charges(tid) == 0 and store.get_task(tid)["status"] == "created"


def test_complete_without_images(store: Store, key: str) -> None:
    tid = submit(store, key)
    store.claim("w1", ["m"], 30)
    assert store.complete(tid, "w1", [], 1, PRICE)
    assert store.charges(tid) == 0 and store.get_task(tid)["status"] == "completed"


def test_fail_never_charges(store: Store, key: str) -> None:
    tid = submit(store, key, n=4)
    assert not store.fail(tid, "w1", "not claimed")
    store.claim("w1", ["m"], 30)
    assert not store.fail(tid, "w2", "not mine")
    assert store.fail(tid, "w1", "the prompt was refused")
    row = store.get_task(tid)
    assert (row["status"], row["error"], row["lease_owner"]) == ("failed", "the prompt was refused", None)
    assert not store.complete(tid, "w1", outputs(tid, 4), 1, PRICE)
    assert store.charges(tid) == 0 and store.usage(key)["images"] == 0


def test_release_does_not_count_attempt(store: Store, key: str) -> None:
    tid = submit(store, key)
    store.claim("w1", ["m"], 30)
    store.progress(tid, "w1", 2, 10)
    assert not store.release(tid, "w2")
    assert store.release(tid, "w1")
    row = store.get_task(tid)
    assert (row["status"], row["lease_owner"], row["lease_expires_at"], row["attempts"]) == ("created", None, None, 0)
    assert (row["progress_step"], row["progress_total"]) == (None, None)
    assert not store.release(tid, "w1")
    assert store.claim("w2", ["m"], 30)["attempts"] == 1
    assert store.charges(tid) == 0


# --- the queue cap ----------------------------------------------------------------------------------


def test_queue_cap(store: Store, key: str) -> None:
    a = submit(store, key, max_queue=2)
    submit(store, key, max_queue=2)
    with pytest.raises(TooManyRequests) as info:
        submit(store, key, max_queue=2)
    assert info.value.status == 429 and info.value.retry_after > 0
    assert store.queue_depth() == 2
    store.claim("w", ["m"], 30)  # processing still counts
    with pytest.raises(TooManyRequests):
        submit(store, key, max_queue=2)
    assert store.complete(a, "w", outputs(a, 1), 1, PRICE)  # finished work does not
    submit(store, key, max_queue=2)
    assert store.queue_depth() == 2


def test_queue_cap_concurrent(store: Store, key: str, db_url: str) -> None:
    """Submits from several processes at once never overrun max_queue (count and insert are one step)."""
    stores = [Store.open(db_url) for _ in range(8)]
    try:
        for _ in range(3):
            with store.engine.begin() as conn:
                conn.execute(delete(tasks))
            barrier = threading.Barrier(len(stores))

            def go(st: Store) -> None:
                barrier.wait()
                try:
                    submit(st, key, max_queue=2)
                except TooManyRequests:
                    pass

            threads = [threading.Thread(target=go, args=(st,)) for st in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            assert store.queue_depth() <= 2
    finally:
        for st in stores:
            st.engine.dispose()


# --- reading ----------------------------------------------------------------------------------------


def test_get_and_list_by_key(store: Store, key: str) -> None:
    other = store.create_key("other")[0].id
    mine = [submit(store, key) for _ in range(3)]
    theirs = submit(store, other)
    assert store.get_task(mine[0], key)["id"] == mine[0]
    assert store.get_task(theirs, key) is None and store.get_task(theirs)["key_id"] == other
    rows = store.list_tasks(key, 2, None)
    assert [r["id"] for r in rows] == mine[:0:-1]
    last = rows[-1]
    assert [r["id"] for r in store.list_tasks(key, 2, (last["created_at"], last["id"]))] == [mine[0]]


# --- usage ------------------------------------------------------------------------------------------


def test_usage_totals_and_days(store: Store, key: str) -> None:
    other = store.create_key("other")[0].id
    done = []
    for n, k in ((2, key), (1, key), (3, key), (4, other)):
        tid = submit(store, k, n=n)
        assert store.claim("w", ["m"], 30)["id"] == tid
        assert store.complete(tid, "w", outputs(tid, n), 1, PRICE)
        done.append(tid)
    failed = submit(store, key, n=4)
    store.claim("w", ["m"], 30)
    store.fail(failed, "w", "no")
    with store.engine.begin() as conn:  # move the first two tasks' charges to earlier days
        conn.execute(update(usage).where(usage.c.task_id == done[0]).values(created_at=datetime(2025, 3, 1, 23, 59)))
        conn.execute(update(usage).where(usage.c.task_id == done[1]).values(created_at=datetime(2025, 3, 2, 0, 1)))
    u = store.usage(key)
    assert u["images"] == 6 and u["micro_usd"] == 6 * PRICE
    today = utcnow().date().isoformat()
    assert u["days"] == [
        {"date": "2025-03-01", "images": 2, "micro_usd": 2 * PRICE},
        {"date": "2025-03-02", "images": 1, "micro_usd": PRICE},
        {"date": today, "images": 3, "micro_usd": 3 * PRICE},
    ]
    assert store.usage(other) == {"images": 4, "micro_usd": 4 * PRICE,
                                  "days": [{"date": today, "images": 4, "micro_usd": 4 * PRICE}]}
    assert store.usage(store.create_key("new")[0].id) == {"images": 0, "micro_usd": 0, "days": []}


# --- keys -------------------------------------------------------------------------------------------


def test_keys_hashed_at_rest(store: Store) -> None:
    k, token = store.create_key("alice")
    assert token.startswith("hd-") and len(token) > 40
    assert store.key_for_token(token) == k.id
    assert store.key_for_token(token + "x") is None and store.key_for_token("") is None
    with store.engine.connect() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.id == k.id)).mappings().one()
        dump = conn.exec_driver_sql("SELECT * FROM api_keys").fetchall()
    assert row["key_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert all(token not in str(value) for r in dump for value in r)
    db = Path(store.engine.url.database)
    raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))  # the database, its WAL and shm
    assert token[10:].encode() not in raw and row["key_hash"].encode() in raw
    assert row["prefix"] == k.prefix and token.startswith(k.prefix)


def test_revoke(store: Store) -> None:
    (k1, t1), (k2, t2), (k3, t3) = (store.create_key(n) for n in ("a", "b", "c"))
    assert store.revoke_key(k1.id)
    assert store.key_for_token(t1) is None
    assert not store.revoke_key(k1.id)  # already revoked
    assert store.revoke_key(k2.prefix)  # by the prefix a listing shows
    assert store.key_for_token(t2) is None
    assert store.key_for_token(t3) == k3.id
    assert not store.revoke_key("no-such-key")
    listed = {k.id: k for k in store.list_keys()}
    assert listed[k1.id].revoked_at is not None and listed[k3.id].revoked_at is None
    assert store.count_keys() == 3


# --- migrations -------------------------------------------------------------------------------------


def test_schema_matches_tables(store: Store) -> None:
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, metadata)
    assert diff == []
    names = set(inspect(store.engine).get_table_names())
    assert names == {"api_keys", "tasks", "usage", "uploads", "alembic_version"}


def test_open_twice_is_harmless(db_url: str) -> None:
    first = Store.open(db_url)
    k, token = first.create_key()
    tid = submit(first, k.id)
    first.engine.dispose()
    second = Store.open(db_url)
    try:
        assert second.key_for_token(token) == k.id and second.get_task(tid) is not None
        with second.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0001"]
            assert conn.execute(select(func.count()).select_from(tasks)).scalar_one() == 1
    finally:
        second.engine.dispose()


def test_sqlite_pragmas(store: Store) -> None:
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


# --- the lifecycle as a state machine ---------------------------------------------------------------


def test_lifecycle_state_machine(tmp_path: Path) -> None:
    """Random submit/claim/renew/complete/fail/release/expire sequences, checked against a model."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

    shared = Store.open(f"sqlite:///{tmp_path}/machine.sqlite")
    key_id = shared.create_key("machine")[0].id
    workers = st.sampled_from(["w1", "w2", "w3"])
    model_sets = st.sampled_from([["m1"], ["m2"], ["m1", "m2"]])
    max_attempts = 2

    class Lifecycle(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.store = shared
            with shared.engine.begin() as conn:
                conn.execute(delete(usage))
                conn.execute(delete(tasks))
            # task id -> what the store must say about it
            self.model: dict[str, dict[str, Any]] = {}

        def _pick(self, data: st.DataObject) -> str:
            return data.draw(st.sampled_from(list(self.model)))  # insertion order: ids are random

        def _held(self, tid: str, worker: str) -> bool:
            m = self.model[tid]
            return m["status"] == "processing" and m["owner"] == worker

        @rule(model=st.sampled_from(["m1", "m2"]), n=st.integers(1, 4))
        def submit(self, model: str, n: int) -> None:
            row = self.store.insert_task(key_id, model, {"num_images": n}, [], 10_000)
            self.model[row["id"]] = {"model": model, "n": n, "status": "created", "owner": None, "attempts": 0,
                                     "created_at": row["created_at"]}

        @rule(worker=workers, models=model_sets)
        def claim(self, worker: str, models: list[str]) -> None:
            waiting = [(m["created_at"], tid) for tid, m in self.model.items()
                       if m["status"] == "created" and m["model"] in models]
            got = self.store.claim(worker, models, 60)
            if not waiting:
                assert got is None
                return
            assert got is not None and got["id"] == min(waiting)[1]
            m = self.model[got["id"]]
            m.update(status="processing", owner=worker, attempts=m["attempts"] + 1)
            assert got["attempts"] == m["attempts"]

        @precondition(lambda self: self.model)
        @rule(worker=workers, data=st.data())
        def renew(self, worker: str, data: st.DataObject) -> None:
            tid = self._pick(data)
            assert self.store.renew(tid, worker, 60) == self._held(tid, worker)

        @precondition(lambda self: self.model)
        @rule(worker=workers, data=st.data())
        def complete(self, worker: str, data: st.DataObject) -> None:
            tid = self._pick(data)
            expected = self._held(tid, worker)
            assert self.store.complete(tid, worker, outputs(tid, self.model[tid]["n"]), 1, PRICE) == expected
            if expected:
                self.model[tid].update(status="completed", owner=None)

        @precondition(lambda self: self.model)
        @rule(worker=workers, data=st.data())
        def fail(self, worker: str, data: st.DataObject) -> None:
            tid = self._pick(data)
            expected = self._held(tid, worker)
            assert self.store.fail(tid, worker, "boom") == expected
            if expected:
                self.model[tid].update(status="failed", owner=None)

        @precondition(lambda self: self.model)
        @rule(worker=workers, data=st.data())
        def release(self, worker: str, data: st.DataObject) -> None:
            tid = self._pick(data)
            expected = self._held(tid, worker)
            assert self.store.release(tid, worker) == expected
            if expected:
                m = self.model[tid]
                m.update(status="created", owner=None, attempts=m["attempts"] - 1)

        @precondition(lambda self: any(m["status"] == "processing" for m in self.model.values()))
        @rule(data=st.data())
        def expire(self, data: st.DataObject) -> None:
            """The holder of one task dies: its lease runs out and recovery runs."""
            tid = data.draw(st.sampled_from([t for t, m in self.model.items() if m["status"] == "processing"]))
            expire_lease(self.store, tid)
            m = self.model[tid]
            give_up = m["attempts"] >= max_attempts
            assert self.store.recover_expired(max_attempts) == ((0, 1) if give_up else (1, 0))
            m.update(status="failed" if give_up else "created", owner=None)

        @invariant()
        def matches_model(self) -> None:
            with self.store.engine.connect() as conn:
                rows = {r["id"]: r for r in conn.execute(select(tasks)).mappings()}
                charged = dict(conn.execute(select(usage.c.task_id, func.count()).group_by(usage.c.task_id)).all())
            assert set(rows) == set(self.model)
            for tid, m in self.model.items():
                row = rows[tid]
                assert row["status"] in STATUSES
                assert (row["status"], row["lease_owner"], row["attempts"]) == (m["status"], m["owner"], m["attempts"])
                assert (row["lease_owner"] is not None) == (row["status"] == "processing")
                assert charged.get(tid, 0) == (m["n"] if m["status"] == "completed" else 0)

    try:
        run_state_machine_as_test(Lifecycle, settings=hypothesis.settings(
            max_examples=40, stateful_step_count=25, deadline=None, database=None,
            suppress_health_check=list(hypothesis.HealthCheck)))
    finally:
        shared.engine.dispose()
