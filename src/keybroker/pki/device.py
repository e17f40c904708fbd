"""Device certificates: a manufacturer's profile, and the checks a controller makes on one.

A *device certificate* (Matter's DAC, IEEE 802.1AR's IDevID) binds a device's
key to what is printed on its label: serial number, hardware id (a MAC) and
model. It is not a keybroker identity certificate (no ``keybroker://`` URI, no
clientAuth): a controller trusts it because it chains to a manufacturer root it
was configured with, and because its identification info equals what an
out-of-band record (a pairing code, an inventory entry) says.

The profile (what :meth:`CertificateAuthority.issue_device` writes and
:func:`verify_device_chain` demands):

* subject: CN = model, serialNumber = device serial;
* SAN: exactly one URI ``urn:dev:mac:<12 hex digits>`` (RFC 9039 §4.1 device URN);
* basicConstraints CA=false (critical), no EKU;
* keyUsage (critical): digitalSignature, plus keyAgreement for a P-256 key (it
  decapsulates HPKE, RFC 9180 DHKEM(P-256)) or keyEncipherment for an RSA key
  (RSA-OAEP, RFC 8017). A device key signs a fresh challenge *and* receives the
  common key, so both bits must be there; keyCertSign must not be;
* key: P-256 or RSA ≥ 2048 (Ed25519 can neither be an HPKE KEM key nor
  decrypt).

:func:`verify_device_chain` raises one specific error per refusal reason (see
:mod:`keybroker.errors`): ChainTooLong, SelfSignedCertificate,
CertificateNotYetValid, CertificateExpired, WrongKeyUsage, UntrustedIssuer,
CertificateRevoked, RevocationUnknown. The trust decision itself stays
cryptography's (:func:`keybroker.pki.verify_chain`); the checks made before it
only pick the error type earlier and enforce the stricter leaf profile.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from keybroker.errors import (
    CertificateExpired,
    CertificateInvalid,
    CertificateNotYetValid,
    ChainTooLong,
    DecodeError,
    IdentityMismatch,
    PublicKeyMismatch,
    RevocationUnknown,
    SelfSignedCertificate,
    UntrustedIssuer,
    WrongKeyUsage,
)
from keybroker.pki._time import as_utc
from keybroker.pki.formats import PARSE_ERRORS, public_key_fingerprint
from keybroker.pki.keypolicy import KeyPolicy, KeyType
from keybroker.pki.revocation import verify_not_revoked
from keybroker.pki.validation import verify_chain

#: Device keys: P-256 (HPKE DHKEM(P-256)) or RSA ≥ 2048 (RSA-OAEP).
DEVICE_KEY_POLICY = KeyPolicy(allowed=frozenset({KeyType.P256, KeyType.RSA}))
#: Most intermediates between a device certificate and its manufacturer root
#: (root → intermediate → device, as Matter's PAA → PAI → DAC).
DEFAULT_MAX_DEVICE_INTERMEDIATES = 1

MAC_URN_PREFIX = "urn:dev:mac:"
# A strict subset of PrintableString, so that labels, URIs and subjects agree byte for byte.
_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAC_RE = re.compile(r"[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What a device's label says: serial number, hardware id (MAC) and model.

    Construction validates; ``hardware_id`` is 12 lower-case hex digits (any
    ``:`` or ``-`` separators and upper case are normalised away).
    """

    serial: str
    hardware_id: str
    model: str

    def __post_init__(self) -> None:
        for what, value in (("serial number", self.serial), ("model", self.model)):
            if not isinstance(value, str) or not _LABEL_RE.fullmatch(value):
                raise DecodeError(f"device {what} must be 1-64 of A-Z a-z 0-9 . _ -")
        if not isinstance(self.hardware_id, str):
            raise DecodeError("hardware id must be a string")
        mac = self.hardware_id.lower().replace(":", "").replace("-", "")
        if not _MAC_RE.fullmatch(mac):
            raise DecodeError("hardware id must be a 48-bit MAC address (12 hex digits)")
        object.__setattr__(self, "hardware_id", mac)

    @property
    def mac_urn(self) -> str:
        return MAC_URN_PREFIX + self.hardware_id

    def subject(self) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, self.model),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, self.serial),
            ]
        )

    def __str__(self) -> str:
        return f"{self.model} serial {self.serial} (MAC {self.hardware_id})"


def device_key_usage(public_key: object) -> x509.KeyUsage:
    """The keyUsage a device certificate for ``public_key`` carries (see the module docstring)."""
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=not is_rsa,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def device_identity_of(cert: x509.Certificate) -> DeviceIdentity:
    """The identification info a device certificate carries; IdentityMismatch if it has none.

    Requires exactly one CN, one serialNumber and one ``urn:dev:mac:`` URI, so a
    second value cannot hide behind the first.
    """
    try:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        serials = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityMismatch("device certificate has no subjectAltName") from None
    except PARSE_ERRORS:
        raise CertificateInvalid("device certificate has a malformed subject or SAN") from None
    macs = [
        uri
        for uri in sans.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.lower().startswith(MAC_URN_PREFIX)
    ]
    if len(names) != 1 or len(serials) != 1 or len(macs) != 1:
        raise IdentityMismatch(
            "device certificate must carry exactly one model (CN), serialNumber and MAC URN"
        )
    try:
        return DeviceIdentity(
            serial=str(serials[0].value),
            hardware_id=macs[0][len(MAC_URN_PREFIX) :],
            model=str(names[0].value),
        )
    except DecodeError as exc:
        raise IdentityMismatch(
            f"device certificate identification info is malformed: {exc}"
        ) from None


