"""Certificate revocation lists: what a CRL must satisfy before we believe it.

Fail closed. A CRL is used only if its signature verifies under the issuer's
key, the issuer may sign CRLs (keyUsage cRLSign), it is current
(``last_update ≤ now ≤ next_update``) and it is a complete, direct CRL (no
critical extension: no delta CRLs, no partitions, no indirect entries). A CRL
failing any of these raises :class:`CertificateInvalid`, never "not revoked":
an attacker who can stall or forge CRL delivery must not thereby un-revoke a
certificate. When revocation checking is asked for, a certificate whose
issuer has no CRL at all is likewise rejected.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime
from typing import Final, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keybroker.errors import CertificateInvalid, CertificateRevoked
from keybroker.pki._time import as_utc, is_within
from keybroker.pki.formats import PARSE_ERRORS


class Revocation(NamedTuple):
    """One entry to put on a CRL."""

    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags | None = None


#: (CRL DER, issuer SPKI DER) pairs whose signature verified. A signature's validity is a
#: function of those bytes alone, so a CRL checked once under a key need not be checked
#: again (a controller checks the same few CRLs on every pairing). Only successes are kept,
#: and at most this many; every other check (issuer name, cRLSign, currentness, critical
#: extensions) still runs on every call.
_VERIFIED_MAX: Final = 256
_verified: dict[tuple[bytes, bytes], None] = {}


def _signature_valid(
    crl: x509.CertificateRevocationList, issuer_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
) -> bool:
    try:
        key = (
            crl.public_bytes(Encoding.DER),
            issuer_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        )
        if key in _verified:
            return True
        signed = crl.is_signature_valid(issuer_key)
    except PARSE_ERRORS:
        return False
    if signed:
        if len(_verified) >= _VERIFIED_MAX:
            _verified.clear()
        _verified[key] = None
    return signed


def _issuer_may_sign_crls(issuer: x509.Certificate) -> bool:
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return usage.crl_sign


def verify_crl(
    crl: x509.CertificateRevocationList, issuer: x509.Certificate, now: datetime
) -> None:
    """Return None if ``crl`` is a current, complete CRL signed by ``issuer``; else raise."""
    now = as_utc(now)
    name = issuer.subject.rfc4514_string()
    if crl.issuer != issuer.subject:
        raise CertificateInvalid(f"CRL is not from {name}")
    issuer_key = issuer.public_key()
    # The path validator admits only RSA and EC issuers; so do we.
    if not isinstance(issuer_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CertificateInvalid(f"{name} has a key type that cannot sign CRLs here")
    if not _signature_valid(crl, issuer_key):
        raise CertificateInvalid(f"CRL signature does not verify under the key of {name}")
    if not _issuer_may_sign_crls(issuer):
        raise CertificateInvalid(f"{name} may not sign CRLs (keyUsage lacks cRLSign)")
    next_update = crl.next_update_utc
    if next_update is None or not is_within(crl.last_update_utc, next_update, now):
        raise CertificateInvalid(f"CRL of {name} is not current at {now.isoformat()}")
    try:
        critical = any(ext.critical for ext in crl.extensions)
    except PARSE_ERRORS:
        critical = True
    if critical:
        raise CertificateInvalid(f"CRL of {name} has a critical extension we do not process")


def verify_not_revoked(
    chain: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    now: datetime,
) -> None:
    """Check every certificate of a *verified* chain (leaf first, trust anchor last).

    Each certificate but the anchor needs at least one CRL from the next
    certificate in the chain (its issuer); every such CRL must pass
    :func:`verify_crl`, and none may list the certificate.
    """
    for cert, issuer in itertools.pairwise(chain):
        own = [crl for crl in crls if crl.issuer == issuer.subject]
        if not own:
            raise CertificateInvalid(
                f"no CRL from {issuer.subject.rfc4514_string()}; revocation status unknown"
            )
        for crl in own:
            verify_crl(crl, issuer, now)
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is None:
                continue
            try:
                entry_critical = any(ext.critical for ext in entry.extensions)
            except PARSE_ERRORS:
                entry_critical = True
            if entry_critical:
                # e.g. certificateIssuer (indirect CRL): we cannot tell whose serial this is.
                raise CertificateInvalid("CRL entry has a critical extension we do not process")
            raise CertificateRevoked(
                f"certificate serial {cert.serial_number:x} revoked by "
                f"{issuer.subject.rfc4514_string()}"
            )
