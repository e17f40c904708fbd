"""RFC 8032 §7.1 Ed25519 known answers (tests/vectors/ed25519_rfc8032.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keybroker.errors import CryptoError
from keybroker.keys import ED25519, SECRET_ACCESS, Keyset, PublicKeyset

VECTORS = json.loads(
    (Path(__file__).parents[2] / "vectors" / "ed25519_rfc8032.json").read_text(encoding="utf-8")
)


def test_source_is_named_and_complete() -> None:
    assert "RFC 8032" in VECTORS["source"] and "7.1" in VECTORS["source"]
    names = [v["name"] for v in VECTORS["vectors"]]
    assert names == ["TEST 1", "TEST 2", "TEST 3", "TEST 1024", "TEST SHA(abc)"]
    assert len(bytes.fromhex(VECTORS["vectors"][3]["message"])) == 1023


@pytest.mark.parametrize("v", VECTORS["vectors"], ids=lambda v: v["name"])
def test_cryptography_matches_rfc8032(v: dict[str, Any]) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["secret_key"]))
    message = bytes.fromhex(v["message"])
    assert key.public_key().public_bytes_raw().hex() == v["public_key"]
    assert key.sign(message).hex() == v["signature"]
    key.public_key().verify(bytes.fromhex(v["signature"]), message)


@pytest.mark.parametrize("v", VECTORS["vectors"], ids=lambda v: v["name"])
def test_our_ed25519_template_signs_the_rfc_signature(v: dict[str, Any]) -> None:
    ks = Keyset("test/ed25519-vector", "sign")
    info = ks.import_secret_material(ED25519, bytes.fromhex(v["secret_key"]), SECRET_ACCESS)
    ks.promote(info.version)
    message = bytes.fromhex(v["message"])
    signature = ks.signer().sign(message)
    assert signature[5:].hex() == v["signature"]
    assert ks.public_keyset().public_key_bytes().hex() == v["public_key"]
    verifier = PublicKeyset.from_public_key(
        ED25519, bytes.fromhex(v["public_key"]), key_id=info.key_id
    )
    verifier.verify(signature, message)
    with pytest.raises(CryptoError):
        verifier.verify(signature, message + b"\x00")
