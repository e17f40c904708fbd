"""The MQTT bus (aiomqtt on paho-mqtt), for Mosquitto or any MQTT 5 server.

* MQTT 5, QoS 1 both ways. Topics ``kb.<hex>`` travel as ``kb/<hex>``.
* ``publish`` uses one connection per bus (clean session) and returns on PUBACK;
  if that connection dropped, it reconnects once and retries, else raises
  :class:`~keybroker.errors.TransportError`.
* Every subscription has its own connection. A durable one connects with the
  stable client id ``<client_id_prefix><durable>``, ``clean_start=False`` and a
  session expiry (7 days by default), so the server queues QoS 1 messages while
  the subscriber is away (Mosquitto: up to ``max_queued_messages``, 1000 by
  default) and keeps them across its own restarts if ``persistence true``.
  The session starts with the first subscribe: messages published before a
  durable name ever subscribed are not kept (NATS keeps them; subscribe at
  enrolment).
* Acks are real: durable subscriptions turn off paho's automatic PUBACK
  (``manual_ack``) and send it on ``ack()``, so a message that was received but
  not acked is delivered again when the durable subscription next connects
  (MQTT 5 §4.4). A PUBACK has no reply, so ``ack()`` returns once it is queued
  for sending; if the connection dies at that moment the message comes again
  (at least once, as promised). An ack that arrives after its connection was
  replaced is dropped rather than sent on the new connection, where the packet
  id may name another message. Live subscriptions keep paho's automatic PUBACK.
* Reconnects: a subscription whose connection drops reconnects by itself with
  backoff (0.1 s doubling to 5 s, forever) and subscribes again; its session
  brings back what was queued meanwhile. If another client takes over the same
  durable client id, an MQTT 5 server says "session taken over" (0x8E) and that
  raises :class:`~keybroker.errors.TransportError` instead of fighting back.
  Mosquitto before 2.0.15 just closes the socket; then connections that keep
  dying young back off (to one attempt per 5 s) and a warning names the likely
  cause, so two holders of one durable name do not flap at full speed.
* TCP_NODELAY is set on every connection: paho leaves Nagle on, and the
  push-auth research measured a QoS 1 round trip at ~88 ms without it against
  ~1.7 ms with it (Nagle plus delayed ACK). aiomqtt applies ``socket_options``
  to paho's socket right after connecting (only CONNECT goes out before). The
  server side wants ``set_tcp_nodelay true`` in mosquitto.conf as well.
* Durable names become MQTT client ids, which the server operator sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from keybroker.bus.interface import MAX_PAYLOAD, AckCallback, Bus, BusMessage, Subscription
from keybroker.bus.topics import to_mqtt
from keybroker.errors import TransportError

_log = logging.getLogger(__name__)

DAY = 24 * 3600
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
QOS = 1
_SESSION_TAKEN_OVER = 0x8E  # MQTT 5 reason code 142
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0
_STABLE_AFTER = 10.0  # seconds a connection must live before reconnect backoff resets


class MqttBus(Bus):
    """A bus on an MQTT 5 server. Create with :meth:`connect`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        client_id_prefix: str = "kb-",
        session_expiry: int = 7 * DAY,
        connect_timeout: float = 5.0,
        request_timeout: float = 10.0,
        keepalive: int = 30,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        super().__init__(max_payload=max_payload)
        self.host = host
        self.port = port
        self.display_url = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
        self._tls = tls
        self._username = username
        self._password = password
        self.client_id_prefix = client_id_prefix
        self.session_expiry = session_expiry
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.keepalive = keepalive
        self._publisher: aiomqtt.Client | None = None
        self._publisher_lock = asyncio.Lock()

    @classmethod
    async def connect(cls, host: str = "127.0.0.1", port: int = 1883, **options: Any) -> MqttBus:
        """Connect the publishing connection; :class:`TransportError` if unreachable."""
        bus = cls(host, port, **options)
        await bus._connect_publisher()
        return bus

    # -- connections ---------------------------------------------------------------

    def _new_client(self, identifier: str, *, durable: bool) -> aiomqtt.Client:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.session_expiry if durable else 0
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=not durable,
            properties=properties,
            username=self._username,
            password=self._password,
            tls_context=self._tls,
            keepalive=self.keepalive,
            timeout=self.request_timeout,
            socket_options=[NODELAY],
        )
        # aiomqtt exposes neither knob; both are public on the paho client it wraps.
        client._client.connect_timeout = self.connect_timeout
        if durable:
            client._client.manual_ack_set(True)
        return client

    async def _enter(self, client: aiomqtt.Client, what: str) -> None:
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise TransportError(
                f"cannot connect to MQTT at {self.display_url} ({what}): {exc}"
            ) from None

    async def _connect_publisher(self) -> aiomqtt.Client:
        client = self._new_client(
            f"{self.client_id_prefix}pub-{secrets.token_hex(8)}", durable=False
        )
        await self._enter(client, "publisher")
        self._publisher = client
        return client

    # -- Bus -------------------------------------------------------------------------

    async def _publish(self, topic: str, payload: bytes) -> None:
        for attempt in (1, 2):
            async with self._publisher_lock:
                client = self._publisher
                if client is None or _is_down(client):
                    if client is not None:
                        await _quiet_exit(client)
                    self._publisher = None
                    client = await self._connect_publisher()
            try:
                await client.publish(to_mqtt(topic), payload, qos=QOS)
                return
            except aiomqtt.MqttError as exc:
                if attempt == 2:
                    raise TransportError(
                        f"MQTT at {self.display_url} did not accept the message: {exc}"
                    ) from None
                _log.warning("MQTT %s: publish failed (%s); reconnecting", self.display_url, exc)
                async with self._publisher_lock:
                    if self._publisher is client:
                        self._publisher = None
                        await _quiet_exit(client)

    def _subscription(self, topic: str, durable: str | None) -> Subscription:
        return _MqttSubscription(self, topic, durable)

    async def _close(self) -> None:
        async with self._publisher_lock:
            if self._publisher is not None:
                await _quiet_exit(self._publisher)
                self._publisher = None

    def _sockets_for_tests(self) -> list[socket.socket]:
        """Every open connection's socket (tests check TCP_NODELAY on them)."""
        clients = [self._publisher] + [
            s._client for s in self._subscriptions if isinstance(s, _MqttSubscription)
        ]
        socks = [c._client.socket() for c in clients if c is not None]
        return [s for s in socks if isinstance(s, socket.socket)]


