"""Principals: what the broker knows about each (public facts only), and revocation.

Revoking a principal is final: its status becomes ``revoked``, every
certificate issued to it is marked revoked, its outstanding deliveries fail,
and no token can enrol it again (pick a new name). Revoking twice changes
nothing the second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from cryptography import x509
from sqlalchemy.engine import Connection

from keybroker.broker._context import BrokerContext, principal_id, record
from keybroker.broker._delivery_rows import fail_sent
from keybroker.broker.events import CertificateRevoked, Event, PrincipalRevoked, to_ms
from keybroker.errors import DecodeError, NotFound
from keybroker.pki import PrincipalId, PrincipalKind, load_certificate
from keybroker.store.schema import certificates, principals

ACTIVE = "active"
REVOKED = "revoked"


@dataclass(frozen=True)
class PrincipalInfo:
    """Public facts about a principal and its current identity certificate."""

    principal: PrincipalId
    status: str
    serial_number: str | None
    hpke_template: str | None
    hpke_key_id: int | None
    hpke_public_key: bytes | None
    certificate_sha256: bytes | None
    certificate_not_after: datetime | None
    created_at: datetime
    updated_at: datetime


def find_row(conn: Connection, principal: PrincipalId) -> Any | None:
    return conn.execute(
        _FIND, {"f_kind": principal.kind.value, "f_name": principal.name}
    ).one_or_none()


# Built once: every signed API request looks its principal up, and building the
# statement cost more than running it.
_FIND: Final = sa.select(principals).where(
    principals.c.kind == sa.bindparam("f_kind"), principals.c.name == sa.bindparam("f_name")
)


def require_row(conn: Connection, principal: PrincipalId) -> Any:
    row = find_row(conn, principal)
    if row is None:
        raise NotFound(f"no principal {principal}")
    return row


def _current_certificate(conn: Connection, row_id: str) -> Any | None:
    return conn.execute(
        sa.select(certificates.c.fingerprint, certificates.c.der, certificates.c.not_after)
        .where(certificates.c.principal_id == row_id, certificates.c.revoked_at.is_(None))
        .order_by(certificates.c.not_before.desc(), certificates.c.fingerprint)
        .limit(1)
    ).one_or_none()


def _info(conn: Connection, row: Any) -> PrincipalInfo:
    cert = _current_certificate(conn, row.id)
    return PrincipalInfo(
        principal=PrincipalId(PrincipalKind(row.kind), row.name),
        status=row.status,
        serial_number=row.serial_number,
        hpke_template=row.hpke_template,
        hpke_key_id=row.hpke_key_id,
        hpke_public_key=None if row.hpke_public_key is None else bytes(row.hpke_public_key),
        certificate_sha256=None if cert is None else bytes(cert.fingerprint),
        certificate_not_after=None if cert is None else cert.not_after,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


@dataclass(frozen=True)
class PrincipalCredentials:
    """What authenticating a principal, or sealing to it, needs: status, the current
    certificate's DER and fingerprint, and the HPKE key (all public)."""

    principal: PrincipalId
    status: str
    certificate_der: bytes | None
    certificate_sha256: bytes | None
    hpke_template: str | None
    hpke_key_id: int | None
    hpke_public_key: bytes | None


_CURRENT_CERTIFICATE: Final = (
    sa.select(certificates.c.fingerprint, certificates.c.der)
    .where(certificates.c.principal_id == sa.bindparam("c_id"), certificates.c.revoked_at.is_(None))
    .order_by(certificates.c.not_before.desc(), certificates.c.fingerprint)
    .limit(1)
)


def principal_credentials(
    ctx: BrokerContext, principal: PrincipalId | str, *, conn: Connection | None = None
) -> PrincipalCredentials:
    """:class:`PrincipalCredentials` in one read (two prebuilt statements): every signed
    API request needs them. :class:`NotFound` if there is no such principal. With
    ``conn``, read inside the caller's transaction."""
    pid = principal_id(principal)
    if conn is None:
        with ctx.store.reader() as own:
            return principal_credentials(ctx, pid, conn=own)
    row = require_row(conn, pid)
    cert = conn.execute(_CURRENT_CERTIFICATE, {"c_id": row.id}).one_or_none()
    return PrincipalCredentials(
        principal=pid,
        status=row.status,
        certificate_der=None if cert is None else bytes(cert.der),
        certificate_sha256=None if cert is None else bytes(cert.fingerprint),
        hpke_template=row.hpke_template,
        hpke_key_id=row.hpke_key_id,
        hpke_public_key=None if row.hpke_public_key is None else bytes(row.hpke_public_key),
    )


def list_principals(ctx: BrokerContext, *, status: str | None = None) -> list[PrincipalInfo]:
    query = sa.select(principals).order_by(principals.c.kind, principals.c.name)
    if status is not None:
        query = query.where(principals.c.status == status)
    with ctx.store.snapshot() as conn:
        return [_info(conn, row) for row in conn.execute(query)]


def show_principal(ctx: BrokerContext, principal: PrincipalId | str) -> PrincipalInfo:
    pid = principal_id(principal)
    with ctx.store.snapshot() as conn:
        return _info(conn, require_row(conn, pid))


def principal_certificate(ctx: BrokerContext, principal: PrincipalId | str) -> x509.Certificate:
    """The principal's current (unrevoked) identity certificate; :class:`NotFound` if none."""
    pid = principal_id(principal)
    with ctx.store.snapshot() as conn:
        cert = _current_certificate(conn, require_row(conn, pid).id)
    if cert is None:
        raise NotFound(f"{pid} has no current certificate")
    return load_certificate(bytes(cert.der))


def revoke_certificates(
    conn: Connection, row_id: str, principal: PrincipalId, now: datetime, reason: str
) -> list[Event]:
    """Mark every unrevoked certificate of the principal revoked; return the events."""
    revoked = list(
        conn.execute(
            certificates.update()
            .where(certificates.c.principal_id == row_id, certificates.c.revoked_at.is_(None))
            .values(revoked_at=now, revocation_reason=reason)
            .returning(certificates.c.fingerprint, certificates.c.serial)
        )
    )
    return [
        CertificateRevoked(
            at_ms=to_ms(now),
            principal=str(principal),
            certificate_sha256=bytes(r.fingerprint),
            certificate_serial=r.serial,
            reason=reason,
        )
        for r in sorted(revoked, key=lambda r: bytes(r.fingerprint))
    ]


def _reason(reason: str) -> str:
    try:
        return x509.ReasonFlags(reason).value
    except ValueError:
        raise DecodeError("unknown revocation reason (RFC 5280 §5.3.1 names)") from None


def revoke_principal(
    ctx: BrokerContext, principal: PrincipalId | str, *, reason: str = "unspecified"
) -> PrincipalInfo:
    pid = principal_id(principal)
    why = _reason(reason)
    now = ctx.now()
    with ctx.store.transaction() as conn:
        ctx.store.lock(conn, f"principal/{pid}")
        row = require_row(conn, pid)
        if row.status != REVOKED:
            conn.execute(
                principals.update()
                .where(principals.c.id == row.id)
                .values(status=REVOKED, updated_at=now)
            )
            events: list[Event] = [
                PrincipalRevoked(at_ms=to_ms(now), principal=str(pid), reason=why)
            ]
            events += revoke_certificates(conn, row.id, pid, now, why)
            events += fail_sent(conn, now, "principal revoked", principal_id=row.id)
            record(ctx, conn, events)
            row = require_row(conn, pid)
        return _info(conn, row)
