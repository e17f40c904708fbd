"""pairing (S9): the broker's device inventory (what a pairing code carries, per serial)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pairing_inventory",
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("hardware_id", sa.String(length=12), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("key_sha256", sa.LargeBinary(length=32), nullable=False),
        sa.Column("added_by", sa.String(length=128), nullable=False),
        sa.Column("added_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_pairing_inventory")),
    )


def downgrade() -> None:
    op.drop_table("pairing_inventory")
