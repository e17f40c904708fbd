"""The NATS bus: core NATS for live subscribers, JetStream for durable per-principal delivery.

* ``publish`` goes through JetStream into one stream (``KEYBROKER_BUS`` over
  ``kb.>`` by default, created if missing: file storage, limits retention with
  ``max_age``, ``max_bytes``, ``max_msgs_per_subject`` and ``max_msg_size``) and
  returns once the stream stored it. Core subscribers on the subject see the
  same message live.
* A durable subscription is a JetStream **durable pull consumer** named by the
  caller, filtered to its topic, explicit ack, ``ack_wait``, ``max_deliver``,
  deliver policy *all*: a new durable also receives what the stream still holds
  for its topic, a message published while the subscriber was away waits in the
  stream, and an un-acked one is delivered again after ``ack_wait`` (at most
  ``max_deliver`` times: the bus is a hint, the broker's API stays the source of
  truth for what waits).
* Acks are synchronous (``ack_sync``): when ``ack()`` returns, the server has it.
* Reconnects: nats-py reconnects by itself (forever, every
  ``reconnect_time_wait`` seconds) and re-subscribes; a pull subscription sends
  a fresh pull request as soon as the reconnect is reported (a restarted server
  has forgotten the old one), and the durable consumer lives on the server, so
  no stored message is lost. A ``publish`` during an outage raises
  :class:`~keybroker.errors.TransportError` after ``request_timeout``.
* The *first* connection fails fast: an unreachable or refusing server raises
  :class:`~keybroker.errors.TransportError` at once, or within
  ``connect_timeout`` if it does not answer (each URL is tried twice).
* TCP_NODELAY: nats-py connects through asyncio streams, and asyncio sets
  TCP_NODELAY on every TCP transport it creates (``base_events._set_nodelay``),
  TLS included (the TLS layer sits on the same socket). Nothing to set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from keybroker.bus.interface import MAX_PAYLOAD, Bus, BusMessage, Subscription
from keybroker.bus.topics import DEFAULT_PREFIX, check_durable
from keybroker.bus.urls import redact_url
from keybroker.errors import ConfigurationError, LocalProtocolError, TransportError

_log = logging.getLogger(__name__)

DEFAULT_STREAM = "KEYBROKER_BUS"
DAY = 24 * 3600.0

# How long one pull request waits at the server before we ask again; only
# bounds how quickly a dead connection is noticed, not delivery latency.
_PULL_WAIT = 5.0
_HEADROOM = 4096


class NatsBus(Bus):
    """A bus on a NATS server with JetStream. Create with :meth:`connect`."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        display_url: str,
        stream: str = DEFAULT_STREAM,
        prefix: str = DEFAULT_PREFIX,
        max_payload: int = MAX_PAYLOAD,
        ack_wait: float = 30.0,
        max_deliver: int = 10,
        request_timeout: float = 5.0,
    ) -> None:
        super().__init__(max_payload=max_payload)
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(timeout=request_timeout)
        self.display_url = display_url
        self.stream = stream
        self.prefix = prefix
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.request_timeout = request_timeout
        self._reconnect_signal = asyncio.Event()

    @classmethod
    async def connect(
        cls,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        *,
        stream: str = DEFAULT_STREAM,
        prefix: str = DEFAULT_PREFIX,
        max_payload: int = MAX_PAYLOAD,
        max_age: float = 7 * DAY,
        max_bytes: int = 1 << 30,
        max_msgs_per_subject: int = 10_000,
        ack_wait: float = 30.0,
        max_deliver: int = 10,
        connect_timeout: float = 5.0,
        request_timeout: float = 5.0,
        reconnect_time_wait: float = 1.0,
        tls: ssl.SSLContext | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        name: str = "keybroker",
    ) -> NatsBus:
        """Connect, make sure the stream exists, and return the bus.

        Raises :class:`TransportError` if the server cannot be reached within
        ``connect_timeout`` and :class:`ConfigurationError` if it has no
        JetStream or the stream cannot be used for ``<prefix>.>``.
        """
        check_durable(stream)  # same charset rules as a NATS stream name
        check_durable(prefix)
        if isinstance(servers, str):
            servers = [servers]
        display = ", ".join(redact_url(s) for s in servers)

        nc = NatsClient()

        first_errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            if not nc.is_connected and not nc.options.get("allow_reconnect"):
                first_errors.append(exc)  # the first connection: reported by the raise below
                return
            _log.warning("NATS %s: %s", display, exc)

        async def on_disconnect() -> None:
            if not (nc.is_closed or nc.is_draining):  # not our own close()
                _log.warning("NATS %s: disconnected; reconnecting", display)

        reconnected: list[NatsBus] = []

        async def on_reconnect() -> None:
            _log.info("NATS %s: reconnected", display)
            for bus in reconnected:
                bus._reconnected()

        options: dict[str, Any] = {
            "servers": servers,
            "name": name,
            # The first connection fails fast: each server tried twice, no pause
            # (nats-py would otherwise retry a dead URL for minutes, or forever).
            # Once connected, reconnects are on, forever, every reconnect_time_wait.
            "allow_reconnect": False,
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0,
            "connect_timeout": connect_timeout,
            "error_cb": on_error,
            "disconnected_cb": on_disconnect,
            "reconnected_cb": on_reconnect,
        }
        for key, value in (("tls", tls), ("user", user), ("password", password), ("token", token)):
            if value is not None:
                options[key] = value
        try:
            deadline = 2 * connect_timeout * len(servers) + 1.0
            await asyncio.wait_for(nc.connect(**options), deadline)
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            await _quiet_close(nc)
            cause = first_errors[-1] if first_errors else exc
            raise TransportError(
                f"cannot connect to NATS at {display}: {_describe(cause)}"
            ) from None
        nc.options.update(
            allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=reconnect_time_wait
        )

        bus = cls(
            nc,
            display_url=display,
            stream=stream,
            prefix=prefix,
            max_payload=max_payload,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            request_timeout=request_timeout,
        )
        reconnected.append(bus)
        try:
            await bus._ensure_stream(
                StreamConfig(
                    name=stream,
                    description="keybroker bus: per-principal notifications (opaque payloads)",
                    subjects=[f"{prefix}.>"],
                    retention=RetentionPolicy.LIMITS,
                    storage=StorageType.FILE,
                    discard=DiscardPolicy.OLD,
                    max_age=max_age,
                    max_bytes=max_bytes,
                    # JetStream counts subject and headers too; the payload check is ours.
                    max_msg_size=max_payload + _HEADROOM,
                    max_msgs_per_subject=max_msgs_per_subject,
                    num_replicas=1,
                )
            )
        except BaseException:
            await _quiet_close(nc)
            raise
        return bus

    async def _ensure_stream(self, config: StreamConfig) -> None:
        subject = f"{self.prefix}.>"
        try:
            try:
                info = await self._js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                try:
                    info = await self._js.add_stream(config)
                    _log.info("NATS %s: created stream %s", self.display_url, self.stream)
                except nats.js.errors.BadRequestError as refused:
                    # Another replica may have created it meanwhile; if not, say why not
                    # (typically: its subjects overlap another stream's).
                    try:
                        info = await self._js.stream_info(self.stream)
                    except nats.js.errors.NotFoundError:
                        raise refused from None
        except nats.errors.NoRespondersError:
            raise ConfigurationError(
                f"NATS at {self.display_url} has no JetStream (run nats-server with -js)"
            ) from None
        except nats.js.errors.APIError as exc:
            raise ConfigurationError(
                f"cannot create JetStream stream {self.stream!r} for {subject!r} on "
                f"{self.display_url}: {exc.description or exc}"
            ) from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise TransportError(
                f"JetStream at {self.display_url} did not answer: {_describe(exc)}"
            ) from None
        if subject not in (info.config.subjects or []):
            raise ConfigurationError(
                f"JetStream stream {self.stream!r} exists but does not cover {subject!r} "
                f"(its subjects: {info.config.subjects})"
            )

    def _reconnected(self) -> None:
        # A server restart forgets pending pull requests: wake every pull to ask again.
        signal, self._reconnect_signal = self._reconnect_signal, asyncio.Event()
        signal.set()

    async def delete_stream(self) -> None:
        """Delete the bus stream and every durable consumer on it (tests, decommissioning)."""
        try:
            await self._js.delete_stream(self.stream)
        except nats.js.errors.NotFoundError:
            pass
        except (TimeoutError, nats.errors.Error) as exc:
            raise TransportError(
                f"cannot delete stream {self.stream!r}: {_describe(exc)}"
            ) from None

    def _check_covered(self, topic: str) -> None:
        if not topic.startswith(self.prefix + "."):
            raise LocalProtocolError(
                f"topic {topic!r} is outside this bus's stream subjects {self.prefix + '.>'!r}"
            )

    async def _publish(self, topic: str, payload: bytes) -> None:
        self._check_covered(topic)
        try:
            await self._js.publish(topic, payload, stream=self.stream)
        except (TimeoutError, nats.errors.Error) as exc:
            raise TransportError(
                f"NATS at {self.display_url} did not store the message: {_describe(exc)}"
            ) from None

    def _subscription(self, topic: str, durable: str | None) -> Subscription:
        if durable is not None:
            self._check_covered(topic)
        return _NatsSubscription(self, topic, durable)

    async def _close(self) -> None:
        await _quiet_close(self._nc)

    def _socket_for_tests(self) -> Any:
        """The connection's socket (tests check TCP_NODELAY on it)."""
        transport = self._nc._transport
        writer = getattr(transport, "_io_writer", None)
        return None if writer is None else writer.get_extra_info("socket")


