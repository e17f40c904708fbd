"""rotation (S10): rollouts and their per-link records

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ROLLOUT_STATES = "state IN ('RUNNING', 'HALTED', 'ABORTED', 'COMPLETED')"
_LINK_STATES = (
    "state IN ('PENDING', 'DELIVERED_DOWNSTREAM', 'ACKED_DOWNSTREAM', 'DELIVERED_UPSTREAM', "
    "'ACTIVE', 'RETIRED_OLD', 'FAILED_KEEP_OLD', 'ABORTED_KEEP_OLD')"
)


def upgrade() -> None:
    op.create_table(
        "rotation_rollouts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("topology", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("policy", sa.LargeBinary(), nullable=False),
        sa.Column("document", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("reason", sa.String(length=256), nullable=True),
        sa.CheckConstraint(_ROLLOUT_STATES, name=op.f("ck_rotation_rollouts_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rotation_rollouts")),
    )
    op.create_index(
        op.f("ix_rotation_rollouts_state"), "rotation_rollouts", ["state"], unique=False
    )
    op.create_table(
        "rotation_links",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("rollout_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=32), nullable=False),
        sa.Column("site", sa.String(length=32), nullable=False),
        sa.Column("keyset", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("old_version", sa.Integer(), nullable=False),
        sa.Column("new_version", sa.Integer(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.String(length=36), nullable=True),
        sa.Column("next_at", sa.DateTime(), nullable=False),
        sa.Column("reason", sa.String(length=256), nullable=True),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(_LINK_STATES, name=op.f("ck_rotation_links_state")),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rotation_rollouts.id"],
            name=op.f("fk_rotation_links_rollout_id_rotation_rollouts"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rotation_links")),
        sa.UniqueConstraint(
            "rollout_id", "position", name=op.f("uq_rotation_links_rollout_id_position")
        ),
    )
    op.create_index(op.f("ix_rotation_links_state_next_at"), "rotation_links", ["state", "next_at"])
    op.create_index(op.f("ix_rotation_links_keyset_state"), "rotation_links", ["keyset", "state"])


def downgrade() -> None:
    op.drop_index(op.f("ix_rotation_links_keyset_state"), table_name="rotation_links")
    op.drop_index(op.f("ix_rotation_links_state_next_at"), table_name="rotation_links")
    op.drop_table("rotation_links")
    op.drop_index(op.f("ix_rotation_rollouts_state"), table_name="rotation_rollouts")
    op.drop_table("rotation_rollouts")
