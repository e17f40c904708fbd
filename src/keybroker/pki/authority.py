"""A certificate authority: a CA certificate and its private key, issuing certificates and CRLs.

CA keys are P-256. Ed25519 is refused on purpose: cryptography's path
validator (``x509.verification``), which is the only validator keybroker uses,
admits only RSA and NIST-curve issuers (the CA/B Forum profile) and exposes no
switch for it (pyca/cryptography#13391). An Ed25519 CA would issue certificates
nothing in keybroker could verify. Ed25519 *subject* keys are fine: only the
issuer's key and signature algorithm are restricted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keybroker.errors import ConfigurationError, DecodeError, LocalProtocolError
from keybroker.pki._time import as_utc, is_within, positive
from keybroker.pki.csr import csr_public_key
from keybroker.pki.device import DEVICE_KEY_POLICY, DeviceIdentity, device_key_usage
from keybroker.pki.formats import PARSE_ERRORS, fingerprint
from keybroker.pki.keypolicy import DEFAULT_KEY_POLICY, KeyPolicy, describe_key
from keybroker.pki.principal import URI_SCHEME, PrincipalId
from keybroker.pki.revocation import Revocation

# X.520 serialNumber is a PrintableString of at most 64 characters (RFC 5280 Appendix A).
# Space is left out so that an identifier cannot differ from another by padding alone.
_SERIAL_NUMBER_RE = re.compile(r"[A-Za-z0-9'()+,./:=?-]{1,64}")

_RESERVED_SUBJECT_OIDS = frozenset({NameOID.COMMON_NAME, NameOID.SERIAL_NUMBER})

_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_IDENTITY_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _require_ca_key(public_key: object) -> None:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raise ConfigurationError(
            "Ed25519 CA keys are not supported: cryptography's path validator refuses "
            "Ed25519 issuers (pyca/cryptography#13391); use a P-256 key"
        )
    if not (
        isinstance(public_key, ec.EllipticCurvePublicKey)
        and isinstance(public_key.curve, ec.SECP256R1)
    ):
        raise ConfigurationError(f"CA key must be P-256, not {describe_key(public_key)}")


def _as_name(name: str | x509.Name) -> x509.Name:
    if isinstance(name, x509.Name):
        return name
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class CertificateAuthority:
    """A CA certificate with its private key. ``repr`` shows the subject and fingerprint only."""

    __slots__ = ("_certificate", "_key")

    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        _require_ca_key(key.public_key())
        if _spki(certificate.public_key()) != _spki(key.public_key()):
            raise ConfigurationError("CA private key does not match the CA certificate")
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
            usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        except (x509.ExtensionNotFound, *PARSE_ERRORS):
            raise ConfigurationError("not a CA certificate (basicConstraints/keyUsage)") from None
        if not (constraints.value.ca and usage.key_cert_sign and usage.crl_sign):
            raise ConfigurationError("not a CA certificate, or may not sign certificates and CRLs")
        self._certificate = certificate
        self._key = key

    @classmethod
    def create(
        cls,
        name: str | x509.Name,
        key: ec.EllipticCurvePrivateKey,
        now: datetime,
        validity: timedelta,
        *,
        path_length: int | None = 1,
    ) -> CertificateAuthority:
        """A self-signed root CA. ``path_length`` bounds the intermediates below it."""
        _require_ca_key(key.public_key())
        not_before = as_utc(now).replace(microsecond=0)
        subject = _as_name(name)
        public_key = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + positive(validity))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    @property
    def name(self) -> x509.Name:
        return self._certificate.subject

    @property
    def path_length(self) -> int | None:
        bc = self._certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        return bc.value.path_length

    def __repr__(self) -> str:
        return (
            f"CertificateAuthority(subject={self.name.rfc4514_string()!r}, "
            f"sha256={fingerprint(self._certificate).hex()[:16]})"
        )

    def __reduce__(self) -> NoReturn:
        raise TypeError("CertificateAuthority holds a private key and cannot be pickled")

    # -- issuing -----------------------------------------------------------------

    def _window(self, now: datetime, validity: timedelta) -> tuple[datetime, datetime]:
        # Certificate times have whole seconds; truncating here keeps comparisons exact.
        not_before = as_utc(now).replace(microsecond=0)
        not_after = not_before + positive(validity)
        own = self._certificate
        if not is_within(own.not_valid_before_utc, own.not_valid_after_utc, not_before):
            raise LocalProtocolError("the issuing CA is not valid at the requested time")
        if not_after > own.not_valid_after_utc:
            raise LocalProtocolError("requested validity ends after the issuing CA's")
        return not_before, not_after

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self._certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)

    def _builder(
        self,
        subject: x509.Name,
        public_key: CertificatePublicKeyTypes,
        now: datetime,
        validity: timedelta,
    ) -> x509.CertificateBuilder:
        not_before, not_after = self._window(now, validity)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
        )

    def issue_intermediate(
        self,
        name: str | x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        now: datetime,
        validity: timedelta,
        *,
        path_length: int = 0,
    ) -> x509.Certificate:
        """A subordinate CA certificate for ``public_key`` (P-256).

        Load it with its key as ``CertificateAuthority(cert, key)``.
        """
        _require_ca_key(public_key)
        if path_length < 0:
            raise LocalProtocolError("path length must not be negative")
        own = self.path_length
        if own is not None and path_length >= own:
            raise LocalProtocolError(
                f"this CA allows {own} intermediate(s) below it; "
                f"an intermediate with path length {path_length} would exceed that"
            )
        builder = (
            self._builder(_as_name(name), public_key, now, validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
        )
        return builder.sign(self._key, hashes.SHA256())

    def issue_identity(
        self,
        principal: PrincipalId,
        public_key: CertificatePublicKeyTypes,
        now: datetime,
        validity: timedelta,
        *,
        serial_number: str,
        server_auth: bool = False,
        extra_subject: Sequence[x509.NameAttribute[str]] = (),
        extra_sans: Sequence[x509.GeneralName] = (),
        key_policy: KeyPolicy = DEFAULT_KEY_POLICY,
    ) -> x509.Certificate:
        """An identity certificate binding ``public_key`` to ``principal``.

        Subject: CN ``<kind>/<name>``, serialNumber ``serial_number`` (a device
        serial or any identification string), then ``extra_subject`` (e.g. a
        hardware model). SAN: ``keybroker://<kind>/<name>`` plus ``extra_sans``
        (e.g. a DNS name for a service that also serves TLS). EKU clientAuth,
        plus serverAuth if ``server_auth``.
        """
        key_policy.verify_key(public_key)
        if not isinstance(serial_number, str) or not _SERIAL_NUMBER_RE.fullmatch(serial_number):
            raise DecodeError("serial number must be 1-64 PrintableString characters, no spaces")
        for attribute in extra_subject:
            if attribute.oid in _RESERVED_SUBJECT_OIDS:
                raise LocalProtocolError("extra_subject may not set CN or serialNumber")
        for general_name in extra_sans:
            if isinstance(general_name, x509.UniformResourceIdentifier) and (
                general_name.value.lower().startswith(f"{URI_SCHEME}:")
            ):
                raise LocalProtocolError("extra_sans may not carry a keybroker URI")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, str(principal)),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number),
                *extra_subject,
            ]
        )
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server_auth:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        sans = [x509.UniformResourceIdentifier(principal.uri), *extra_sans]
        builder = (
            self._builder(subject, public_key, now, validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_IDENTITY_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        )
        return builder.sign(self._key, hashes.SHA256())

    def issue_identity_from_csr(
        self,
        csr: x509.CertificateSigningRequest,
        principal: PrincipalId,
        now: datetime,
        validity: timedelta,
        *,
        serial_number: str,
        server_auth: bool = False,
        extra_subject: Sequence[x509.NameAttribute[str]] = (),
        extra_sans: Sequence[x509.GeneralName] = (),
        key_policy: KeyPolicy = DEFAULT_KEY_POLICY,
    ) -> x509.Certificate:
        """Verify ``csr`` (signature, key type) and certify its key as ``principal``.

        Nothing but the public key is taken from the CSR.
        """
        public_key = csr_public_key(csr, key_policy=key_policy)
        return self.issue_identity(
            principal,
            public_key,
            now,
            validity,
            serial_number=serial_number,
            server_auth=server_auth,
            extra_subject=extra_subject,
            extra_sans=extra_sans,
            key_policy=key_policy,
        )

    def issue_device(
        self,
        identity: DeviceIdentity,
        public_key: CertificatePublicKeyTypes,
        now: datetime,
        validity: timedelta,
    ) -> x509.Certificate:
        """A device certificate (:mod:`keybroker.pki.device` profile) for ``public_key``.

        The manufacturer's part: ``identity`` is what the device's label says. The
        key must be P-256 or RSA ≥ 2048 (:data:`~keybroker.pki.device.DEVICE_KEY_POLICY`).
        """
        DEVICE_KEY_POLICY.verify_key(public_key)
        builder = (
            self._builder(identity.subject(), public_key, now, validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(device_key_usage(public_key), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.mac_urn)]),
                critical=False,
            )
        )
        return builder.sign(self._key, hashes.SHA256())

    def issue_crl(
        self,
        revoked: Iterable[Revocation | tuple[int, datetime, x509.ReasonFlags | None]],
        now: datetime,
        next_update: datetime,
        crl_number: int,
    ) -> x509.CertificateRevocationList:
        """A complete CRL listing ``revoked`` (serial, revocation time, reason or None)."""
        last_update = as_utc(now).replace(microsecond=0)
        next_update = as_utc(next_update, "next_update")
        if next_update <= last_update:
            raise LocalProtocolError("next_update must be after now")
        # RFC 5280 §5.2.3: a non-negative integer of at most 20 octets.
        if not 0 <= crl_number < 1 << 159:
            raise LocalProtocolError("CRL number out of range")
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.name)
            .last_update(last_update)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(crl_number), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
        )
        for serial, revoked_at, reason in revoked:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(as_utc(revoked_at, "revocation time"))
            )
            # RFC 5280 §5.3.1: "unspecified" SHOULD be expressed by omitting the reason.
            if reason is not None and reason is not x509.ReasonFlags.unspecified:
                entry = entry.add_extension(x509.CRLReason(reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(self._key, hashes.SHA256())
