"""The store on SQLite and PostgreSQL: the tasks table as a queue (claim, leases, recovery), the usage ledger,
keys, migrations, and waking idle workers (LISTEN/NOTIFY). PostgreSQL runs when HIDREAM_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import delete, func, inspect, select, text, update

from hidream.service.errors import TooManyRequests
from hidream.service.store import MIGRATIONS, Store, connect, utcnow
from hidream.service.tables import api_keys, metadata, tasks, usage

try:  # tests/service as a package or as a plain directory on sys.path
    from .databases import key, postgres_url, sqlite_url, store, store_url  # noqa: F401 - fixtures
except ImportError:
    from databases import key, postgres_url, sqlite_url, store, store_url  # noqa: F401 - fixtures

STATUSES = {"created", "processing", "completed", "failed"}
PRICE = 44_000  # micro-USD per image



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


def test_queue_position_is_the_claim_order(store: Store, key: str) -> None:
    a, b, c = (submit(store, key) for _ in range(3))
    other = submit(store, key, model="other")
    base = datetime(2025, 1, 1)
    for tid, minutes in ((a, 2), (b, 0), (c, 1), (other, 0)):  # claimed b, c, a; `other` waits for another model
        set_created_at(store, tid, base + timedelta(minutes=minutes))
    assert [store.queue_position(t) for t in (b, c, a, other)] == [0, 1, 2, 0]
    assert store.claim("w1", ["m"], 30)["id"] == b
    assert [store.queue_position(t) for t in (b, c, a)] == [0, 0, 1]  # a task that runs waits for nothing
    assert store.queue_position("no-such-task") == 0


def test_claim_honours_models(store: Store, key: str) -> None:
    ta = submit(store, key, model="a")
    tb = submit(store, key, model="b")
    assert store.claim("w", ["c"], 30) is None
    assert store.claim("w", [], 30) is None
    assert store.claim("w", ["b"], 30)["id"] == tb
    assert store.claim("w", ["b"], 30) is None
    assert store.claim("w", ["a", "b"], 30)["id"] == ta


def test_claim_concurrent_each_task_once(store: Store, key: str, store_url: str) -> None:
    ids = {submit(store, key) for _ in range(50)}
    workers = [Store.open(store_url) for _ in range(4)]  # one engine each, as separate processes
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
        st.close()
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
    assert store.recover_expired(3) == (1, [])
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
    assert store.recover_expired(2) == (1, [])
    row = store.get_task(tid)
    assert (row["status"], row["lease_owner"], row["lease_expires_at"], row["attempts"]) == ("created", None, None, 1)
    assert store.get_task(live)["status"] == "processing"  # a live lease is left alone
    assert store.claim("w3", ["m"], 0.01)["attempts"] == 2
    time.sleep(0.05)
    assert store.recover_expired(2) == (0, [tid])
    row = store.get_task(tid)
    assert row["status"] == "failed" and row["lease_owner"] is None and row["completed_at"] is not None
    assert "stopped responding 2 times" in row["error"]
    assert store.charges(tid) == 0
    assert store.recover_expired(2) == (0, [])
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


def test_queue_cap_concurrent(store: Store, key: str, store_url: str) -> None:
    """Submits from several processes at once never overrun max_queue (count and insert are one step)."""
    stores = [Store.open(store_url) for _ in range(8)]
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
            st.close()


def test_concurrent_submits_never_exceed_max_queue(store_url: str) -> None:
    """16 threads of one process submit at once, 3 times: the count and the insert are one locked step."""
    store = Store.open(store_url)
    key, _ = store.create_key()
    accepted, refused = [], []
    barrier = threading.Barrier(16)

    def submit() -> None:
        barrier.wait()
        try:
            store.insert_task(key.id, "hidream-o1-image", {}, [], max_queue=5)
            accepted.append(1)
        except TooManyRequests as err:
            assert err.retry_after > 0
            refused.append(1)

    try:
        for _ in range(3):
            store.engine.dispose()
            threads = [threading.Thread(target=submit) for _ in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert len(accepted) == 5 and len(refused) == 43
        assert store.queue_depth() == 5
    finally:
        store.close()


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
    if not store.postgres:  # PostgreSQL's files are the server's, out of reach: the dump above covers it
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
    assert names == {"api_keys", "tasks", "usage", "uploads", "workers", "webhook_attempts", "idempotency_keys",
                     "alembic_version"}


def test_open_twice_is_harmless(store_url: str) -> None:
    first = Store.open(store_url)
    k, token = first.create_key()
    tid = submit(first, k.id)
    first.close()
    second = Store.open(store_url)
    try:
        assert second.key_for_token(token) == k.id and second.get_task(tid) is not None
        with second.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0004"]
            assert conn.execute(select(func.count()).select_from(tasks)).scalar_one() == 1
    finally:
        second.close()


def alembic(url: str, revision: str, down: bool = False) -> str:
    """Upgrade (or downgrade) the database at `url` to `revision`, as `migrate` does; the revision it is at after."""
    engine = connect(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, revision)
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    finally:
        engine.dispose()


def worker_columns(url: str) -> set[str]:
    engine = connect(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns("workers")}
    finally:
        engine.dispose()


def test_the_worker_engine_migration_up_and_down(store_url: str) -> None:
    assert alembic(store_url, "0003") == "0003"
    assert "engine" not in worker_columns(store_url)
    engine = connect(store_url)
    with engine.begin() as conn:  # a worker registered by the previous release
        conn.execute(text("INSERT INTO workers (id, host, pid, models, device, state, started_at, heartbeat_at) "
                          "VALUES ('w-old', 'box', 1, '[\"m\"]', 'cpu', 'idle', :now, :now)"), {"now": utcnow()})
    engine.dispose()

    assert alembic(store_url, "head") == "0004"
    assert "engine" in worker_columns(store_url)
    store = Store.open(store_url)  # at head already: nothing to do
    try:
        [old] = store.list_workers()
        assert old["id"] == "w-old" and old["engine"] is None  # the old row: no engine facts
        store.register_worker("w-new", "box", 2, ["m"], "cuda:0", {"precision": "bf16", "quantize": "fp8",
                                                                   "offload": "layers", "variant": "full"})
    finally:
        store.close()

    assert alembic(store_url, "0003", down=True) == "0003"
    assert "engine" not in worker_columns(store_url)
    engine = connect(store_url)
    with engine.connect() as conn:  # the rows stay, without the column
        assert set(conn.execute(text("SELECT id FROM workers")).scalars()) == {"w-old", "w-new"}
    engine.dispose()

    assert alembic(store_url, "head") == "0004"
    store = Store.open(store_url)
    try:
        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata) == []
        assert {w["id"]: w["engine"] for w in store.list_workers()} == {"w-old": None, "w-new": None}
    finally:
        store.close()


def test_sqlite_pragmas(sqlite_url: str) -> None:
    store = Store.open(sqlite_url)
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.close()


# --- the lifecycle as a state machine ---------------------------------------------------------------


def test_lifecycle_state_machine(store_url: str) -> None:
    """Random submit/claim/renew/complete/fail/release/expire sequences, checked against a model."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

    shared = Store.open(store_url)
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
            assert self.store.recover_expired(max_attempts) == ((0, [tid]) if give_up else (1, []))
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
        shared.close()


