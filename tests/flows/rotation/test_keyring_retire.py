"""Retiring received key versions from a keyring, and the AEAD a data plane gets from one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agent_kit import deliver, make_keyring

from keybroker.client.keyring import KekSource, Keyring
from keybroker.errors import CryptoError, KeysetError
from keybroker.flows.rotation.traffic import version_of
from keybroker.keys import AES256_GCM, HMAC_SHA256, SECRET_ACCESS, Keyset, KeyState

LINK = "rotation/n1/s1"


@pytest.fixture
def broker_side() -> Keyset:
    """The broker's link keyset: v1 primary, v2 and v3 pending."""
    keyset = Keyset.generate(LINK, AES256_GCM)
    keyset.add()
    keyset.add()
    return keyset


def test_forgetting_a_version_drops_it_and_keeps_the_others(broker_side: Keyset) -> None:
    keyring = make_keyring()
    for version in (1, 2, 3):
        deliver(keyring, broker_side, version)
    broker_side.promote(2)
    v2_ct = broker_side.aead().encrypt(b"under v2", b"ad")
    broker_side.promote(1)
    v1_ct = broker_side.aead().encrypt(b"under v1", b"ad")

    assert keyring.forget_version(LINK, 1) is True
    held = keyring.received[LINK]
    assert [(v.version, v.state) for v in held.versions] == [
        (2, KeyState.PENDING),
        (3, KeyState.PENDING),
    ]
    key_ids = {v.version: v.key_id for v in broker_side.versions}
    assert {v.version: v.key_id for v in held.versions} == {2: key_ids[2], 3: key_ids[3]}
    aead = held.aead()
    assert aead.decrypt(v2_ct, b"ad") == b"under v2"
    with pytest.raises(CryptoError):  # its key id is simply unknown now
        aead.decrypt(v1_ct, b"ad")
    # The material of what is kept is the broker's, byte for byte (checked inside keys).
    assert held.export_secret_material(2, SECRET_ACCESS) == broker_side.export_secret_material(
        2, SECRET_ACCESS
    )
    assert keyring.forget_version(LINK, 1) is False  # already gone
    assert keyring.forget_version("no/such", 1) is False


def test_forgetting_the_last_version_drops_the_keyset(broker_side: Keyset) -> None:
    keyring = make_keyring()
    deliver(keyring, broker_side, 1)
    assert keyring.forget_version(LINK, 1) is True
    assert LINK not in keyring.received


def test_a_forgotten_version_installs_again_if_delivered_again(broker_side: Keyset) -> None:
    keyring = make_keyring()
    deliver(keyring, broker_side, 1)
    deliver(keyring, broker_side, 2)
    keyring.forget_version(LINK, 1)
    deliver(keyring, broker_side, 1)  # the operator enabled it again and re-delivered it
    assert [v.version for v in keyring.received[LINK].versions] == [1, 2]


def test_forgetting_survives_saving_and_loading(tmp_path: Path, broker_side: Keyset) -> None:
    source = KekSource(kek=Keyset.generate("test-kek", AES256_GCM).aead())
    path = tmp_path / "s1.keyring"
    keyring = make_keyring()
    deliver(keyring, broker_side, 1)
    deliver(keyring, broker_side, 2)
    keyring.save(path, source)
    keyring.forget_version(LINK, 1)
    assert [v.version for v in Keyring.load(path, source).received[LINK].versions] == [1, 2]
    keyring.save(path, source)
    loaded = Keyring.load(path, source)
    assert [v.version for v in loaded.received[LINK].versions] == [2]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["s1.keyring"]  # no temporary left


def test_data_aead_encrypts_under_a_chosen_version_and_decrypts_any(
    broker_side: Keyset,
) -> None:
    keyring = make_keyring("node/n1")
    for version in (1, 2):
        deliver(keyring, broker_side, version)
    before = keyring.received[LINK].versions

    v1 = keyring.data_aead(LINK, encrypt_version=1)
    v2 = keyring.data_aead(LINK, encrypt_version=2)
    reader = keyring.data_aead(LINK)
    ct1, ct2 = v1.encrypt(b"one", b"ad"), v2.encrypt(b"two", b"ad")
    assert version_of(ct1, before) == 1 and version_of(ct2, before) == 2
    assert (reader.decrypt(ct1, b"ad"), reader.decrypt(ct2, b"ad")) == (b"one", b"two")
    # The broker's own copy reads both: the keys are the delivered ones.
    assert broker_side.aead().decrypt(ct2, b"ad") == b"two"
    with pytest.raises(KeysetError):  # no primary here: the reader cannot encrypt
        reader.encrypt(b"x", b"ad")
    # Promoting happened in private copies: the keyring still holds two pending versions.
    assert keyring.received[LINK].versions == before
    assert keyring.received[LINK].primary is None

    keyring.forget_version(LINK, 1)
    with pytest.raises(KeysetError):
        keyring.data_aead(LINK, encrypt_version=1)
    assert keyring.data_aead(LINK).decrypt(ct2, b"ad") == b"two"
    with pytest.raises(CryptoError):
        keyring.data_aead(LINK).decrypt(ct1, b"ad")


def test_data_aead_refuses_what_it_cannot_serve(broker_side: Keyset) -> None:
    keyring = make_keyring()
    with pytest.raises(KeysetError):
        keyring.data_aead(LINK)
    mac = Keyset.generate("links/mac", HMAC_SHA256)
    deliver(keyring, mac, 1)
    with pytest.raises(KeysetError):
        keyring.data_aead("links/mac")
    deliver(keyring, broker_side, 1)
    with pytest.raises(KeysetError):
        keyring.data_aead(LINK, encrypt_version=7)
    handle = keyring.data_aead(LINK, encrypt_version=1)
    secret = broker_side.export_secret_material(1, SECRET_ACCESS)
    for text in (repr(handle), repr(keyring)):
        assert secret.hex() not in text and str(secret) not in text
