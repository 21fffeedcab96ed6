"""Webhooks: each finished prediction with a `webhook_url` is POSTed there, signed, retried for about an hour.

Deliveries live in the tasks table (`webhook_state`, `webhook_next_at`) and the `webhook_attempts` log, so
any API replica may send one and a restart loses none. The receiver may get a prediction more than once
(at-least-once): the `HiDream-Webhook-Id` header (the prediction id) is its idempotency key.

Signature: `HiDream-Webhook-Signature: v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>` with the
timestamp from `HiDream-Webhook-Timestamp` (Unix seconds); the secret is the API key's, from
`GET /api/v1/webhook/secret`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import SQLAlchemyError

from hidream.service.errors import BadRequest
from hidream.service.fetch import FetchPolicy, post
from hidream.service.settings import Settings
from hidream.service.store import Store, utcnow

log = logging.getLogger("hidream.webhooks")
MAX_DELAY_S = 600.0
PARALLEL = 8  # deliveries in flight at once per sender


def key_secret(signing_secret: str, key_id: str) -> str:
    """The webhook secret of one API key: derived from the service's secret, the same on every replica."""
    return "whsec_" + hmac.new(signing_secret.encode(), f"webhook:{key_id}".encode(), hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def retry_delay_s(attempt: int, first_s: float) -> float:
    """The wait after failed attempt `attempt` (1-based): first_s, doubling, at most 10 minutes."""
    return min(first_s * 2 ** (attempt - 1), MAX_DELAY_S)


class WebhookSender:
    """Claims due deliveries from the store and sends them; run() until stop() (an asyncio task)."""

    def __init__(self, settings: Settings, store: Store, render: Callable[[dict[str, Any]], dict[str, Any]],
                 policy: FetchPolicy, poll_s: float = 0.5) -> None:
        self.settings, self.store, self.render, self.poll_s = settings, store, render, poll_s
        self.policy = FetchPolicy(timeout_s=settings.webhook_timeout_s, allow_networks=policy.allow_networks)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        lease_s = self.settings.webhook_timeout_s * 2 + 5  # a claimed delivery is due again after this
        wait = self.poll_s
        while not self._stop.is_set():
            try:
                claimed = []
                while len(claimed) < PARALLEL:
                    row = await run_in_threadpool(self.store.claim_webhook, lease_s)
                    if row is None:
                        break
                    claimed.append(row)
                wait = self.poll_s
                if claimed:
                    await asyncio.gather(*(self.deliver(row) for row in claimed))
                    continue
            except SQLAlchemyError as err:  # the database is away: back off, then try again
                wait = min(wait * 2, 30.0)
                log.warning("webhooks: %s (%s); retrying in %.1f s", type(err).__name__,
                            (str(err).splitlines() or [""])[0][:200], wait)
            except Exception:  # a bug, not an outage: say so, and keep sending the others
                log.exception("webhooks: unexpected error")
            try:
                await asyncio.wait_for(self._stop.wait(), wait)
            except TimeoutError:
                pass

    async def deliver(self, row: dict[str, Any]) -> None:
        attempt = row["attempts_made"] + 1
        body = json.dumps(await run_in_threadpool(self.render, row), separators=(",", ":")).encode()
        timestamp = int(time.time())
        secret = key_secret(self.settings.signing_secret(), row["key_id"])
        headers = {"Content-Type": "application/json", "User-Agent": "hidream-webhooks/1",
                   "HiDream-Webhook-Id": row["id"], "HiDream-Webhook-Timestamp": str(timestamp),
                   "HiDream-Webhook-Signature": sign(secret, timestamp, body),
                   "HiDream-Webhook-Attempt": str(attempt)}
        started = time.perf_counter()
        status, error = None, ""
        try:
            status = await post(row["webhook_url"], body, headers, self.policy, "webhook_url")
            if not 200 <= status < 300:
                error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        except BadRequest as err:
            error = err.message.removeprefix("webhook_url: ")
        except Exception as err:  # whatever one delivery raises is that delivery's failed attempt
            log.exception("webhook for %s: attempt %d raised", row["id"], attempt)
            error = f"{type(err).__name__}: {err}"[:500]
        duration_ms = int((time.perf_counter() - started) * 1000)
        next_at = None
        if error:
            due = utcnow() + timedelta(seconds=retry_delay_s(attempt, self.settings.webhook_retry_s))
            ended = row["completed_at"] or utcnow()
            if due <= ended + timedelta(seconds=self.settings.webhook_give_up_s):
                next_at = due
            log.info("webhook for %s: attempt %d failed (%s); %s", row["id"], attempt, error,
                     f"retrying at {next_at:%H:%M:%S}" if next_at else "giving up")
        await run_in_threadpool(self.store.record_webhook_attempt, row["id"], attempt, status, error,
                                duration_ms, next_at)
