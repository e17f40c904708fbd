from __future__ import annotations

from datetime import timedelta

import pytest
from broker_kit import World

from keybroker.broker.events import (
    KeyDestroyed,
    KeyDisabled,
    KeyEnabled,
    KeyPromoted,
    KeysetCreated,
    KeyVersionAdded,
)
from keybroker.broker.home import CA_KEYSET, LOG_KEYSET
from keybroker.errors import Conflict, KeysetError, KeyStateError, NotFound, RemoteProtocolError
from keybroker.keys import AES256_GCM, ED25519

HOUR = timedelta(hours=1)


def test_a_keyset_lifecycle_is_applied_and_logged_step_by_step(world: World) -> None:
    broker = world.broker
    start = world.log_size()
    v1 = broker.create_keyset("site/fra1/restore", AES256_GCM)
    v2 = broker.rotate_keyset("site/fra1/restore")
    assert (v1.version, v1.state.value) == (1, "primary")
    assert (v2.version, v2.state.value) == (2, "pending")
    broker.promote_version("site/fra1/restore", 2)
    broker.disable_version("site/fra1/restore", 1)
    broker.enable_version("site/fra1/restore", 1)
    broker.disable_version("site/fra1/restore", 1)
    broker.destroy_version("site/fra1/restore", 1)

    shown = broker.show_keyset("site/fra1/restore")
    assert shown.purpose == "aead" and shown.primary == 2
    assert [(v.version, v.state) for v in shown.versions] == [(1, "destroyed"), (2, "primary")]
    assert all(v.public_key is None for v in shown.versions)  # symmetric: nothing public
    assert shown.revision == 7

    events = world.events_since(start)
    assert [type(e) for e in events] == [
        KeysetCreated,
        KeyVersionAdded,
        KeyPromoted,
        KeyDisabled,
        KeyEnabled,
        KeyDisabled,
        KeyDestroyed,
    ]
    promoted = events[2]
    assert isinstance(promoted, KeyPromoted)
    assert (promoted.version, promoted.previous_primary, promoted.key_id) == (2, 1, v2.key_id)
    # The store agrees with the log: version 1's material is gone.
    stored = world.home.keysets.load("site/fra1/restore").keyset
    with pytest.raises(KeysetError):
        stored.prove_possession(1, b"c")


def test_listing_shows_public_facts_and_hides_the_brokers_own_keys(world: World) -> None:
    broker = world.broker
    broker.create_keyset("b", ED25519)
    broker.create_keyset("a", AES256_GCM)
    listed = broker.list_keysets()
    assert [k.name for k in listed] == ["a", "b"]
    (version,) = listed[1].versions
    assert version.template == "ED25519" and version.public_key is not None
    assert len(version.public_key) == 32


@pytest.mark.parametrize("name", [CA_KEYSET, LOG_KEYSET, "keybroker/new"])
def test_the_brokers_own_keysets_are_out_of_reach(world: World, name: str) -> None:
    broker = world.broker
    before, size = world.dump(), world.log_size()
    with pytest.raises(RemoteProtocolError):
        broker.create_keyset(name, AES256_GCM)
    with pytest.raises(RemoteProtocolError):
        broker.rotate_keyset(name)
    with pytest.raises(RemoteProtocolError):
        broker.show_keyset(name)
    with pytest.raises(RemoteProtocolError):
        broker.grant("site/fra1", name, "hold")
    with pytest.raises(RemoteProtocolError):
        broker.deliver(name, 1, "site/fra1", HOUR)
    assert world.dump() == before and world.log_size() == size


def test_forbidden_steps_change_nothing(world: World) -> None:
    broker = world.broker
    broker.create_keyset("k", AES256_GCM)
    before, size = world.dump(), world.log_size()
    with pytest.raises(KeyStateError):
        broker.destroy_version("k", 1)  # the primary: never destroyed
    with pytest.raises(KeyStateError):
        broker.disable_version("k", 1)
    with pytest.raises(KeysetError):
        broker.promote_version("k", 9)
    with pytest.raises(NotFound):
        broker.rotate_keyset("nope")
    with pytest.raises(Conflict):
        broker.create_keyset("k", AES256_GCM)
    assert world.dump() == before and world.log_size() == size


def test_a_concurrent_change_surfaces_as_conflict_and_logs_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = world.broker
    broker.create_keyset("k", AES256_GCM)
    repo = world.home.keysets
    stale = repo.load("k")  # what a second replica read before the rotation below
    broker.rotate_keyset("k")
    before, size = world.dump(), world.log_size()
    monkeypatch.setattr(repo, "load", lambda name, conn=None: stale)
    with pytest.raises(Conflict):
        broker.rotate_keyset("k")
    assert world.dump() == before and world.log_size() == size
