from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta

import pytest
import sqlalchemy as sa
from broker_kit import Principal, World

from keybroker.broker import DeliveryEnvelope, make_ack_proof
from keybroker.broker.events import (
    DeliveryAcknowledged,
    DeliveryExpired,
    DeliveryFailed,
    DeliverySent,
)
from keybroker.errors import (
    AuthorizationError,
    Conflict,
    CryptoError,
    DecodeError,
    KeysetError,
    NotFound,
)
from keybroker.keys import (
    AES256_GCM,
    ED25519,
    HMAC_SHA256,
    SECRET_ACCESS,
    X25519_HPKE,
    KeyTemplate,
)
from keybroker.pki import PrincipalId
from keybroker.store.schema import deliveries

HOUR = timedelta(hours=1)


def _holding(world: World, template: KeyTemplate = AES256_GCM, name: str = "k") -> Principal:
    principal = world.enrolled("site/fra1")
    world.broker.create_keyset(name, template)
    world.broker.grant(principal.pid, name, "hold")
    return principal


def test_a_delivery_is_sealed_signed_fetched_opened_and_acked(world: World) -> None:
    broker = world.broker
    alice = world.enrolled("site/fra1")
    broker.create_keyset("site/fra1/restore", AES256_GCM)
    broker.grant(alice.pid, "site/fra1/restore", "hold")
    start = world.log_size()

    sent = broker.deliver("site/fra1/restore", 1, alice.pid, HOUR)
    assert (sent.recipient, sent.keyset, sent.version) == ("site/fra1", "site/fra1/restore", 1)
    assert len(sent.challenge) == 32
    (fetched,) = broker.fetch_deliveries(alice.pid)
    assert fetched == sent
    assert DeliveryEnvelope.decode(fetched.encode()) == fetched

    local, proof = alice.receive(fetched, broker.ca_certificate, "aead")
    theirs = world.home.keysets.load("site/fra1/restore").keyset
    ciphertext = theirs.aead().encrypt(b"device state", b"ad")
    assert local.aead().decrypt(ciphertext, b"ad") == b"device state"

    acked = broker.ack(fetched.delivery_id, alice.pid, proof)
    assert acked.state == "acked" and acked.completed_at == world.clock.now
    assert broker.fetch_deliveries(alice.pid) == []
    sent_event, acked_event = world.events_since(start)
    assert isinstance(sent_event, DeliverySent) and sent_event.delivery_id == sent.delivery_id
    assert isinstance(acked_event, DeliveryAcknowledged)

    before, size = world.dump(), world.log_size()
    assert broker.ack(fetched.delivery_id, alice.pid, proof) == acked  # repeated: unchanged
    assert world.dump() == before and world.log_size() == size


@pytest.mark.parametrize("template", [ED25519, HMAC_SHA256, X25519_HPKE])
def test_every_purpose_is_delivered_and_proven(world: World, template: KeyTemplate) -> None:
    broker = world.broker
    alice = _holding(world, template)
    pending = broker.rotate_keyset("k")  # a pending version is delivered before it is promoted
    envelope = broker.deliver("k", pending.version, alice.pid, HOUR)
    (purpose,) = template.purposes
    local, proof = alice.receive(envelope, broker.ca_certificate, purpose.value)
    assert local.version(pending.version).key_id == pending.key_id
    assert broker.ack(envelope.delivery_id, alice.pid, proof).state == "acked"


def test_asking_twice_returns_the_same_delivery(world: World) -> None:
    broker = world.broker
    alice = _holding(world)
    first = broker.deliver("k", 1, alice.pid, HOUR)
    before, size = world.dump(), world.log_size()
    assert broker.deliver("k", 1, alice.pid, HOUR) == first
    assert world.dump() == before and world.log_size() == size


def test_concurrent_requests_make_one_delivery(world: World) -> None:
    broker = world.broker
    alice = _holding(world)
    barrier = threading.Barrier(3)
    got: list[object] = []

    def run() -> None:
        barrier.wait()
        try:
            got.append(broker.deliver("k", 1, alice.pid, HOUR))
        except Exception as exc:
            got.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    envelopes = [g for g in got if isinstance(g, DeliveryEnvelope)]
    assert len(envelopes) == 3, got
    assert len({e.delivery_id for e in envelopes}) == 1
    with world.home.store.snapshot() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(deliveries)).scalar_one() == 1


