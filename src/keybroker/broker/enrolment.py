"""Enrolment: a one-time token, a CSR and a signed HPKE key become an identity certificate.

The operator creates a token for ``<kind>/<name>`` and hands its secret to the
principal out of band; only its SHA-256 is stored, and the secret is shown
once. The principal then calls :func:`enrol` with

* the token secret and the principal id it was issued for;
* a CSR self-signed by its identity key (Ed25519 or P-256);
* its X25519 HPKE sealing key with the identity key's signature over
  :class:`~keybroker.broker.messages.HpkeKeyBinding` (principal, template,
  key id, public key), so the broker seals only to a key the identity chose.

Single use holds across threads and replicas: the token is spent by a
conditional ``UPDATE … WHERE used_at IS NULL`` whose row count must be 1,
in the same transaction that issues the certificate, so of two enrolments
with one token exactly one commits. Every refusal — unknown, used, expired
or another principal's token — raises the same :class:`AuthorizationError`,
so the answer tells a guesser nothing.

Enrolling a principal that exists already re-keys it: its identity and HPKE
keys are replaced, its old certificates are revoked (``superseded``) and
deliveries sealed to the old HPKE key fail. A revoked principal cannot be
enrolled again.

Certificates are for TLS clients (EKU clientAuth), except that a ``service``
principal's is also for TLS servers (clientAuth and serverAuth): a key server
(keyless TLS) presents it to edges. A service's token may name DNS names
(:func:`check_dns_names`), which its certificate then carries as subjectAltNames
beside its ``keybroker://`` URI; they come from the token the operator made,
never from the CSR.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.engine import Connection

from keybroker.broker._context import BrokerContext, principal_id, record, ttl
from keybroker.broker._delivery_rows import fail_sent
from keybroker.broker.events import EnrolmentTokenCreated, Event, PrincipalEnrolled, to_ms
from keybroker.broker.messages import HpkeKeyBinding, verify_identity_signature
from keybroker.broker.principals import REVOKED, find_row, revoke_certificates
from keybroker.errors import AuthorizationError, Conflict, DecodeError, RemoteProtocolError
from keybroker.keys import X25519_HPKE
from keybroker.pki import (
    PrincipalId,
    PrincipalKind,
    certificate_der,
    csr_public_key,
    fingerprint,
    load_csr,
    public_key_fingerprint,
)
from keybroker.store.schema import certificates, enrolment_tokens, principals

TOKEN_BYTES: Final = 32
#: Longest token text accepted from a peer (ours are 43 characters).
MAX_TOKEN_LENGTH: Final = 128
#: One answer for every token refusal: which check failed is no business of the caller's.
_REFUSAL: Final = "enrolment token is unknown, used, expired or for another principal"
#: DNS names one token may ask for (``enrolment_tokens.dns_names`` is VARCHAR(1024)).
MAX_DNS_NAMES: Final = 4
# A host name (RFC 1123 §2.1): LDH labels of 1-63 characters; no wildcard, no trailing dot.
_DNS_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME: Final = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")


@dataclass(frozen=True)
class EnrolmentToken:
    """A new token. ``secret`` is shown to the operator once and never stored or printed."""

    token_id: str
    principal: PrincipalId
    expires_at: datetime
    secret: str = field(repr=False)
    #: DNS names the principal's certificate will carry (service principals only).
    dns_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnrolmentResult:
    principal: PrincipalId
    certificate: x509.Certificate
    ca_certificate: x509.Certificate
    reenrolled: bool


def token_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def check_dns_names(principal: PrincipalId, names: Iterable[str]) -> tuple[str, ...]:
    """``names`` checked as DNS names for ``principal``'s certificate, lower-cased, in order.

    Only ``service`` principals serve TLS, so only they may have any
    (:class:`RemoteProtocolError` otherwise); each must be a host name (letters,
    digits and hyphens in dot-separated labels; no wildcard, no IP address), at most
    :data:`MAX_DNS_NAMES` of them (:class:`DecodeError` otherwise).
    """
    if isinstance(names, str):
        raise DecodeError("DNS names are a list of names")
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return ()
    if principal.kind is not PrincipalKind.SERVICE:
        raise RemoteProtocolError(
            f"only service principals serve TLS; {principal} cannot have DNS names"
        )
    if len(wanted) > MAX_DNS_NAMES:
        raise DecodeError(f"at most {MAX_DNS_NAMES} DNS names")
    checked: list[str] = []
    for name in wanted:
        text = name.lower() if isinstance(name, str) else ""
        labels = text.split(".")
        if len(text) > 253 or not _DNS_NAME.fullmatch(text) or labels[-1].isdigit():
            raise DecodeError(f"{name!r:.80} is not a DNS host name")
        checked.append(text)
    return tuple(dict.fromkeys(checked))


def create_enrolment_token(
    ctx: BrokerContext,
    principal: PrincipalId | str,
    ttl_: timedelta,
    *,
    dns_names: Iterable[str] = (),
) -> EnrolmentToken:
    """A one-time token for ``principal``; :func:`check_dns_names` says which ``dns_names``."""
    pid = principal_id(principal)
    lifetime = ttl(ttl_, ctx.policy.max_token_ttl)
    names = check_dns_names(pid, dns_names)
    secret = base64.urlsafe_b64encode(ctx.rng(TOKEN_BYTES)).rstrip(b"=").decode("ascii")
    token_id = ctx.new_id()
    now = ctx.now()
    expires_at = now + lifetime
    with ctx.store.transaction() as conn:
        ctx.store.lock(conn, f"principal/{pid}")
        row = find_row(conn, pid)
        if row is not None and row.status == REVOKED:
            raise Conflict(f"{pid} is revoked; enrol under a new name")
        conn.execute(
            enrolment_tokens.insert().values(
                id=token_id,
                principal_kind=pid.kind.value,
                principal_name=pid.name,
                token_hash=token_hash(secret),
                created_at=now,
                expires_at=expires_at,
                used_at=None,
                dns_names=",".join(names) or None,
            )
        )
        record(
            ctx,
            conn,
            [
                EnrolmentTokenCreated(
                    at_ms=to_ms(now),
                    token_id=token_id,
                    principal=str(pid),
                    expires_at_ms=to_ms(expires_at),
                )
            ],
        )
    return EnrolmentToken(token_id, pid, expires_at, secret, names)


def _binding(pid: PrincipalId, public_key: bytes, key_id: int, template: str) -> HpkeKeyBinding:
    if not isinstance(public_key, bytes) or len(public_key) > 1024:
        raise DecodeError("malformed HPKE public key")
    if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id < 1 << 32:
        raise DecodeError("HPKE key ids are 32-bit unsigned integers")
    if not isinstance(template, str):
        raise DecodeError("malformed HPKE template")
    binding = HpkeKeyBinding(str(pid), template, key_id, public_key)
    binding.recipient()  # DecodeError unless a well-formed HPKE key of a known template
    return binding


def _spend_token(
    conn: Connection, secret: str, pid: PrincipalId, now: datetime
) -> tuple[str, tuple[str, ...]]:
    """Mark the token used and return its id and DNS names; :class:`AuthorizationError`
    unless it could be spent just now."""
    token = conn.execute(
        sa.select(enrolment_tokens).where(enrolment_tokens.c.token_hash == token_hash(secret))
    ).one_or_none()
    if (
        token is None
        or token.used_at is not None
        or token.expires_at <= now
        or not hmac.compare_digest(
            f"{token.principal_kind}/{token.principal_name}".encode(), str(pid).encode()
        )
    ):
        raise AuthorizationError(_REFUSAL)
    spent = conn.execute(
        enrolment_tokens.update()
        .where(
            enrolment_tokens.c.id == token.id,
            enrolment_tokens.c.used_at.is_(None),
            enrolment_tokens.c.expires_at > now,
        )
        .values(used_at=now)
    )
    # Another enrolment spent it between our read and this write.
    if spent.rowcount != 1:
        raise AuthorizationError(_REFUSAL)
    token_id: str = token.id
    names = tuple(token.dns_names.split(",")) if token.dns_names else ()
    return token_id, names


def enrol(
    ctx: BrokerContext,
    principal: PrincipalId | str,
    token: str,
    csr: bytes,
    *,
    hpke_public_key: bytes,
    hpke_key_signature: bytes,
    hpke_key_id: int,
    hpke_template: str = X25519_HPKE.name,
) -> EnrolmentResult:
    # Everything a peer sent is checked before the database is touched.
    pid = principal_id(principal)
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
        raise DecodeError("malformed enrolment token")
    request = load_csr(csr)
    identity_key = csr_public_key(request)
    binding = _binding(pid, hpke_public_key, hpke_key_id, hpke_template)
    verify_identity_signature(identity_key, hpke_key_signature, binding.encode())
    spki = identity_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    now = ctx.now()
    with ctx.store.transaction() as conn:
        ctx.store.lock(conn, f"principal/{pid}")
        token_id, names = _spend_token(conn, token, pid, now)
        existing = find_row(conn, pid)
        if existing is not None and existing.status == REVOKED:
            raise AuthorizationError(f"{pid} is revoked")
        row_id = ctx.new_id() if existing is None else existing.id
        serial = row_id if existing is None else (existing.serial_number or row_id)
        # A service may serve TLS (a keyless key server does): its certificate is for
        # servers too, with the DNS names its token named. Nothing else comes from the CSR.
        service = pid.kind is PrincipalKind.SERVICE
        cert = ctx.ca.issue_identity_from_csr(
            request,
            pid,
            now,
            ctx.policy.identity_validity,
            serial_number=serial,
            server_auth=service,
            extra_sans=[x509.DNSName(name) for name in names] if service else (),
        )
        key_columns = {
            "status": "active",
            "serial_number": serial,
            "identity_public_key": spki,
            "hpke_public_key": binding.public_key,
            "hpke_key_signature": hpke_key_signature,
            "hpke_key_id": binding.key_id,
            "hpke_template": binding.template,
            "updated_at": now,
        }
        superseded: list[Event] = []
        if existing is None:
            conn.execute(
                principals.insert().values(
                    id=row_id, kind=pid.kind.value, name=pid.name, created_at=now, **key_columns
                )
            )
        else:
            conn.execute(principals.update().where(principals.c.id == row_id).values(**key_columns))
            superseded += revoke_certificates(conn, row_id, pid, now, "superseded")
            superseded += fail_sent(conn, now, "principal re-enrolled", principal_id=row_id)
        conn.execute(
            certificates.insert().values(
                fingerprint=fingerprint(cert),
                serial=format(cert.serial_number, "x"),
                issuer_fingerprint=fingerprint(ctx.ca.certificate),
                principal_id=row_id,
                subject=cert.subject.rfc4514_string(),
                is_ca=False,
                der=certificate_der(cert),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
            )
        )
        enrolled = PrincipalEnrolled(
            at_ms=to_ms(now),
            principal=str(pid),
            token_id=token_id,
            reenrolled=existing is not None,
            certificate_sha256=fingerprint(cert),
            certificate_serial=format(cert.serial_number, "x"),
            identity_key_sha256=public_key_fingerprint(identity_key),
            hpke_template=binding.template,
            hpke_key_id=binding.key_id,
            hpke_public_key=binding.public_key,
        )
        record(ctx, conn, [enrolled, *superseded])
    return EnrolmentResult(pid, cert, ctx.ca.certificate, existing is not None)
