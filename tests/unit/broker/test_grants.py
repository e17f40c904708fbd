from __future__ import annotations

import pytest
from broker_kit import World

from keybroker.broker import GrantMode
from keybroker.broker.events import GrantCreated, GrantRevoked
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
