from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from broker_kit import World
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keybroker.broker.audit import verify_log
from keybroker.broker.events import EVENT_TYPES, decode_event
from keybroker.broker.home import INIT_ENTRY
from keybroker.encoding import decode
from keybroker.errors import CryptoError, DecodeError
from keybroker.keys import AES256_GCM
from keybroker.log.sth import SignedTreeHead
from keybroker.store.schema import log_leaves

HOUR = timedelta(hours=1)


def _activity(world: World) -> None:
    broker = world.broker
    alice = world.enrolled("site/fra1")
    broker.create_keyset("k", AES256_GCM)
    broker.grant(alice.pid, "k", "hold")
    envelope = broker.deliver("k", 1, alice.pid, HOUR)
    _, proof = alice.receive(envelope, broker.ca_certificate, "aead")
    broker.ack(envelope.delivery_id, alice.pid, proof)


def test_the_log_verifies_and_stays_consistent_with_what_was_seen(world: World) -> None:
    broker = world.broker
    first = broker.verify_log(full=True)
    assert first.tree_size == 1
    _activity(world)
    second = broker.verify_log(previous=first, full=True)
    assert second.tree_size == world.log_size() > first.tree_size
    assert broker.verify_log(previous=second) == second


def test_every_entry_is_a_known_event_and_carries_no_secret_types(world: World) -> None:
    _activity(world)
    entries = world.home.log.entries(0, world.log_size())
    assert decode(INIT_ENTRY, entries[0])[0] == INIT_ENTRY
    labels = [type(decode_event(e)).LABEL for e in entries[1:]]
    assert set(labels) <= set(EVENT_TYPES)
    assert len(labels) == len(entries) - 1
    with pytest.raises(DecodeError):
        decode_event(entries[0])


def test_a_forked_or_forged_history_is_detected(world: World) -> None:
    broker = world.broker
    _activity(world)
    seen = broker.verify_log()
    signer = world.home.log_signer
    # The log's own key signing a different root for a size the client saw: a fork.
    forked = SignedTreeHead.sign(signer, seen.tree_size, bytes(32), seen.timestamp_ms)
    world.broker.create_keyset("more", AES256_GCM)
    with pytest.raises(CryptoError):
        broker.verify_log(previous=forked)
    # A head from the future: the log would have shrunk.
    bigger = SignedTreeHead.sign(signer, seen.tree_size + 100, seen.root_hash, seen.timestamp_ms)
    with pytest.raises(CryptoError):
        broker.verify_log(previous=bigger)
    # A head signed by someone else.
    other = SignedTreeHead.sign(
        _Signer(Ed25519PrivateKey.generate()), seen.tree_size, seen.root_hash, seen.timestamp_ms
    )
    with pytest.raises(CryptoError):
        broker.verify_log(previous=other)
    with pytest.raises(CryptoError):
        broker.verify_log(previous=replace(seen, signature=bytes(64)))
    broker.verify_log(previous=seen, full=True)


def test_verify_log_detects_an_altered_entry(world: World) -> None:
    _activity(world)
    with world.home.store.transaction() as conn:
        conn.execute(log_leaves.update().where(log_leaves.c.idx == 2).values(entry=b"tampered"))
    world.broker.verify_log()  # the signed head alone cannot see it
    with pytest.raises(CryptoError):
        world.broker.verify_log(full=True)


class _Signer:
    key_id = "someone-else"

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def test_verify_log_is_a_plain_function_too(world: World) -> None:
    head = verify_log(world.home.log, world.home.log_public_key)
    assert head == world.home.log.tree_head()