def test_no_delivery_without_a_hold_grant(world: World) -> None:
    broker = world.broker
    alice = world.enrolled("site/fra1")
    broker.create_keyset("k", AES256_GCM)
    broker.grant(alice.pid, "k", "use")  # use is not hold
    before, size = world.dump(), world.log_size()
    with pytest.raises(AuthorizationError):
        broker.deliver("k", 1, alice.pid, HOUR)
    with pytest.raises(NotFound):
        broker.deliver("k", 1, "site/nobody", HOUR)
    assert world.dump() == before and world.log_size() == size


def test_retired_versions_are_not_delivered(world: World) -> None:
    broker = world.broker
    alice = _holding(world)
    broker.rotate_keyset("k")
    broker.promote_version("k", 2)
    broker.disable_version("k", 1)
    before, size = world.dump(), world.log_size()
    with pytest.raises(KeysetError):
        broker.deliver("k", 1, alice.pid, HOUR)
    with pytest.raises(KeysetError):
        broker.deliver("k", 7, alice.pid, HOUR)
    assert world.dump() == before and world.log_size() == size


def test_a_wrong_proof_fails_the_delivery_and_is_logged(world: World) -> None:
    broker = world.broker
    alice = _holding(world)
    envelope = broker.deliver("k", 1, alice.pid, HOUR)
    local, good = alice.receive(envelope, broker.ca_certificate, "aead")
    # A proof for the right key but another delivery id (a replayed or misdirected ack).
    wrong = make_ack_proof(local, 1, envelope.challenge, "another-delivery")
    start = world.log_size()
    with pytest.raises(CryptoError):
        broker.ack(envelope.delivery_id, alice.pid, wrong)
    info = broker.show_delivery(envelope.delivery_id)
    assert info.state == "failed" and info.failure_reason == "proof of possession did not verify"
    (event,) = world.events_since(start)
    assert isinstance(event, DeliveryFailed) and event.reason == info.failure_reason

    before, size = world.dump(), world.log_size()
    with pytest.raises(Conflict):
        broker.ack(envelope.delivery_id, alice.pid, good)
    assert world.dump() == before and world.log_size() == size
    # A new delivery can be made once the failed one is settled.
    assert broker.deliver("k", 1, alice.pid, HOUR).delivery_id != envelope.delivery_id


def test_a_late_ack_expires_the_delivery(world: World) -> None:
    broker = world.broker
    alice = _holding(world)
    envelope = broker.deliver("k", 1, alice.pid, HOUR)
    _, proof = alice.receive(envelope, broker.ca_certificate, "aead")
    world.clock.advance(HOUR)
    assert broker.fetch_deliveries(alice.pid) == []
    start = world.log_size()
    with pytest.raises(AuthorizationError):
        broker.ack(envelope.delivery_id, alice.pid, proof)
    assert broker.show_delivery(envelope.delivery_id).state == "expired"
    (event,) = world.events_since(start)
    assert isinstance(event, DeliveryExpired)
    before = world.dump()
    with pytest.raises(AuthorizationError):
        broker.ack(envelope.delivery_id, alice.pid, proof)
    assert world.dump() == before


def test_the_sweep_expires_overdue_deliveries(world: World) -> None:
    broker = world.broker
    alice = _holding(world)
    broker.create_keyset("short", AES256_GCM)
    broker.grant(alice.pid, "short", "hold")
    late = broker.deliver("short", 1, alice.pid, timedelta(minutes=5))
    kept = broker.deliver("k", 1, alice.pid, HOUR)
    assert broker.expire_overdue() == []
    world.clock.advance(timedelta(minutes=5))
    assert broker.expire_overdue() == [late.delivery_id]
    assert broker.show_delivery(kept.delivery_id).state == "sent"
    assert [d.delivery_id for d in broker.list_deliveries(state="expired")] == [late.delivery_id]


