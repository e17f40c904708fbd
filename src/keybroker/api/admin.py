"""Operator credentials: a 256-bit random bearer token, stored only as a hash.

``keybroker init`` calls :func:`create_admin_credential` and shows the token
once. The database keeps SHA-256 over a domain-separation label and the
token: the token is uniformly random and 256 bits long, so a slow password
hash would add nothing, and a stolen database row does not let anyone in.
Checking compares the presented token's hash with every active credential's
using :func:`hmac.compare_digest`, so timing says nothing about how close a
guess came.

Tokens look like ``kbadm_<43 base64url characters>``: the prefix lets secret
scanners recognise a leaked one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from datetime import datetime
from typing import Final

import sqlalchemy as sa

from keybroker.api.problems import Unauthenticated
from keybroker.api.settings import utc_now
from keybroker.errors import DecodeError, NotFound
from keybroker.store.engine import Store
from keybroker.store.schema import admin_credentials

TOKEN_PREFIX: Final = "kbadm_"  # noqa: S105 (a prefix, not a secret)
_TOKEN_BYTES: Final = 32
_TOKEN_RE: Final = re.compile(rf"{TOKEN_PREFIX}[A-Za-z0-9_-]{{43}}")
_HASH_LABEL: Final = b"keybroker/admin-token/v1\x00"
_REFUSAL: Final = "missing or invalid admin credential"


def _hash(token: str) -> bytes:
    return hashlib.sha256(_HASH_LABEL + token.encode("ascii")).digest()


def create_admin_credential(
    store: Store, *, label: str = "init", now: datetime | None = None
) -> str:
    """Make a new operator token; return it (the only time it exists outside its holder)."""
    if not isinstance(label, str) or not 0 < len(label) <= 64:
        raise DecodeError("credential labels are 1 to 64 characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)
    with store.transaction() as conn:
        conn.execute(
            admin_credentials.insert().values(
                id=str(uuid.uuid4()),
                token_hash=_hash(token),
                label=label,
                created_at=now or utc_now(),
                revoked_at=None,
            )
        )
    return token


def revoke_admin_credentials(
    store: Store, *, label: str | None = None, now: datetime | None = None
) -> int:
    """Revoke every active credential (or those with ``label``); return how many."""
    query = admin_credentials.update().where(admin_credentials.c.revoked_at.is_(None))
    if label is not None:
        query = query.where(admin_credentials.c.label == label)
    with store.transaction() as conn:
        count: int = conn.execute(query.values(revoked_at=now or utc_now())).rowcount
    if label is not None and count == 0:
        raise NotFound(f"no active admin credential labelled {label!r}")
    return count


def verify_admin_token(store: Store, token: str) -> None:
    """Return ``None`` if ``token`` is an active operator credential; raise
    :class:`~keybroker.api.problems.Unauthenticated` otherwise."""
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise Unauthenticated(_REFUSAL)
    presented = _hash(token)
    with store.snapshot() as conn:
        hashes = conn.execute(
            sa.select(admin_credentials.c.token_hash).where(
                admin_credentials.c.revoked_at.is_(None)
            )
        ).scalars()
        # Compare with every one, without stopping early.
        matched = False
        for stored in hashes:
            matched |= hmac.compare_digest(bytes(stored), presented)
    if not matched:
        raise Unauthenticated(_REFUSAL)
