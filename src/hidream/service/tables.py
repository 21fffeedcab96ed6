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
    Index("ix_tasks_queue", "status", "created_at"),
    Index("ix_tasks_key_created", "key_id", "created_at"),
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
)
