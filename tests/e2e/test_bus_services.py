"""The bus contract against the machine's real services: NATS JetStream and Mosquitto.

The same contract also runs against MemoryBus, so the three cannot drift. Every
test uses its own topic prefix, NATS stream and MQTT client ids, and removes the
stream / persistent sessions it made. Services: ``KEYBROKER_TEST_NATS_URL``
(default nats://127.0.0.1:4222, JetStream on) and ``KEYBROKER_TEST_MQTT_URL``
(default mqtt://127.0.0.1:1883); under CI=true a missing one fails the test.
Absence of a message is shown with markers (publish X, then a marker; the
marker must come first), never by sleeping.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tests.conftest import missing

from keybroker.bus import MAX_PAYLOAD, Bus, BusMessage, MemoryBus, principal_topic
from keybroker.bus.mqttbus import MqttBus
from keybroker.bus.natsbus import NatsBus
from keybroker.errors import ConfigurationError, LocalProtocolError, TransportError

NATS_URL = os.environ.get("KEYBROKER_TEST_NATS_URL", "nats://127.0.0.1:4222")
MQTT_URL = os.environ.get("KEYBROKER_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
SALT = b"keybroker bus e2e topic salt 32b"
TIMEOUT = 10.0  # generous: only bounds a hung test, never asserted on


@dataclass
class Harness:
    """One test's slice of a bus server: unique prefix, stream, client ids."""

    kind: str
    prefix: str = field(default_factory=lambda: "kbt" + secrets.token_hex(5))
    shared: MemoryBus | None = None
    durables: set[str] = field(default_factory=set)
    buses: list[Bus] = field(default_factory=list)

    @property
    def stream(self) -> str:
        return self.prefix.upper()

    def topic(self, principal: str) -> str:
        return principal_topic(principal, SALT, prefix=self.prefix)

    def durable(self, name: str) -> str:
        self.durables.add(name)
        return name

    async def open(self, **options: Any) -> Bus:
        """A new connection to the test's bus (the memory bus is one shared instance)."""
        bus: Bus
        if self.kind == "memory":
            if self.shared is None:
                self.shared = MemoryBus()
            return self.shared
        if self.kind == "nats":
            options = {"stream": self.stream, "prefix": self.prefix, "ack_wait": 1.0} | options
            bus = await NatsBus.connect(NATS_URL, **options)
        else:
            url = urlsplit(MQTT_URL)
            options = {"client_id_prefix": self.prefix + "-", "session_expiry": 300} | options
            bus = await MqttBus.connect(url.hostname or "", url.port or 1883, **options)
        self.buses.append(bus)
        return bus

    async def cleanup(self) -> None:
        for bus in self.buses:
            await bus.close()
        if self.shared is not None:
            await self.shared.close()
        if self.kind == "nats":
            async with await NatsBus.connect(
                NATS_URL, stream=self.stream, prefix=self.prefix
            ) as bus:
                await bus.delete_stream()
        elif self.kind == "mqtt":
            for durable in self.durables:
                await end_mqtt_session(self.prefix + "-" + durable)


async def end_mqtt_session(client_id: str) -> None:
    """Connect with clean start and session expiry 0: Mosquitto forgets the session."""
    url = urlsplit(MQTT_URL)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0
    async with aiomqtt.Client(
        url.hostname or "",
        url.port or 1883,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=True,
        properties=properties,
    ):
        pass


_probed: dict[str, str | None] = {}


async def service_or_skip(kind: str) -> None:
    """Probe each service once per session; missing() skips, or fails under CI."""
    if kind not in _probed:
        try:
            if kind == "nats":
                bus: Bus = await NatsBus.connect(NATS_URL, stream="KBT_PROBE", prefix="kbtprobe")
                await bus.delete_stream()  # type: ignore[attr-defined]
            else:
                url = urlsplit(MQTT_URL)
                bus = await MqttBus.connect(url.hostname or "", url.port or 1883)
            await bus.close()
            _probed[kind] = None
        except (TransportError, ConfigurationError) as exc:
            _probed[kind] = str(exc)
    problem = _probed[kind]
    if problem is not None:
        what = f"NATS with JetStream at {NATS_URL}" if kind == "nats" else f"MQTT at {MQTT_URL}"
        missing(f"{what} ({problem})")