def verify_device_identity(
    cert: x509.Certificate, expected: DeviceIdentity, public_key_sha256: bytes
) -> None:
    """Return None if ``cert`` names ``expected`` and carries the key ``public_key_sha256`` names.

    ``public_key_sha256`` is SHA-256 of the DER SubjectPublicKeyInfo (what a pairing
    code carries). Raises IdentityMismatch, or PublicKeyMismatch for the key alone.
    Checks names and key only: call :func:`verify_device_chain` first.
    """
    actual = device_identity_of(cert)
    if actual != expected:
        differ = [
            field
            for field in ("serial", "hardware_id", "model")
            if getattr(actual, field) != getattr(expected, field)
        ]
        raise IdentityMismatch(
            f"certificate is for {actual}, expected {expected} ({', '.join(differ)} differ)"
        )
    if public_key_fingerprint(cert.public_key()) != public_key_sha256:
        raise PublicKeyMismatch(
            "certificate public key hash does not equal the one in the out-of-band record"
        )


def _check_window(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateNotYetValid(
            f"{what} not valid before {cert.not_valid_before_utc.isoformat()} "
            f"(now {now.isoformat()})"
        )
    if now > cert.not_valid_after_utc:
        raise CertificateExpired(
            f"{what} expired at {cert.not_valid_after_utc.isoformat()} (now {now.isoformat()})"
        )


def _check_leaf_profile(leaf: x509.Certificate) -> None:
    key = leaf.public_key()
    DEVICE_KEY_POLICY.verify_key(key)
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise WrongKeyUsage("device certificate is a CA certificate (basicConstraints CA=true)")
    try:
        usage_ext = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise WrongKeyUsage("device certificate has no keyUsage") from None
    usage = usage_ext.value
    needed = "keyEncipherment" if isinstance(key, rsa.RSAPublicKey) else "keyAgreement"
    has_needed = (
        usage.key_encipherment if isinstance(key, rsa.RSAPublicKey) else usage.key_agreement
    )
    if not (usage.digital_signature and has_needed) or usage.key_cert_sign or usage.crl_sign:
        raise WrongKeyUsage(
            f"device certificate keyUsage must allow digitalSignature and {needed}, "
            "and not keyCertSign or cRLSign"
        )


def _name_linked_depth(
    leaf: x509.Certificate, pool: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> int | None:
    """Fewest intermediates on a name-linked path from ``leaf`` to a root, or None if none.

    Only picks the error type after the verifier has said no.
    """
    root_names = {root.subject for root in roots}
    frontier = [leaf.issuer]
    seen: set[x509.Name] = set()
    for depth in range(len(pool) + 1):
        if any(name in root_names for name in frontier):
            return depth
        seen.update(frontier)
        frontier = [c.issuer for c in pool if c.subject in frontier and c.issuer not in seen]
        if not frontier:
            return None
    return None


def verify_device_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    trust_roots: Sequence[x509.Certificate],
    now: datetime,
    *,
    crls: Sequence[x509.CertificateRevocationList] | None,
    max_intermediates: int = DEFAULT_MAX_DEVICE_INTERMEDIATES,
) -> list[x509.Certificate]:
    """Validate a device certificate up to a manufacturer root; return the chain, leaf first.

    ``crls`` has no default: skipping revocation must be written down
    (``crls=None``). With a list, every certificate below the root needs a
    current CRL from its issuer (fail closed, RevocationUnknown otherwise).
    """
    now = as_utc(now)
    if len(intermediates) > max_intermediates:
        raise ChainTooLong(
            f"{len(intermediates)} intermediate certificates; at most {max_intermediates} allowed"
        )
    if leaf.issuer == leaf.subject:
        raise SelfSignedCertificate("device certificate is self-signed (issuer = subject)")
    _check_window(leaf, now, "device certificate")
    for cert in intermediates:
        _check_window(cert, now, f"intermediate {cert.subject.rfc4514_string()}")
    _check_leaf_profile(leaf)
    try:
        chain = verify_chain(
            leaf,
            intermediates,
            trust_roots,
            now,
            crls=None,
            max_depth=max_intermediates,
            require_client_auth=False,
        )
    except CertificateExpired as exc:
        # Leaf and intermediates were checked above: only a root can be out of its window.
        if any(now < root.not_valid_before_utc for root in trust_roots):
            raise CertificateNotYetValid(str(exc)) from None
        raise
    except CertificateInvalid as exc:
        depth = _name_linked_depth(leaf, intermediates, trust_roots)
        if depth is not None and depth > max_intermediates:
            raise ChainTooLong(
                f"the path to the root needs {depth} intermediates; at most {max_intermediates}"
            ) from None
        raise UntrustedIssuer(
            f"no valid path from issuer {leaf.issuer.rfc4514_string()} to a trusted root ({exc})"
        ) from None
    if crls is not None:
        try:
            verify_not_revoked(chain, crls, now)
        except RevocationUnknown:
            raise
        except CertificateInvalid as exc:
            raise RevocationUnknown(str(exc)) from None
    return chain