class _NatsSubscription(Subscription):
    def __init__(self, bus: NatsBus, topic: str, durable: str | None) -> None:
        super().__init__(bus, topic, durable)
        self._nats = bus
        self._core: NatsSubscription | None = None
        self._pull: JetStreamContext.PullSubscription | None = None

    async def _open(self) -> None:
        bus = self._nats
        try:
            if self.durable is None:
                self._core = await bus._nc.subscribe(self.topic)
                # Make sure the server registered the interest before we return.
                await bus._nc.flush(timeout=math.ceil(bus.request_timeout))
                return
            await self._ensure_consumer(self.durable)
            self._pull = await bus._js.pull_subscribe_bind(durable=self.durable, stream=bus.stream)
        except (TimeoutError, nats.errors.Error) as exc:
            await self._close()
            raise TransportError(
                f"cannot subscribe to {self.topic!r} on NATS {bus.display_url}: {_describe(exc)}"
            ) from None

    async def _ensure_consumer(self, durable: str) -> None:
        bus = self._nats
        js = bus._js
        try:
            info = await js.consumer_info(bus.stream, durable)
        except nats.js.errors.NotFoundError:
            config = ConsumerConfig(
                name=durable,
                durable_name=durable,
                description="keybroker bus subscriber",
                filter_subject=self.topic,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=bus.ack_wait,
                max_deliver=bus.max_deliver,
            )
            info = await js.add_consumer(bus.stream, config)
        if info.config.filter_subject != self.topic:
            raise ConfigurationError(
                f"durable {durable!r} on stream {bus.stream!r} belongs to another topic; "
                "use one durable name per topic"
            )

    async def _receive(self) -> BusMessage:
        bus = self._nats
        while True:
            try:
                msg = await self._next()
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                raise TransportError(f"NATS connection to {bus.display_url} closed") from None
            except nats.js.errors.APIError as exc:
                # E.g. the consumer or stream was deleted under us: nothing will come.
                raise TransportError(
                    f"NATS durable {self.durable!r} failed: {exc.description or exc}"
                ) from None
            except nats.errors.Error as exc:
                # Reconnecting, stale connection…: nats-py recovers; poll again shortly.
                _log.debug("NATS %s: %s; polling again", bus.display_url, exc)
                await asyncio.sleep(min(1.0, bus.request_timeout))
                continue
            if len(msg.data) > bus.max_payload:
                _log.warning("NATS %s: dropped an oversized message", bus.display_url)
                if self._pull is not None:
                    await _quiet(msg.term())
                continue
            return self._message(msg)

    async def _next(self) -> Msg:
        if self._core is not None:
            return await self._core.next_msg(timeout=_PULL_WAIT)
        assert self._pull is not None
        # Race the pull against a reconnect: after a server restart the pull request
        # is gone, and waiting out _PULL_WAIT would delay delivery for nothing. A
        # message that arrives for a cancelled pull waits in the inbox for the next.
        fetch = asyncio.ensure_future(self._pull.fetch(1, timeout=_PULL_WAIT))
        reconnect = asyncio.ensure_future(self._nats._reconnect_signal.wait())
        try:
            await asyncio.wait({fetch, reconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (fetch, reconnect):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if fetch.done() and not fetch.cancelled():
            return fetch.result()[0]
        raise TimeoutError

    def _message(self, msg: Msg) -> BusMessage:
        if self._pull is None:
            return BusMessage(msg.subject, msg.data)
        timeout = self._nats.request_timeout

        async def ack() -> None:
            try:
                await msg.ack_sync(timeout=timeout)
            except nats.errors.MsgAlreadyAckdError:
                pass
            except (TimeoutError, nats.errors.Error) as exc:
                raise TransportError(f"NATS did not confirm the ack: {_describe(exc)}") from None

        return BusMessage(msg.subject, msg.data, ack)

    async def _close(self) -> None:
        for sub in (self._core, self._pull):
            if sub is not None and not self._nats._nc.is_closed:
                await _quiet(sub.unsubscribe())
        self._core = self._pull = None


async def _quiet(aw: Any) -> None:
    try:
        await aw
    except Exception as exc:
        _log.debug("ignored during NATS cleanup: %r", exc)


async def _quiet_close(nc: NatsClient) -> None:
    if not nc.is_closed:
        await _quiet(nc.close())


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
