"""The rotation agent in-process against a real app (SQLite and PostgreSQL): it installs and
saves before it acks, retires what the broker disabled, survives restarts and broker errors,
and fetches at once on a bus wake-up."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agent_kit import eventually, read_json
from api_kit import Clock, Env, RecordingTransport, make_env

from keybroker.api import ApiSettings, create_admin_credential, create_app
from keybroker.broker import Broker
from keybroker.broker.home import init_home
from keybroker.bus import Bus, MemoryBus
from keybroker.client.keyring import KekSource, Keyring
from keybroker.client.principal import Delivery, PrincipalClient
from keybroker.errors import ConfigurationError, CryptoError, KeybrokerError, TransportError
from keybroker.flows.rotation.agent import Backoff, RotationAgent, durable_name
from keybroker.keys import SECRET_ACCESS

LINK = "rotation/n1/s1"
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@pytest.fixture
async def agent_env(tmp_path: Path, store_url: str) -> AsyncIterator[Env]:
    clock = Clock(T0)
    home = init_home(tmp_path / "home", db_url=store_url, clock=clock)
    made = make_env(home, clock, tmp_path)
    try:
        yield made
    finally:
        await made.aclose()
        home.close()


@pytest.fixture
async def slow_env(tmp_path: Path, sqlite_url: str) -> AsyncIterator[Env]:
    """A broker whose long-polls look at the database only every 10 minutes."""
    clock = Clock(T0)
    home = init_home(tmp_path / "home", db_url=sqlite_url, clock=clock)
    broker = Broker.from_home(home)
    app = create_app(broker, ApiSettings(clock=clock, poll_interval_seconds=600))
    token = create_admin_credential(home.store, now=clock())
    made = Env(home, broker, app, clock, token, tmp_path, RecordingTransport(app))
    try:
        yield made
    finally:
        await made.aclose()
        home.close()


class Principal:
    """An enrolled principal: its client, keyring path and KEK."""

    def __init__(self, client: PrincipalClient, path: Path, source: KekSource) -> None:
        self.client, self.path, self.source = client, path, source

    def on_disk(self) -> list[int]:
        held = Keyring.load(self.path, self.source).received.get(LINK)
        return [] if held is None else [v.version for v in held.versions]


async def enrolled(env: Env, name: str) -> Principal:
    kek = env.kek()
    client = await env.enrolled(name, kek=kek)
    return Principal(client, env.tmp / (name.replace("/", "_") + ".keyring"), KekSource(kek=kek))


async def link_env(env: Env) -> tuple[Principal, Principal]:
    site, node = await enrolled(env, "site/s1"), await enrolled(env, "node/n1")
    op = env.operator()
    await op.create_keyset(LINK, "AES256_GCM")
    for who in ("site/s1", "node/n1"):
        await op.grant(who, LINK, "hold")
    return site, node


class Running:
    """An agent running as a task, stopped by :meth:`stop`."""

    def __init__(self, agent: RotationAgent) -> None:
        self.agent = agent
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(agent.run(self.stop_event))

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 15)


def long_poll_parked(env: Env) -> bool:
    """A long-poll has read the empty inbox and waits (on the API's in-process waker)."""
    return bool(env.app.state.keybroker.waker.current()._waiters)


async def acked(env: Env, delivery_id: str) -> bool:
    return (await env.operator().show_delivery(delivery_id)).state == "acked"


async def test_the_agent_installs_acks_and_retires(agent_env: Env, tmp_path: Path) -> None:
    env, op = agent_env, agent_env.operator()
    site, node = await link_env(env)
    acks: list[tuple[str, list[int]]] = []
    for who in (site, node):
        real_ack = who.client.ack

        async def checking_ack(
            delivery: Delivery, who: Principal = who, real: Any = real_ack
        ) -> Any:
            # The keyring on disk already holds what is being acknowledged.
            acks.append((str(who.client.principal), who.on_disk()))
            assert delivery.version in who.on_disk()
            return await real(delivery)

        who.client.ack = checking_ack  # type: ignore[method-assign]

    agents = [
        Running(
            RotationAgent(
                who.client, wait=2, sync_interval=0.1, status_file=tmp_path / f"{name}.json"
            )
        )
        for who, name in ((site, "site"), (node, "node"))
    ]
    try:
        first = [await op.deliver(LINK, 1, p) for p in ("site/s1", "node/n1")]
        for d in first:
            await eventually(lambda d=d: acked(env, d.delivery_id), what="v1 acked")
        assert site.on_disk() == node.on_disk() == [1]

        await op.rotate_keyset(LINK)
        to_site = await op.deliver(LINK, 2, "site/s1")
        await eventually(lambda: acked(env, to_site.delivery_id), what="v2 acked by the site")
        assert site.on_disk() == [1, 2] and node.on_disk() == [1]
        to_node = await op.deliver(LINK, 2, "node/n1")
        await eventually(lambda: acked(env, to_node.delivery_id), what="v2 acked by the node")
        assert node.on_disk() == [1, 2]

        await op.promote_version(LINK, 2)
        await op.disable_version(LINK, 1)
        for name in ("site", "node"):
            await eventually(
                lambda name=name: (
                    (read_json(tmp_path / f"{name}.json") or {}).get("installed") == {LINK: [2]}
                ),
                what=f"the {name} retiring v1",
            )
        assert site.on_disk() == node.on_disk() == [2]
        # What it kept is the broker's v2.
        theirs = env.home.keysets.load(LINK).keyset
        ours = Keyring.load(site.path, site.source).data_aead(LINK)
        assert ours.decrypt(theirs.aead().encrypt(b"m", b"ad"), b"ad") == b"m"
    finally:
        for running in agents:
            await running.stop()

    assert [a for a in acks if a[0] == "site/s1"] == [("site/s1", [1]), ("site/s1", [1, 2])]
    status = read_json(tmp_path / "site.json")
    assert status is not None
    assert status["principal"] == "site/s1"
    assert status["installed"] == {LINK: [2]}
    assert status["retired"] == {LINK: [1]}
    assert status["acked"] == 2 and status["last_ack"]["delivery_id"] == to_site.delivery_id
    assert status["last_ack"]["version"] == 2 and status["last_sync"] is not None
    assert status["versions"][LINK][0]["state"] == "primary"  # mirrored from the broker
    secret = theirs.export_secret_material(2, SECRET_ACCESS)
    text = (tmp_path / "site.json").read_bytes()
    assert secret.hex().encode() not in text and secret not in text


async def test_an_unacked_delivery_survives_a_restart_and_installs_once(
    agent_env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env, op = agent_env, agent_env.operator()
    site, _ = await link_env(env)
    delivery = await op.deliver(LINK, 1, "site/s1")

    async def broker_unreachable(_delivery: Delivery) -> Any:
        raise TransportError("POST /ack: ConnectError")

    site.client.ack = broker_unreachable  # type: ignore[method-assign]
    first = Running(RotationAgent(site.client, wait=1, sync_interval=5, max_backoff=0.2))
    await eventually(lambda: site.on_disk() == [1], what="v1 installed")
    await asyncio.sleep(0.5)  # it retries the ack, installing again changes nothing
    await first.stop()
    assert not await acked(env, delivery.delivery_id)
    assert "retrying" in caplog.text

    # "Restarted": a new client from the keyring on disk; the delivery comes again.
    restarted = PrincipalClient.open(
        site.path, kek=site.source._kek, transport=env.transport, clock=env.clock
    )
    env.clients.append(restarted)
    second = Running(RotationAgent(restarted, wait=1, sync_interval=5))
    try:
        await eventually(lambda: acked(env, delivery.delivery_id), what="the ack after restart")
    finally:
        await second.stop()
    assert site.on_disk() == [1]


async def test_broker_errors_back_off_and_do_not_stop_the_agent(agent_env: Env) -> None:
    env, op = agent_env, agent_env.operator()
    site, _ = await link_env(env)
    calls = {"fetch": 0, "holdings": 0}
    real_fetch, real_holdings = site.client.fetch_deliveries, site.client.holdings

    async def flaky_fetch(wait: float = 0) -> list[Delivery]:
        calls["fetch"] += 1
        if calls["fetch"] <= 3:
            raise TransportError("GET /v1/deliveries: ConnectError")
        return await real_fetch(wait)

    async def flaky_holdings() -> Any:
        calls["holdings"] += 1
        if calls["holdings"] <= 3:
            raise TransportError("GET /v1/holdings: ReadTimeout")
        return await real_holdings()

    site.client.fetch_deliveries = flaky_fetch  # type: ignore[method-assign]
    site.client.holdings = flaky_holdings  # type: ignore[method-assign]
    running = Running(RotationAgent(site.client, wait=1, sync_interval=0.05, max_backoff=0.2))
    try:
        delivery = await op.deliver(LINK, 1, "site/s1")
        await eventually(lambda: acked(env, delivery.delivery_id), what="ack despite errors")
        await op.rotate_keyset(LINK)
        await op.deliver(LINK, 2, "site/s1")
        await eventually(lambda: site.on_disk() == [1, 2])
        await op.promote_version(LINK, 2)
        await op.disable_version(LINK, 1)
        await eventually(lambda: site.on_disk() == [2], what="v1 retired despite errors")
        assert not running.task.done()
    finally:
        await running.stop()
    assert calls["fetch"] > 3 and calls["holdings"] > 3
    assert running.agent.status.last_error is not None


def test_backoff_grows_to_its_bound_and_resets() -> None:
    backoff = Backoff(initial=0.5, maximum=4.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next() == 0.5
    with pytest.raises(ValueError):
        Backoff(initial=0, maximum=1)


async def test_a_delivery_it_cannot_open_is_refused_and_not_spun_on(
    agent_env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env, op = agent_env, agent_env.operator()
    site, _ = await link_env(env)
    delivery = await op.deliver(LINK, 1, "site/s1")
    fetches = 0
    real_fetch = site.client.fetch_deliveries

    def forged(_delivery: Delivery) -> Any:
        raise CryptoError()

    async def counting_fetch(wait: float = 0) -> list[Delivery]:
        nonlocal fetches
        fetches += 1
        return await real_fetch(wait)

    site.client.open_delivery = forged  # type: ignore[method-assign]
    site.client.fetch_deliveries = counting_fetch  # type: ignore[method-assign]
    running = Running(RotationAgent(site.client, wait=5, sync_interval=5))
    await asyncio.sleep(1.0)
    await running.stop()
    assert fetches <= 2  # it waited instead of asking again and again
    assert running.agent.status.refused == [delivery.delivery_id]
    assert (await op.show_delivery(delivery.delivery_id)).state == "sent"
    assert f"refused {LINK} v1 (delivery {delivery.delivery_id})" in caplog.text


async def test_a_bus_wake_up_fetches_at_once(slow_env: Env) -> None:
    env = slow_env
    site, _ = await link_env(env)
    bus = MemoryBus()
    opened: list[str] = []

    async def opener(url: str) -> Bus:
        opened.append(url)
        return bus

    agent = RotationAgent(
        site.client, wait=30, sync_interval=5, bus_url="memory://", bus_opener=opener
    )
    running = Running(agent)
    try:
        await eventually(lambda: agent.status.bus == "connected", what="the bus subscription")
        await eventually(lambda: long_poll_parked(env), what="the long-poll waiting")
        # Made behind the API's back: no long-poll in this process is woken, and the
        # broker looks at its database only every 10 minutes. Only the bus can tell.
        envelope = env.broker.deliver(LINK, 1, "site/s1", timedelta(hours=1))
        await asyncio.sleep(0.3)
        assert not await acked(env, envelope.delivery_id)
        await bus.publish("kb.wake", b"1")
        await eventually(lambda: acked(env, envelope.delivery_id), timeout=5, what="the wake-up")
    finally:
        await running.stop()
    assert opened == ["memory://"]


async def test_the_durable_name_is_stable_and_reveals_no_name(agent_env: Env) -> None:
    site, node = await link_env(agent_env)
    name = durable_name(site.client.keyring.certificate_pem)
    assert name == durable_name(site.client.keyring.certificate_pem)
    assert name != durable_name(node.client.keyring.certificate_pem)
    assert name.startswith("kbagent-") and "s1" not in name.removeprefix("kbagent-")
    assert RotationAgent(site.client).durable == name


async def test_a_failed_save_leaves_the_keyring_as_the_file_has_it(
    agent_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, op = agent_env, agent_env.operator()
    site, _ = await link_env(env)
    await op.deliver(LINK, 1, "site/s1")
    await RotationAgent(site.client).receive_once(wait=5)
    assert site.on_disk() == [1]

    def disk_full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Keyring, "save", disk_full)
    with pytest.raises(OSError):
        site.client.forget_version(LINK, 1)
    monkeypatch.undo()
    assert [v.version for v in site.client.keyring.received[LINK].versions] == [1]
    assert site.client.forget_version(LINK, 1) is True
    assert site.on_disk() == [] and site.client.forget_version(LINK, 1) is False


async def test_logs_say_what_happened_and_never_key_bytes(
    agent_env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env, op = agent_env, agent_env.operator()
    site, _ = await link_env(env)
    delivery = await op.deliver(LINK, 1, "site/s1")
    agent = RotationAgent(site.client)
    assert await agent.receive_once(wait=5) == 1
    await op.rotate_keyset(LINK)
    await op.promote_version(LINK, 2)
    await op.disable_version(LINK, 1)
    assert await agent.sync_once() == [(LINK, 1)]
    text = caplog.text
    assert f"installed {LINK} v1 (delivery {delivery.delivery_id})" in text
    assert f"acked {LINK} v1" in text and f"retired {LINK} v1" in text
    secret = env.home.keysets.load(LINK).keyset.export_secret_material(1, SECRET_ACCESS)
    for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)):
        assert form not in text


NATS_URL = os.environ.get("KEYBROKER_TEST_NATS_URL", "nats://127.0.0.1:4222")


async def test_nats_wake_ups_reach_a_durable_jetstream_consumer(
    slow_env: Env, require: Callable[[str], None]
) -> None:
    from keybroker.bus.natsbus import NatsBus

    env = slow_env
    try:
        probe = await NatsBus.connect(NATS_URL, connect_timeout=2)
    except KeybrokerError:
        require(f"NATS with JetStream at {NATS_URL}")
        return
    site, _ = await link_env(env)
    topic = f"kb.wake{secrets.token_hex(4)}"
    agent = RotationAgent(
        site.client,
        wait=30,
        sync_interval=5,
        bus_url=NATS_URL,
        wake_topic=topic,
        # A wake-up handed to a pull request the stopped agent left behind comes back
        # after ack_wait; short here so the test need not wait the default 30 s.
        bus_options={"ack_wait": 1.0},
    )
    try:
        running = Running(agent)
        await eventually(lambda: agent.status.bus == "connected", what="the NATS subscription")
        await eventually(lambda: long_poll_parked(env), what="the long-poll waiting")
        info = await probe._js.consumer_info(probe.stream, agent.durable)
        assert info.config.durable_name == agent.durable
        assert info.config.filter_subject == topic

        envelope = env.broker.deliver(LINK, 1, "site/s1", timedelta(hours=1))
        await asyncio.sleep(0.3)
        assert not await acked(env, envelope.delivery_id)  # the long-poll alone would wait
        await probe.publish(topic, b"1")
        await eventually(lambda: acked(env, envelope.delivery_id), timeout=5, what="wake-up")
        await running.stop()

        # Down: a wake-up waits for it on the server, and is taken when it is back.
        await probe.publish(topic, b"1")
        info = await probe._js.consumer_info(probe.stream, agent.durable)
        assert info.num_pending + info.num_ack_pending == 1
        running = Running(agent)

        async def drained() -> bool:
            now = await probe._js.consumer_info(probe.stream, agent.durable)
            return bool(now.num_pending == 0 and now.num_ack_pending == 0)

        await eventually(drained, timeout=10, what="the stored wake-up taken")
        await running.stop()
    finally:
        with contextlib.suppress(Exception):
            await probe._js.delete_consumer(probe.stream, agent.durable)
        await probe.close()


async def test_an_unusable_bus_leaves_the_long_poll_working(agent_env: Env) -> None:
    env, op = agent_env, agent_env.operator()
    site, _ = await link_env(env)

    async def no_jetstream(url: str) -> Bus:
        raise ConfigurationError(f"NATS at {url} has no JetStream")

    agent = RotationAgent(
        site.client, wait=2, sync_interval=5, bus_url="nats://nowhere", bus_opener=no_jetstream
    )
    running = Running(agent)
    try:
        await eventually(lambda: agent.status.bus == "unusable", what="the bus given up")
        delivery = await op.deliver(LINK, 1, "site/s1")
        await eventually(lambda: acked(env, delivery.delivery_id), what="an ack by long-poll")
        assert not running.task.done()
    finally:
        await running.stop()