def test_nobody_acks_or_sees_another_principals_delivery(world: World) -> None:
    broker = world.broker
    alice = _holding(world)
    mallory = world.enrolled("site/evil")
    broker.grant(mallory.pid, "k", "hold")
    envelope = broker.deliver("k", 1, alice.pid, HOUR)
    _, proof = alice.receive(envelope, broker.ca_certificate, "aead")
    assert broker.fetch_deliveries(mallory.pid) == []
    before, size = world.dump(), world.log_size()
    with pytest.raises(NotFound) as other:
        broker.ack(envelope.delivery_id, mallory.pid, proof)
    with pytest.raises(NotFound) as missing:
        broker.ack("00000000-0000-4000-8000-000000000000", mallory.pid, proof)
    assert str(other.value) == str(missing.value)  # no existence oracle
    with pytest.raises(CryptoError):  # and mallory cannot open it
        mallory.receive(envelope, broker.ca_certificate, "aead")
    assert world.dump() == before and world.log_size() == size


def test_malformed_acks_change_nothing(world: World) -> None:
    broker = world.broker
    alice = _holding(world)
    envelope = broker.deliver("k", 1, alice.pid, HOUR)
    before, size = world.dump(), world.log_size()
    with pytest.raises(DecodeError):
        broker.ack(envelope.delivery_id, alice.pid, b"")
    with pytest.raises(DecodeError):
        broker.ack(envelope.delivery_id, alice.pid, b"x" * 10_000)
    with pytest.raises(DecodeError):
        broker.ack("x" * 100, alice.pid, b"x" * 32)
    assert world.dump() == before and world.log_size() == size


def test_a_forged_or_altered_envelope_does_not_verify(world: World) -> None:
    broker = world.broker
    alice = _holding(world)
    envelope = broker.deliver("k", 1, alice.pid, HOUR)
    ca = broker.ca_certificate
    envelope.verify(ca)
    for changed in (
        replace(envelope, expires_at_ms=envelope.expires_at_ms + 1),
        replace(envelope, challenge=bytes(32)),
        replace(envelope, recipient="site/evil"),
        replace(envelope, sealed=envelope.sealed[:-1] + bytes([envelope.sealed[-1] ^ 1])),
    ):
        with pytest.raises(CryptoError):
            changed.verify(ca)
    with pytest.raises(CryptoError):
        envelope.verify(ca, recipient=PrincipalId.parse("site/other"))
    with pytest.raises(DecodeError):
        DeliveryEnvelope.decode(replace(envelope, challenge=b"short").encode())


def test_retiring_what_allowed_a_delivery_fails_it(world: World) -> None:
    broker = world.broker
    alice = _holding(world)
    broker.rotate_keyset("k")
    first = broker.deliver("k", 2, alice.pid, HOUR)
    broker.disable_version("k", 2)
    assert broker.show_delivery(first.delivery_id).failure_reason == "key version disabled"
    second = broker.deliver("k", 1, alice.pid, HOUR)
    broker.revoke_grant(alice.pid, "k", "hold")
    assert broker.show_delivery(second.delivery_id).failure_reason == "hold grant revoked"
    broker.grant(alice.pid, "k", "hold")
    third = broker.deliver("k", 1, alice.pid, HOUR)
    broker.revoke_principal(alice.pid)
    assert broker.show_delivery(third.delivery_id).failure_reason == "principal revoked"
    assert broker.list_deliveries(state="sent") == []


def test_no_delivery_row_or_log_entry_holds_the_raw_key(world: World) -> None:
    broker = world.broker
    alice = _holding(world)
    broker.rotate_keyset("k")
    for version in (1, 2):
        envelope = broker.deliver("k", version, alice.pid, HOUR)
        _, proof = alice.receive(envelope, broker.ca_certificate, "aead")
        broker.ack(envelope.delivery_id, alice.pid, proof)
    keyset = world.home.keysets.load("k").keyset
    secrets = [keyset.export_secret_material(v, SECRET_ACCESS) for v in (1, 2)]
    with world.home.store.snapshot() as conn:
        rows = conn.execute(sa.select(deliveries)).all()
    cells = [bytes(c) if isinstance(c, memoryview) else c for row in rows for c in row]
    entries = world.home.log.entries(0, world.log_size())
    blobs = [c for c in cells if isinstance(c, bytes)] + entries
    assert blobs
    for secret in secrets:
        assert len(secret) == 32
        assert not any(secret in blob for blob in blobs)


