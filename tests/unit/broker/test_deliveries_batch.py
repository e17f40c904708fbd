"""Batched paths of deliveries: ``ack_many`` against ``ack`` one by one, and
``holders_in`` + ``deliver_loaded_in`` against ``deliver_in`` (SQLite and PostgreSQL)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import pytest
from broker_kit import Principal, World

from keybroker.broker import DeliveryInfo, make_ack_proof
from keybroker.broker.deliveries import (
    AckRequest,
    ack_many,
    deliver_in,
    deliver_loaded_in,
    holders_in,
)
from keybroker.broker.events import Event
from keybroker.errors import AuthorizationError, KeybrokerError
from keybroker.keys import AES256_GCM
from keybroker.pki import PrincipalId

HOUR = timedelta(hours=1)
SHORT = timedelta(minutes=5)


@dataclass
class Scenario:
    """One of each kind of ack, on keysets and principals named after ``tag``."""

    tag: str
    requests: list[AckRequest]
    #: Every delivery made, in order: their states are compared afterwards.
    deliveries: list[str]


def _scenario(world: World, tag: str) -> Scenario:
    broker = world.broker
    alice = world.enrolled(f"site/alice-{tag}")
    mallory = world.enrolled(f"site/mallory-{tag}")
    made: list[str] = []

    def delivered(case: str, ttl: timedelta = HOUR) -> tuple[str, bytes, bytes]:
        name = f"{tag}/{case}"
        broker.create_keyset(name, AES256_GCM)
        broker.grant(alice.pid, name, "hold")
        envelope = broker.deliver(name, 1, alice.pid, ttl)
        local, proof = alice.receive(envelope, broker.ca_certificate, "aead")
        wrong = make_ack_proof(local, 1, envelope.challenge, "another-delivery")
        made.append(envelope.delivery_id)
        return envelope.delivery_id, proof, wrong

    good, good_proof, _ = delivered("good")
    bad, _, bad_proof = delivered("wrong-proof")
    late, late_proof, _ = delivered("late", SHORT)
    twice, twice_proof, _ = delivered("repeated")
    clash, clash_proof, clash_wrong = delivered("acked-then-other-proof")
    other, other_proof, _ = delivered("someone-else")
    failed, failed_right, failed_wrong = delivered("failed-then-right")
    requests: list[AckRequest] = [
        (good, alice.pid, good_proof),
        (bad, alice.pid, bad_proof),
        (late, alice.pid, late_proof),
        (late, alice.pid, late_proof),  # now expired: refused, nothing changes
        (twice, alice.pid, twice_proof),
        (twice, alice.pid, twice_proof),  # the very ack that succeeded, repeated
        (clash, alice.pid, clash_proof),
        (clash, alice.pid, clash_wrong),  # another proof after the ack: Conflict
        (other, mallory.pid, other_proof),  # not mallory's: NotFound
        (other, alice.pid, b""),  # malformed: DecodeError
        ("00000000-0000-4000-8000-000000000000", alice.pid, good_proof),
        (failed, alice.pid, failed_wrong),
        (failed, alice.pid, failed_right),  # the delivery failed: Conflict
        ("x" * 100, str(alice.pid), good_proof),  # malformed id
    ]
    return Scenario(tag, requests, made)


def _one_by_one(world: World, requests: list[AckRequest]) -> list[DeliveryInfo | Exception]:
    out: list[DeliveryInfo | Exception] = []
    for did, pid, proof in requests:
        try:
            out.append(world.broker.ack(did, pid, proof))
        except KeybrokerError as exc:
            out.append(exc)
    return out


def _shape(result: DeliveryInfo | Exception, scenario: Scenario) -> tuple[Any, ...]:
    if isinstance(result, DeliveryInfo):
        return (
            "info",
            scenario.deliveries.index(result.delivery_id),
            result.state,
            result.version,
            result.completed_at,
            result.failure_reason,
        )
    return ("error", type(result).__name__, str(result))


def _normalised(events: list[Event], scenario: Scenario) -> list[dict[str, Any]]:
    out = []
    for event in events:
        fields = asdict(event)  # type: ignore[call-overload]
        fields["type"] = type(event).__name__
        if "delivery_id" in fields:
            fields["delivery_id"] = scenario.deliveries.index(fields["delivery_id"])
        for key in ("principal", "keyset"):
            if key in fields:
                fields[key] = fields[key].replace(scenario.tag, "*")
        out.append(fields)
    return out


def test_ack_many_does_what_acks_one_by_one_do(world: World) -> None:
    one, many = _scenario(world, "one"), _scenario(world, "many")
    world.clock.advance(2 * SHORT)  # past the "late" deliveries' deadline, before the others'

    start = world.log_size()
    singles = _one_by_one(world, one.requests)
    single_events = world.events_since(start)
    start = world.log_size()
    batched = ack_many(world.broker.context, many.requests)
    batch_events = world.events_since(start)

    assert [_shape(r, one) for r in singles] == [_shape(r, many) for r in batched]
    assert [type(r).__name__ for r in batched] == [
        "DeliveryInfo",
        "CryptoError",
        "AuthorizationError",
        "AuthorizationError",
        "DeliveryInfo",
        "DeliveryInfo",
        "DeliveryInfo",
        "Conflict",
        "NotFound",
        "DecodeError",
        "NotFound",
        "CryptoError",
        "Conflict",
        "DecodeError",
    ]
    states = [world.broker.show_delivery(d) for d in one.deliveries]
    batched_states = [world.broker.show_delivery(d) for d in many.deliveries]
    assert [(s.state, s.completed_at, s.failure_reason) for s in states] == [
        (s.state, s.completed_at, s.failure_reason) for s in batched_states
    ]
    assert [s.state for s in batched_states] == [
        "acked",
        "failed",
        "expired",
        "acked",
        "acked",
        "sent",
        "failed",
    ]
    assert _normalised(single_events, one) == _normalised(batch_events, many)
    assert len(batch_events) == 6  # 3 acked, 2 failed, 1 expired
    world.broker.verify_log(full=True)


def test_a_batch_that_changes_nothing_logs_nothing(world: World) -> None:
    alice = world.enrolled("site/alice")
    world.broker.create_keyset("k", AES256_GCM)
    world.broker.grant(alice.pid, "k", "hold")
    envelope = world.broker.deliver("k", 1, alice.pid, HOUR)
    before, size = world.dump(), world.log_size()
    assert ack_many(world.broker.context, []) == []
    refused = ack_many(
        world.broker.context,
        [
            (envelope.delivery_id, alice.pid, b""),
            ("00000000-0000-4000-8000-000000000000", alice.pid, b"x" * 32),
        ],
    )
    assert [type(r).__name__ for r in refused] == ["DecodeError", "NotFound"]
    assert world.dump() == before and world.log_size() == size


def _envelope_shape(envelope: Any) -> tuple[Any, ...]:
    return (envelope.recipient, envelope.keyset, envelope.version, envelope.expires_at_ms)


def test_deliver_loaded_in_checks_what_deliver_in_checks(world: World) -> None:
    broker, ctx = world.broker, world.broker.context
    alice = world.enrolled("site/alice")
    carol: Principal = world.enrolled("site/carol")
    for name in ("a", "b", "c"):
        broker.create_keyset(name, AES256_GCM)
        broker.grant(alice.pid, name, "hold")
    now = world.clock.now
    with ctx.store.transaction() as conn:
        plain, plain_events = deliver_in(ctx, conn, "a", 1, alice.pid, HOUR, now)
        holders = holders_in(conn, [(alice.pid, "b"), (carol.pid, "b"), (alice.pid, "c")])
        stored = ctx.keysets.load("b", conn=conn)
        loaded, loaded_events = deliver_loaded_in(
            ctx, conn, stored, 1, holders[alice.pid, "b"], HOUR, now
        )
        again, none = deliver_loaded_in(ctx, conn, stored, 1, holders[alice.pid, "b"], HOUR, now)
        # carol has no grant on b: refused by both paths alike
        with pytest.raises(AuthorizationError) as by_loaded:
            deliver_loaded_in(ctx, conn, stored, 1, holders[carol.pid, "b"], HOUR, now)
        with pytest.raises(AuthorizationError) as by_plain:
            deliver_in(ctx, conn, "b", 1, carol.pid, HOUR, now)
        assert str(by_loaded.value) == str(by_plain.value)
        with pytest.raises(KeybrokerError):  # a holder read for another keyset
            deliver_loaded_in(ctx, conn, stored, 1, holders[alice.pid, "c"], HOUR, now)
    assert again == loaded and none == []  # asking twice returns the delivery on its way
    assert _envelope_shape(plain)[0] == _envelope_shape(loaded)[0] == str(alice.pid)
    assert [type(e).__name__ for e in plain_events] == [type(e).__name__ for e in loaded_events]
    (fetched_a, fetched_b) = sorted(broker.fetch_deliveries(alice.pid), key=lambda e: e.keyset)
    assert fetched_a == plain and fetched_b == loaded
    _, proof = alice.receive(fetched_b, broker.ca_certificate, "aead")
    assert broker.ack(fetched_b.delivery_id, alice.pid, proof).state == "acked"
    assert PrincipalId.parse(fetched_b.recipient) == alice.pid
