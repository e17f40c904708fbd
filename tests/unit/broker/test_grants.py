from __future__ import annotations

from typing import Any

import pytest
from broker_kit import World

from keybroker.broker import GrantMode
from keybroker.broker._context import record
from keybroker.broker.events import Event, GrantCreated, GrantRevoked
from keybroker.broker.grants import grant_many_in
from keybroker.errors import AuthorizationError, DecodeError, NotFound
from keybroker.keys import AES256_GCM


def test_granting_is_idempotent_and_logged_once(world: World) -> None:
    broker = world.broker
    alice = world.enrolled("site/fra1")
    broker.create_keyset("k", AES256_GCM)
    start = world.log_size()

    first = broker.grant(alice.pid, "k", "hold")
    before, size = world.dump(), world.log_size()
    again = broker.grant(str(alice.pid), "k", GrantMode.HOLD)
    assert again == first
    assert world.dump() == before and world.log_size() == size

    use = broker.grant(alice.pid, "k", "use")
    assert use.grant_id != first.grant_id and use.mode is GrantMode.USE
    assert {g.mode for g in broker.list_grants(principal=alice.pid)} == {
        GrantMode.USE,
        GrantMode.HOLD,
    }
    created = world.events_since(start)
    assert [type(e) for e in created] == [GrantCreated, GrantCreated]
    assert isinstance(created[0], GrantCreated) and created[0].grant_id == first.grant_id


def test_revoking_a_grant_ends_it_and_logs_it(world: World) -> None:
    broker = world.broker
    alice = world.enrolled("site/fra1")
    broker.create_keyset("k", AES256_GCM)
    granted = broker.grant(alice.pid, "k", "hold")
    start = world.log_size()

    revoked = broker.revoke_grant(alice.pid, "k", "hold")
    assert revoked.grant_id == granted.grant_id and revoked.revoked_at == world.clock.now
    assert broker.list_grants(keyset="k") == []
    assert broker.list_grants(keyset="k", include_revoked=True) == [revoked]
    (event,) = world.events_since(start)
    assert isinstance(event, GrantRevoked) and event.grant_id == granted.grant_id

    before, size = world.dump(), world.log_size()
    with pytest.raises(NotFound):
        broker.revoke_grant(alice.pid, "k", "hold")
    assert world.dump() == before and world.log_size() == size
    assert broker.grant(alice.pid, "k", "hold").grant_id != granted.grant_id


def test_bad_grants_are_refused_and_change_nothing(world: World) -> None:
    broker = world.broker
    alice = world.enrolled("site/fra1")
    broker.create_keyset("k", AES256_GCM)
    before, size = world.dump(), world.log_size()
    with pytest.raises(DecodeError):
        broker.grant(alice.pid, "k", "own")
    with pytest.raises(NotFound):
        broker.grant("site/nobody", "k", "hold")
    with pytest.raises(NotFound):
        broker.grant(alice.pid, "missing", "hold")
    assert world.dump() == before and world.log_size() == size
    broker.revoke_principal(alice.pid)
    before, size = world.dump(), world.log_size()
    with pytest.raises(AuthorizationError):
        broker.grant(alice.pid, "k", "hold")
    assert world.dump() == before and world.log_size() == size


def _grant_many(world: World, pairs: list[tuple[Any, str]], mode: str = "hold") -> list[Event]:
    ctx = world.broker.context
    with ctx.store.transaction() as conn:
        events = grant_many_in(ctx, conn, pairs, mode, now=world.clock.now)
        record(ctx, conn, events)
    return events


def test_many_grants_at_once_are_what_one_at_a_time_would_make(world: World) -> None:
    broker = world.broker
    alice, bob = world.enrolled("site/fra1"), world.enrolled("node/up1")
    for name in ("k1", "k2", "k3"):
        broker.create_keyset(name, AES256_GCM)
    first = broker.grant(alice.pid, "k1", "hold")
    start = world.log_size()

    pairs = [(alice.pid, "k1"), (alice.pid, "k2"), (str(bob.pid), "k1"), (bob.pid, "k3")]
    events = _grant_many(world, [*pairs, (alice.pid, "k2")])  # a pair twice: one grant
    made = {(e.principal, e.keyset) for e in events if isinstance(e, GrantCreated)}
    assert made == {(str(alice.pid), "k2"), (str(bob.pid), "k1"), (str(bob.pid), "k3")}
    assert world.events_since(start) == events  # logged, once each
    held = {(str(g.principal), g.keyset, g.mode) for g in broker.list_grants()}
    assert held == {(str(p), k, GrantMode.HOLD) for p, k in pairs}
    # The grant already there is kept, not doubled; granting again changes nothing.
    assert [g.grant_id for g in broker.list_grants(keyset="k1", principal=alice.pid)] == [
        first.grant_id
    ]
    before, size = world.dump(), world.log_size()
    assert _grant_many(world, pairs) == []
    assert world.dump() == before and world.log_size() == size
    assert broker.grant(bob.pid, "k3", "hold").grant_id == next(
        e.grant_id for e in events if isinstance(e, GrantCreated) and e.keyset == "k3"
    )


def test_many_grants_with_one_bad_pair_make_none(world: World) -> None:
    broker = world.broker
    alice, bob = world.enrolled("site/fra1"), world.enrolled("node/up1")
    broker.create_keyset("k", AES256_GCM)
    before, size = world.dump(), world.log_size()
    good = (alice.pid, "k")
    with pytest.raises(NotFound, match="nobody"):
        _grant_many(world, [good, ("site/nobody", "k")])
    with pytest.raises(NotFound, match="missing"):
        _grant_many(world, [good, (bob.pid, "missing")])
    with pytest.raises(DecodeError):
        _grant_many(world, [good], mode="own")
    assert world.dump() == before and world.log_size() == size
    broker.revoke_principal(bob.pid)
    before, size = world.dump(), world.log_size()
    with pytest.raises(AuthorizationError):
        _grant_many(world, [good, (bob.pid, "k")])
    assert world.dump() == before and world.log_size() == size
