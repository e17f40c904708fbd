"""A manufacturer PKI for pairing tests, built with keybroker.pki, plus raw certificates in
the shapes a real CA refuses to make (for the refusal cases)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from keybroker.flows.pairing.code import PairingCode
from keybroker.keys import CertificateKey
from keybroker.pki import CertificateAuthority, DeviceIdentity, Revocation
from keybroker.pki.device import device_key_usage

NOW = datetime(2030, 6, 1, tzinfo=UTC)
DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)
LAMP = DeviceIdentity("SN-0001", "00:24:BE:80:4F:F1", "lamp-2")
PLUG = DeviceIdentity("SN-0002", "0024be804ff2", "plug-1")


def device_key(kind: str = "p256", n: int = 0) -> CertificateKey:
    """Keys are slow to make (RSA); one per (kind, n) for the whole run."""
    return _device_key(kind, n)


@functools.cache
def _device_key(kind: str, n: int) -> CertificateKey:
    return CertificateKey.generate(kind)  # type: ignore[arg-type]


@functools.cache
def ca_key(n: int) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Pki:
    """One manufacturer: root → intermediate (path length 1) → intermediate2 → devices."""

    root: CertificateAuthority
    intermediate: CertificateAuthority
    intermediate2: CertificateAuthority

    def device(
        self,
        identity: DeviceIdentity = LAMP,
        *,
        key: CertificateKey | None = None,
        not_before: datetime = NOW - 30 * DAY,
        validity: timedelta = 365 * DAY,
        issuer: CertificateAuthority | None = None,
    ) -> x509.Certificate:
        key = key or device_key()
        return (issuer or self.intermediate).issue_device(
            identity, key.public_key(), not_before, validity
        )

    def crls(
        self,
        revoked: Sequence[x509.Certificate] = (),
        *,
        now: datetime = NOW - DAY,
        validity: timedelta = 7 * DAY,
    ) -> list[x509.CertificateRevocationList]:
        entries = [Revocation(c.serial_number, now, None) for c in revoked]
        by_issuer = {
            ca.name: [e for e, c in zip(entries, revoked, strict=True) if c.issuer == ca.name]
            for ca in (self.root, self.intermediate, self.intermediate2)
        }
        return [
            ca.issue_crl(by_issuer[ca.name], now, now + validity, 1)
            for ca in (self.root, self.intermediate, self.intermediate2)
        ]


def make_pki(label: str, n: int, start: datetime = NOW - 365 * DAY) -> Pki:
    root = CertificateAuthority.create(f"{label} root", ca_key(n), start, 3650 * DAY, path_length=2)
    inter_cert = root.issue_intermediate(
        f"{label} devices", ca_key(n + 1).public_key(), start, 1000 * DAY, path_length=1
    )
    inter = CertificateAuthority(inter_cert, ca_key(n + 1))
    inter2_cert = inter.issue_intermediate(
        f"{label} devices 2", ca_key(n + 2).public_key(), start, 900 * DAY, path_length=0
    )
    return Pki(root, inter, CertificateAuthority(inter2_cert, ca_key(n + 2)))


@functools.cache
def acme() -> Pki:
    return make_pki("Acme", 0)


@functools.cache
def evil() -> Pki:
    return make_pki("Evil", 10)


def code_for(cert: x509.Certificate) -> PairingCode:
    return PairingCode.for_certificate(cert)


def raw_device(
    *,
    subject: x509.Name | None = None,
    issuer: x509.Name | None = None,
    public_key: object = None,
    sign_key: object = None,
    not_before: datetime = NOW - 30 * DAY,
    not_after: datetime = NOW + 300 * DAY,
    key_usage: x509.KeyUsage | bool | None = True,
    ca: bool | None = False,
    sans: Sequence[x509.GeneralName] | None = None,
    identity: DeviceIdentity = LAMP,
    pki: Pki | None = None,
    issuer_key: int = 1,
) -> x509.Certificate:
    """A device certificate built by hand; defaults give one the intermediate of acme() would."""
    pki = pki or acme()
    public_key = public_key if public_key is not None else device_key().public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject or identity.subject())
        .issuer_name(issuer or pki.intermediate.name)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key(issuer_key).public_key()),
        critical=False,
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    if key_usage is True:
        builder = builder.add_extension(device_key_usage(public_key), critical=True)
    elif isinstance(key_usage, x509.KeyUsage):
        builder = builder.add_extension(key_usage, critical=True)
    sans = [x509.UniformResourceIdentifier(identity.mac_urn)] if sans is None else sans
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    signer = sign_key if sign_key is not None else ca_key(issuer_key)
    if isinstance(signer, ed25519.Ed25519PrivateKey):
        return builder.sign(signer, None)
    return builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]


def usage(**bits: bool) -> x509.KeyUsage:
    fields = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    fields.update(bits)
    return x509.KeyUsage(**fields)


def rsa_public(bits: int = 2048) -> rsa.RSAPublicKey:
    key = device_key(f"rsa{bits}").public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    return key
