"""pairing (S9): manufacturer CA certificates whose CRLs the broker publishes

The CRLs themselves go in the ``crls`` table of 0001.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pairing_manufacturer_cas",
        sa.Column("fingerprint", sa.LargeBinary(length=32), nullable=False),
        sa.Column("subject", sa.String(length=512), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", name=op.f("pk_pairing_manufacturer_cas")),
    )


def downgrade() -> None:
    op.drop_table("pairing_manufacturer_cas")
