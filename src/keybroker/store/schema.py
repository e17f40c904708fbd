"""The database schema (SQLAlchemy Core), one ``MetaData`` for every table the core needs.

The Alembic migrations under ``migrations/versions`` must produce exactly this
schema; ``tests/unit/store/test_migrations.py`` checks that they do, on SQLite
and PostgreSQL.

Nothing secret is stored in clear: key material lives only in
``key_versions.wrapped_material`` (AEAD under the root key, AAD = keyset name +
version), enrolment tokens only as hashes, deliveries only as HPKE ciphertext.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    TypeDecorator,
    UniqueConstraint,
)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no zone, so store naive UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


PRINCIPAL_KINDS = ("site", "node", "device", "service", "user")
KEY_STATES = ("pending", "primary", "enabled", "disabled", "destroyed")
DELIVERY_STATES = ("sent", "acked", "failed", "expired")
GRANT_MODES = ("use", "hold")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


principals = Table(
    "principals",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("serial_number", String(128), nullable=True),
    Column("identity_public_key", LargeBinary, nullable=True),
    Column("hpke_public_key", LargeBinary, nullable=True),
    Column("hpke_key_signature", LargeBinary, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # The HPKE key's template and key id (the 5-byte prefix the principal opens by); 0002.
    Column("hpke_key_id", BigInteger, nullable=True),
    Column("hpke_template", String(32), nullable=True),
    UniqueConstraint("kind", "name"),
    CheckConstraint(_in("kind", PRINCIPAL_KINDS), name="kind"),
    CheckConstraint(_in("status", ("pending", "active", "revoked")), name="status"),
)

enrolment_tokens = Table(
    "enrolment_tokens",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("principal_kind", String(16), nullable=False),
    Column("principal_name", String(64), nullable=False),
    # SHA-256 of the token; the token itself is shown once to the operator and never stored.
    Column("token_hash", LargeBinary(32), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("used_at", UTCDateTime, nullable=True),
    # DNS names the operator asked a service's certificate to carry (comma-separated,
    # checked when the token was made); NULL for none (0006).
    Column("dns_names", String(1024), nullable=True),
)

certificates = Table(
    "certificates",
    metadata,
    # Hex serial is unique per issuer, not globally; the SHA-256 fingerprint is the key.
    Column("fingerprint", LargeBinary(32), primary_key=True),
    Column("serial", String(64), nullable=False),
    Column("issuer_fingerprint", LargeBinary(32), nullable=True),
    Column("principal_id", String(36), ForeignKey("principals.id"), nullable=True),
    Column("subject", String(512), nullable=False),
    Column("is_ca", Boolean, nullable=False),
    Column("der", LargeBinary, nullable=False),
    Column("not_before", UTCDateTime, nullable=False),
    Column("not_after", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("revocation_reason", String(32), nullable=True),
    UniqueConstraint("issuer_fingerprint", "serial"),
    Index(None, "principal_id"),
)

crls = Table(
    "crls",
    metadata,
    Column("issuer_fingerprint", LargeBinary(32), nullable=False),
    Column("crl_number", BigInteger, nullable=False),
    Column("der", LargeBinary, nullable=False),
    Column("this_update", UTCDateTime, nullable=False),
    Column("next_update", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("issuer_fingerprint", "crl_number"),
)

keysets = Table(
    "keysets",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("purpose", String(32), nullable=False),
    Column("template", String(32), nullable=False),
    # Bumped by every change; writers compare-and-set it so two replicas never interleave.
    Column("revision", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

key_versions = Table(
    "key_versions",
    metadata,
    Column("keyset_id", String(36), ForeignKey("keysets.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("key_id", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),
    Column("template", String(32), nullable=False),
    Column("public_key", LargeBinary, nullable=True),
    # AEAD under the root key, AAD = keybroker.keys.version_aad(keyset name, version);
    # NULL once destroyed.
    Column("wrapped_material", LargeBinary, nullable=True),
    Column("kek_id", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("state_changed_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("keyset_id", "version"),
    UniqueConstraint("keyset_id", "key_id"),
    CheckConstraint(_in("state", KEY_STATES), name="state"),
)

grants = Table(
    "grants",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("principal_id", String(36), ForeignKey("principals.id"), nullable=False),
    Column("keyset_id", String(36), ForeignKey("keysets.id"), nullable=False),
    Column("mode", String(8), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    CheckConstraint(_in("mode", GRANT_MODES), name="mode"),
    Index(None, "principal_id", "keyset_id"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("principal_id", String(36), ForeignKey("principals.id"), nullable=False),
    Column("keyset_id", String(36), ForeignKey("keysets.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    # HPKE ciphertext to the principal's sealing key; never the key in clear.
    Column("sealed", LargeBinary, nullable=False),
    Column("challenge", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime, nullable=True),
    Column("failure_reason", String(256), nullable=True),
    # The broker's signature over the delivery envelope (HPKE base mode does not say who
    # sealed), and the proof of possession the principal acked with; 0002.
    Column("signature", LargeBinary, nullable=True),
    Column("ack_proof", LargeBinary, nullable=True),
    CheckConstraint(_in("state", DELIVERY_STATES), name="state"),
    Index(None, "principal_id", "state"),
    Index(None, "state", "expires_at"),
    # Every delivery of one key version in a state (0005): disabling a version fails
    # its outstanding deliveries, and a rollout asks whether one is already on its way.
    Index(None, "keyset_id", "version", "state"),
)

log_leaves = Table(
    "log_leaves",
    metadata,
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("leaf_hash", LargeBinary(32), nullable=False),
    Column("entry", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# Hashes of every *complete* subtree: (level, idx) covers leaves
# [idx * 2**level, (idx + 1) * 2**level). Level 0 is the leaf hashes themselves,
# kept in log_leaves, so rows here start at level 1. Proofs read O(log n) rows.
log_nodes = Table(
    "log_nodes",
    metadata,
    Column("level", Integer, nullable=False),
    Column("idx", BigInteger, nullable=False),
    Column("hash", LargeBinary(32), nullable=False),
    PrimaryKeyConstraint("level", "idx"),
)

tree_heads = Table(
    "tree_heads",
    metadata,
    Column("tree_size", BigInteger, primary_key=True, autoincrement=False),
    Column("root_hash", LargeBinary(32), nullable=False),
    Column("timestamp_ms", BigInteger, nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("key_id", String(64), nullable=False),
)

# -- the HTTP API's own tables (0003) ------------------------------------------------

# Operator credentials made by ``keybroker init``: only a domain-separated SHA-256 of each
# 256-bit random token is kept; the token is shown once and never stored.
admin_credentials = Table(
    "admin_credentials",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("token_hash", LargeBinary(32), nullable=False, unique=True),
    Column("label", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
)

# RFC 9421 signature nonces seen recently, shared by every replica: a (principal, nonce)
# pair is accepted once. Rows are useless (and purged) once a signature carrying them
# would be refused as too old anyway.
request_nonces = Table(
    "request_nonces",
    metadata,
    Column("principal", String(64), nullable=False),
    Column("nonce", String(64), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("principal", "nonce"),
    Index(None, "expires_at"),
)

# -- S10 staged rotation (0004) --------------------------------------------------------

ROLLOUT_STATES = ("RUNNING", "HALTED", "ABORTED", "COMPLETED")
LINK_STATES = (
    "PENDING",
    "DELIVERED_DOWNSTREAM",
    "ACKED_DOWNSTREAM",
    "DELIVERED_UPSTREAM",
    "ACTIVE",
    "RETIRED_OLD",
    "FAILED_KEEP_OLD",
    "ABORTED_KEEP_OLD",
)

# One rollout: the policy it runs under (canonical encoding of RolloutPolicy) and the
# topology it was started with (canonical encoding), so a restarted broker needs nothing else.
rotation_rollouts = Table(
    "rotation_rollouts",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("topology", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("policy", LargeBinary, nullable=False),
    Column("document", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("reason", String(256), nullable=True),
    CheckConstraint(_in("state", ROLLOUT_STATES), name="state"),
    Index(None, "state"),
)

# One link of one rollout: the durable record of the sans-IO machine in
# keybroker.flows.rotation.protocol. ``seq`` counts transitions; every update is a
# compare-and-set on it, so two replicas never apply the same step twice.
rotation_links = Table(
    "rotation_links",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("rollout_id", String(36), ForeignKey("rotation_rollouts.id"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("node", String(32), nullable=False),
    Column("site", String(32), nullable=False),
    Column("keyset", String(128), nullable=False),
    Column("state", String(24), nullable=False),
    Column("old_version", Integer, nullable=False),
    Column("new_version", Integer, nullable=True),
    Column("attempt", Integer, nullable=False),
    Column("delivery_id", String(36), nullable=True),
    Column("next_at", UTCDateTime, nullable=False),
    Column("reason", String(256), nullable=True),
    Column("seq", Integer, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    CheckConstraint(_in("state", LINK_STATES), name="state"),
    UniqueConstraint("rollout_id", "position"),
    Index(None, "state", "next_at"),
    Index(None, "keyset", "state"),
)

# -- push login (S7): keybroker.flows.pushauth -------------------------------------------

PUSH_LOGIN_STATES = ("PENDING", "APPROVED", "DENIED", "FRAUD", "EXPIRED")

# Which phone (a ``device/…`` principal) answers for which user. One phone per user.
pushauth_phones = Table(
    "pushauth_phones",
    metadata,
    Column("device", String(81), primary_key=True),
    Column("user", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("user"),
)

# Users an operator must unlock (after a fraud report).
pushauth_users = Table(
    "pushauth_users",
    metadata,
    Column("user", String(64), primary_key=True),
    Column("locked", Boolean, nullable=False),
    Column("reason", String(256), nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
)

# One login. The number shown on the terminal is kept only as a MAC under a server key
# (``number_mac``); the session token only sealed to the terminal (``sealed_token``).
pushauth_logins = Table(
    "pushauth_logins",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("challenge_id", LargeBinary, nullable=False),
    Column("user", String(64), nullable=False),
    Column("device", String(81), nullable=False),
    Column("terminal", String(81), nullable=False),
    Column("terminal_address", String(64), nullable=False),
    Column("application", String(128), nullable=False),
    Column("number_mac", LargeBinary, nullable=False),
    Column("nonce", LargeBinary, nullable=False),
    Column("request_digest", LargeBinary, nullable=False),
    Column("notice", LargeBinary, nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("decided_at", UTCDateTime, nullable=True),
    Column("reason", String(256), nullable=True),
    Column("token_id", String(36), nullable=True),
    Column("sealed_token", LargeBinary, nullable=True),
    CheckConstraint(_in("state", PUSH_LOGIN_STATES), name="state"),
    UniqueConstraint("challenge_id"),
    Index(None, "user", "created_at"),
    Index(None, "device", "state"),
    Index(None, "state", "expires_at"),
)

# -- pairing (S9): keybroker.flows.pairing (0008) ----------------------------------------

# Manufacturer CA certificates (roots or intermediates) an operator published CRLs for.
# Their CRLs are rows of ``crls`` (issuer_fingerprint = this table's fingerprint). The
# broker relays both; controllers verify each CRL under a manufacturer root they trust.
pairing_manufacturer_cas = Table(
    "pairing_manufacturer_cas",
    metadata,
    Column("fingerprint", LargeBinary(32), primary_key=True),
    Column("subject", String(512), nullable=False),
    Column("der", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# -- pairing (S9): the broker's device inventory (0009) -----------------------------------

# What a device's pairing code carries, recorded by an operator: a controller may check a
# device against this record instead of a code (``pair controller --from-inventory``).
# Nothing secret: identification info, the SHA-256 of the device key's SPKI, who and when.
pairing_inventory = Table(
    "pairing_inventory",
    metadata,
    Column("serial", String(64), primary_key=True),
    Column("hardware_id", String(12), nullable=False),
    Column("model", String(64), nullable=False),
    Column("key_sha256", LargeBinary(32), nullable=False),
    Column("added_by", String(128), nullable=False),
    Column("added_at", UTCDateTime, nullable=False),
)
