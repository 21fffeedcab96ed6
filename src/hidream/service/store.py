"""The task store: keys, tasks (the table is the queue), the usage ledger, uploads. All SQL lives here."""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Engine,
    and_,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    null,
    or_,
    select,
    text,
    update,
)

from hidream.service.errors import Conflict, TooManyRequests
from hidream.service.tables import api_keys, idempotency_keys, tasks, uploads, usage, webhook_attempts, workers

MIGRATIONS = Path(__file__).parent / "migrations"
KEY_PREFIX = "hd-"
ACTIVE = ("created", "processing")
TERMINAL = ("completed", "failed")
CANCELED = "canceled"  # the error of a canceled prediction
IDEMPOTENCY_WINDOW = timedelta(hours=24)
RATE_WINDOW = timedelta(minutes=1)
CHANNEL = "hidream_tasks"  # PostgreSQL NOTIFY channel: a task was queued (payload: its model)
# The LISTEN connection waits without sending anything: TCP keepalives find a silently dead one in about 1 min.
LISTEN_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}

log = logging.getLogger("hidream.store")


def utcnow() -> datetime:
    """Naive UTC: what every timestamp column holds, on SQLite and PostgreSQL alike."""
    return datetime.now(UTC).replace(tzinfo=None)


def new_id() -> str:
    return secrets.token_hex(16)


def hash_key(token: str) -> str:
    # Keys carry 256 random bits, so a plain SHA-256 is enough to store them safely.
    return hashlib.sha256(token.encode()).hexdigest()


def connect(url: str) -> Engine:
    """An engine for the URL; SQLite in WAL mode with a busy timeout so readers never block the worker."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # As many connections as the API's thread pool may use at once, so they are not reopened.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=20, max_overflow=20)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    for scheme in ("postgresql://", "postgres://"):  # the plain scheme means psycopg 3 here, not psycopg2
        if url.startswith(scheme):
            url = "postgresql+psycopg://" + url.removeprefix(scheme)
    if url.startswith("postgresql+psycopg://"):
        # Short transactions need few connections; 20 at most per process (plus one LISTEN connection
        # in a worker) keeps a few API processes and workers under the server's default max_connections (100).
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (Alembic)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # Processes starting together on a new database take turns: the later ones find it at head.
    with _sqlite_file_lock(engine), engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7302)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """An exclusive lock on `<database>.migrate-lock` for a SQLite file database (no-op otherwise)."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    with open(f"{path}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    rate_per_minute: int | None = None  # None: the service's default
    max_concurrent: int | None = None


def _api_key(r: Any) -> ApiKey:
    return ApiKey(r["id"], r["name"], r["prefix"], r["created_at"], r["revoked_at"], r["rate_per_minute"],
                  r["max_concurrent"])


