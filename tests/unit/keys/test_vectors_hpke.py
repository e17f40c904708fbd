"""RFC 9180 known answers for the HPKE suites of our templates (vectors/hpke_rfc9180.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from keybroker.errors import CryptoError
from keybroker.keys import SECRET_ACCESS, TEMPLATES, Keyset, PublicKeyset

VECTORS = json.loads(
    (Path(__file__).parents[2] / "vectors" / "hpke_rfc9180.json").read_text(encoding="utf-8")
)
AEADS = {1: AEAD.AES_128_GCM, 3: AEAD.CHACHA20_POLY1305}


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def suite_of(v: dict[str, Any]) -> Suite:
    assert (v["mode"], v["kem_id"], v["kdf_id"]) == (0, 32, 1)
    return Suite(KEM.X25519, KDF.HKDF_SHA256, AEADS[v["aead_id"]])


def test_source_is_named() -> None:
    assert "RFC 9180" in VECTORS["source"]
    assert {v["template"] for v in VECTORS["vectors"]} == {"X25519_HPKE", "X25519_HPKE_CHACHA20"}


@pytest.mark.parametrize("v", VECTORS["vectors"], ids=lambda v: v["section"])
def test_first_encryption_decrypts_with_the_vector_aad(v: dict[str, Any]) -> None:
    private_key = X25519PrivateKey.from_private_bytes(h(v["skRm"]))
    assert private_key.public_key().public_bytes_raw() == h(v["pkRm"])
    # The vectors' sequence-0 encryption uses aad "Count-0", but the public
    # single-shot Suite API fixes aad to empty. The private binding with an aad
    # parameter is what cryptography's own HPKE tests use; only this test touches it.
    plaintext = rust_openssl.hpke._decrypt_with_aad(
        suite_of(v), h(v["enc"]) + h(v["ct"]), private_key, info=h(v["info"]), aad=h(v["aad"])
    )
    assert plaintext == h(v["pt"])
    with pytest.raises(InvalidTag):
        rust_openssl.hpke._decrypt_with_aad(
            suite_of(v), h(v["enc"]) + h(v["ct"]), private_key, info=h(v["info"]), aad=b""
        )


@pytest.mark.parametrize("v", VECTORS["vectors"], ids=lambda v: v["section"])
def test_our_template_uses_the_vector_suite(v: dict[str, Any]) -> None:
    """skRm imported through the handle: same public key, same wire format as RFC 9180 Seal."""
    ks = Keyset("test/hpke-vector", "hpke")
    info = ks.import_secret_material(v["template"], h(v["skRm"]), SECRET_ACCESS)
    ks.promote(info.version)
    assert ks.public_keyset().public_key_bytes() == h(v["pkRm"])
    assert TEMPLATES[v["template"]].algorithm.endswith(
        "AES-128-GCM" if v["aead_id"] == 1 else "ChaCha20-Poly1305"
    )
    prefix = ks.hpke().seal(b"", b"")[:5]
    # Sealed by plain RFC 9180 single-shot Seal to pkRm, opened through our handle.
    recipient = PublicKeyset.from_public_key(v["template"], h(v["pkRm"]), key_id=info.key_id)
    assert recipient.public_key_bytes() == h(v["pkRm"])
    raw_sealed = suite_of(v).encrypt(h(v["pt"]), recipient_key(v), info=h(v["info"]))
    assert ks.hpke().open(prefix + raw_sealed, h(v["info"])) == h(v["pt"])
    # And what we seal, plain Suite.decrypt opens after the 5-byte prefix.
    ours = recipient.seal(h(v["pt"]), h(v["info"]))
    assert ours[:5] == prefix
    private_key = X25519PrivateKey.from_private_bytes(h(v["skRm"]))
    assert suite_of(v).decrypt(ours[5:], private_key, info=h(v["info"])) == h(v["pt"])
    # The vector's own ciphertext needs aad "Count-0", which our API never uses.
    with pytest.raises(CryptoError):
        ks.hpke().open(prefix + h(v["enc"]) + h(v["ct"]), h(v["info"]))


def recipient_key(v: dict[str, Any]) -> Any:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    return X25519PublicKey.from_public_bytes(h(v["pkRm"]))
