"""trust transfer: km's registry of external factory certificates (factory_cas, factory_registry)
and each provider's view of a transfer (transfers, transfer_devices)

Revision ID: 0004
Revises: 0003
Create Date: 2025-04-01 00:00:00

Written by hand to match iotdlm/store/tables.py as of this revision; it must not import tables.py
(later revisions change tables.py, and this file must keep creating the schema of revision 0004).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)
    op.create_table(
        "factory_cas",
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(2048), nullable=False),
        sa.Column("anchor", sa.Boolean(), nullable=False),
        sa.Column("not_after", tz, nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("registered_by", sa.String(255), nullable=False),
        sa.Column("registered_at", tz, nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", name="pk_factory_cas"),
    )
    op.create_table(
        "factory_registry",
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(255), nullable=False),
        sa.Column("issuer_fingerprint", sa.String(64), nullable=False),
        sa.Column("serial_hex", sa.String(42), nullable=False),
        sa.Column("not_after", tz, nullable=False),
        sa.Column("enroll_not_before", tz, nullable=True),
        sa.Column("enroll_not_after", tz, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("batch", sa.String(64), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("registered_by", sa.String(255), nullable=False),
        sa.Column("registered_at", tz, nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", name="pk_factory_registry"),
    )
    op.create_index("ix_factory_registry_device_id", "factory_registry", ["device_id"])
    op.create_index("ix_factory_registry_batch", "factory_registry", ["batch"])
    op.create_table(
        "transfers",
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("transfer_id", sa.String(64), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("created_at", tz, nullable=False),
        sa.Column("updated_at", tz, nullable=False),
        sa.PrimaryKeyConstraint("role", "transfer_id", name="pk_transfers"),
    )
    op.create_table(
        "transfer_devices",
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("transfer_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("updated_at", tz, nullable=False),
        sa.PrimaryKeyConstraint("role", "transfer_id", "device_id", name="pk_transfer_devices"),
    )
    op.create_index(
        "ix_transfer_devices_role_transfer_id_status", "transfer_devices", ["role", "transfer_id", "status"]
    )


def downgrade() -> None:
    op.drop_index("ix_transfer_devices_role_transfer_id_status", table_name="transfer_devices")
    op.drop_table("transfer_devices")
    op.drop_table("transfers")
    op.drop_index("ix_factory_registry_batch", table_name="factory_registry")
    op.drop_index("ix_factory_registry_device_id", table_name="factory_registry")
    op.drop_table("factory_registry")
    op.drop_table("factory_cas")