# --- PostgreSQL specifics ---------------------------------------------------------------------------


def test_postgresql_url_uses_psycopg3(postgres_url: str) -> None:
    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    engine = connect(plain)
    try:
        assert engine.url.drivername == "postgresql+psycopg" and engine.dialect.driver == "psycopg"
        assert engine.pool._pre_ping and engine.pool.size() == 10
        with engine.connect() as conn:  # the query string (here: the test's search_path) is kept
            assert conn.execute(text("SELECT current_schema()")).scalar().startswith("t_")
    finally:
        engine.dispose()


@pytest.fixture
def pg_store(postgres_url: str):
    s = Store.open(postgres_url)
    yield s
    s.close()


def test_claim_skips_rows_locked_by_another_claim(pg_store: Store) -> None:
    """FOR UPDATE SKIP LOCKED: a claim in flight elsewhere does not block this one, nor hand out its task."""
    store, key = pg_store, pg_store.create_key()[0].id
    first, second = submit(store, key), submit(store, key)
    set_created_at(store, second, utcnow() + timedelta(seconds=1))
    with store.engine.connect() as other:  # another worker's claim, locked but not committed yet
        other.execute(text("SET lock_timeout = '2s'"))
        locked = other.execute(select(tasks.c.id).where(tasks.c.status == "created")
                               .order_by(tasks.c.created_at).limit(1).with_for_update(skip_locked=True)).scalar()
        assert locked == first
        started = time.perf_counter()
        assert store.claim("w2", ["m"], 30)["id"] == second
        assert store.claim("w2", ["m"], 30) is None
        assert time.perf_counter() - started < 1.0  # skipped, not waited for
        other.rollback()
    assert store.claim("w1", ["m"], 30)["id"] == first


