"""The store's side of cancel, idempotency keys, per-key rate limits, previews and webhook deliveries, on SQLite
and PostgreSQL (when HIDREAM_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from hidream.service.errors import Conflict, TooManyRequests
from hidream.service.store import CANCELED, IdempotentReplay, Limits, Store, utcnow
from hidream.service.tables import idempotency_keys, tasks

try:  # tests/service as a package or as a plain directory on sys.path
    from .databases import key, postgres_url, sqlite_url, store, store_url  # noqa: F401 - fixtures
except ImportError:
    from databases import key, postgres_url, sqlite_url, store, store_url  # noqa: F401 - fixtures

PRICE = 44_000
INPUT = {"num_images": 1, "prompt": "p"}


def submit(store: Store, key: str, **kwargs) -> str:
    return store.insert_task(key, "m", INPUT, [], 10_000, **kwargs)["id"]


def shift_created(store: Store, task_id: str, by: timedelta) -> None:
    at = store.get_task(task_id)["created_at"] + by  # in Python: SQLite has no datetime arithmetic
    with store.engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(created_at=at))


# --- cancel ---------------------------------------------------------------------------------------------------


def test_cancel_a_queued_task_fails_it_and_no_worker_gets_it(store: Store, key: str) -> None:
    tid = submit(store, key)
    assert store.cancel(tid, key) == "canceled"
    row = store.get_task(tid)
    assert (row["status"], row["error"], row["started_at"]) == ("failed", CANCELED, None)
    assert row["completed_at"] is not None
    assert store.claim("w", ["m"], 30) is None
    assert store.cancel(tid, key) == "failed"  # again: already ended, nothing changes
    assert store.charges(tid) == 0


def test_cancel_of_another_keys_or_an_unknown_task_is_none(store: Store, key: str) -> None:
    other = store.create_key("other")[0].id
    tid = submit(store, key)
    assert store.cancel(tid, other) is None
    assert store.cancel("0" * 32, key) is None
    assert store.get_task(tid)["status"] == "created"


def test_cancel_of_a_running_task_is_seen_by_its_worker_and_wins_over_completion(store: Store, key: str) -> None:
    tid = submit(store, key)
    assert store.claim("w", ["m"], 30)["id"] == tid
    assert store.progress(tid, "w", 1, 10) is False
    assert not store.cancel_requested(tid)
    assert store.cancel(tid, key) == "requested"
    assert store.cancel_requested(tid)
    assert store.progress(tid, "w", 2, 10) is True  # the worker learns it with its next progress report
    # A worker that finishes anyway is refused: the task fails as canceled and nothing is charged.
    assert not store.complete(tid, "w", [f"outputs/{tid}/0.png"], 5, PRICE)
    row = store.get_task(tid)
    assert (row["status"], row["error"], row["outputs"]) == ("failed", CANCELED, [])
    assert store.charges(tid) == 0
    assert store.cancel(tid, key) == "failed"


def test_a_canceled_task_whose_worker_died_is_not_run_again(store: Store, key: str) -> None:
    tid = submit(store, key)
    store.claim("w", ["m"], 0.01)
    store.cancel(tid, key)
    with store.engine.begin() as conn:
        conn.execute(update(tasks).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    store.recover_expired(max_attempts=3)
    row = store.get_task(tid)
    assert (row["status"], row["error"]) == ("failed", CANCELED)
    assert store.claim("w2", ["m"], 30) is None


def test_a_canceled_task_released_at_shutdown_ends_canceled_instead_of_queued(store: Store, key: str) -> None:
    tid = submit(store, key)
    store.claim("w", ["m"], 30)
    store.cancel(tid, key)
    assert store.release(tid, "w")
    row = store.get_task(tid)
    assert (row["status"], row["error"]) == ("failed", CANCELED)
    assert store.claim("w", ["m"], 30) is None


# --- previews -------------------------------------------------------------------------------------------------


def test_progress_keeps_the_latest_preview_until_the_task_ends(store: Store, key: str) -> None:
    tid = submit(store, key)
    store.claim("w", ["m"], 30)
    store.progress(tid, "w", 5, 10, "data:image/jpeg;base64,AAAA")
    store.progress(tid, "w", 6, 10)  # no new preview: the last one stays
    row = store.get_task(tid)
    assert (row["preview"], row["preview_step"], row["progress_step"]) == ("data:image/jpeg;base64,AAAA", 5, 6)
    store.progress(tid, "other-worker", 7, 10, "data:image/jpeg;base64,BBBB")  # not its task: ignored
    assert store.get_task(tid)["preview_step"] == 5
    assert store.complete(tid, "w", [], 1, PRICE)
    assert store.get_task(tid)["preview"] is None


# --- idempotency ----------------------------------------------------------------------------------------------


def test_an_idempotency_key_names_one_task_per_api_key(store: Store, key: str) -> None:
    tid = submit(store, key, idempotency=("k1", "hash-a"))
    with pytest.raises(IdempotentReplay) as replay:
        submit(store, key, idempotency=("k1", "hash-a"))
    assert replay.value.task_id == tid
    with pytest.raises(Conflict, match="Idempotency-Key"):
        submit(store, key, idempotency=("k1", "hash-b"))
    assert store.idempotent_task(key, "k1", "hash-a")["id"] == tid
    with pytest.raises(Conflict):
        store.idempotent_task(key, "k1", "hash-b")
    assert store.idempotent_task(key, "k2", "hash-a") is None
    other = store.create_key("other")[0].id  # another API key's "k1" is another key altogether
    assert submit(store, other, idempotency=("k1", "hash-a")) != tid
    assert len(store.list_tasks(key, 10, None)) == 1


def test_an_idempotency_key_is_forgotten_after_24_hours(store: Store, key: str) -> None:
    tid = submit(store, key, idempotency=("k1", "hash-a"))
    with store.engine.begin() as conn:
        conn.execute(update(idempotency_keys).values(created_at=utcnow() - timedelta(hours=24, seconds=1)))
    assert store.idempotent_task(key, "k1", "hash-a") is None
    again = submit(store, key, idempotency=("k1", "hash-b"))  # another body is fine now
    assert again != tid
    with pytest.raises(IdempotentReplay) as replay:
        submit(store, key, idempotency=("k1", "hash-b"))
    assert replay.value.task_id == again


def test_concurrent_submits_with_one_idempotency_key_make_one_task(store: Store, key: str) -> None:
    made, replays, errors = [], [], []

    def go() -> None:
        try:
            made.append(submit(store, key, idempotency=("same", "h")))
        except IdempotentReplay as r:
            replays.append(r.task_id)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(made) == 1 and replays == made * 7


# --- rate limits ------------------------------------------------------------------------------------------------


def test_rate_per_minute_counts_the_keys_submits_in_a_rolling_minute(store: Store, key: str) -> None:
    limits = Limits(rate_per_minute=3)
    first = submit(store, key, limits=limits)
    submit(store, key, limits=limits)
    submit(store, key, limits=limits)
    with pytest.raises(TooManyRequests, match="rate limit: 3 submits per minute") as err:
        submit(store, key, limits=limits)
    assert 1 <= err.value.retry_after <= 60
    other = store.create_key("other")[0].id
    submit(store, other, limits=limits)  # another key has its own budget
    shift_created(store, first, -timedelta(seconds=61))  # the oldest leaves the window: one more fits
    submit(store, key, limits=limits)
    with pytest.raises(TooManyRequests):
        submit(store, key, limits=limits)


def test_max_concurrent_counts_queued_and_running_tasks(store: Store, key: str) -> None:
    limits = Limits(max_concurrent=2)
    a = submit(store, key, limits=limits)
    submit(store, key, limits=limits)
    store.claim("w", ["m"], 30)
    with pytest.raises(TooManyRequests, match="2 tasks queued or running") as err:
        submit(store, key, limits=limits)
    assert err.value.retry_after >= 1
    assert store.complete(a, "w", [], 1, PRICE)
    submit(store, key, limits=limits)


def test_a_keys_own_limits_win_over_the_service_defaults(store: Store) -> None:
    record, _ = store.create_key("limited", rate_per_minute=1)
    assert (record.rate_per_minute, record.max_concurrent) == (1, None)
    submit(store, record.id, limits=Limits(rate_per_minute=100))
    with pytest.raises(TooManyRequests):
        submit(store, record.id, limits=Limits(rate_per_minute=100))
    updated = store.set_key_limits(record.prefix, 0, None)  # 0: no limit for this key
    assert (updated.rate_per_minute, updated.max_concurrent) == (0, None)
    for _ in range(3):
        submit(store, record.id, limits=Limits(rate_per_minute=1))
    back = store.set_key_limits(record.id, -1, 1)  # -1: back to the service default
    assert (back.rate_per_minute, back.max_concurrent) == (None, 1)
    with pytest.raises(TooManyRequests, match="rate limit: 1 tasks"):
        submit(store, record.id)
    assert store.set_key_limits("no-such-key", 1, 1) is None


# --- webhook deliveries -------------------------------------------------------------------------------------------


def finish(store: Store, key: str, webhook_url: str | None = "http://example.com/hook", ok: bool = True) -> str:
    tid = submit(store, key, webhook_url=webhook_url)
    assert store.claim("w", ["m"], 30)["id"] == tid
    assert store.complete(tid, "w", [], 1, PRICE) if ok else store.fail(tid, "w", "boom")
    return tid


def test_a_finished_task_with_a_webhook_is_due_once_and_leased_while_sent(store: Store, key: str) -> None:
    assert store.claim_webhook(30) is None
    finish(store, key, webhook_url=None)
    assert store.claim_webhook(30) is None  # no webhook: nothing to send
    tid = finish(store, key, ok=False)
    row = store.claim_webhook(30)
    assert (row["id"], row["webhook_state"], row["attempts_made"]) == (tid, "pending", 0)
    assert store.claim_webhook(30) is None  # leased to the first sender
    store.record_webhook_attempt(tid, 1, 500, "HTTP 500", 12, utcnow() - timedelta(seconds=1))
    row = store.claim_webhook(30)
    assert (row["id"], row["attempts_made"]) == (tid, 1)
    store.record_webhook_attempt(tid, 2, 204, "", 3, None)
    assert store.claim_webhook(30) is None
    assert store.get_task(tid)["webhook_state"] == "delivered"
    attempts = store.webhook_attempts([tid])[tid]
    assert [(a["attempt"], a["status_code"], a["error"]) for a in attempts] == [(1, 500, "HTTP 500"), (2, 204, "")]


def test_a_delivery_given_up_is_failed_and_not_due_again(store: Store, key: str) -> None:
    tid = finish(store, key)
    store.claim_webhook(30)
    store.record_webhook_attempt(tid, 1, None, "timed out", 10_000, None)
    assert store.get_task(tid)["webhook_state"] == "failed"
    assert store.claim_webhook(30) is None


def test_a_canceled_queued_task_with_a_webhook_is_due(store: Store, key: str) -> None:
    tid = submit(store, key, webhook_url="http://example.com/hook")
    store.cancel(tid, key)
    assert store.claim_webhook(30)["id"] == tid


def test_a_sender_that_died_leaves_the_delivery_due_after_its_lease(store: Store, key: str) -> None:
    tid = finish(store, key)
    store.claim_webhook(0.01)
    with store.engine.begin() as conn:  # the lease ran out
        conn.execute(update(tasks).values(webhook_next_at=utcnow() - timedelta(seconds=1)))
    assert store.claim_webhook(30)["id"] == tid


def test_a_task_never_starts_before_it_was_created(store: Store, key: str) -> None:
    """A claim reads the time before it may wait for a submit's lock; the task it then finds is newer."""
    tid = submit(store, key)
    shift_created(store, tid, timedelta(seconds=2))  # as if created after the claim read the clock
    row = store.claim("w", ["m"], 30)
    assert row["id"] == tid and row["started_at"] == row["created_at"]