def test_an_inbox_holds_only_its_own_sent_unexpired_deliveries_oldest_first(
    world: World,
) -> None:
    """The inbox is one statement (principal outer-joined to its deliveries): each of its
    filters is checked here, and an empty inbox is told apart from an unknown principal."""
    broker = world.broker
    alice, bob = world.enrolled("site/fra1"), world.enrolled("site/ams1")
    assert broker.fetch_deliveries(alice.pid) == []  # enrolled, nothing waiting
    for name in ("a", "b", "c", "d"):
        broker.create_keyset(name, AES256_GCM)
        broker.grant(alice.pid, name, "hold")
        broker.grant(bob.pid, name, "hold")
    first = broker.deliver("a", 1, alice.pid, HOUR)
    world.clock.now += timedelta(seconds=1)
    short = broker.deliver("b", 1, alice.pid, timedelta(seconds=5))
    world.clock.now += timedelta(seconds=1)
    third = broker.deliver("c", 1, alice.pid, HOUR)
    acked = broker.deliver("d", 1, alice.pid, HOUR)
    others = broker.deliver("a", 1, bob.pid, HOUR)
    _, proof = alice.receive(acked, broker.ca_certificate, "aead")
    broker.ack(acked.delivery_id, alice.pid, proof)

    assert broker.fetch_deliveries(alice.pid) == [first, short, third]
    assert broker.fetch_deliveries(bob.pid) == [others]
    world.clock.now += timedelta(seconds=5)  # "b" is past its deadline, not yet expired
    assert broker.fetch_deliveries(alice.pid) == [first, third]

    with pytest.raises(NotFound, match="no principal site/nowhere"):
        broker.fetch_deliveries("site/nowhere")
    broker.revoke_principal(bob.pid, reason="cessationOfOperation")
    with pytest.raises(AuthorizationError, match="site/ams1 is revoked"):
        broker.fetch_deliveries(bob.pid)


def test_outstanding_deliveries_are_exactly_the_sent_ones_asked_for(world: World) -> None:
    """What the rotation batch reads under its delivery locks: per (principal row,
    keyset row, version), the sent delivery if there is one; nothing else."""
    from keybroker.broker.deliveries import outstanding_deliveries
    from keybroker.store.schema import keysets as keysets_table
    from keybroker.store.schema import principals as principals_table

    broker = world.broker
    alice, bob = world.enrolled("site/fra1"), world.enrolled("site/ams1")
    for name in ("a", "b"):
        broker.create_keyset(name, AES256_GCM)
        for who in (alice, bob):
            broker.grant(who.pid, name, "hold")
    broker.rotate_keyset("a")  # version 2 of "a"
    sent_a1 = broker.deliver("a", 1, alice.pid, HOUR)
    sent_a2 = broker.deliver("a", 2, alice.pid, HOUR)
    acked = broker.deliver("a", 1, bob.pid, HOUR)
    _, proof = bob.receive(acked, broker.ca_certificate, "aead")
    broker.ack(acked.delivery_id, bob.pid, proof)
    sent_b = broker.deliver("b", 1, bob.pid, HOUR)
    with world.home.store.snapshot() as conn:
        pid = dict(conn.execute(sa.select(principals_table.c.name, principals_table.c.id)).all())
        kid = dict(conn.execute(sa.select(keysets_table.c.name, keysets_table.c.id)).all())
        found = outstanding_deliveries(
            conn,
            [
                (pid["fra1"], kid["a"], 1),  # sent
                (pid["fra1"], kid["a"], 2),  # sent
                (pid["ams1"], kid["a"], 1),  # acked: not outstanding
                (pid["ams1"], kid["b"], 1),  # sent
                (pid["fra1"], kid["b"], 1),  # never delivered
            ],
        )
        assert outstanding_deliveries(conn, []) == {}
    assert {key: row.id for key, row in found.items()} == {
        (pid["fra1"], kid["a"], 1): sent_a1.delivery_id,
        (pid["fra1"], kid["a"], 2): sent_a2.delivery_id,
        (pid["ams1"], kid["b"], 1): sent_b.delivery_id,
    }
