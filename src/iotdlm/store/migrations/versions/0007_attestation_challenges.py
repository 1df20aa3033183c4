"""trust transfer: SP2's outstanding attestation challenges (attestation_challenges)

Revision ID: 0007
Revises: 0006

A challenge issued by one km worker is answered at another, and survives a km restart: each is a
row (device, nonce, issued, expires), taken (deleted) by the evidence that answers it. Written by
hand; it must not import tables.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)
    op.create_table(
        "attestation_challenges",
        sa.Column("device_id", sa.String(255), nullable=False),
        sa.Column("nonce", sa.String(128), nullable=False),
        sa.Column("issued_at", tz, nullable=False),
        sa.Column("expires_at", tz, nullable=False),
        sa.PrimaryKeyConstraint("device_id", "nonce", name="pk_attestation_challenges"),
    )
    op.create_index("ix_attestation_challenges_expires_at", "attestation_challenges", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_attestation_challenges_expires_at", table_name="attestation_challenges")
    op.drop_table("attestation_challenges")
