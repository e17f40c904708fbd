from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from pki_builders import World, flip_last_byte, name, p256

from keybroker.errors import CertificateInvalid, DecodeError
from keybroker.pki import (
    DEFAULT_KEY_POLICY,
    KEY_POLICY_WITH_RSA,
    KeyPolicy,
    KeyType,
    csr_public_key,
    load_csr,
    verify_csr,
)


def csr_der(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    algorithm = (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )
    csr = (
        x509.CertificateSigningRequestBuilder().subject_name(name("whatever")).sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    "make_key", [ed25519.Ed25519PrivateKey.generate, p256], ids=["ed25519", "p256"]
)
def test_default_policy_accepts_ed25519_and_p256(make_key: object) -> None:
    key = make_key()  # type: ignore[operator]
    csr = load_csr(csr_der(key))
    verify_csr(csr)
    assert csr_public_key(csr) == key.public_key()


def test_pem_csr(world: World) -> None:
    key = p256()
    der = csr_der(key)
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    verify_csr(load_csr(pem))


@pytest.mark.parametrize(
    "key_name",
    ["secp256k1", "rsa_1024", "rsa_2048", "p384", "ed448"],
)
def test_default_policy_refuses_other_keys(world: World, key_name: str) -> None:
    key: CertificateIssuerPrivateKeyTypes
    if key_name == "p384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif key_name == "ed448":
        key = ed448.Ed448PrivateKey.generate()
    else:
        key = getattr(world, key_name)
    csr = load_csr(csr_der(key))  # well formed: parsing succeeds
    with pytest.raises(CertificateInvalid, match="not allowed"):
        verify_csr(csr)


def test_rsa_policy_takes_rsa_2048_but_not_1024(world: World) -> None:
    verify_csr(load_csr(csr_der(world.rsa_2048)), key_policy=KEY_POLICY_WITH_RSA)
    with pytest.raises(CertificateInvalid, match="at least 2048"):
        verify_csr(load_csr(csr_der(world.rsa_1024)), key_policy=KEY_POLICY_WITH_RSA)
    strict = KeyPolicy(allowed=frozenset({KeyType.RSA}), min_rsa_bits=3072)
    with pytest.raises(CertificateInvalid):
        verify_csr(load_csr(csr_der(world.rsa_2048)), key_policy=strict)


def test_policy_can_narrow_to_one_type() -> None:
    only_p256 = KeyPolicy(allowed=frozenset({KeyType.P256}))
    verify_csr(load_csr(csr_der(p256())), key_policy=only_p256)
    with pytest.raises(CertificateInvalid):
        verify_csr(load_csr(csr_der(ed25519.Ed25519PrivateKey.generate())), key_policy=only_p256)


@pytest.mark.parametrize(
    "make_key", [ed25519.Ed25519PrivateKey.generate, p256], ids=["ed25519", "p256"]
)
def test_bad_self_signature_is_certificate_invalid(make_key: object) -> None:
    tampered = flip_last_byte(csr_der(make_key()))  # type: ignore[operator]
    csr = load_csr(tampered)  # still parses
    with pytest.raises(CertificateInvalid, match="self-signature"):
        verify_csr(csr)


def test_csr_signed_by_another_key_is_certificate_invalid() -> None:
    # Key A's CSR body with key B's signature: splice the signature of one into the other.
    a, b = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    der_a, der_b = csr_der(a), csr_der(b)
    spliced = der_a[:-64] + der_b[-64:]  # Ed25519 signatures are the last 64 bytes
    with pytest.raises(CertificateInvalid):
        verify_csr(load_csr(spliced))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x30\x03\x02\x01\x00",
        b"-----BEGIN CERTIFICATE REQUEST-----\n!!\n-----END CERTIFICATE REQUEST-----",
    ],
)
def test_garbage_csr_is_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        load_csr(data)


def test_truncated_csr_is_decode_error() -> None:
    der = csr_der(p256())
    with pytest.raises(DecodeError):
        load_csr(der[:-10])


def test_default_policy_is_ed25519_and_p256() -> None:
    assert DEFAULT_KEY_POLICY.allowed == {KeyType.ED25519, KeyType.P256}