def test_submit_waits_for_the_queue_lock(pg_store: Store) -> None:
    """The count-then-insert of a submit waits while another submit holds the lock (pg_advisory_xact_lock)."""
    store, key = pg_store, pg_store.create_key()[0].id
    done = threading.Event()
    with store.engine.connect() as other:
        other.execute(text("SELECT pg_advisory_xact_lock(7301)"))
        thread = threading.Thread(target=lambda: (submit(store, key), done.set()))
        thread.start()
        assert not done.wait(0.3)  # blocked behind the lock
        other.rollback()
    thread.join(5)
    assert done.is_set() and store.queue_depth() == 1


# --- waking idle workers: wait_for_task -------------------------------------------------------------

WAKE_BOUND_S = 0.1  # an idle worker must see a new task within this


def wake_latency(waiter: Store, action, timeout_s: float = 5.0) -> float:
    """Seconds from the start of `action`, run while a thread is blocked in waiter.wait_for_task, to its return."""
    woke: list[float] = []
    thread = threading.Thread(target=lambda: (waiter.wait_for_task(timeout_s), woke.append(time.perf_counter())))
    thread.start()
    time.sleep(0.2)
    assert not woke, "wait_for_task returned before anything was queued"
    started = time.perf_counter()
    action()
    thread.join(timeout_s + 1)
    assert woke, "wait_for_task did not return"
    return woke[0] - started


def test_wait_for_task_times_out(store: Store) -> None:
    store.wait_for_task(0.0)  # PostgreSQL: opens the LISTEN connection, returning at once
    started = time.perf_counter()
    store.wait_for_task(0.3)
    assert 0.25 <= time.perf_counter() - started < 2.0


def test_wait_for_task_sqlite_wakes_on_submit_in_this_process(sqlite_url: str) -> None:
    store = Store.open(sqlite_url)
    try:
        key = store.create_key()[0].id
        latency = wake_latency(store, lambda: submit(store, key))
        print(f"sqlite in-process wake-up: {latency * 1000:.1f} ms")
        assert latency < WAKE_BOUND_S
        submit(store, key)  # queued while nobody waits: the next wait returns at once (nothing is missed)
        started = time.perf_counter()
        store.wait_for_task(5.0)
        assert time.perf_counter() - started < WAKE_BOUND_S
        started = time.perf_counter()
        store.wait_for_task(0.3)  # ... but only once
        assert time.perf_counter() - started >= 0.25
    finally:
        store.close()


def test_wait_for_task_postgres_wakes_on_notify_from_another_store(postgres_url: str) -> None:
    """LISTEN/NOTIFY: a waiter wakes within WAKE_BOUND_S of a submit through another engine (another process)."""
    waiter, submitter = Store.open(postgres_url), Store.open(postgres_url)
    try:
        key = submitter.create_key()[0].id
        waiter.wait_for_task(0.0)  # opens the LISTEN connection
        latencies = [wake_latency(waiter, lambda: submit(submitter, key)) for _ in range(3)]
        print("postgresql NOTIFY wake-up: " + ", ".join(f"{x * 1000:.1f} ms" for x in latencies))
        assert max(latencies) < WAKE_BOUND_S
        for _ in range(3):  # several notifications, one wake-up: the rest are drained, not replayed
            submit(submitter, key)
        time.sleep(0.1)
        waiter.wait_for_task(5.0)
        started = time.perf_counter()
        waiter.wait_for_task(0.3)
        assert time.perf_counter() - started >= 0.25
    finally:
        waiter.close()
        submitter.close()


def test_requeues_notify_too(postgres_url: str) -> None:
    """release() and recover_expired() put tasks back: they wake waiters; a recovery that requeues nothing does not."""
    waiter, other = Store.open(postgres_url), Store.open(postgres_url)
    try:
        key = other.create_key()[0].id
        tid = submit(other, key)
        waiter.wait_for_task(0.0)
        assert other.claim("w1", ["m"], 30)["id"] == tid
        assert wake_latency(waiter, lambda: other.release(tid, "w1")) < WAKE_BOUND_S
        assert other.claim("w1", ["m"], 30)["id"] == tid
        expire_lease(other, tid)
        assert wake_latency(waiter, lambda: other.recover_expired(3)) < WAKE_BOUND_S
        started = time.perf_counter()
        other.recover_expired(3)  # nothing expired
        waiter.wait_for_task(0.3)
        assert time.perf_counter() - started >= 0.25
    finally:
        waiter.close()
        other.close()


