"""The orchestrator over the real broker, with in-process agents and a clock the test moves."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import timedelta

import pytest

from keybroker.broker.events import decode_event
from keybroker.errors import Conflict, KeysetError
from keybroker.flows.rotation import orchestrator as orchestrator_module
from keybroker.flows.rotation.messages import LinkStepped, decode_rotation_event
from keybroker.flows.rotation.protocol import LinkState, RolloutPolicy
from keybroker.flows.rotation.simulation import Faults, Fleet, star_topology

from .conftest import Bench

POLICY = RolloutPolicy(
    ack_timeout_ms=10_000,
    max_attempts=2,
    backoff_base_ms=1_000,
    backoff_cap_ms=2_000,
    grace_ms=5_000,
)


def _fleet(rig: Bench, sites: int = 4) -> Fleet:
    fleet = Fleet(rig.broker, star_topology("t", 2, sites))
    fleet.provision()
    return fleet


def _run(fleet: Fleet, rig: Bench, faults: Faults | None = None, rounds: int = 40) -> None:
    for _ in range(rounds):
        fleet.pump(faults)
        rig.clock.advance(timedelta(seconds=1))


def test_every_link_rotates_and_retires_its_old_key(rig: Bench) -> None:
    fleet = _fleet(rig)
    rollout = fleet.orchestrator.start(fleet.topology, POLICY)
    _run(fleet, rig)
    status = fleet.orchestrator.status(rollout)
    assert status.state == "COMPLETED" and status.finished
    for link, info in zip(fleet.topology.links, status.links, strict=True):
        assert info.state is LinkState.RETIRED_OLD
        node, site = fleet.ends(link)
        assert node.transmit_version(link.keyset) == info.new_version == 2
        assert not site.holds(link.keyset, 1) and not node.holds(link.keyset, 1)
        assert site.open(link.keyset, node.seal(link.keyset, b"hello")) == b"hello"


def test_a_site_that_is_down_keeps_its_link_on_the_old_key(rig: Bench) -> None:
    fleet = _fleet(rig)
    down = fleet.topology.links[1]
    rollout = fleet.orchestrator.start(fleet.topology, POLICY)
    _run(fleet, rig, Faults(down={down.downstream}))
    status = fleet.orchestrator.status(rollout)
    by_name = {link.name: link for link in status.links}
    failed = by_name[down.name]
    assert failed.state is LinkState.FAILED_KEEP_OLD
    assert failed.version_in_use == 1 and "attempts" in (failed.reason or "")
    node, site = fleet.ends(down)
    assert not node.holds(down.keyset, 2)
    assert node.transmit_version(down.keyset) == 1
    assert site.open(down.keyset, node.seal(down.keyset, b"still")) == b"still"
    # The withdrawn version is disabled: nobody can be delivered it any more.
    with pytest.raises(KeysetError):
        rig.broker.deliver(down.keyset, 2, down.upstream, timedelta(minutes=1))
    others = [link for link in status.links if link.name != down.name]
    assert all(link.state is LinkState.RETIRED_OLD for link in others)

    # The site comes back; retry completes the link with a fresh version.
    fleet.orchestrator.retry(rollout)
    _run(fleet, rig)
    retried = {link.name: link for link in fleet.orchestrator.status(rollout).links}[down.name]
    assert retried.state is LinkState.RETIRED_OLD and retried.new_version == 3
    assert node.transmit_version(down.keyset) == 3


def test_a_wrong_proof_never_reaches_the_upstream_node(rig: Bench) -> None:
    fleet = _fleet(rig, sites=2)
    bad = fleet.topology.links[0]
    rollout = fleet.orchestrator.start(fleet.topology, POLICY)
    _run(fleet, rig, Faults(bad_proof={bad.downstream}))
    link = {x.name: x for x in fleet.orchestrator.status(rollout).links}[bad.name]
    assert link.state is LinkState.FAILED_KEEP_OLD
    node, _ = fleet.ends(bad)
    assert not node.holds(bad.keyset, 2)


def test_lost_acks_are_retried_and_succeed(rig: Bench) -> None:
    fleet = _fleet(rig, sites=2)
    lossy = fleet.topology.links[0]
    rollout = fleet.orchestrator.start(
        fleet.topology,
        RolloutPolicy(
            ack_timeout_ms=3_000,
            max_attempts=3,
            backoff_base_ms=1_000,
            backoff_cap_ms=1_000,
            grace_ms=2_000,
        ),
    )
    for _ in range(5):  # the first delivery's ack is lost, then it times out
        fleet.pump(Faults(ack_lost={lossy.downstream}))
        rig.clock.advance(timedelta(seconds=1))
    _run(fleet, rig)
    link = {x.name: x for x in fleet.orchestrator.status(rollout).links}[lossy.name]
    assert link.state is LinkState.RETIRED_OLD


def test_the_log_replays_every_link_step_once_in_order(rig: Bench) -> None:
    fleet = _fleet(rig, sites=3)
    start = rig.home.log.size()
    rollout = fleet.orchestrator.start(fleet.topology, POLICY)
    _run(fleet, rig, Faults(down={fleet.topology.links[0].downstream}))
    steps: dict[str, list[LinkStepped]] = {}
    for entry in rig.home.log.entries(start, rig.home.log.size()):
        try:
            event = decode_rotation_event(entry)
        except Exception:
            decode_event(entry)  # everything else is a broker event
            continue
        if isinstance(event, LinkStepped) and event.rollout_id == rollout:
            steps.setdefault(event.link, []).append(event)
    assert set(steps) == {link.name for link in fleet.topology.links}
    for events in steps.values():
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        for before, after in itertools.pairwise(events):
            assert after.from_state == before.to_state
        assert events[-1].to_state in ("RETIRED_OLD", "FAILED_KEEP_OLD")


def test_abort_leaves_unfinished_links_on_their_old_key(rig: Bench) -> None:
    fleet = _fleet(rig, sites=3)
    slow = fleet.topology.links[2]
    rollout = fleet.orchestrator.start(fleet.topology, POLICY)
    for _ in range(3):
        fleet.pump(Faults(down={slow.downstream}))
        rig.clock.advance(timedelta(seconds=1))
    status = fleet.orchestrator.abort(rollout)
    assert status.state == "ABORTED"
    aborted = {x.name: x for x in status.links}[slow.name]
    assert aborted.state is LinkState.ABORTED_KEEP_OLD and aborted.version_in_use == 1
    _run(fleet, rig)
    final = fleet.orchestrator.status(rollout)
    assert final.finished
    node, site = fleet.ends(slow)
    assert node.transmit_version(slow.keyset) == 1
    assert not node.holds(slow.keyset, 2) and not site.holds(slow.keyset, 2)
    assert site.open(slow.keyset, node.seal(slow.keyset, b"old")) == b"old"
    with pytest.raises(KeysetError):  # the withdrawn version can never be delivered
        rig.broker.deliver(slow.keyset, 2, slow.downstream, timedelta(minutes=1))
    with pytest.raises(Conflict):
        fleet.orchestrator.abort(rollout)


def test_a_second_rollout_over_busy_links_is_refused(rig: Bench) -> None:
    fleet = _fleet(rig, sites=2)
    fleet.orchestrator.start(fleet.topology, POLICY)
    with pytest.raises(Conflict):
        fleet.orchestrator.start(fleet.topology, POLICY)


def test_a_delivery_the_broker_refuses_fails_that_link_alone(rig: Bench) -> None:
    # The site lost its hold grant before the rollout: the broker refuses to deliver it
    # the new version. The batch is stepped without savepoints first, so this refusal
    # rolls it back and it is done again link by link; the other links must move as if
    # nothing happened, and the refused one must keep its old key.
    fleet = _fleet(rig)
    refused = fleet.topology.links[2]
    rig.broker.revoke_grant(refused.downstream, refused.keyset, "hold")
    rollout = fleet.orchestrator.start(fleet.topology, POLICY)
    _run(fleet, rig)
    status = fleet.orchestrator.status(rollout)
    by_name = {link.name: link for link in status.links}
    failed = by_name[refused.name]
    assert failed.state is LinkState.FAILED_KEEP_OLD
    assert failed.version_in_use == 1 and "grant" in (failed.reason or "")
    node, site = fleet.ends(refused)
    assert not node.holds(refused.keyset, 2) and not site.holds(refused.keyset, 2)
    assert site.open(refused.keyset, node.seal(refused.keyset, b"old")) == b"old"
    others = [link for link in status.links if link.name != refused.name]
    assert others and all(link.state is LinkState.RETIRED_OLD for link in others)
    # Each link's steps are in the log once each, in order: the rolled-back first pass
    # left nothing behind.
    seqs: dict[str, list[int]] = {}
    for entry in rig.home.log.entries(0, rig.home.log.size()):
        try:
            event = decode_rotation_event(entry)
        except Exception:
            continue
        if isinstance(event, LinkStepped) and event.rollout_id == rollout:
            seqs.setdefault(event.link, []).append(event.seq)
    assert set(seqs) == {link.name for link in fleet.topology.links}
    assert all(s == list(range(1, len(s) + 1)) for s in seqs.values())


def test_setup_in_batches_makes_each_keyset_grant_and_delivery_once(rig: Bench) -> None:
    # Batches of 2 links over 5: keysets and grants are made a batch per transaction.
    fleet = Fleet(rig.broker, star_topology("t", 2, 5), batch_size=2)
    for agent in fleet.agents.values():
        agent.enrol(rig.broker)
    first = fleet.topology.links[0]
    rig.broker.create_keyset(first.keyset, "AES256_GCM")
    rig.broker.grant(first.downstream, first.keyset, "hold")
    start = rig.home.log.size()
    report = fleet.orchestrator.setup(fleet.topology, delivery_ttl=timedelta(hours=1))
    assert (report.keysets_created, report.grants_created, report.deliveries) == (4, 9, 10)
    logged = Counter(
        type(decode_event(entry)).__name__
        for entry in rig.home.log.entries(start, rig.home.log.size())
    )
    assert logged == {"KeysetCreated": 4, "GrantCreated": 9, "DeliverySent": 10}
    grants = rig.broker.list_grants()
    assert len(grants) == 10
    assert {(str(g.principal), g.keyset) for g in grants} == {
        (str(end), link.keyset)
        for link in fleet.topology.links
        for end in (link.upstream, link.downstream)
    }
    fleet.receive_all()
    fleet.sync_all()
    for link in fleet.topology.links:
        node, site = fleet.ends(link)
        assert node.transmit_version(link.keyset) == site.transmit_version(link.keyset) == 1
        assert site.open(link.keyset, node.seal(link.keyset, b"m")) == b"m"
    again = fleet.orchestrator.setup(fleet.topology, delivery_ttl=timedelta(hours=1))
    assert (again.keysets_created, again.grants_created, again.deliveries) == (0, 0, 0)


def test_setup_counts_only_the_grants_it_made(rig: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another writer granted after setup looked (setup's read sees no grants at all):
    # that grant is found under the lock, neither doubled nor counted.
    fleet = Fleet(rig.broker, star_topology("t", 1, 2))
    for agent in fleet.agents.values():
        agent.enrol(rig.broker)
    first = fleet.topology.links[0]
    rig.broker.create_keyset(first.keyset, "AES256_GCM")
    rig.broker.grant(first.upstream, first.keyset, "hold")
    monkeypatch.setattr(orchestrator_module, "_holding", lambda conn, names: set())
    report = fleet.orchestrator.setup(fleet.topology, delivery_ttl=timedelta(hours=1))
    assert (report.keysets_created, report.grants_created) == (1, 3)
    assert len(rig.broker.list_grants()) == 4
