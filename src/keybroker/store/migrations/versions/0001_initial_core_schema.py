"""initial core schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "crls",
        sa.Column("issuer_fingerprint", sa.LargeBinary(length=32), nullable=False),
        sa.Column("crl_number", sa.BigInteger(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("this_update", sa.DateTime(), nullable=False),
        sa.Column("next_update", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("issuer_fingerprint", "crl_number", name=op.f("pk_crls")),
    )
    op.create_table(
        "enrolment_tokens",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("principal_kind", sa.String(length=16), nullable=False),
        sa.Column("principal_name", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrolment_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_enrolment_tokens_token_hash")),
    )
    op.create_table(
        "keysets",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("template", sa.String(length=32), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keysets")),
        sa.UniqueConstraint("name", name=op.f("uq_keysets_name")),
    )
    op.create_table(
        "log_leaves",
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("entry", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("idx", name=op.f("pk_log_leaves")),
    )
    op.create_table(
        "log_nodes",
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("idx", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx", name=op.f("pk_log_nodes")),
    )
    op.create_table(
        "principals",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("serial_number", sa.String(length=128), nullable=True),
        sa.Column("identity_public_key", sa.LargeBinary(), nullable=True),
        sa.Column("hpke_public_key", sa.LargeBinary(), nullable=True),
        sa.Column("hpke_key_signature", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            "kind IN ('site', 'node', 'device', 'service', 'user')", name=op.f("ck_principals_kind")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'active', 'revoked')", name=op.f("ck_principals_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_principals")),
        sa.UniqueConstraint("kind", "name", name=op.f("uq_principals_kind_name")),
    )
    op.create_table(
        "tree_heads",
        sa.Column("tree_size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("tree_size", name=op.f("pk_tree_heads")),
    )
    op.create_table(
        "certificates",
        sa.Column("fingerprint", sa.LargeBinary(length=32), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("issuer_fingerprint", sa.LargeBinary(length=32), nullable=True),
        sa.Column("principal_id", sa.String(length=36), nullable=True),
        sa.Column("subject", sa.String(length=512), nullable=False),
        sa.Column("is_ca", sa.Boolean(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("not_before", sa.DateTime(), nullable=False),
        sa.Column("not_after", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("revocation_reason", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["principal_id"],
            ["principals.id"],
            name=op.f("fk_certificates_principal_id_principals"),
        ),
        sa.PrimaryKeyConstraint("fingerprint", name=op.f("pk_certificates")),
        sa.UniqueConstraint(
            "issuer_fingerprint", "serial", name=op.f("uq_certificates_issuer_fingerprint_serial")
        ),
    )
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_certificates_principal_id"), ["principal_id"], unique=False
        )

    op.create_table(
        "deliveries",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("principal_id", sa.String(length=36), nullable=False),
        sa.Column("keyset_id", sa.String(length=36), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("challenge", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.Column("failure_reason", sa.String(length=256), nullable=True),
        sa.CheckConstraint(
            "state IN ('sent', 'acked', 'failed', 'expired')", name=op.f("ck_deliveries_state")
        ),
        sa.ForeignKeyConstraint(
            ["keyset_id"], ["keysets.id"], name=op.f("fk_deliveries_keyset_id_keysets")
        ),
        sa.ForeignKeyConstraint(
            ["principal_id"], ["principals.id"], name=op.f("fk_deliveries_principal_id_principals")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_deliveries_principal_id_state"), ["principal_id", "state"], unique=False
        )

    op.create_table(
        "grants",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("principal_id", sa.String(length=36), nullable=False),
        sa.Column("keyset_id", sa.String(length=36), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint("mode IN ('use', 'hold')", name=op.f("ck_grants_mode")),
        sa.ForeignKeyConstraint(
            ["keyset_id"], ["keysets.id"], name=op.f("fk_grants_keyset_id_keysets")
        ),
        sa.ForeignKeyConstraint(
            ["principal_id"], ["principals.id"], name=op.f("fk_grants_principal_id_principals")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_grants")),
    )
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_grants_principal_id_keyset_id"),
            ["principal_id", "keyset_id"],
            unique=False,
        )

    op.create_table(
        "key_versions",
        sa.Column("keyset_id", sa.String(length=36), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("template", sa.String(length=32), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=True),
        sa.Column("wrapped_material", sa.LargeBinary(), nullable=True),
        sa.Column("kek_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("state_changed_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            "state IN ('pending', 'primary', 'enabled', 'disabled', 'destroyed')",
            name=op.f("ck_key_versions_state"),
        ),
        sa.ForeignKeyConstraint(
            ["keyset_id"], ["keysets.id"], name=op.f("fk_key_versions_keyset_id_keysets")
        ),
        sa.PrimaryKeyConstraint("keyset_id", "version", name=op.f("pk_key_versions")),
        sa.UniqueConstraint("keyset_id", "key_id", name=op.f("uq_key_versions_keyset_id_key_id")),
    )


def downgrade() -> None:
    op.drop_table("key_versions")
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_grants_principal_id_keyset_id"))

    op.drop_table("grants")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_principal_id_state"))

    op.drop_table("deliveries")
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_certificates_principal_id"))

    op.drop_table("certificates")
    op.drop_table("tree_heads")
    op.drop_table("principals")
    op.drop_table("log_nodes")
    op.drop_table("log_leaves")
    op.drop_table("keysets")
    op.drop_table("enrolment_tokens")
    op.drop_table("crls")