def test_listen_connection_is_reopened_after_a_drop(postgres_url: str) -> None:
    waiter, other = Store.open(postgres_url), Store.open(postgres_url)
    try:
        key = other.create_key()[0].id
        waiter.wait_for_task(0.0)
        pid = waiter._listener.info.backend_pid
        assert waiter._listener.info.get_parameters()["keepalives"] == "1"  # a silent drop is found too
        with other.engine.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        started = time.perf_counter()
        waiter.wait_for_task(5.0)  # notices the drop
        waiter.wait_for_task(5.0)  # reopens (returns at once: what was sent meanwhile is lost)
        assert time.perf_counter() - started < 1.0
        assert waiter._listener.info.backend_pid != pid
        assert wake_latency(waiter, lambda: submit(other, key)) < WAKE_BOUND_S
    finally:
        waiter.close()
        other.close()


def test_idle_worker_starts_a_new_task_promptly(store_url: str, tmp_path: Path) -> None:
    """The worker's idle wait is wait_for_task: a task queued by another Store (PostgreSQL; on SQLite by
    this process's Store, as in `serve`) starts within WAKE_BOUND_S, and stop() still ends the loop promptly."""
    from hidream.service.settings import Settings
    from hidream.service.storage import LocalStorage
    from hidream.service.worker import Worker, WorkerState

    class NoImages:
        def generate(self, request, progress=None, should_cancel=None):
            return type("Result", (), {"images": []})()

    settings = Settings(home=tmp_path, database_url=store_url, lease_s=30)
    store = Store.open(store_url)
    submitter = Store.open(store_url) if store.postgres else store
    worker = Worker(settings, store, LocalStorage(tmp_path / "files"), NoImages)
    thread = threading.Thread(target=worker.run, daemon=True)
    try:
        key = submitter.create_key()[0].id
        inp = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 1, "guidance_scale": 1.0,
               "output_format": "png", "seed": 1, "keep_original_aspect": False, "num_images": 1}
        import hidream.engine.pipeline  # noqa: F401 - the worker imports it for its first task: do it now
        thread.start()
        lags = []
        for _ in range(3):
            time.sleep(0.3)  # idle, blocked in wait_for_task
            assert worker.state is WorkerState.IDLE
            tid = submitter.insert_task(key, settings.model_ids[0], inp, [], 100)["id"]
            deadline = time.monotonic() + 5
            while (row := store.get_task(tid))["status"] != "completed" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert row["status"] == "completed"
            lags.append((row["started_at"] - row["created_at"]).total_seconds())
        print(f"{store.engine.dialect.name}: worker start lag " + ", ".join(f"{x * 1000:.1f} ms" for x in lags))
        assert max(lags) < WAKE_BOUND_S
        time.sleep(0.3)
        started = time.perf_counter()
        worker.stop()
        thread.join(5)
        assert worker.state is WorkerState.STOPPED and time.perf_counter() - started < 1.5
    finally:
        worker.stop()
        thread.join(5)
        store.close()
        if submitter is not store:
            submitter.close()


def test_first_key_is_created_once_even_by_concurrent_starts(store_url: str) -> None:
    stores = [Store.open(store_url) for _ in range(4)]
    tokens: list[str | None] = []
    barrier = threading.Barrier(4)

    def start(store: Store) -> None:
        barrier.wait()
        tokens.append(store.create_first_key())

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        created = [t for t in tokens if t is not None]
        assert len(created) == 1 and stores[0].count_keys() == 1
        assert stores[0].key_for_token(created[0]) is not None
        assert stores[1].create_first_key() is None  # a later start creates none
    finally:
        for s in stores:
            s.close()


def _open_store(url: str) -> None:
    Store.open(url).close()


def test_processes_starting_together_on_a_new_sqlite_database_all_succeed(tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for trial in range(3):
        url = f"sqlite:///{tmp_path}/new-{trial}.sqlite"
        procs = [ctx.Process(target=_open_store, args=(url,)) for _ in range(5)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 5