class _MqttSubscription(Subscription):
    def __init__(self, bus: MqttBus, topic: str, durable: str | None) -> None:
        super().__init__(bus, topic, durable)
        self._mqtt = bus
        self._client: aiomqtt.Client | None = None
        self._connecting: asyncio.Task[aiomqtt.Client] | None = None
        self._connected_at = 0.0
        self._short_lived = 0
        if durable is None:
            self._identifier = f"{bus.client_id_prefix}sub-{secrets.token_hex(8)}"
        else:
            self._identifier = bus.client_id_prefix + durable

    async def _open(self) -> None:
        await self._connect()

    async def _connect(self) -> None:
        # The connect runs as a task so that a cancelled caller (close() during a
        # reconnect) cannot leave a half-made connection holding the durable session.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._make_client())
        task = self._connecting
        try:
            self._client = await asyncio.shield(task)
        finally:
            if task.done():
                self._connecting = None
        self._connected_at = asyncio.get_running_loop().time()

    async def _make_client(self) -> aiomqtt.Client:
        bus = self._mqtt
        client = bus._new_client(self._identifier, durable=self.durable is not None)
        await bus._enter(client, f"subscriber of {self.topic}")
        try:
            await client.subscribe(to_mqtt(self.topic), qos=QOS)
        except aiomqtt.MqttError as exc:
            await _quiet_exit(client)
            raise TransportError(
                f"MQTT at {bus.display_url} refused the subscription to {self.topic!r}: {exc}"
            ) from None
        return client

    async def _receive(self) -> BusMessage:
        while True:
            client = self._client
            if client is None:
                await self._reconnect()
                continue
            try:
                message = await client.messages.__anext__()
            except aiomqtt.MqttError as exc:
                self._client = None
                await _quiet_exit(client)
                self._dropped(exc)
                continue
            payload = message.payload
            if message.topic.value != to_mqtt(self.topic):
                # A session that once subscribed elsewhere (the durable name was reused
                # for another topic): never hand out another topic's messages.
                _log.warning("MQTT: durable %r still had another topic; dropping it", self.durable)
                self._send_ack(client, message)
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.unsubscribe(message.topic.value)
                continue
            if not isinstance(payload, bytes | bytearray) or len(payload) > self._mqtt.max_payload:
                _log.warning("MQTT %s: dropped an oversized message", self._mqtt.display_url)
                self._send_ack(client, message)
                continue
            return BusMessage(self.topic, bytes(payload), self._ack_for(client, message))

    def _ack_for(self, client: aiomqtt.Client, message: aiomqtt.Message) -> AckCallback | None:
        if self.durable is None:
            return None

        async def ack() -> None:
            self._send_ack(client, message)

        return ack

    def _send_ack(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        if self.durable is None or self._client is not client or _is_down(client):
            return  # the server will deliver it again on the next connection
        client._client.ack(message.mid, message.qos)

    def _dropped(self, exc: aiomqtt.MqttError) -> None:
        """Classify a lost connection: a takeover ends the subscription, anything else retries."""
        if _reason(exc) == _SESSION_TAKEN_OVER:
            raise TransportError(
                f"MQTT session {self._identifier!r} was taken over by another client "
                "with the same durable name"
            ) from None
        # Servers older than MQTT 5 conformance (Mosquitto < 2.0.15) close a taken-over
        # connection without saying why. Connections that keep dying young are then
        # retried ever more slowly, so two holders of one durable name do not flap.
        lived = asyncio.get_running_loop().time() - self._connected_at
        self._short_lived = self._short_lived + 1 if lived < _STABLE_AFTER else 0
        hint = ""
        if self._short_lived >= 3:
            hint = f"; is another client using the durable name {self.durable!r}?"
        _log.warning(
            "MQTT %s: subscriber lost its connection (%s)%s", self._mqtt.display_url, exc, hint
        )

    async def _reconnect(self) -> None:
        delay = min(_BACKOFF_FIRST * 2**self._short_lived, _BACKOFF_MAX)
        while True:
            await asyncio.sleep(delay)
            try:
                await self._connect()
                _log.info("MQTT %s: subscriber reconnected", self._mqtt.display_url)
                return
            except TransportError as exc:
                _log.warning("%s; retrying", exc)
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _close(self) -> None:
        task, self._connecting = self._connecting, None
        if task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await _quiet_exit(await task)
        current, self._client = self._client, None
        if current is not None:
            await _quiet_exit(current)


def _is_down(client: aiomqtt.Client) -> bool:
    return client._disconnected.done()


def _reason(exc: BaseException | None) -> int | None:
    """The MQTT reason code behind an aiomqtt error, if any."""
    while exc is not None:
        rc = getattr(exc, "rc", None)
        if rc is not None:
            value = getattr(rc, "value", rc)
            return int(value) if isinstance(value, int) else None
        exc = exc.__cause__
    return None


async def _quiet_exit(client: aiomqtt.Client) -> None:
    lost = client._disconnected
    if lost.done() and not lost.cancelled():
        lost.exception()  # the drop was handled; keep asyncio from reporting it as unretrieved
    try:
        await client.__aexit__(None, None, None)
    except Exception as exc:
        _log.debug("ignored while disconnecting from MQTT: %r", exc)
