"""initial schema: certificates, devices, nonces, meta

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00

Written by hand to match iotdlm/store/tables.py as of this revision; it must not import tables.py
(later revisions change tables.py, and this file must keep creating the schema of revision 0001).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)
    op.create_table(
        "certificates",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("serial_hex", sa.String(42), nullable=False),
        sa.Column("issuer", sa.String(1024), nullable=False),
        sa.Column("subject", sa.String(2048), nullable=False),
        sa.Column("device_id", sa.String(255), nullable=True),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("not_before", tz, nullable=False),
        sa.Column("not_after", tz, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("requested_by", sa.String(255), nullable=False),
        sa.Column("created_at", tz, nullable=False),
        sa.Column("revoked_at", tz, nullable=True),
        sa.Column("revocation_reason", sa.String(64), nullable=True),
        sa.Column("superseded_by_hex", sa.String(42), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_certificates"),
        sa.UniqueConstraint("serial_hex", "issuer", name="uq_certificates_serial_hex_issuer"),
        sa.UniqueConstraint("fingerprint", name="uq_certificates_fingerprint"),
    )
    op.create_index("ix_certificates_device_id", "certificates", ["device_id"])
    op.create_index("ix_certificates_status", "certificates", ["status"])
    op.create_index("ix_certificates_not_after", "certificates", ["not_after"])
    op.create_index("ix_certificates_created_at", "certificates", ["created_at"])

    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(255), nullable=False),
        sa.Column("dtype", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", tz, nullable=False),
        sa.Column("updated_at", tz, nullable=False),
        sa.PrimaryKeyConstraint("device_id", name="pk_devices"),
    )
    op.create_index("ix_devices_dtype", "devices", ["dtype"])
    op.create_index("ix_devices_status", "devices", ["status"])

    op.create_table(
        "nonces",
        sa.Column("sender", sa.String(255), nullable=False),
        sa.Column("nonce", sa.String(255), nullable=False),
        sa.Column("expires_at", tz, nullable=False),
        sa.PrimaryKeyConstraint("sender", "nonce", name="pk_nonces"),
    )
    op.create_index("ix_nonces_expires_at", "nonces", ["expires_at"])

    op.create_table(
        "meta",
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_meta"),
    )


def downgrade() -> None:
    op.drop_table("meta")
    op.drop_index("ix_nonces_expires_at", table_name="nonces")
    op.drop_table("nonces")
    op.drop_index("ix_devices_status", table_name="devices")
    op.drop_index("ix_devices_dtype", table_name="devices")
    op.drop_table("devices")
    op.drop_index("ix_certificates_created_at", table_name="certificates")
    op.drop_index("ix_certificates_not_after", table_name="certificates")
    op.drop_index("ix_certificates_status", table_name="certificates")
    op.drop_index("ix_certificates_device_id", table_name="certificates")
    op.drop_table("certificates")
