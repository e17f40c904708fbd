from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keybroker.errors import CryptoError
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
