from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keybroker.errors import CryptoError, KeysetError
from keybroker.keys import SECRET_ACCESS, Keyset


@pytest.mark.parametrize(
    "template", ["AES256_GCM", "HMAC_SHA256", "X25519_HPKE", "ED25519", "ECDSA_P256"]
)
def test_proof_verifies_for_its_challenge_only(template: str) -> None:
    ks = Keyset.generate("k", template)
    v2 = ks.add().version
    proof = ks.prove_possession(v2, b"c" * 32)
    ks.verify_possession(v2, b"c" * 32, proof)
    with pytest.raises(CryptoError):
        ks.verify_possession(v2, b"d" * 32, proof)
    with pytest.raises(CryptoError):
        ks.verify_possession(1, b"c" * 32, proof)
    with pytest.raises(CryptoError):
        ks.verify_possession(v2, b"c" * 32, proof[:-1] + bytes([proof[-1] ^ 1]))


def test_signing_keys_prove_with_a_signature_anyone_can_check() -> None:
    ks = Keyset.generate("k", "ED25519")
    proof = ks.prove_possession(1, b"c" * 32)
    info = ks.version(1)
    assert info.public_key is not None
    # A plain Ed25519 signature by the version's key over the proof-of-possession message.
    Ed25519PublicKey.from_public_bytes(info.public_key).verify(proof, ks._pop_message(1, b"c" * 32))


def test_symmetric_proof_is_not_the_key() -> None:
    ks = Keyset.generate("k", "AES256_GCM")
    proof = ks.prove_possession(1, b"c" * 32)
    assert ks.export_secret_material(1, SECRET_ACCESS) not in proof


def test_unprefixed_signature_is_the_algorithms_own() -> None:
    ks = Keyset.generate("k", "ED25519")
    raw = ks.signer().sign_unprefixed(b"m")
    prefixed = ks.signer().sign(b"m")
    assert len(raw) == 64
    assert prefixed[5:] == raw  # Ed25519 is deterministic
    info = ks.version(1)
    assert info.public_key is not None
    Ed25519PublicKey.from_public_bytes(info.public_key).verify(raw, b"m")
    with pytest.raises(CryptoError):
        ks.signer().verify(raw, b"m")  # the prefixed verifier does not take it


def test_imported_material_keeps_a_given_key_id() -> None:
    source = Keyset.generate("a", "AES256_GCM")
    key = source.export_secret_material(1, SECRET_ACCESS)
    ct = None
    for _ in range(2):  # derived again: the same id each time, so earlier output opens
        again = Keyset("b", "aead")
        v = again.import_secret_material("AES256_GCM", key, SECRET_ACCESS, key_id=7)
        again.promote(v.version)
        assert v.key_id == 7
        if ct is None:
            ct = again.aead().encrypt(b"x", b"")
        assert again.aead().decrypt(ct, b"") == b"x"
    with pytest.raises(KeysetError):
        Keyset("c", "aead").import_secret_material("AES256_GCM", key, SECRET_ACCESS, key_id=-1)