async def make_harness(kind: str) -> AsyncIterator[Harness]:
    if kind != "memory":
        await service_or_skip(kind)
    harness = Harness(kind)
    try:
        yield harness
    finally:
        await harness.cleanup()


@pytest.fixture(params=["memory", "nats", "mqtt"])
async def any_bus(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async for harness in make_harness(request.param):
        yield harness


@pytest.fixture(params=["nats", "mqtt"])
async def server_bus(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async for harness in make_harness(request.param):
        yield harness


@pytest.fixture
async def nats_bus() -> AsyncIterator[Harness]:
    async for harness in make_harness("nats"):
        yield harness


@pytest.fixture
async def mqtt_bus() -> AsyncIterator[Harness]:
    async for harness in make_harness("mqtt"):
        yield harness


def enum_text(value: object) -> str:
    return str(getattr(value, "value", value))


async def next_message(sub: Any) -> BusMessage:
    message: BusMessage = await asyncio.wait_for(anext(sub), TIMEOUT)
    return message


# ---------------------------------------------------------------------------
# The contract: memory, NATS and MQTT alike
# ---------------------------------------------------------------------------


async def test_round_trip(any_bus: Harness) -> None:
    bus = await any_bus.open()
    topic = any_bus.topic("device/alice-phone")
    async with bus.subscribe(topic) as sub:
        await bus.publish(topic, b"something waits")
        message = await next_message(sub)
    assert message.topic == topic
    assert message.payload == b"something waits"


async def test_topic_isolation(any_bus: Harness) -> None:
    bus = await any_bus.open()
    a, b = any_bus.topic("user/a"), any_bus.topic("user/b")
    async with bus.subscribe(a) as sub_a, bus.subscribe(b, durable=any_bus.durable("b")) as sub_b:
        await bus.publish(b, b"for b")
        await bus.publish(a, b"for a")
        got_a = await next_message(sub_a)
        got_b = await next_message(sub_b)
    assert (got_a.topic, got_a.payload) == (a, b"for a")  # b's message, sent first, never came
    assert (got_b.topic, got_b.payload) == (b, b"for b")


async def test_payload_bytes_preserved_exactly(any_bus: Harness) -> None:
    bus = await any_bus.open()
    topic = any_bus.topic("device/bytes")
    payloads = [
        b"",
        b"\x00",
        bytes(range(256)),
        b"\r\n\x00PUB kb.x 5\r\n",  # protocol-looking bytes are just bytes
        secrets.token_bytes(4096),
        secrets.token_bytes(MAX_PAYLOAD),
    ]
    async with bus.subscribe(topic, durable=any_bus.durable("bytes")) as sub:
        for payload in payloads:
            await bus.publish(topic, payload)
        for payload in payloads:
            message = await next_message(sub)
            assert message.payload == payload
            await message.ack()


async def test_oversized_payload_refused_before_sending(any_bus: Harness) -> None:
    bus = await any_bus.open()
    with pytest.raises(LocalProtocolError, match="max_payload"):
        await bus.publish(any_bus.topic("x"), bytes(MAX_PAYLOAD + 1))


async def test_live_subscription_gets_only_what_comes_while_open(any_bus: Harness) -> None:
    bus = await any_bus.open()
    topic = any_bus.topic("device/live")
    async with bus.subscribe(topic):
        pass
    await bus.publish(topic, b"while closed")
    async with bus.subscribe(topic) as sub:
        await bus.publish(topic, b"marker")
        assert (await next_message(sub)).payload == b"marker"


async def test_durable_gets_what_was_published_while_away(any_bus: Harness) -> None:
    bus = await any_bus.open()
    topic = any_bus.topic("site/fra1")
    durable = any_bus.durable("fra1")
    async with bus.subscribe(topic, durable=durable):
        pass
    await bus.publish(topic, b"one")
    await bus.publish(topic, b"two")
    async with bus.subscribe(topic, durable=durable) as sub:
        for expected in (b"one", b"two"):
            message = await next_message(sub)
            assert message.payload == expected
            await message.ack()


async def test_unacked_redelivered_acked_not(any_bus: Harness) -> None:
    bus = await any_bus.open()
    topic = any_bus.topic("node/n1")
    durable = any_bus.durable("n1")
    async with bus.subscribe(topic, durable=durable) as sub:
        await bus.publish(topic, b"not acked")
        assert (await next_message(sub)).payload == b"not acked"
    async with bus.subscribe(topic, durable=durable) as sub:
        again = await next_message(sub)
        assert again.payload == b"not acked"
        await again.ack()
    async with bus.subscribe(topic, durable=durable) as sub:
        await bus.publish(topic, b"marker")
        assert (await next_message(sub)).payload == b"marker"
        # (the acked message did not come back before the marker)


async def test_one_open_subscription_per_durable(any_bus: Harness) -> None:
    bus = await any_bus.open()
    topic = any_bus.topic("device/one")
    durable = any_bus.durable("one")
    async with bus.subscribe(topic, durable=durable):
        with pytest.raises(LocalProtocolError, match="already open"):
            async with bus.subscribe(topic, durable=durable):
                pass


async def test_close_ends_a_waiting_iteration(any_bus: Harness) -> None:
    bus = await any_bus.open()
    sub = bus.subscribe(any_bus.topic("device/closing"), durable=any_bus.durable("closing"))
    await sub.open()
    waiting = asyncio.ensure_future(anext(sub))
    await asyncio.sleep(0.05)
    await sub.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, TIMEOUT)


# ---------------------------------------------------------------------------
# Real servers only
# ---------------------------------------------------------------------------


async def test_subscriber_process_away_and_back(server_bus: Harness) -> None:
    """The subscriber's whole connection goes away; the message waits at the server."""
    publisher = await server_bus.open()
    topic = server_bus.topic("device/restarting")
    durable = server_bus.durable("restarting")
    subscriber = await server_bus.open()
    async with subscriber.subscribe(topic, durable=durable):
        pass
    await subscriber.close()

    await publisher.publish(topic, b"while you were away")

    subscriber = await server_bus.open()
    async with subscriber.subscribe(topic, durable=durable) as sub:
        message = await next_message(sub)
        assert message.payload == b"while you were away"
        await message.ack()


async def test_two_buses_see_each_other(server_bus: Harness) -> None:
    publisher, subscriber = await server_bus.open(), await server_bus.open()
    topic = server_bus.topic("device/pair")
    async with subscriber.subscribe(topic) as sub:
        await publisher.publish(topic, b"across connections")
        assert (await next_message(sub)).payload == b"across connections"


# ---------------------------------------------------------------------------
# NATS JetStream
# ---------------------------------------------------------------------------


async def test_nats_redelivers_unacked_after_ack_wait(nats_bus: Harness) -> None:
    bus = await nats_bus.open(ack_wait=0.5)
    topic = nats_bus.topic("node/slow")
    async with bus.subscribe(topic, durable=nats_bus.durable("slow")) as sub:
        await bus.publish(topic, b"ack me")
        first = await next_message(sub)
        again = await next_message(sub)  # still connected: comes back after ack_wait
        assert first.payload == again.payload == b"ack me"
        await again.ack()
        await bus.publish(topic, b"marker")
        assert (await next_message(sub)).payload == b"marker"


async def test_nats_new_durable_gets_what_the_stream_holds(nats_bus: Harness) -> None:
    bus = await nats_bus.open()
    topic = nats_bus.topic("device/new")
    await bus.publish(topic, b"before the first subscribe")
    async with bus.subscribe(topic, durable=nats_bus.durable("new")) as sub:
        message = await next_message(sub)
        assert message.payload == b"before the first subscribe"
        await message.ack()


async def test_nats_stream_created_with_limits(nats_bus: Harness) -> None:
    bus = await nats_bus.open(max_age=3600.0, max_bytes=1 << 20)
    assert isinstance(bus, NatsBus)
    info = await bus._js.stream_info(nats_bus.stream)
    config = info.config
    assert config.subjects == [f"{nats_bus.prefix}.>"]
    assert enum_text(config.storage) == "file"
    assert enum_text(config.retention) == "limits"
    assert config.max_age == 3600.0
    assert config.max_bytes == 1 << 20
    assert config.max_msg_size is not None and config.max_msg_size > MAX_PAYLOAD
    assert config.max_msgs_per_subject and config.max_msgs_per_subject > 0
    # A second bus finds the stream and reuses it.
    again = await nats_bus.open()
    assert isinstance(again, NatsBus)
    assert (await again._js.stream_info(nats_bus.stream)).config.subjects == config.subjects


async def test_nats_consumer_settings(nats_bus: Harness) -> None:
    bus = await nats_bus.open(ack_wait=7.0, max_deliver=3)
    assert isinstance(bus, NatsBus)
    topic = nats_bus.topic("device/consumer")
    async with bus.subscribe(topic, durable=nats_bus.durable("consumer")):
        info = await bus._js.consumer_info(nats_bus.stream, "consumer")
    assert info.config.durable_name == "consumer"
    assert info.config.filter_subject == topic
    assert info.config.ack_wait == 7.0
    assert info.config.max_deliver == 3
    assert enum_text(info.config.ack_policy) == "explicit"
    assert enum_text(info.config.deliver_policy) == "all"


async def test_nats_existing_stream_must_cover_prefix(nats_bus: Harness) -> None:
    await nats_bus.open()  # creates STREAM over <prefix>.>
    with pytest.raises(ConfigurationError, match="does not cover"):
        await NatsBus.connect(NATS_URL, stream=nats_bus.stream, prefix=nats_bus.prefix + "x")


async def test_nats_overlapping_stream_refused(nats_bus: Harness) -> None:
    await nats_bus.open()  # STREAM over <prefix>.>
    with pytest.raises(ConfigurationError, match="overlap"):
        await NatsBus.connect(NATS_URL, stream=nats_bus.stream + "_2", prefix=nats_bus.prefix)


async def test_nats_durable_belongs_to_one_topic(nats_bus: Harness) -> None:
    bus = await nats_bus.open()
    durable = nats_bus.durable("shared")
    async with bus.subscribe(nats_bus.topic("user/a"), durable=durable):
        pass
    with pytest.raises(ConfigurationError, match="another topic"):
        async with bus.subscribe(nats_bus.topic("user/b"), durable=durable):
            pass


async def test_nats_topic_outside_the_stream_refused(nats_bus: Harness) -> None:
    bus = await nats_bus.open()
    with pytest.raises(LocalProtocolError, match="outside"):
        await bus.publish("elsewhere.abc", b"x")
    with pytest.raises(LocalProtocolError, match="outside"):
        bus.subscribe("elsewhere.abc", durable="d")


async def test_nats_tcp_nodelay(nats_bus: Harness) -> None:
    bus = await nats_bus.open()
    assert isinstance(bus, NatsBus)
    sock = bus._socket_for_tests()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# ---------------------------------------------------------------------------
# MQTT (Mosquitto)
# ---------------------------------------------------------------------------


async def test_mqtt_tcp_nodelay_on_every_connection(mqtt_bus: Harness) -> None:
    bus = await mqtt_bus.open()
    assert isinstance(bus, MqttBus)
    topic = mqtt_bus.topic("device/nodelay")
    async with bus.subscribe(topic), bus.subscribe(topic, durable=mqtt_bus.durable("nodelay")):
        sockets = bus._sockets_for_tests()
        assert len(sockets) == 3  # publisher, live subscriber, durable subscriber
        for sock in sockets:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_mqtt_server_sees_opaque_topic_and_exact_bytes(mqtt_bus: Harness) -> None:
    """An eavesdropper on ``<prefix>/#`` sees kb/<hex> and the bytes we sent, nothing else."""
    bus = await mqtt_bus.open()
    topic = mqtt_bus.topic("user/alice")
    url = urlsplit(MQTT_URL)
    async with aiomqtt.Client(url.hostname or "", url.port or 1883) as spy:
        await spy.subscribe(f"{mqtt_bus.prefix}/#", qos=1)
        await bus.publish(topic, b"\x01opaque")
        seen = await asyncio.wait_for(anext(aiter(spy.messages)), TIMEOUT)
    assert seen.topic.value == topic.replace(".", "/")
    assert "alice" not in seen.topic.value
    assert seen.payload == b"\x01opaque"
    assert seen.qos == 1


async def test_mqtt_durable_reused_for_another_topic_never_leaks(mqtt_bus: Harness) -> None:
    """MQTT sessions remember old subscriptions; the bus must not hand those messages out."""
    bus = await mqtt_bus.open()
    old, new = mqtt_bus.topic("user/old"), mqtt_bus.topic("user/new")
    durable = mqtt_bus.durable("moved")
    async with bus.subscribe(old, durable=durable):
        pass
    async with bus.subscribe(new, durable=durable) as sub:
        await bus.publish(old, b"for the old topic")
        await bus.publish(new, b"marker")
        message = await next_message(sub)
        assert (message.topic, message.payload) == (new, b"marker")
