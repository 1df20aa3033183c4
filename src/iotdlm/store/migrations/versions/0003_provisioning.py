"""provisioning records (pm): one row per device

Revision ID: 0003
Revises: 0002
Create Date: 2025-03-01 00:00:00

Written by hand to match iotdlm/store/tables.py as of this revision; it must not import tables.py
(later revisions change tables.py, and this file must keep creating the schema of revision 0003).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)
    op.create_table(
        "provisioning",
        sa.Column("device_id", sa.String(255), nullable=False),
        sa.Column("dtype", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("operator", sa.String(255), nullable=False),
        sa.Column("ref", sa.String(1024), nullable=True),
        sa.Column("steps_done", sa.Text(), nullable=False),
        sa.Column("release_counter", sa.BigInteger(), nullable=True),
        sa.Column("image_sha256", sa.String(64), nullable=True),
        sa.Column("certificates", sa.Text(), nullable=False),
        sa.Column("failed_step", sa.String(64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("started_at", tz, nullable=False),
        sa.Column("updated_at", tz, nullable=False),
        sa.Column("completed_at", tz, nullable=True),
        sa.PrimaryKeyConstraint("device_id", name="pk_provisioning"),
    )
    op.create_index("ix_provisioning_dtype_status", "provisioning", ["dtype", "status"])
    op.create_index("ix_provisioning_updated_at", "provisioning", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_provisioning_updated_at", table_name="provisioning")
    op.drop_index("ix_provisioning_dtype_status", table_name="provisioning")
    op.drop_table("provisioning")
