"""validation authority and audit log: certificates.crl_partition, crl_numbers, crls, audit_log,
audit_checkpoints

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01 00:00:00

Written by hand to match iotdlm/store/tables.py as of this revision; it must not import tables.py
(later revisions change tables.py, and this file must keep creating the schema of revision 0002).
Existing certificates get ``crl_partition`` NULL (no partition assigned).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)
    seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

    # A nullable column without a default: a plain ALTER TABLE ... ADD COLUMN on both backends.
    op.add_column("certificates", sa.Column("crl_partition", sa.Integer(), nullable=True))
    op.create_index(
        "ix_certificates_issuer_crl_partition_status_id",
        "certificates",
        ["issuer", "crl_partition", "status", "id"],
    )

    op.create_table(
        "crl_numbers",
        sa.Column("issuer", sa.String(1024), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("last_number", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("issuer", "partition", name="pk_crl_numbers"),
    )

    op.create_table(
        "crls",
        sa.Column("issuer", sa.String(1024), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("number", sa.BigInteger(), nullable=False),
        sa.Column("this_update", tz, nullable=False),
        sa.Column("next_update", tz, nullable=False),
        sa.Column("base_number", sa.BigInteger(), nullable=True),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("issuer", "partition", "kind", name="pk_crls"),
    )

    op.create_table(
        "audit_log",
        sa.Column("seq", seq, nullable=False, autoincrement=False),
        sa.Column("at", tz, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("subject", sa.String(1024), nullable=True),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_kind", "audit_log", ["kind"])
    op.create_index("ix_audit_log_at", "audit_log", ["at"])

    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", seq, nullable=False, autoincrement=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("at", tz, nullable=False),
        sa.Column("signer", sa.String(255), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_checkpoints"),
    )


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_index("ix_audit_log_kind", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("crls")
    op.drop_table("crl_numbers")
    op.drop_index("ix_certificates_issuer_crl_partition_status_id", table_name="certificates")
    # SQLite >= 3.35 drops an unindexed column in place; batch mode rebuilds the table otherwise.
    with op.batch_alter_table("certificates") as batch:
        batch.drop_column("crl_partition")
