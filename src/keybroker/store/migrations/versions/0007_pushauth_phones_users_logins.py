"""push login (S7): phones, locked users and logins

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_STATES = "state IN ('PENDING', 'APPROVED', 'DENIED', 'FRAUD', 'EXPIRED')"


def upgrade() -> None:
    op.create_table(
        "pushauth_phones",
        sa.Column("device", sa.String(length=81), nullable=False),
        sa.Column("user", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("device", name=op.f("pk_pushauth_phones")),
        sa.UniqueConstraint("user", name=op.f("uq_pushauth_phones_user")),
    )
    op.create_table(
        "pushauth_users",
        sa.Column("user", sa.String(length=64), nullable=False),
        sa.Column("locked", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=256), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("user", name=op.f("pk_pushauth_users")),
    )
    op.create_table(
        "pushauth_logins",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("challenge_id", sa.LargeBinary(), nullable=False),
        sa.Column("user", sa.String(length=64), nullable=False),
        sa.Column("device", sa.String(length=81), nullable=False),
        sa.Column("terminal", sa.String(length=81), nullable=False),
        sa.Column("terminal_address", sa.String(length=64), nullable=False),
        sa.Column("application", sa.String(length=128), nullable=False),
        sa.Column("number_mac", sa.LargeBinary(), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("request_digest", sa.LargeBinary(), nullable=False),
        sa.Column("notice", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("decided_at", sa.DateTime(), nullable=True),
        sa.Column("reason", sa.String(length=256), nullable=True),
        sa.Column("token_id", sa.String(length=36), nullable=True),
        sa.Column("sealed_token", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint(_STATES, name=op.f("ck_pushauth_logins_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pushauth_logins")),
        sa.UniqueConstraint("challenge_id", name=op.f("uq_pushauth_logins_challenge_id")),
    )
    op.create_index(
        op.f("ix_pushauth_logins_user_created_at"), "pushauth_logins", ["user", "created_at"]
    )
    op.create_index(op.f("ix_pushauth_logins_device_state"), "pushauth_logins", ["device", "state"])
    op.create_index(
        op.f("ix_pushauth_logins_state_expires_at"), "pushauth_logins", ["state", "expires_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_pushauth_logins_state_expires_at"), table_name="pushauth_logins")
    op.drop_index(op.f("ix_pushauth_logins_device_state"), table_name="pushauth_logins")
    op.drop_index(op.f("ix_pushauth_logins_user_created_at"), table_name="pushauth_logins")
    op.drop_table("pushauth_logins")
    op.drop_table("pushauth_users")
    op.drop_table("pushauth_phones")
