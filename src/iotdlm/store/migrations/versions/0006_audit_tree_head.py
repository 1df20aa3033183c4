"""audit checkpoints carry the RFC 9162 Merkle tree head of the records they sign

Revision ID: 0006
Revises: 0005

A checkpoint becomes a signed tree head (size, chain hash, Merkle root, time), which an outside
copy can be checked against with consistency proofs (docs/adr/0005-audit-anchors.md). Older
checkpoints keep a NULL root. Written by hand; it must not import tables.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_checkpoints") as batch:
        batch.add_column(sa.Column("root", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_checkpoints") as batch:
        batch.drop_column("root")
