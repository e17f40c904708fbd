"""Manufacturer CRLs published by the broker, and the controller's check of what it fetches.

On the broker host an operator publishes, for each manufacturer CA (root or
intermediate), its certificate and its latest CRL (``keybroker pair crl-publish``).
The broker checks that the CRL is current, complete and signed by that CA, that
its CRL number only grows, stores it (``pairing_manufacturer_cas`` and ``crls``)
and logs the publication. Controllers read the latest CRL of every CA with
``GET /v1/pairing/crls`` (``pair controller --crl-from-broker``).

The broker is a relay here, not a trust anchor: a controller keeps a CRL only
if the CA it names is one of the manufacturer roots the controller was
configured with, or is issued (directly or through CAs kept so) by one of them,
and the CRL verifies under that CA's key (:func:`trusted_crls`). Path validation
then checks each CRL again against the issuer in the device's verified chain. A
broker that withholds a CRL or relays a stale one makes revocation *unknown*,
and the controller refuses (fail closed); it cannot make a revoked device pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar, Final

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from keybroker.broker._context import record
from keybroker.broker.events import Event, to_ms
from keybroker.broker.service import Broker
from keybroker.encoding import message_label
from keybroker.errors import CertificateInvalid, Conflict, DecodeError, KeybrokerError
from keybroker.pki import certificate_der, fingerprint, load_certificate, load_crl, verify_crl
from keybroker.pki._time import is_within
from keybroker.pki.formats import PARSE_ERRORS
from keybroker.store.schema import crls, pairing_manufacturer_cas

if TYPE_CHECKING:
    from keybroker.client.principal import PrincipalClient

#: CAs kept by the controller may chain this deep below a root (root → intermediate → …).
MAX_CA_DEPTH: Final = 4


def _entry(event: str) -> str:
    return message_label(f"keybroker/log/entry/pairing/{event}", 1)


@dataclass(frozen=True)
class CrlPublished(Event):
    """A manufacturer CA's CRL the broker now serves to controllers."""

    LABEL: ClassVar[str] = _entry("crl-published")
    at_ms: int
    issuer: str
    issuer_sha256: bytes
    crl_number: int
    this_update_ms: int
    next_update_ms: int


LOG_ENTRIES: Final = {CrlPublished.LABEL: CrlPublished}


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL's cRLNumber (RFC 5280 §5.2.3, required of conforming CRL issuers)."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        raise DecodeError("the CRL has no CRL number") from None
    except PARSE_ERRORS:
        raise DecodeError("the CRL's extensions do not parse") from None


@dataclass(frozen=True)
class PublishedCrl:
    """One manufacturer CA and its latest CRL, as the broker serves them."""

    issuer: x509.Certificate
    crl: x509.CertificateRevocationList

    @property
    def issuer_sha256(self) -> bytes:
        return fingerprint(self.issuer)

    @property
    def number(self) -> int:
        return crl_number(self.crl)

    @property
    def name(self) -> str:
        return self.issuer.subject.rfc4514_string()

    def __repr__(self) -> str:
        return f"PublishedCrl({self.name!r}, number {self.number})"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, *PARSE_ERRORS):
        return False


