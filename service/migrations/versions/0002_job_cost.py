"""Job cost and send time, for per-owner caps and per-owner admission to the broker.

``cost`` is NFE × samples × slices × pixels of a reconstruction or sampling job (0 for
training and export), summed per owner over queued and running jobs. ``sent_at`` is when a
job's message went to the broker; a queued job without it waits in the database for its
owner's turn (``workers.lifecycle.admit``).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("cost", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("sent_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("sent_at")
        batch.drop_column("cost")
