"""The database schema (SQLAlchemy Core); migrations in `migrations/` create exactly this."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 of the key, hex
    Column("prefix", String(16), nullable=False),  # shown in listings
    Column("created_at", DateTime, nullable=False),
    Column("revoked_at", DateTime),
    Column("rate_per_minute", Integer),  # submits per rolling minute; None: the service default, 0: no limit
    Column("max_concurrent", Integer),  # tasks queued or running at once; None: the service default, 0: no limit
)

tasks = Table(
    "tasks", metadata,
    Column("id", String(32), primary_key=True),  # 128 random bits, hex
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("model", String(200), nullable=False),
    Column("status", String(16), nullable=False),  # created | processing | completed | failed
    Column("input", JSON, nullable=False),  # the validated request as it runs
    Column("references", JSON, nullable=False),  # storage keys of the reference images' bytes
    Column("outputs", JSON, nullable=False),  # storage keys of the images
    Column("error", Text, nullable=False, default=""),
    Column("created_at", DateTime, nullable=False),
    Column("started_at", DateTime),
    Column("completed_at", DateTime),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(100)),
    Column("lease_expires_at", DateTime),
    Column("progress_step", Integer),
    Column("progress_total", Integer),
    Column("inference_ms", BigInteger),
    Column("cancel_requested_at", DateTime),  # set by a cancel while the task runs; the worker stops
    Column("preview", Text),  # the latest low-resolution x0 estimate, a data: URI (JPEG), while processing
    Column("preview_step", Integer),  # the step that preview is of
    Column("webhook_url", Text),
    Column("webhook_state", String(16)),  # None (no webhook or not finished) | pending | delivered | failed
    Column("webhook_next_at", DateTime),  # pending: when the next attempt is due (or its lease ends)
    Index("ix_tasks_queue", "status", "created_at"),
    Index("ix_tasks_key_created", "key_id", "created_at"),
    Index("ix_tasks_webhook_due", "webhook_state", "webhook_next_at"),
)

webhook_attempts = Table(
    "webhook_attempts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_id", String(32), ForeignKey("tasks.id"), nullable=False),
    Column("attempt", Integer, nullable=False),  # 1-based
    Column("at", DateTime, nullable=False),
    Column("status_code", Integer),  # None: no HTTP answer (timeout, refused, address not allowed)
    Column("error", Text, nullable=False),  # "" when delivered
    Column("duration_ms", Integer, nullable=False),
    Index("ix_webhook_attempts_task", "task_id", "attempt"),
)

idempotency_keys = Table(
    "idempotency_keys", metadata,
    Column("key_id", String(32), ForeignKey("api_keys.id"), primary_key=True),
    Column("idempotency_key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),  # sha256 of the request, to tell a different body
    Column("task_id", String(32), ForeignKey("tasks.id"), nullable=False),
    Column("created_at", DateTime, nullable=False),
)

usage = Table(
    "usage", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("task_id", String(32), ForeignKey("tasks.id"), nullable=False),
    Column("image_index", Integer, nullable=False),
    Column("amount_micro_usd", BigInteger, nullable=False),
    Column("created_at", DateTime, nullable=False),
    # One charge per image, whatever retries happen.
    UniqueConstraint("task_id", "image_index", name="uq_usage_task_image"),
    Index("ix_usage_key_created", "key_id", "created_at"),
)

uploads = Table(
    "uploads", metadata,
    Column("blob", String(200), primary_key=True),  # storage key
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("content_type", String(50), nullable=False),
    Column("size", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

workers = Table(
    "workers", metadata,
    Column("id", String(200), primary_key=True),  # Worker.id: host:pid:random
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("models", JSON, nullable=False),  # the model ids it claims tasks for
    Column("device", String(100), nullable=False),  # e.g. cuda:0, cpu; "unknown" when the engine does not say
    Column("state", String(16), nullable=False),  # WorkerState's value: idle | running | stopping | ...
    Column("started_at", DateTime, nullable=False),  # when it registered (its model loaded)
    Column("heartbeat_at", DateTime, nullable=False),  # last sign of life; old means the worker is gone
    Column("current_task", String(32)),  # the task it runs, if any
    # how its engine runs: {"precision", "quantize", "offload", "variant"}; None: registered before 0004
    Column("engine", JSON),
)