def _der(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(Encoding.DER)


class CrlPublisher:
    """The broker's side: store and serve manufacturer CRLs (operator publishes, anyone reads)."""

    def __init__(self, broker: Broker) -> None:
        self._ctx = broker.context

    def publish(
        self, issuer: x509.Certificate, crl: x509.CertificateRevocationList
    ) -> PublishedCrl:
        """Store ``crl`` as ``issuer``'s latest; CertificateInvalid or Conflict change nothing.

        The CRL must be current, complete and signed by ``issuer`` (a CA allowed to
        sign CRLs), and its number above the one published before. Publishing the same
        CRL again is a no-op.
        """
        now = self._ctx.now()
        if not _is_ca(issuer):
            raise CertificateInvalid(f"{issuer.subject.rfc4514_string()} is not a CA certificate")
        verify_crl(crl, issuer, now)
        number = crl_number(crl)
        next_update = crl.next_update_utc
        assert next_update is not None  # verify_crl refuses a CRL without one
        issuer_sha256 = fingerprint(issuer)
        der = _der(crl)
        published = PublishedCrl(issuer, crl)
        with self._ctx.store.transaction() as conn:
            self._ctx.store.lock(conn, f"pairing-crl/{issuer_sha256.hex()}")
            latest = conn.execute(
                sa.select(crls.c.crl_number, crls.c.der)
                .where(crls.c.issuer_fingerprint == issuer_sha256)
                .order_by(crls.c.crl_number.desc())
                .limit(1)
            ).first()
            if latest is not None and latest.crl_number == number and bytes(latest.der) == der:
                return published
            if latest is not None and latest.crl_number >= number:
                raise Conflict(
                    f"{published.name} already has CRL number {latest.crl_number}; "
                    f"a new CRL needs a higher number than {number}"
                )
            known = conn.execute(
                sa.select(pairing_manufacturer_cas.c.fingerprint).where(
                    pairing_manufacturer_cas.c.fingerprint == issuer_sha256
                )
            ).first()
            if known is None:
                conn.execute(
                    pairing_manufacturer_cas.insert().values(
                        fingerprint=issuer_sha256,
                        subject=published.name[:512],
                        der=certificate_der(issuer),
                        created_at=now,
                    )
                )
            conn.execute(
                crls.insert().values(
                    issuer_fingerprint=issuer_sha256,
                    crl_number=number,
                    der=der,
                    this_update=crl.last_update_utc,
                    next_update=next_update,
                )
            )
            record(
                self._ctx,
                conn,
                [
                    CrlPublished(
                        at_ms=to_ms(now),
                        issuer=published.name,
                        issuer_sha256=issuer_sha256,
                        crl_number=number,
                        this_update_ms=to_ms(crl.last_update_utc),
                        next_update_ms=to_ms(next_update),
                    )
                ],
            )
        return published

    def current(self) -> list[PublishedCrl]:
        """The latest CRL of every manufacturer CA, by CA subject."""
        latest = (
            sa.select(crls.c.issuer_fingerprint, sa.func.max(crls.c.crl_number).label("crl_number"))
            .group_by(crls.c.issuer_fingerprint)
            .subquery()
        )
        query = (
            sa.select(pairing_manufacturer_cas.c.der.label("ca"), crls.c.der.label("crl"))
            .join(latest, latest.c.issuer_fingerprint == pairing_manufacturer_cas.c.fingerprint)
            .join(
                crls,
                sa.and_(
                    crls.c.issuer_fingerprint == latest.c.issuer_fingerprint,
                    crls.c.crl_number == latest.c.crl_number,
                ),
            )
            .order_by(pairing_manufacturer_cas.c.subject, pairing_manufacturer_cas.c.fingerprint)
        )
        with self._ctx.store.snapshot() as conn:
            rows = conn.execute(query).all()
        return [PublishedCrl(load_certificate(bytes(r.ca)), load_crl(bytes(r.crl))) for r in rows]


# -- the controller's side --------------------------------------------------------------------


@dataclass(frozen=True)
class CrlVerdict:
    """What the controller made of the broker's CRLs: those it keeps, and why it dropped others."""

    kept: tuple[x509.CertificateRevocationList, ...]
    ignored: tuple[str, ...]


def _issued_by(cert: x509.Certificate, parent: x509.Certificate, now: datetime) -> bool:
    if not _is_ca(cert) or not is_within(cert.not_valid_before_utc, cert.not_valid_after_utc, now):
        return False
    try:
        cert.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def trusted_crls(
    published: Iterable[PublishedCrl], roots: Sequence[x509.Certificate], now: datetime
) -> CrlVerdict:
    """Keep a relayed CRL only under a CA the controller trusts, and only if it verifies.

    A CA is trusted if it is one of ``roots`` or is a CA certificate, valid now,
    directly issued by a trusted CA (up to :data:`MAX_CA_DEPTH` below a root).
    Each kept CRL passed :func:`keybroker.pki.verify_crl` under that CA.
    """
    entries = list(published)
    trusted = {fingerprint(root): root for root in roots}
    for _ in range(MAX_CA_DEPTH):
        grown = False
        for entry in entries:
            if entry.issuer_sha256 in trusted:
                continue
            if any(_issued_by(entry.issuer, parent, now) for parent in list(trusted.values())):
                trusted[entry.issuer_sha256] = entry.issuer
                grown = True
        if not grown:
            break
    kept: list[x509.CertificateRevocationList] = []
    ignored: list[str] = []
    for entry in entries:
        issuer = trusted.get(entry.issuer_sha256)
        if issuer is None:
            ignored.append(f"CRL of {entry.name}: not a CA under a trusted manufacturer root")
            continue
        try:
            verify_crl(entry.crl, issuer, now)
        except KeybrokerError as exc:
            ignored.append(f"CRL of {entry.name}: {exc}")
            continue
        kept.append(entry.crl)
    return CrlVerdict(tuple(kept), tuple(ignored))


async def fetch_trusted_crls(
    client: PrincipalClient, roots: Sequence[x509.Certificate], now: datetime
) -> CrlVerdict:
    """``GET /v1/pairing/crls`` as ``client``'s principal, then :func:`trusted_crls`."""
    from keybroker.api.pairing_schemas import ManufacturerCrls

    found = await client.call(ManufacturerCrls, "GET", "/v1/pairing/crls")
    published: list[PublishedCrl] = []
    unreadable: list[str] = []
    for entry in found.crls:
        try:
            issuer = load_certificate(entry.issuer_certificate.encode("ascii"))
            published.append(PublishedCrl(issuer, load_crl(entry.crl.encode("ascii"))))
        except (KeybrokerError, UnicodeEncodeError):
            unreadable.append(f"CRL of {entry.issuer[:200]}: not a readable certificate and CRL")
    verdict = trusted_crls(published, roots, now)
    return CrlVerdict(verdict.kept, (*unreadable, *verdict.ignored))
