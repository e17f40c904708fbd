"""Stateful property: any sequence of lifecycle operations keeps the keyset's promises.

The model below is the specification written out on its own (not imported
from keybroker.keys.lifecycle): the states of every version, at most one
primary (exactly one once anything was promoted), invalid operations raising
KeyStateError and changing nothing, and every ciphertext made earlier
decrypting exactly while its version is pending, primary or enabled.
"""

from __future__ import annotations

import os

import hypothesis.strategies as st
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from keybroker.errors import CryptoError, KeysetError, KeyStateError
from keybroker.keys import AES256_GCM, SECRET_ACCESS, Keyset

SPEC = {
    ("pending", "promote"): "primary",
    ("enabled", "promote"): "primary",
    ("pending", "disable"): "disabled",
    ("enabled", "disable"): "disabled",
    ("disabled", "enable"): "enabled",
    ("disabled", "destroy"): "destroyed",
}
USABLE = {"pending", "primary", "enabled"}
OPS = ["promote", "disable", "enable", "destroy"]
KEK = Keyset.generate("prop/kek", AES256_GCM).aead()


class KeysetLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.keyset = Keyset("prop/keyset", "aead")
        self.aead = self.keyset.aead()
        self.model: dict[int, str] = {}
        self.ever_promoted = False
        self.ciphertexts: list[tuple[bytes, int, bytes, bytes]] = []

    @initialize(count=st.integers(min_value=0, max_value=3))
    def start(self, count: int) -> None:
        for _ in range(count):
            self.add()

    @precondition(lambda self: len(self.model) < 5)
    @rule()
    def add(self) -> None:
        info = self.keyset.add(AES256_GCM)
        assert info.version == len(self.model) + 1
        self.model[info.version] = "pending"

    @rule(data=st.data())
    def transition(self, data: st.DataObject) -> None:
        # Half the time a move the specification allows, so runs reach deep states
        # (destroyed, re-enabled ...); otherwise a state first, then a version in it
        # and any operation, so every forbidden (state, operation) pair comes up too.
        allowed = [(v, op) for v, state in self.model.items() for op in OPS if (state, op) in SPEC]
        take_allowed = bool(allowed) and data.draw(st.booleans())
        if take_allowed:
            version, op = data.draw(st.sampled_from(allowed))
        else:
            state = data.draw(st.sampled_from(sorted({*self.model.values(), "unknown"})))
            in_state = [v for v, s in self.model.items() if s == state]
            version = data.draw(st.sampled_from(in_state or [len(self.model) + 1]))
            op = data.draw(st.sampled_from(OPS))
        before = self.keyset.versions
        apply = getattr(self.keyset, op)
        if version not in self.model:
            with pytest.raises(KeysetError):
                apply(version)
            assert self.keyset.versions == before
            return
        expected = SPEC.get((self.model[version], op))
        if expected is None:
            with pytest.raises(KeyStateError):
                apply(version)
            assert self.keyset.versions == before
            return
        apply(version)
        if op == "promote":
            for v, state in self.model.items():
                if state == "primary":
                    self.model[v] = "enabled"
            self.ever_promoted = True
        self.model[version] = expected

    @rule(plaintext=st.binary(max_size=48), associated_data=st.binary(max_size=16))
    def encrypt(self, plaintext: bytes, associated_data: bytes) -> None:
        primaries = [v for v, state in self.model.items() if state == "primary"]
        if not primaries:
            with pytest.raises(KeysetError):
                self.aead.encrypt(plaintext, associated_data)
            return
        ct = self.aead.encrypt(plaintext, associated_data)
        self.ciphertexts.append((ct, primaries[0], plaintext, associated_data))

    @rule(data=st.data(), plaintext=st.binary(max_size=48))
    def encrypt_under(self, data: st.DataObject, plaintext: bytes) -> None:
        """A ciphertext under any version that has material, as a peer holding it would make."""
        live = [v for v, state in self.model.items() if state != "destroyed"]
        if not live:
            return
        version = data.draw(st.sampled_from(live))
        key = AESGCM(self.keyset.export_secret_material(version, SECRET_ACCESS))
        nonce = os.urandom(12)
        prefix = b"\x01" + self.keyset.version(version).key_id.to_bytes(4, "big")
        ct = prefix + nonce + key.encrypt(nonce, plaintext, b"peer")
        self.ciphertexts.append((ct, version, plaintext, b"peer"))

    @rule()
    def reload(self) -> None:
        """Serialise and load again: nothing observable may change."""
        blob = self.keyset.encrypt_to_bytes(KEK, b"prop")
        self.keyset = Keyset.decrypt_from_bytes(blob, KEK, b"prop")
        self.aead = self.keyset.aead()

    @invariant()
    def states_match_the_model(self) -> None:
        assert [(v.version, v.state.value) for v in self.keyset.versions] == sorted(
            self.model.items()
        )

    @invariant()
    def exactly_one_primary_once_promoted(self) -> None:
        primaries = [v for v in self.keyset.versions if v.state.value == "primary"]
        assert len(primaries) == (1 if self.ever_promoted else 0)
        assert (self.keyset.primary is None) == (not primaries)

    @invariant()
    def earlier_ciphertexts_decrypt_exactly_while_usable(self) -> None:
        for ct, version, plaintext, associated_data in self.ciphertexts:
            if self.model[version] in USABLE:
                assert self.aead.decrypt(ct, associated_data) == plaintext
            else:
                with pytest.raises(KeysetError) as err:
                    self.aead.decrypt(ct, associated_data)
                assert not isinstance(err.value, CryptoError)
                assert self.model[version] in str(err.value)


KeysetLifecycle.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKeysetLifecycle = KeysetLifecycle.TestCase
