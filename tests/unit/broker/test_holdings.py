"""What a principal holds, as the broker tells it: exactly its active hold grants, with each
version's state, and nothing secret."""

from __future__ import annotations

import pytest
from broker_kit import World

from keybroker.broker.holdings import HeldVersion, Holding
from keybroker.errors import NotFound
from keybroker.keys import AES256_GCM, HMAC_SHA256


def test_a_principal_sees_exactly_the_keysets_it_holds(world: World) -> None:
    broker = world.broker
    site = world.enrolled("site/fra1")
    other = world.enrolled("node/up1-a")
    for name in ("rotation/up1-a/fra1", "rotation/up1-b/fra1", "other/mac"):
        broker.create_keyset(name, HMAC_SHA256 if name == "other/mac" else AES256_GCM)
    broker.create_keyset("never/granted", AES256_GCM)
    broker.grant(site.pid, "rotation/up1-a/fra1", "hold")
    broker.grant(site.pid, "other/mac", "hold")
    # A use grant is not a holding, and another principal's hold is not ours.
    broker.grant(site.pid, "rotation/up1-b/fra1", "use")
    broker.grant(other.pid, "rotation/up1-b/fra1", "hold")

    before, size = world.dump(), world.log_size()
    found = broker.holdings(site.pid)
    assert world.dump() == before and world.log_size() == size  # a pure read

    assert [h.name for h in found] == ["other/mac", "rotation/up1-a/fra1"]
    link = found[1]
    stored = broker.show_keyset("rotation/up1-a/fra1")
    assert link == Holding(
        name="rotation/up1-a/fra1",
        purpose="aead",
        primary=1,
        versions=(HeldVersion(1, stored.versions[0].key_id, "primary"),),
    )
    assert found[0].purpose == "mac"
    assert [h.name for h in broker.holdings(str(other.pid))] == ["rotation/up1-b/fra1"]
    assert broker.holdings(world.enrolled("site/empty").pid) == []


def test_holdings_follow_rotation_and_retirement(world: World) -> None:
    broker = world.broker
    site = world.enrolled("site/fra1")
    broker.create_keyset("link", AES256_GCM)
    broker.grant(site.pid, "link", "hold")

    broker.rotate_keyset("link")
    (held,) = broker.holdings(site.pid)
    assert held.primary == 1
    assert [(v.version, v.state) for v in held.versions] == [(1, "primary"), (2, "pending")]

    broker.promote_version("link", 2)
    broker.disable_version("link", 1)
    (held,) = broker.holdings(site.pid)
    assert held.primary == 2
    assert [(v.version, v.state) for v in held.versions] == [(1, "disabled"), (2, "primary")]
    broker.destroy_version("link", 1)
    (held,) = broker.holdings(site.pid)
    assert held.versions[0].state == "destroyed"
    keys = {v.version: v.key_id for v in broker.show_keyset("link").versions}
    assert {v.version: v.key_id for v in held.versions} == keys


def test_a_revoked_hold_grant_is_no_longer_a_holding(world: World) -> None:
    broker = world.broker
    site = world.enrolled("site/fra1")
    broker.create_keyset("a", AES256_GCM)
    broker.create_keyset("b", AES256_GCM)
    broker.grant(site.pid, "a", "hold")
    broker.grant(site.pid, "b", "hold")
    broker.revoke_grant(site.pid, "a", "hold")
    assert [h.name for h in broker.holdings(site.pid)] == ["b"]
    broker.grant(site.pid, "a", "hold")  # granted again: held again
    assert [h.name for h in broker.holdings(site.pid)] == ["a", "b"]


def test_an_unknown_principal_has_no_holdings_to_show(world: World) -> None:
    with pytest.raises(NotFound):
        world.broker.holdings("site/nobody")
