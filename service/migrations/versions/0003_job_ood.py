"""A reconstruction's out-of-distribution verdict on the job (issue 24).

``ood`` is :func:`models.ood.summary` of the job's slices (score, threshold, flag, method,
flagged slices), so a client polling the job sees the warning without fetching the report;
NULL for other kinds and for priors with no calibrated check.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("ood", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("ood")
