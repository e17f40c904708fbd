"""Raw certificate construction for tests: the shapes our CA refuses to make."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keybroker.pki import CertificateAuthority, PrincipalId

NOW = datetime(2030, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def raw_certificate(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    signing_key: CertificateIssuerPrivateKeyTypes,
    not_before: datetime = NOW - DAY,
    not_after: datetime = NOW + 30 * DAY,
    ca: bool | None = False,
    path_length: int | None = None,
    usage: x509.KeyUsage | str | None = "default",
    eku: Sequence[x509.ObjectIdentifier] | None = (CLIENT_AUTH,),
    sans: Sequence[x509.GeneralName] | None = (),
    aki_key: CertificatePublicKeyTypes | None = None,
    extra: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> x509.Certificate:
    """Build any certificate; defaults give a valid-looking leaf profile.

    ``ca=None`` omits basicConstraints; ``usage=None`` omits keyUsage; ``eku=None``
    omits EKU; ``sans=None`` omits SAN; ``aki_key`` (default: the signer's) names
    the authority key.
    """
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                aki_key or signing_key.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
    if usage == "default":
        usage = key_usage(ca=bool(ca))
    if isinstance(usage, x509.KeyUsage):
        builder = builder.add_extension(usage, critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if sans is not None:
        if not sans:
            sans = [x509.UniformResourceIdentifier("keybroker://site/a")]
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signing_key, _hash(signing_key))


def raw_ca(
    cn: str,
    key: CertificateIssuerPrivateKeyTypes,
    *,
    issuer: x509.Name | None = None,
    signing_key: CertificateIssuerPrivateKeyTypes | None = None,
    not_before: datetime = NOW - 10 * DAY,
    not_after: datetime = NOW + 100 * DAY,
    path_length: int | None = None,
    ca: bool | None = True,
    usage: x509.KeyUsage | str | None = "default",
) -> x509.Certificate:
    """A CA certificate, self-signed unless ``issuer``/``signing_key`` are given."""
    return raw_certificate(
        subject=name(cn),
        issuer=issuer or name(cn),
        public_key=key.public_key(),
        signing_key=signing_key or key,
        not_before=not_before,
        not_after=not_after,
        ca=ca,
        path_length=path_length,
        usage=usage if usage != "default" else key_usage(ca=True),
        eku=None,
        sans=None,
    )


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def flip_last_byte(der: bytes) -> bytes:
    """Corrupt a signature (the last bytes of the DER) without breaking the structure."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


SITE_A = PrincipalId.parse("site/a")
LEAF_SERIAL = "SN-0001"


@dataclass(frozen=True)
class World:
    root_key: ec.EllipticCurvePrivateKey
    root: CertificateAuthority
    inter_key: ec.EllipticCurvePrivateKey
    inter: CertificateAuthority
    other_key: ec.EllipticCurvePrivateKey
    other_root: CertificateAuthority
    leaf_key: ec.EllipticCurvePrivateKey
    leaf_ed_key: ed25519.Ed25519PrivateKey
    leaf: x509.Certificate  # root → leaf, P-256, site/a
    leaf_ed: x509.Certificate  # root → leaf, Ed25519, site/a
    leaf_via_inter: x509.Certificate  # root → inter → leaf, Ed25519, site/a
    rsa_1024: rsa.RSAPrivateKey
    rsa_2048: rsa.RSAPrivateKey
    secp256k1: ec.EllipticCurvePrivateKey


def build_world() -> World:
    root_key, inter_key, other_key, leaf_key = p256(), p256(), p256(), p256()
    leaf_ed_key = ed25519.Ed25519PrivateKey.generate()
    root = CertificateAuthority.create("Test Root", root_key, NOW - 10 * DAY, 3650 * DAY)
    inter = CertificateAuthority(
        root.issue_intermediate(
            "Test Intermediate", inter_key.public_key(), NOW - 10 * DAY, 1000 * DAY
        ),
        inter_key,
    )
    other_root = CertificateAuthority.create("Other Root", other_key, NOW - 10 * DAY, 3650 * DAY)

    def leaf_of(
        ca: CertificateAuthority, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ) -> x509.Certificate:
        return ca.issue_identity(
            SITE_A, key.public_key(), NOW - DAY, 30 * DAY, serial_number=LEAF_SERIAL
        )

    return World(
        root_key=root_key,
        root=root,
        inter_key=inter_key,
        inter=inter,
        other_key=other_key,
        other_root=other_root,
        leaf_key=leaf_key,
        leaf_ed_key=leaf_ed_key,
        leaf=leaf_of(root, leaf_key),
        leaf_ed=leaf_of(root, leaf_ed_key),
        leaf_via_inter=leaf_of(inter, leaf_ed_key),
        rsa_1024=rsa.generate_private_key(65537, 1024),
        rsa_2048=rsa.generate_private_key(65537, 2048),
        secp256k1=ec.generate_private_key(ec.SECP256K1()),
    )