class IdempotentReplay(Exception):
    """A submit whose Idempotency-Key already names a task (made by a concurrent request): use that one."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id


@dataclass(frozen=True)
class Limits:
    """A key's limits as the service applies them: `rate_per_minute` submits, `max_concurrent` active tasks.

    0 means no limit. The key's own values, where set, win over these service-wide defaults.
    """

    rate_per_minute: int = 0
    max_concurrent: int = 0


def _finished(now: datetime) -> dict[str, Any]:
    """Columns every transition to completed or failed sets: the end time and, with a webhook, its delivery."""
    return {"completed_at": now, "lease_owner": None, "lease_expires_at": None, "preview": None,
            "webhook_state": case((tasks.c.webhook_url.is_not(None), "pending"), else_=None),
            "webhook_next_at": case((tasks.c.webhook_url.is_not(None), now), else_=None)}


class Store:
    """Every database operation of the service, each one short transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self._queued = threading.Event()  # set when this Store queued a task (wakes waiters in this process)
        self._listen_lock = threading.Lock()
        self._listener: Any = None  # PostgreSQL: the psycopg connection that LISTENs on CHANNEL

    @classmethod
    def open(cls, url: str) -> Store:
        engine = connect(url)
        migrate(engine)
        return cls(engine)

    def close(self) -> None:
        """Close the LISTEN connection, if any, and the pool."""
        with self._listen_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        self.engine.dispose()

    # --- waking idle workers ----------------------------------------------------------------------

    def _announce(self, conn: Connection, models: Iterable[str]) -> None:
        """Within the transaction that queues tasks: NOTIFY (PostgreSQL sends it at commit)."""
        if self.postgres:
            for model in sorted(set(models)):
                conn.execute(text("SELECT pg_notify(:channel, :model)"), {"channel": CHANNEL, "model": model})

    def wait_for_task(self, timeout_s: float) -> None:
        """Block until a task may have been queued, or `timeout_s` passed; then the caller claims again.

        PostgreSQL: woken by the NOTIFY of any process, through a LISTEN connection kept for the
        purpose. The call that (re)opens that connection returns at once: what was sent before it
        listened is lost, so the caller must look. SQLite: woken only by this Store's own submits
        (in-process `serve`); another process's tasks are found when the timeout ends.
        Spurious returns are possible. With one waiting thread per Store (a worker), a task queued after
        the caller's last claim is never missed: notifications that come while nobody waits are kept.
        """
        if not self.postgres:
            if self._queued.wait(max(timeout_s, 0.0)):
                self._queued.clear()
            return
        deadline = time.monotonic() + timeout_s
        if not self._listen_lock.acquire(timeout=max(timeout_s, 0.0)):
            return  # another thread of this process is listening; the caller polls
        try:
            self._wait_notify(deadline)
        finally:
            self._listen_lock.release()

    def _wait_notify(self, deadline: float) -> None:
        import psycopg

        conn = self._listener
        try:
            if conn is None:
                cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
                conn = psycopg.connect(*cargs, **(LISTEN_KEEPALIVES | cparams), autocommit=True)
                self._listener = conn
                conn.execute(f"LISTEN {CHANNEL}")
                return
            with closing(conn.notifies(timeout=max(deadline - time.monotonic(), 0.0), stop_after=1)) as got:
                if next(got, None) is None:
                    return
            with closing(conn.notifies(timeout=0)) as rest:  # drain: one wake-up serves them all
                for _ in rest:
                    pass
        except psycopg.Error as err:
            if conn is None:  # cannot connect: wait out the timeout rather than spin
                log.warning("store: cannot LISTEN for new tasks (%s); polling", err)
                time.sleep(max(deadline - time.monotonic(), 0.0))
            else:  # dropped: the next call opens a new one
                log.warning("store: the LISTEN connection failed (%s); reopening it", err)
                self._listener = None
                conn.close()

    @contextmanager
    def _exclusive(self) -> Iterator[Connection]:
        """A transaction holding the database's write lock from its first statement."""
        if self.engine.dialect.name != "sqlite":
            with self.engine.begin() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(7301)"))
                yield conn
            return
        # pysqlite would BEGIN lazily (DEFERRED); take the lock up front instead.
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")

    # --- keys -----------------------------------------------------------------------------------

    def create_key(self, name: str = "default", rate_per_minute: int | None = None,
                   max_concurrent: int | None = None) -> tuple[ApiKey, str]:
        """A new key; the clear-text token is returned once and never stored."""
        token = KEY_PREFIX + secrets.token_urlsafe(32)
        row = {"id": new_id(), "name": name, "key_hash": hash_key(token), "prefix": token[:10],
               "created_at": utcnow(), "revoked_at": None, "rate_per_minute": rate_per_minute,
               "max_concurrent": max_concurrent}
        with self.engine.begin() as conn:
            conn.execute(insert(api_keys).values(**row))
        return _api_key(row), token

    def set_key_limits(self, key_id_or_prefix: str, rate_per_minute: int | None,
                       max_concurrent: int | None) -> ApiKey | None:
        """Set a key's own limits (a value of -1 goes back to the service default); None leaves one as is."""
        values = {name: (None if v == -1 else v) for name, v in
                  (("rate_per_minute", rate_per_minute), ("max_concurrent", max_concurrent)) if v is not None}
        cond = or_(api_keys.c.id == key_id_or_prefix, api_keys.c.prefix == key_id_or_prefix)
        with self.engine.begin() as conn:
            if values:
                conn.execute(update(api_keys).where(cond).values(**values))
            row = conn.execute(select(api_keys).where(cond)).mappings().first()
        return _api_key(row) if row else None

    def create_first_key(self) -> str | None:
        """A key named "first key" if there is no key at all (one, even with several processes starting)."""
        token = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._exclusive() as conn:
            if conn.execute(select(func.count()).select_from(api_keys)).scalar_one():
                return None
            conn.execute(insert(api_keys).values(id=new_id(), name="first key", key_hash=hash_key(token),
                                                 prefix=token[:10], created_at=utcnow(), revoked_at=None))
        return token

    def list_keys(self) -> list[ApiKey]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).mappings().all()
        return [_api_key(r) for r in rows]

    def revoke_key(self, key_id_or_prefix: str) -> bool:
        cond = or_(api_keys.c.id == key_id_or_prefix, api_keys.c.prefix == key_id_or_prefix)
        with self.engine.begin() as conn:
            res = conn.execute(update(api_keys).where(cond, api_keys.c.revoked_at.is_(None))
                               .values(revoked_at=utcnow()))
        return res.rowcount > 0

    def key_for_token(self, token: str) -> str | None:
        """The id of the live key with this token, or None."""
        with self.engine.connect() as conn:
            return conn.execute(select(api_keys.c.id).where(
                api_keys.c.key_hash == hash_key(token), api_keys.c.revoked_at.is_(None))).scalar()

    def count_keys(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(api_keys)).scalar_one()

    # --- submitting and reading -------------------------------------------------------------------

    def insert_task(self, key_id: str, model: str, input: dict[str, Any], references: list[str],
                    max_queue: int, task_id: str | None = None, webhook_url: str | None = None,
                    idempotency: tuple[str, str] | None = None, limits: Limits = Limits()) -> dict[str, Any]:
        """Queue a task, unless a limit says no.

        In one transaction, under the submit lock: an `idempotency` (key, request hash) already used by this
        API key raises IdempotentReplay (same hash) or Conflict (another); then the key's rate (submits in the
        last minute) and concurrency (tasks queued or running) limits, then the queue's `max_queue`, each a
        TooManyRequests with the seconds to wait.
        """
        now = utcnow()
        row = {"id": task_id or new_id(), "key_id": key_id, "model": model, "status": "created", "input": input,
               "references": references, "outputs": [], "error": "", "created_at": now, "attempts": 0,
               "webhook_url": webhook_url}
        with self._exclusive() as conn:  # the counts and the insert must not interleave with another submit
            if idempotency is not None:
                self._check_idempotency(conn, key_id, *idempotency, now)
            self._check_limits(conn, key_id, limits, now)
            depth = conn.execute(select(func.count()).select_from(tasks).where(tasks.c.status.in_(ACTIVE))).scalar_one()
            if depth >= max_queue:
                raise TooManyRequests(f"queue full: {depth} tasks waiting or running; retry later", retry_after=10)
            conn.execute(insert(tasks).values(**row))
            if idempotency is not None:
                conn.execute(insert(idempotency_keys).values(key_id=key_id, idempotency_key=idempotency[0],
                                                             request_hash=idempotency[1], task_id=row["id"],
                                                             created_at=now))
            self._announce(conn, [model])
        self._queued.set()
        return row | {"started_at": None, "completed_at": None, "lease_owner": None, "lease_expires_at": None,
                      "progress_step": None, "progress_total": None, "inference_ms": None,
                      "cancel_requested_at": None, "preview": None, "preview_step": None,
                      "webhook_state": None, "webhook_next_at": None}

    def check_limits(self, key_id: str, limits: Limits = Limits()) -> None:
        """TooManyRequests now if `insert_task` would refuse this key for its rate or concurrency (a check before
        costly work, such as a prompt refinement; `insert_task` checks again, under the lock)."""
        with self.engine.connect() as conn:
            self._check_limits(conn, key_id, limits, utcnow())

    def idempotent_task(self, key_id: str, idempotency_key: str, request_hash: str) -> dict[str, Any] | None:
        """The task an Idempotency-Key of this API key made in the last 24 hours (Conflict for another body)."""
        with self.engine.connect() as conn:
            found = conn.execute(select(idempotency_keys).where(
                idempotency_keys.c.key_id == key_id, idempotency_keys.c.idempotency_key == idempotency_key,
                idempotency_keys.c.created_at > utcnow() - IDEMPOTENCY_WINDOW)).mappings().first()
        if found is None:
            return None
        if found["request_hash"] != request_hash:
            raise Conflict("Idempotency-Key: was used with a different request within 24 hours")
        return self.get_task(found["task_id"])

    def _check_idempotency(self, conn: Connection, key_id: str, idempotency_key: str, request_hash: str,
                           now: datetime) -> None:
        ik = idempotency_keys.c
        # Keys older than the window are forgotten; this one may be reused then.
        conn.execute(delete(idempotency_keys).where(ik.key_id == key_id, ik.created_at <= now - IDEMPOTENCY_WINDOW))
        found = conn.execute(select(ik.request_hash, ik.task_id).where(
            ik.key_id == key_id, ik.idempotency_key == idempotency_key)).first()
        if found is not None:
            if found.request_hash != request_hash:
                raise Conflict("Idempotency-Key: was used with a different request within 24 hours")
            raise IdempotentReplay(found.task_id)

    def _check_limits(self, conn: Connection, key_id: str, defaults: Limits, now: datetime) -> None:
        own = conn.execute(select(api_keys.c.rate_per_minute, api_keys.c.max_concurrent)
                           .where(api_keys.c.id == key_id)).first()
        rate = own.rate_per_minute if own is not None and own.rate_per_minute is not None else defaults.rate_per_minute
        concurrent = (own.max_concurrent if own is not None and own.max_concurrent is not None
                      else defaults.max_concurrent)
        if rate > 0:
            # A rolling minute over the tasks table itself: every replica sees the same count.
            recent = conn.execute(select(tasks.c.created_at).where(
                tasks.c.key_id == key_id, tasks.c.created_at > now - RATE_WINDOW)
                .order_by(tasks.c.created_at.desc()).limit(rate)).scalars().all()
            if len(recent) >= rate:
                wait = (recent[-1] + RATE_WINDOW - now).total_seconds()
                raise TooManyRequests(f"rate limit: {rate} submits per minute for this API key; "
                                      f"retry in {max(1, math.ceil(wait))} s", retry_after=max(1, math.ceil(wait)))
        if concurrent > 0:
            active = conn.execute(select(func.count()).select_from(tasks).where(
                tasks.c.key_id == key_id, tasks.c.status.in_(ACTIVE))).scalar_one()
            if active >= concurrent:
                raise TooManyRequests(f"rate limit: {concurrent} tasks queued or running at once for this API "
                                      "key; retry when one ends", retry_after=5)

    def get_task(self, task_id: str, key_id: str | None = None) -> dict[str, Any] | None:
        cond = [tasks.c.id == task_id] + ([tasks.c.key_id == key_id] if key_id is not None else [])
        with self.engine.connect() as conn:
            row = conn.execute(select(tasks).where(*cond)).mappings().first()
        return dict(row) if row else None

    def task_statuses(self, task_ids: list[str]) -> dict[str, str]:
        """The status of each of these tasks that exists (a missing id is absent from the answer)."""
        found: dict[str, str] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(task_ids), 500):
                chunk = task_ids[i:i + 500]
                found |= dict(conn.execute(select(tasks.c.id, tasks.c.status).where(tasks.c.id.in_(chunk))).all())
        return found

    def list_tasks(self, key_id: str, limit: int, before: tuple[datetime, str] | None) -> list[dict[str, Any]]:
        """A key's tasks, newest first, strictly older than the (created_at, id) cursor."""
        q = select(tasks).where(tasks.c.key_id == key_id)
        if before is not None:
            at, tid = before
            q = q.where(or_(tasks.c.created_at < at, and_(tasks.c.created_at == at, tasks.c.id < tid)))
        q = q.order_by(tasks.c.created_at.desc(), tasks.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings().all()]

    def queue_depth(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(tasks).where(tasks.c.status.in_(ACTIVE))).scalar_one()

    def queue_position(self, task_id: str) -> int:
        """How many waiting tasks of its model a worker takes before this one (0: it is next, or not waiting)."""
        with self.engine.connect() as conn:
            me = conn.execute(select(tasks.c.created_at, tasks.c.model, tasks.c.status)
                              .where(tasks.c.id == task_id)).first()
            if me is None or me.status != "created":
                return 0
            ahead = or_(tasks.c.created_at < me.created_at, and_(tasks.c.created_at == me.created_at,
                                                                 tasks.c.id < task_id))
            return conn.execute(select(func.count()).select_from(tasks).where(
                tasks.c.status == "created", tasks.c.model == me.model, ahead)).scalar_one()

    # --- the worker's side ------------------------------------------------------------------------

    def claim(self, worker: str, models: list[str], lease_s: float) -> dict[str, Any] | None:
        """Atomically take the oldest waiting task for one of `models` and lease it to `worker`."""
        now = utcnow()
        oldest = (select(tasks.c.id).where(tasks.c.status == "created", tasks.c.model.in_(models))
                  .order_by(tasks.c.created_at, tasks.c.id).limit(1))
        if self.engine.dialect.name == "postgresql":
            oldest = oldest.with_for_update(skip_locked=True)
        stmt = (update(tasks).where(tasks.c.id == oldest.scalar_subquery(), tasks.c.status == "created")
                .values(status="processing", lease_owner=worker, lease_expires_at=now + timedelta(seconds=lease_s),
                        attempts=tasks.c.attempts + 1,
                        # `now` was read before the statement waited for a concurrent submit's lock (SQLite):
                        # a task queued meanwhile must not seem to start before it was created.
                        started_at=case((tasks.c.created_at > now, tasks.c.created_at), else_=now),
                        progress_step=0, progress_total=None, preview=None, preview_step=None)
                .returning(*tasks.c))
        with self.engine.begin() as conn:
            row = conn.execute(stmt).mappings().first()
        return dict(row) if row else None

    def _held(self, task_id: str, worker: str):
        return and_(tasks.c.id == task_id, tasks.c.status == "processing", tasks.c.lease_owner == worker)

    def renew(self, task_id: str, worker: str, lease_s: float) -> bool:
        """Extend the lease; False when the task is no longer ours (it was recovered elsewhere)."""
        with self.engine.begin() as conn:
            res = conn.execute(update(tasks).where(self._held(task_id, worker))
                               .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s)))
        return res.rowcount == 1

    def progress(self, task_id: str, worker: str, step: int, total: int, preview: str | None = None) -> bool:
        """Record step `step` of `total` (and a preview data: URI); True when a cancel of the task was asked."""
        values: dict[str, Any] = {"progress_step": step, "progress_total": total}
        if preview is not None:
            values |= {"preview": preview, "preview_step": step}
        with self.engine.begin() as conn:
            flag = conn.execute(update(tasks).where(self._held(task_id, worker)).values(**values)
                                .returning(tasks.c.cancel_requested_at)).first()
        return flag is not None and flag[0] is not None

    def cancel_requested(self, task_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(tasks.c.cancel_requested_at).where(tasks.c.id == task_id)).scalar() is not None

    def cancel(self, task_id: str, key_id: str) -> str | None:
        """Cancel a prediction of this key: what happened, or None when the key has no such prediction.

        "canceled": it was queued and is now failed with error "canceled"; "requested": it runs, and its
        worker stops at the next step; "completed" / "failed": it had ended, nothing changed.
        """
        now = utcnow()
        mine = and_(tasks.c.id == task_id, tasks.c.key_id == key_id)
        with self.engine.begin() as conn:
            res = conn.execute(update(tasks).where(mine, tasks.c.status == "created").values(
                status="failed", error=CANCELED, cancel_requested_at=now, **_finished(now)))
            if res.rowcount == 1:
                return "canceled"
            res = conn.execute(update(tasks).where(mine, tasks.c.status == "processing").values(
                cancel_requested_at=func.coalesce(tasks.c.cancel_requested_at, now)))
            if res.rowcount == 1:
                return "requested"
            return conn.execute(select(tasks.c.status).where(mine)).scalar()

    def complete(self, task_id: str, worker: str, outputs: list[str], inference_ms: int,
                 price_micro_usd: int) -> bool:
        """Mark done and charge each image, in one transaction; False (and no charge) if not ours."""
        now = utcnow()
        with self.engine.begin() as conn:
            # A cancel asked before this commits wins: the task fails as canceled and nothing is charged.
            res = conn.execute(update(tasks).where(self._held(task_id, worker), tasks.c.cancel_requested_at.is_(None))
                               .values(status="completed", outputs=outputs, inference_ms=inference_ms,
                                       **_finished(now)).returning(tasks.c.key_id))
            key_id = res.scalar()
            if key_id is None:
                conn.execute(update(tasks).where(self._held(task_id, worker)).values(
                    status="failed", error=CANCELED, **_finished(now)))
                return False
            # The unique (task_id, image_index) constraint makes a second charge impossible.
            if outputs:
                conn.execute(insert(usage), [
                    {"key_id": key_id, "task_id": task_id, "image_index": i,
                     "amount_micro_usd": price_micro_usd, "created_at": now} for i in range(len(outputs))])
        return True

    def fail(self, task_id: str, worker: str, error: str) -> bool:
        with self.engine.begin() as conn:
            res = conn.execute(update(tasks).where(self._held(task_id, worker)).values(
                status="failed", error=error, **_finished(utcnow())))
        return res.rowcount == 1

    def release(self, task_id: str, worker: str) -> bool:
        """Put a task back in the queue without counting the attempt (graceful shutdown).

        A task whose cancel was asked ends canceled instead (True as well: the worker is rid of it).
        """
        with self.engine.begin() as conn:
            now = utcnow()
            if conn.execute(update(tasks).where(self._held(task_id, worker), tasks.c.cancel_requested_at.is_not(None))
                            .values(status="failed", error=CANCELED, **_finished(now))).rowcount:
                return True
            model = conn.execute(update(tasks).where(self._held(task_id, worker)).values(
                status="created", lease_owner=None, lease_expires_at=None, attempts=tasks.c.attempts - 1,
                started_at=None, progress_step=None, progress_total=None, preview=None, preview_step=None)
                .returning(tasks.c.model)).scalar()
            if model is None:
                return False
            self._announce(conn, [model])
        self._queued.set()
        return True

    def recover_expired(self, max_attempts: int) -> tuple[int, list[str]]:
        """Tasks whose worker died (lease expired): back to the queue, or failed after `max_attempts`.

        Returns (how many were requeued, the ids of those that failed: their files may be deleted).
        """
        now = utcnow()
        expired = and_(tasks.c.status == "processing", tasks.c.lease_expires_at < now)
        with self.engine.begin() as conn:
            # A canceled task whose worker died ends as canceled rather than running again.
            failed = list(conn.execute(update(tasks).where(expired, tasks.c.cancel_requested_at.is_not(None)).values(
                status="failed", error=CANCELED, **_finished(now)).returning(tasks.c.id)).scalars())
            failed += conn.execute(update(tasks).where(expired, tasks.c.attempts >= max_attempts).values(
                status="failed", **_finished(now),
                error=f"the worker running this task stopped responding {max_attempts} times; giving up")
                .returning(tasks.c.id)).scalars().all()
            requeued = conn.execute(update(tasks).where(expired).values(
                status="created", lease_owner=None, lease_expires_at=None, started_at=None,
                progress_step=None, progress_total=None, preview=None, preview_step=None)
                .returning(tasks.c.model)).scalars().all()
            self._announce(conn, requeued)
        if requeued:
            self._queued.set()
        return len(requeued), failed

    # --- webhooks ---------------------------------------------------------------------------------

    def claim_webhook(self, lease_s: float) -> dict[str, Any] | None:
        """Take the delivery due first: its next attempt is pushed `lease_s` ahead while this sender tries.

        The row carries `attempts_made`. A sender that dies mid-attempt leaves the delivery pending; it is
        due again when the lease ends (so a receiver may see a prediction twice, never zero times).
        """
        now = utcnow()
        due = (select(tasks.c.id).where(tasks.c.webhook_state == "pending", tasks.c.webhook_next_at <= now)
               .order_by(tasks.c.webhook_next_at, tasks.c.id).limit(1))
        if self.postgres:
            due = due.with_for_update(skip_locked=True)
        stmt = (update(tasks).where(tasks.c.id == due.scalar_subquery(), tasks.c.webhook_state == "pending")
                .values(webhook_next_at=now + timedelta(seconds=lease_s)).returning(*tasks.c))
        with self.engine.begin() as conn:
            row = conn.execute(stmt).mappings().first()
            if row is None:
                return None
            made = conn.execute(select(func.count()).select_from(webhook_attempts)
                                .where(webhook_attempts.c.task_id == row["id"])).scalar_one()
        return dict(row) | {"attempts_made": made}

    def record_webhook_attempt(self, task_id: str, attempt: int, status_code: int | None, error: str,
                               duration_ms: int, next_at: datetime | None) -> None:
        """Log one attempt; then the delivery is done (`error` ""), due again at `next_at`, or given up (None)."""
        state = "delivered" if not error else ("pending" if next_at is not None else "failed")
        with self.engine.begin() as conn:
            conn.execute(insert(webhook_attempts).values(task_id=task_id, attempt=attempt, at=utcnow(),
                                                         status_code=status_code, error=error[:1000],
                                                         duration_ms=duration_ms))
            conn.execute(update(tasks).where(tasks.c.id == task_id, tasks.c.webhook_state == "pending")
                         .values(webhook_state=state, webhook_next_at=next_at if state == "pending" else None))

    def webhook_attempts(self, task_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        """The delivery attempts of these tasks, oldest first, by task id."""
        out: dict[str, list[dict[str, Any]]] = {tid: [] for tid in task_ids}
        if not task_ids:
            return out
        with self.engine.connect() as conn:
            rows = conn.execute(select(webhook_attempts).where(webhook_attempts.c.task_id.in_(task_ids))
                                .order_by(webhook_attempts.c.task_id, webhook_attempts.c.attempt,
                                          webhook_attempts.c.id)).mappings().all()
        for r in rows:
            out[r["task_id"]].append(dict(r))
        return out

    # --- usage and uploads ------------------------------------------------------------------------

    def usage(self, key_id: str) -> dict[str, Any]:
        day = func.date(usage.c.created_at)
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count(), func.coalesce(func.sum(usage.c.amount_micro_usd), 0))
                                 .where(usage.c.key_id == key_id)).one()
            days = conn.execute(select(day, func.count(), func.sum(usage.c.amount_micro_usd))
                                .where(usage.c.key_id == key_id).group_by(day).order_by(day)).all()
        return {"images": total[0], "micro_usd": int(total[1]),
                "days": [{"date": str(d), "images": n, "micro_usd": int(a)} for d, n, a in days]}

    def charges(self, task_id: str) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(usage).where(usage.c.task_id == task_id)).scalar_one()

    def add_upload(self, blob: str, key_id: str, content_type: str, size: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(uploads).values(blob=blob, key_id=key_id, content_type=content_type,
                                                size=size, created_at=utcnow()))

    def remove_upload(self, blob: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(uploads).where(uploads.c.blob == blob))

    def upload_owner(self, blob: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(uploads.c.key_id).where(uploads.c.blob == blob)).scalar()

    # --- workers and the service's status -------------------------------------------------------

    def ping(self) -> None:
        """A trivial query: raises if the database does not answer."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()

    def register_worker(self, id: str, host: str, pid: int, models: list[str], device: str,
                        engine: dict[str, Any] | None = None) -> None:
        """Advertise a worker (its model is loaded) as idle, with how its engine runs (`engine`: precision,
        quantize, offload, variant); registering an id again replaces its row."""
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(delete(workers).where(workers.c.id == id))
            conn.execute(insert(workers).values(
                id=id, host=host, pid=pid, models=list(models), device=device, state="idle",
                started_at=now, heartbeat_at=now, current_task=None,
                engine=null() if engine is None else dict(engine)))  # SQL NULL, not JSON null

    def worker_heartbeat(self, id: str, state: str, current_task: str | None) -> bool:
        """A worker's sign of life, with its state and task; False when it is not registered (any more)."""
        with self.engine.begin() as conn:
            res = conn.execute(update(workers).where(workers.c.id == id).values(
                state=state, current_task=current_task, heartbeat_at=utcnow()))
        return res.rowcount == 1

    def remove_worker(self, id: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(delete(workers).where(workers.c.id == id)).rowcount == 1

    def list_workers(self) -> list[dict[str, Any]]:
        """Every registered worker, the oldest registration first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(workers).order_by(workers.c.started_at, workers.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def live_workers(self, stale_after_s: float) -> list[dict[str, Any]]:
        """The workers that serve tasks now: a heartbeat under `stale_after_s` old, not stopping; oldest first."""
        since = utcnow() - timedelta(seconds=stale_after_s)
        with self.engine.connect() as conn:
            rows = conn.execute(select(workers).where(workers.c.heartbeat_at >= since,
                                                      workers.c.state.not_in(("stopping", "stopped")))
                                .order_by(workers.c.started_at, workers.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def status(self, stale_after_s: float) -> dict[str, Any]:
        """The service at a glance, read in one transaction.

        `queue`: waiting tasks per model; `running`: tasks being processed, with progress; `workers`: each
        registered worker, `alive` when its last heartbeat is under `stale_after_s` old; `throughput`:
        tasks completed and failed in the last 1, 5 and 15 minutes; `stuck`: models with waiting tasks
        that no live worker (alive, not stopping) serves, which is why those tasks wait.
        """
        now = utcnow()
        windows = {"1m": 1, "5m": 5, "15m": 15}
        since = {name: now - timedelta(minutes=m) for name, m in windows.items()}
        finished = tasks.c.status.in_(("completed", "failed"))
        counts = [func.coalesce(func.sum(case((tasks.c.completed_at >= since[name], 1), else_=0)), 0)
                  for name in windows]
        with self.engine.connect() as conn:
            queue = conn.execute(select(tasks.c.model, func.count()).where(tasks.c.status == "created")
                                 .group_by(tasks.c.model).order_by(tasks.c.model)).all()
            running = conn.execute(
                select(tasks.c.id, tasks.c.model, tasks.c.lease_owner, tasks.c.progress_step,
                       tasks.c.progress_total, tasks.c.started_at)
                .where(tasks.c.status == "processing").order_by(tasks.c.started_at, tasks.c.id)).mappings().all()
            done = conn.execute(select(tasks.c.status, *counts)
                                .where(finished, tasks.c.completed_at >= since["15m"])
                                .group_by(tasks.c.status)).all()
            rows = conn.execute(select(workers).order_by(workers.c.started_at, workers.c.id)).mappings().all()

        def age(at: datetime | None) -> float | None:
            return None if at is None else max((now - at).total_seconds(), 0.0)

        worker_list = [dict(r) | {"heartbeat_age_s": age(r["heartbeat_at"]),
                                  "alive": age(r["heartbeat_at"]) <= stale_after_s} for r in rows]
        throughput = {name: {"completed": 0, "failed": 0} for name in windows}
        for status, *n in done:
            for name, count in zip(windows, n, strict=True):
                throughput[name][status] = int(count)
        served = {m for w in worker_list if w["alive"] and w["state"] not in ("stopping", "stopped")
                  for m in w["models"]}
        return {
            "now": now,
            "stale_after_s": stale_after_s,
            "queue": {model: n for model, n in queue},
            "running": [{"id": r["id"], "model": r["model"], "worker": r["lease_owner"],
                         "step": r["progress_step"], "total": r["progress_total"],
                         "started_at": r["started_at"], "running_s": age(r["started_at"])} for r in running],
            "workers": worker_list,
            "throughput": throughput,
            "stuck": [{"model": model, "tasks": n} for model, n in queue if model not in served],
        }
