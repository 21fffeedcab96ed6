"""Cancel, previews, webhooks, idempotency keys and per-key rate limits.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TASK_COLUMNS = [
    ("cancel_requested_at", sa.DateTime),
    ("preview", sa.Text),
    ("preview_step", sa.Integer),
    ("webhook_url", sa.Text),
    ("webhook_state", sa.String(16)),
    ("webhook_next_at", sa.DateTime),
]


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        for name, type_ in TASK_COLUMNS:
            batch.add_column(sa.Column(name, type_))
        batch.create_index("ix_tasks_webhook_due", ["webhook_state", "webhook_next_at"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("rate_per_minute", sa.Integer))
        batch.add_column(sa.Column("max_concurrent", sa.Integer))
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(32), sa.ForeignKey("tasks.id"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Index("ix_webhook_attempts_task", "task_id", "attempt"),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), primary_key=True),
        sa.Column("idempotency_key", sa.String(255), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(32), sa.ForeignKey("tasks.id"), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("webhook_attempts")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("max_concurrent")
        batch.drop_column("rate_per_minute")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index("ix_tasks_webhook_due")
        for name, _ in reversed(TASK_COLUMNS):
            batch.drop_column(name)
