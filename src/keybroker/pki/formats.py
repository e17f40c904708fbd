"""PEM/DER loading for certificates, CSRs and CRLs, and the digests we name them by.

Every loader takes bytes a peer may control and raises :class:`DecodeError` and
nothing else. cryptography reports malformed input as ``ValueError`` (and a few
narrower types), and parses names and extensions lazily; the loaders touch them
so that a malformed extension fails here, as a DecodeError, rather than later as
a ValueError from inside path validation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from keybroker.errors import DecodeError

#: Largest certificate or CSR a loader accepts, in bytes (PEM or DER).
MAX_CERTIFICATE_SIZE = 64 * 1024
#: Largest CRL or certificate bundle a loader accepts, in bytes.
MAX_CRL_SIZE = 4 * 1024 * 1024

_PEM_BEGIN = b"-----BEGIN "
#: What cryptography raises for input it cannot parse; not all of it derives from ValueError.
PARSE_ERRORS = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)

T = TypeVar("T")


def is_pem(data: bytes) -> bool:
    return data.lstrip().startswith(_PEM_BEGIN)


def _load(
    data: bytes,
    *,
    what: str,
    max_size: int,
    pem: Callable[[bytes], T],
    der: Callable[[bytes], T],
    force: Callable[[T], object],
) -> T:
    if not isinstance(data, bytes):
        raise DecodeError(f"{what} must be bytes")
    if len(data) > max_size:
        raise DecodeError(f"{what} larger than {max_size} bytes")
    try:
        obj = pem(data) if is_pem(data) else der(data)
        force(obj)
    except PARSE_ERRORS:
        # The library's message may quote input bytes; ours does not.
        raise DecodeError(f"malformed {what}") from None
    return obj


def _force_certificate(cert: x509.Certificate) -> None:
    _ = (cert.version, cert.subject, cert.issuer, cert.extensions)
    # RFC 5280 §4.1.2.2; cryptography only warns today, and will refuse later.
    if cert.serial_number <= 0:
        raise DecodeError("certificate serial number is not positive")
    _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_algorithm_oid)
    cert.public_key()


def _force_csr(csr: x509.CertificateSigningRequest) -> None:
    _ = (csr.subject, csr.extensions, csr.signature_algorithm_oid)


def _force_crl(crl: x509.CertificateRevocationList) -> None:
    _ = (crl.issuer, crl.extensions, crl.last_update_utc, crl.next_update_utc)
    for entry in crl:
        _ = (entry.serial_number, entry.revocation_date_utc, entry.extensions)


def load_certificate(data: bytes, *, max_size: int = MAX_CERTIFICATE_SIZE) -> x509.Certificate:
    """One certificate from PEM or DER bytes."""
    return _load(
        data,
        what="certificate",
        max_size=max_size,
        pem=x509.load_pem_x509_certificate,
        der=x509.load_der_x509_certificate,
        force=_force_certificate,
    )


def load_certificates(data: bytes, *, max_size: int = MAX_CRL_SIZE) -> list[x509.Certificate]:
    """A PEM bundle (one or more certificates) or a single DER certificate."""

    def der(raw: bytes) -> list[x509.Certificate]:
        return [x509.load_der_x509_certificate(raw)]

    def force(certs: list[x509.Certificate]) -> None:
        for cert in certs:
            _force_certificate(cert)

    return _load(
        data,
        what="certificate bundle",
        max_size=max_size,
        pem=x509.load_pem_x509_certificates,
        der=der,
        force=force,
    )


def load_csr(
    data: bytes, *, max_size: int = MAX_CERTIFICATE_SIZE
) -> x509.CertificateSigningRequest:
    """A certificate signing request from PEM or DER bytes.

    Only the structure is checked here; :func:`keybroker.pki.verify_csr` checks
    the self-signature and the key type.
    """
    return _load(
        data,
        what="CSR",
        max_size=max_size,
        pem=x509.load_pem_x509_csr,
        der=x509.load_der_x509_csr,
        force=_force_csr,
    )


def load_crl(data: bytes, *, max_size: int = MAX_CRL_SIZE) -> x509.CertificateRevocationList:
    """A certificate revocation list from PEM or DER bytes (structure only, not trust)."""
    return _load(
        data,
        what="CRL",
        max_size=max_size,
        pem=x509.load_pem_x509_crl,
        der=x509.load_der_x509_crl,
        force=_force_crl,
    )


def certificate_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER encoding."""
    return cert.fingerprint(hashes.SHA256())


def subject_key_identifier(public_key: CertificatePublicKeyTypes) -> bytes:
    """The key identifier of RFC 5280 §4.2.1.2 method 1 (SHA-1 of the subjectPublicKey bits).

    SHA-1 here is a name, not a security property: it is what every other
    implementation computes, so AKI/SKI chaining works with them.
    """
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


def public_key_fingerprint(public_key: CertificatePublicKeyTypes) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: names a key independently of any certificate."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return digest.finalize()
