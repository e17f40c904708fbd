"""Known answers for the key transport: RFC 9180 §A.3.1 (the P-256 suite) and RSA-OAEP
interoperating with plain ``cryptography``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from keybroker.errors import CryptoError
from keybroker.keys import AES256_GCM, SECRET_ACCESS, CertificateKey, Keyset

VECTORS = json.loads(
    (Path(__file__).parents[2] / "vectors" / "hpke_rfc9180_p256.json").read_text("utf-8")
)
SUITE = Suite(KEM.P256, KDF.HKDF_SHA256, AEAD.AES_128_GCM)


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def receiver(v: dict[str, Any]) -> ec.EllipticCurvePrivateKey:
    key = ec.derive_private_key(int(v["skRm"], 16), ec.SECP256R1())
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert point == h(v["pkRm"])
    return key


def test_source_is_named() -> None:
    assert "RFC 9180 Appendix A.3.1" in VECTORS["source"]


@pytest.mark.parametrize("v", VECTORS["vectors"], ids=lambda v: v["section"])
def test_rfc9180_p256_vector_opens_under_the_suite_we_seal_with(v: dict[str, Any]) -> None:
    assert (v["mode"], v["kem_id"], v["kdf_id"], v["aead_id"]) == (0, 16, 1, 1)
    sealed = h(v["enc"]) + h(v["ct"])
    opened = rust_openssl.hpke._decrypt_with_aad(
        SUITE, sealed, receiver(v), info=h(v["info"]), aad=h(v["aad"])
    )
    assert opened == h(v["pt"])
    with pytest.raises(InvalidTag):
        rust_openssl.hpke._decrypt_with_aad(SUITE, sealed, receiver(v), info=h(v["info"]), aad=b"")


@pytest.mark.parametrize("v", VECTORS["vectors"], ids=lambda v: v["section"])
def test_certificate_key_is_that_suite(v: dict[str, Any]) -> None:
    """The vector's receiver key as a device key: plain RFC 9180 Seal opens through it."""
    device = CertificateKey(receiver(v))
    sealed = SUITE.encrypt(h(v["pt"]), device.public_key(), info=h(v["info"]))
    assert device.open(sealed, h(v["info"])) == h(v["pt"])
    with pytest.raises(CryptoError):
        device.open(sealed, b"other info")
    # The vector's own ciphertext needs aad "Count-0", which single-shot Seal never uses.
    with pytest.raises(CryptoError):
        device.open(h(v["enc"]) + h(v["ct"]), h(v["info"]))


@pytest.mark.parametrize("bits", [2048, 3072])
def test_rsa_oaep_round_trip_with_cryptography(bits: int) -> None:
    private = rsa.generate_private_key(65537, bits)
    device = CertificateKey(private)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"L")
    # cryptography encrypts, we decrypt ...
    assert device.open(private.public_key().encrypt(b"k" * 32, oaep), b"L") == b"k" * 32
    # ... and a keyset version we seal, cryptography decrypts (label = the transport info).
    common = Keyset.generate("pairing/home", AES256_GCM)
    sealed = common.seal_version_to_certificate_key(1, private.public_key(), info=b"session")
    assert len(sealed) == bits // 8
    from keybroker.keys.keyset import _transport_info

    label = _transport_info("pairing/home", "aead", b"session")
    plain = private.decrypt(
        sealed,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=label),
    )
    assert common.export_secret_material(1, SECRET_ACCESS) in plain
    received = Keyset("pairing/home", "aead")
    received.install_version_sealed_to_certificate_key(sealed, device, info=b"session")
    assert received.export_secret_material(1, SECRET_ACCESS) == common.export_secret_material(
        1, SECRET_ACCESS
    )
    with pytest.raises(CryptoError):
        Keyset("pairing/other", "aead").install_version_sealed_to_certificate_key(
            sealed, device, info=b"session"
        )
    with pytest.raises(CryptoError):
        received.install_version_sealed_to_certificate_key(sealed, device, info=b"other")


def test_certificate_key_repr_and_pickling_show_no_secret() -> None:
    key = CertificateKey.generate("p256")
    pem = key.private_key_pem(SECRET_ACCESS)
    assert b"PRIVATE KEY" in pem and "PRIVATE" not in repr(key)
    with pytest.raises(TypeError):
        key.private_key_pem(object())  # type: ignore[arg-type]
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(key)
