"""deliveries: index by (keyset_id, version, state)

Disabling a key version fails every outstanding delivery of it, and a rotation
rollout asks whether a version is already on its way to a principal; both read
deliveries by keyset, version and state, which without this index walks every
delivery in that state (the term that grew with the number of links in
bench/rotation.py).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_deliveries_keyset_id_version_state"),
        "deliveries",
        ["keyset_id", "version", "state"],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_deliveries_keyset_id_version_state"), table_name="deliveries")
