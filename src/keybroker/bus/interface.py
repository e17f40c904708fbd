"""The bus interface every implementation provides: publish, subscribe, ack, close.

Semantics shared by all implementations (each module states what it adds):

* ``publish`` returns once the message server has accepted the message
  (JetStream stored it; Mosquitto sent PUBACK; the memory bus queued it). It
  raises :class:`~keybroker.errors.TransportError` if that did not happen.
* A subscription without ``durable`` sees only messages published while it is
  open (at most once); its ``ack()`` does nothing.
* A subscription with ``durable=<name>`` is at least once: every message
  published to its topic after the durable name was first subscribed is
  delivered, including those published while no subscriber was connected,
  and a message that is not acked is delivered again (NATS after ``ack_wait``;
  MQTT and memory when the durable subscription is next opened). Handlers
  must therefore be idempotent. One durable name belongs to one topic and to
  at most one open subscription at a time.
* Payloads are opaque bytes of at most ``max_payload`` (64 KiB by default),
  delivered unchanged.
* Topics and durable names are visible to whoever runs the message server
  (durable names become NATS consumer names and MQTT client ids): derive both
  opaquely (:func:`~keybroker.bus.topics.principal_topic`), never from names.
* Errors: a bad topic, durable name or payload, or use after ``close()``, is a
  :class:`~keybroker.errors.LocalProtocolError` (the caller's bug); the server
  failing us is a :class:`~keybroker.errors.TransportError`; a server set up so
  the bus cannot work is a :class:`~keybroker.errors.ConfigurationError`.
  Nothing from nats-py or aiomqtt escapes.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from keybroker.bus.topics import check_durable, check_topic
from keybroker.errors import LocalProtocolError

#: Default ceiling for one payload. A "something waits" ping or an HPKE-sealed
#: challenge is well under 1 KiB; the ceiling bounds what a server queues per principal.
MAX_PAYLOAD = 64 * 1024

AckCallback = Callable[[], Awaitable[None]]


class BusMessage:
    """One message as a subscriber receives it. ``repr`` shows the size, never the bytes."""

    __slots__ = ("_ack", "_acked", "payload", "topic")

    def __init__(self, topic: str, payload: bytes, ack: AckCallback | None = None) -> None:
        self.topic = topic
        self.payload = payload
        self._ack = ack
        self._acked = False

    @property
    def acked(self) -> bool:
        return self._acked

    async def ack(self) -> None:
        """Confirm the message was handled, so it is not delivered again. Idempotent."""
        if self._acked:
            return
        if self._ack is not None:
            await self._ack()
        self._acked = True

    def __repr__(self) -> str:
        return f"BusMessage(topic={self.topic!r}, payload=<{len(self.payload)} bytes>)"


class Subscription(ABC):
    """An open stream of messages on one topic: ``async with`` it, then ``async for`` it.

    Iteration ends (``StopAsyncIteration``) once the subscription or its bus is
    closed; a failure the implementation cannot recover from raises
    :class:`~keybroker.errors.TransportError`.
    """

    def __init__(self, bus: Bus, topic: str, durable: str | None) -> None:
        self.topic = topic
        self.durable = durable
        self._bus = bus
        self._closed = asyncio.Event()
        self._opened = False
        self._kept: BusMessage | None = None

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def open(self) -> None:
        if self._opened:
            raise LocalProtocolError("this subscription is already open")
        if self._closed.is_set():
            raise LocalProtocolError("this subscription was closed; subscribe again")
        self._bus._claim(self)
        try:
            await self._open()
        except BaseException:
            self._bus._release(self)
            raise
        self._opened = True

    async def close(self) -> None:
        """Stop receiving. Un-acked messages of a durable subscription stay pending."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            if self._opened:
                await self._close()
        finally:
            self._bus._release(self)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> BusMessage:
        if not self._opened:
            raise LocalProtocolError("open the subscription first: `async with bus.subscribe(…)`")
        if self._closed.is_set():
            raise StopAsyncIteration
        if self._kept is not None:
            message, self._kept = self._kept, None
            return message
        receive = asyncio.ensure_future(self._receive())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({receive, closed}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Our caller gave up (e.g. wait_for timed out) just as a message arrived:
            # keep it for the next __anext__ rather than drop it.
            if receive.done() and not receive.cancelled() and receive.exception() is None:
                self._kept = receive.result()
            raise
        finally:
            for task in (receive, closed):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if receive.done() and not receive.cancelled():
            return receive.result()
        raise StopAsyncIteration

    @abstractmethod
    async def _open(self) -> None:
        """Connect / create server-side state; raise TransportError on failure."""

    @abstractmethod
    async def _receive(self) -> BusMessage:
        """Wait for the next message (cancellation must not lose a message)."""

    @abstractmethod
    async def _close(self) -> None:
        """Release connections; must not raise."""


class Bus(ABC):
    """How the broker reaches principals in real time. Use as ``async with``.

    Everything published here is either a "something waits for you" ping or
    ciphertext sealed to its recipient: the bus and the message server behind
    it never see key material or plaintext, and topics reveal no names
    (see :func:`keybroker.bus.topics.principal_topic`).
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        if max_payload <= 0:
            raise LocalProtocolError("max_payload must be positive")
        self.max_payload = max_payload
        self._subscriptions: set[Subscription] = set()
        self._durable_owners: dict[str, Subscription] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def publish(self, topic: str, payload: bytes) -> None:
        """Hand ``payload`` to the server for ``topic``; returns once the server accepted it."""
        self._check_open()
        check_topic(topic)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise LocalProtocolError("a bus payload is bytes")
        data = bytes(payload)
        if len(data) > self.max_payload:
            raise LocalProtocolError(
                f"bus payload of {len(data)} bytes exceeds max_payload={self.max_payload}"
            )
        await self._publish(topic, data)

    def subscribe(self, topic: str, *, durable: str | None = None) -> Subscription:
        """A subscription to ``topic`` (opened by ``async with``); see the module docstring."""
        self._check_open()
        check_topic(topic)
        if durable is not None:
            check_durable(durable)
        sub = self._subscription(topic, durable)
        self._subscriptions.add(sub)
        return sub

    async def close(self) -> None:
        """Close every subscription, then the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        await self._close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- for implementations -----------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError("this bus is closed")

    def _claim(self, sub: Subscription) -> None:
        """One open subscription per durable name (a second would steal its messages)."""
        self._check_open()
        if sub.durable is None:
            return
        if sub.durable in self._durable_owners:
            raise LocalProtocolError(f"durable subscription {sub.durable!r} is already open")
        self._durable_owners[sub.durable] = sub

    def _release(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)
        if sub.durable is not None and self._durable_owners.get(sub.durable) is sub:
            del self._durable_owners[sub.durable]

    @abstractmethod
    async def _publish(self, topic: str, payload: bytes) -> None: ...

    @abstractmethod
    def _subscription(self, topic: str, durable: str | None) -> Subscription: ...

    @abstractmethod
    async def _close(self) -> None: ...
