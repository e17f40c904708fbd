"""The SDK-facing helpers, without a database."""

from __future__ import annotations

import contextlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.hashes import SHA256
from hypothesis import given
from hypothesis import strategies as st

from keybroker.broker import DeliveryEnvelope, HpkeKeyBinding, make_ack_proof, verify_ack_proof
from keybroker.broker.messages import (
    IdentityPrivateKey,
    sign_with_identity,
    verify_identity_signature,
)
from keybroker.errors import CryptoError, DecodeError, LocalProtocolError
from keybroker.keys import AES256_GCM, ED25519, X25519_HPKE, Keyset
from keybroker.pki import PrincipalId

PID = PrincipalId.parse("device/d-1")


@pytest.mark.parametrize(
    "key",
    [ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())],
    ids=["ed25519", "p256"],
)
def test_identity_signatures_verify_only_under_their_key(key: IdentityPrivateKey) -> None:
    binding = HpkeKeyBinding.from_public_keyset(
        PID, Keyset.generate("h", X25519_HPKE).public_keyset()
    )
    signature = sign_with_identity(key, binding.encode())
    verify_identity_signature(key.public_key(), signature, binding.encode())
    other = replace_key_id(binding)
    with pytest.raises(CryptoError):
        verify_identity_signature(key.public_key(), signature, other.encode())
    with pytest.raises(CryptoError):
        verify_identity_signature(key.public_key(), signature + b"\0" * 300, binding.encode())


def replace_key_id(binding: HpkeKeyBinding) -> HpkeKeyBinding:
    return HpkeKeyBinding(
        binding.principal, binding.template, binding.key_id ^ 1, binding.public_key
    )


def test_identity_key_types_outside_the_policy_are_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(LocalProtocolError):
        sign_with_identity(p384, b"m")
    with pytest.raises(CryptoError):
        verify_identity_signature(p384.public_key(), p384.sign(b"m", ec.ECDSA(SHA256())), b"m")
    with pytest.raises(LocalProtocolError):
        HpkeKeyBinding.from_public_keyset(PID, Keyset.generate("s", ED25519).public_keyset())


def test_ack_proofs_bind_the_delivery_and_challenge() -> None:
    keyset = Keyset.generate("k", AES256_GCM)
    challenge = bytes(range(32))
    proof = make_ack_proof(keyset, 1, challenge, "d-1")
    verify_ack_proof(keyset, 1, challenge, "d-1", proof)
    for args in ((challenge, "d-2"), (bytes(32), "d-1")):
        with pytest.raises(CryptoError):
            verify_ack_proof(keyset, 1, *args, proof)
    with pytest.raises(CryptoError):
        verify_ack_proof(Keyset.generate("k", AES256_GCM), 1, challenge, "d-1", proof)


SAMPLE = DeliveryEnvelope(
    delivery_id="00000000-0000-4000-8000-000000000000",
    recipient=str(PID),
    keyset="k",
    version=1,
    challenge=bytes(32),
    expires_at_ms=1_800_000_000_000,
    sealed=b"\x01" * 80,
    signature=b"\x30" * 70,
).encode()


def test_an_envelope_round_trips() -> None:
    assert DeliveryEnvelope.decode(SAMPLE).encode() == SAMPLE


@given(st.integers(0, len(SAMPLE) - 1), st.integers(1, 255), st.integers(0, len(SAMPLE)))
def test_a_damaged_envelope_raises_only_decode_error(at: int, flip: int, cut: int) -> None:
    damaged = bytearray(SAMPLE)
    damaged[at] ^= flip
    for data in (bytes(damaged), SAMPLE[:cut]):
        with contextlib.suppress(DecodeError):
            DeliveryEnvelope.decode(data)


def test_a_recipient_key_is_parsed_once_and_a_bad_one_refused_every_time() -> None:
    hpke = Keyset.generate("site/fra1/hpke", X25519_HPKE)
    binding = HpkeKeyBinding.from_public_keyset(
        PrincipalId.parse("site/fra1"), hpke.public_keyset()
    )
    first = binding.recipient()
    again = HpkeKeyBinding(binding.principal, binding.template, binding.key_id, binding.public_key)
    assert again.recipient() is first  # remembered per (template, key id, key)
    other_id = HpkeKeyBinding(binding.principal, binding.template, 7, binding.public_key)
    assert other_id.recipient() is not first and other_id.recipient().primary.key_id == 7
    sealed = first.seal(b"secret", info=b"ctx")
    assert hpke.hpke().open(sealed, info=b"ctx") == b"secret"
    low_order = HpkeKeyBinding(binding.principal, binding.template, binding.key_id, bytes(32))
    for _ in range(2):  # a refusal is not remembered as a key
        with pytest.raises(DecodeError):
            low_order.recipient()
    with pytest.raises(DecodeError, match="not an HPKE key template"):
        HpkeKeyBinding(binding.principal, AES256_GCM, 1, binding.public_key).recipient()
