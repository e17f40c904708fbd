"""broker: HPKE key id and template, signed delivery envelopes, ack proofs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("principals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hpke_key_id", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("hpke_template", sa.String(length=32), nullable=True))

    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("signature", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("ack_proof", sa.LargeBinary(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_deliveries_state_expires_at"), ["state", "expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_state_expires_at"))
        batch_op.drop_column("ack_proof")
        batch_op.drop_column("signature")

    with op.batch_alter_table("principals", schema=None) as batch_op:
        batch_op.drop_column("hpke_template")
        batch_op.drop_column("hpke_key_id")
