"""The rotation agent: one per downstream site or upstream node, a thin asyncio driver.

It keeps the principal's keyring in step with the broker:

* **install, then acknowledge.** It long-polls the inbox
  (``GET /v1/deliveries?wait=…``); each delivery is verified (the CA's signature),
  HPKE-opened into the keyring and the keyring **saved to disk before** the ack with
  proof of possession goes out (:meth:`PrincipalClient.open_delivery` saves). An
  ack the broker recorded is therefore never for a key a crash lost; an unacked
  delivery is fetched again after a restart and installing it again changes nothing.
  The broker delivers a link's new version to its upstream node only after the
  site acknowledged it, so this order is what makes the node's switch safe.
* **retire.** Every ``sync_interval`` seconds it asks ``GET /v1/holdings`` and
  forgets every local version the broker reports ``disabled`` or ``destroyed``
  (:meth:`PrincipalClient.forget_version`, saved atomically).
* **wake-ups.** With a bus (``nats://…``, ``mqtt://…``) it also subscribes to the
  broker's wake topic — the servers publish there on every delivery
  (:mod:`keybroker.api.wakeups`) — and fetches at once on a wake-up, the long-poll
  staying the fallback. The subscription is durable (on NATS a JetStream durable
  pull consumer, on MQTT a persistent session) under :func:`durable_name`, opaque
  but stable for the principal, so a wake-up sent while the agent was down is
  still there when it returns.

Failures talking to the broker or the bus are logged and retried with bounded
exponential backoff (:class:`Backoff`); the agent does not stop for them. A
delivery it cannot use (not signed by the CA for us, malformed, clashing with a
key it holds) or whose ack the broker refuses is logged and left alone. Logs
name keysets, versions, key ids and delivery ids; never key bytes.

What a data plane does with the keys is :func:`.traffic.transmit_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from keybroker.bus import Bus, open_bus
from keybroker.client.principal import Delivery, PrincipalClient
from keybroker.errors import (
    ConfigurationError,
    Conflict,
    CryptoError,
    KeybrokerError,
    KeysetError,
    NotFound,
    RemoteProtocolError,
    StoreError,
    TransportError,
)
from keybroker.flows.rotation.traffic import write_json_atomic
from keybroker.keys import CONSUMING_STATES, Keyset
from keybroker.pki import load_certificate, public_key_fingerprint

logger = logging.getLogger("keybroker.rotation.agent")

#: Broker states that mean "forget your copy".
RETIRED_STATES: Final = frozenset({"disabled", "destroyed"})
#: The servers' default wake topic (``keybroker serve --wake-topic``).
DEFAULT_WAKE_TOPIC: Final = "kb.wake"
_DURABLE_LABEL: Final = b"keybroker/rotation/agent-durable/v1\x00"
#: How long a stopping agent lets an install-and-ack in progress finish.
_STOP_GRACE: Final = 5.0


class Backoff:
    """Delays ``initial, initial*factor, …`` up to ``maximum``; :meth:`reset` after a success."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0) -> None:
        if not 0 < initial <= maximum or factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self._failures = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * self.factor**self._failures)
        self._failures += 1
        return delay

    def reset(self) -> None:
        self._failures = 0


def durable_name(certificate_pem: bytes) -> str:
    """The agent's durable bus subscription name, derived from its identity key.

    Stable while the principal keeps its identity key, the same in every restart,
    and opaque: message-server operators see consumer names, and the bus rules
    (:mod:`keybroker.bus.interface`) keep principal names off the server.
    """
    spki = public_key_fingerprint(load_certificate(certificate_pem).public_key())
    return "kbagent-" + hashlib.sha256(_DURABLE_LABEL + spki).hexdigest()[:24]


def _transient(exc: BaseException) -> bool:
    """A failure worth retrying the same request for (network, server, database)."""
    if isinstance(exc, TransportError | OSError):
        return True
    return isinstance(exc, StoreError) and not isinstance(exc, NotFound | Conflict)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _until(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))


@dataclass
class AgentStatus:
    """What the status file says, besides what the keyring holds."""

    acked: int = 0
    last_ack: dict[str, Any] | None = None
    last_sync: float | None = None
    last_error: str | None = None
    retired: dict[str, list[int]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    bus: str | None = None


class RotationAgent:
    """Drives one principal's keyring. ``await agent.run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        client: PrincipalClient,
        *,
        wait: float = 30.0,
        sync_interval: float = 5.0,
        status_file: Path | None = None,
        bus_url: str | None = None,
        wake_topic: str = DEFAULT_WAKE_TOPIC,
        max_backoff: float = 30.0,
        bus_options: dict[str, Any] | None = None,
        bus_opener: Callable[[str], Awaitable[Bus]] | None = None,
    ) -> None:
        if wait < 0 or sync_interval <= 0 or max_backoff <= 0:
            raise ValueError("wait must be >= 0, sync_interval and max_backoff > 0")
        self.client = client
        self.wait = wait
        self.sync_interval = sync_interval
        self.status_file = None if status_file is None else Path(status_file)
        self.bus_url = bus_url
        self.wake_topic = wake_topic
        self.max_backoff = max_backoff
        self._bus_options = dict(bus_options or {})
        self._open_bus = bus_opener or self._default_bus
        self.status = AgentStatus()
        self._refused: set[str] = set()
        self._woken = asyncio.Event()

    def __repr__(self) -> str:
        return f"RotationAgent({self.client.principal})"

    async def _default_bus(self, url: str) -> Bus:
        return await open_bus(url, **self._bus_options)

    @property
    def durable(self) -> str:
        return durable_name(self.client.keyring.certificate_pem)

    # -- one step at a time (the loops below repeat these) ------------------------------

    async def receive_once(self, wait: float = 0) -> int:
        """Fetch (waiting up to ``wait`` s), install, save and ack; the number acked."""
        return await self._handle(await self.client.fetch_deliveries(wait=wait))

    async def sync_once(self) -> list[tuple[str, int]]:
        """Mirror the broker: forget versions it disabled or destroyed, promote its primary.

        The local primary is what this principal transmits under
        (:func:`.traffic.transmit_version`), so a version becomes the transmit key
        only once the broker promoted it: for a link, after both ends acknowledged it.
        """
        retired: list[tuple[str, int]] = []
        for holding in await self.client.holdings():
            local = self.client.keyring.received.get(holding.name)
            if local is None:
                continue
            self._follow_primary(holding.name, holding.primary)
            local = self.client.keyring.received[holding.name]
            mine = {v.version: v for v in local.versions}
            for version in holding.versions:
                have = mine.get(version.version)
                if version.state not in RETIRED_STATES or have is None:
                    continue
                if have.key_id != version.key_id:
                    logger.warning(
                        "not retiring %s v%d: our key id %#010x, the broker's %#010x",
                        holding.name,
                        version.version,
                        have.key_id,
                        version.key_id,
                    )
                    continue
                if self.client.forget_version(holding.name, version.version):
                    logger.info(
                        "retired %s v%d (key id %#010x): the broker %s it",
                        holding.name,
                        version.version,
                        have.key_id,
                        version.state,
                    )
                    retired.append((holding.name, version.version))
                    self.status.retired.setdefault(holding.name, []).append(version.version)
        self.status.last_sync = time.time()
        self.write_status()
        return retired

    def _follow_primary(self, keyset: str, primary: int | None) -> None:
        local = self.client.keyring.received[keyset]
        if primary is None or primary not in {
            v.version for v in local.versions if v.state in CONSUMING_STATES
        }:
            return  # not installed here (yet): keep transmitting under what we have
        if self.client.promote_version(keyset, primary):
            logger.info("transmitting on %s under v%d: the broker promoted it", keyset, primary)
            self.write_status()

    def wake(self) -> None:
        """Fetch now (a bus wake-up arrived)."""
        self._woken.set()

    async def _handle(self, deliveries: list[Delivery]) -> int:
        acked = 0
        for delivery in deliveries:
            if delivery.delivery_id in self._refused:
                continue
            if await self._install_and_ack(delivery):
                acked += 1
        return acked

    async def _install_and_ack(self, delivery: Delivery) -> bool:
        what = f"{delivery.keyset} v{delivery.version} (delivery {delivery.delivery_id})"
        try:
            info = self.client.open_delivery(delivery)  # verified, installed and saved
        except (CryptoError, RemoteProtocolError, KeysetError) as exc:
            # Not signed by the CA for us, malformed, or clashing with a key we hold:
            # never acknowledged; the broker lets it expire.
            self._refuse(delivery, f"refused {what}: {_describe(exc)}")
            return False
        logger.info("installed %s, key id %#010x; keyring saved", what, info.key_id)
        self.write_status()
        try:
            await self.client.ack(delivery)
        except KeybrokerError as exc:
            if _transient(exc):
                raise
            self._refuse(delivery, f"the broker refused the ack of {what}: {_describe(exc)}")
            return False
        logger.info("acked %s with proof of possession", what)
        self.status.acked += 1
        self.status.last_ack = {
            "delivery_id": delivery.delivery_id,
            "keyset": delivery.keyset,
            "version": delivery.version,
            "at": time.time(),
        }
        self.write_status()
        return True

    def _refuse(self, delivery: Delivery, message: str) -> None:
        logger.error("%s", message)
        self._refused.add(delivery.delivery_id)
        self.status.refused.append(delivery.delivery_id)
        self.status.last_error = message
        self.write_status()

    # -- the loops ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Receive, sync and (with a bus) listen for wake-ups until ``stop`` is set.

        Broker and bus failures are retried forever; anything else (a bug) stops the
        agent and is raised.
        """
        logger.info(
            "agent for %s: long-poll %ss, sync every %ss%s",
            self.client.principal,
            self.wait,
            self.sync_interval,
            f", wake-ups from {self.bus_url}" if self.bus_url else "",
        )
        self.write_status()
        loops = {
            asyncio.create_task(self._inbox_loop(stop), name="agent-inbox"),
            asyncio.create_task(self._sync_loop(stop), name="agent-sync"),
        }
        bus = None
        if self.bus_url is not None:
            bus = asyncio.create_task(self._bus_loop(stop), name="agent-bus")
        stopped = asyncio.create_task(stop.wait())
        watched = loops | {stopped} | ({bus} if bus is not None else set())
        try:
            while True:
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                for task in done - {stopped}:
                    task.result()  # raises what stopped a loop early (a bug)
                if stopped in done or done & loops:
                    break
                watched -= done  # the bus gave up: the long-poll carries on alone
        finally:
            stop.set()
            if bus is not None:
                bus.cancel()
            # Let an install-and-ack in progress finish rather than cut it in half.
            _, late = await asyncio.wait(loops, timeout=_STOP_GRACE)
            for task in late | {stopped}:
                task.cancel()
            await asyncio.gather(*loops, stopped, *([bus] if bus else []), return_exceptions=True)
            self.write_status()
            logger.info("agent for %s stopped", self.client.principal)

    def _backoff(self) -> Backoff:
        return Backoff(initial=min(0.5, self.max_backoff), maximum=self.max_backoff)

    async def _inbox_loop(self, stop: asyncio.Event) -> None:
        backoff = self._backoff()
        while not stop.is_set():
            try:
                deliveries = await self._fetch(stop)
                fresh = [d for d in deliveries if d.delivery_id not in self._refused]
                await self._handle(fresh)
                backoff.reset()
                if deliveries and not fresh:
                    # Only deliveries we refused wait there: the long-poll would answer at
                    # once, forever. Wait for news instead.
                    await self._pause(stop, self.wait or self.sync_interval)
            except (KeybrokerError, OSError) as exc:
                delay = backoff.next()
                self._failed(f"inbox: {_describe(exc)}; retrying in {delay:.1f}s")
                await _until(stop, delay)

    async def _fetch(self, stop: asyncio.Event) -> list[Delivery]:
        # A wake-up from before this fetch is answered by it: the delivery that caused
        # it is already in the broker's database.
        self._woken.clear()
        fetch = asyncio.create_task(self.client.fetch_deliveries(wait=self.wait))
        woken = asyncio.create_task(self._woken.wait())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({fetch, woken, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (woken, stopped):
                task.cancel()
        if fetch.done():
            return fetch.result()
        fetch.cancel()
        with contextlib.suppress(asyncio.CancelledError, KeybrokerError):
            await fetch
        if stop.is_set():
            return []
        logger.debug("woken by the bus; fetching")
        return await self.client.fetch_deliveries(wait=0)

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        self._woken.clear()
        woken = asyncio.create_task(self._woken.wait())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({woken, stopped}, timeout=seconds)
        finally:
            woken.cancel()
            stopped.cancel()

    async def _sync_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff(
            initial=self.sync_interval, maximum=max(self.max_backoff, self.sync_interval)
        )
        while not stop.is_set():
            try:
                await self.sync_once()
                backoff.reset()
                delay = self.sync_interval
            except (KeybrokerError, OSError) as exc:
                delay = backoff.next()
                self._failed(f"sync: {_describe(exc)}; retrying in {delay:.1f}s")
            await _until(stop, delay)

    async def _bus_loop(self, stop: asyncio.Event) -> None:
        assert self.bus_url is not None
        backoff = self._backoff()
        durable = self.durable
        while not stop.is_set():
            try:
                async with (
                    await self._open_bus(self.bus_url) as bus,
                    bus.subscribe(self.wake_topic, durable=durable) as subscription,
                ):
                    logger.info(
                        "waiting for wake-ups on %s (durable subscription %s)",
                        self.wake_topic,
                        durable,
                    )
                    self.status.bus = "connected"
                    self.write_status()
                    backoff.reset()
                    async for message in subscription:
                        self.wake()
                        await message.ack()
                raise TransportError("the bus subscription ended")
            except ConfigurationError as exc:
                # A bus URL or server that cannot work (no nats-py, no JetStream…) will
                # not heal by retrying: say so once and live on the long-poll.
                self.status.bus = "unusable"
                self._failed(f"bus: {_describe(exc)}; long-polling only")
                return
            except KeybrokerError as exc:
                self.status.bus = "down"
                delay = backoff.next()
                self._failed(f"bus: {_describe(exc)}; long-polling, retrying in {delay:.1f}s")
                await _until(stop, delay)

    def _failed(self, message: str) -> None:
        logger.warning("%s", message)
        self.status.last_error = message
        self.write_status()

    # -- the status file --------------------------------------------------------------------

    def status_document(self) -> dict[str, Any]:
        keyring = self.client.keyring
        return {
            "principal": str(keyring.principal),
            "pid": os.getpid(),
            "installed": {
                name: _installed(keyset) for name, keyset in sorted(keyring.received.items())
            },
            "versions": {
                name: [
                    {"version": v.version, "key_id": v.key_id, "state": v.state.value}
                    for v in keyset.versions
                ]
                for name, keyset in sorted(keyring.received.items())
            },
            "retired": {name: sorted(v) for name, v in sorted(self.status.retired.items())},
            "acked": self.status.acked,
            "last_ack": self.status.last_ack,
            "last_sync": self.status.last_sync,
            "last_error": self.status.last_error,
            "refused": list(self.status.refused),
            "bus": self.status.bus,
            "updated_at": time.time(),
        }

    def write_status(self) -> None:
        if self.status_file is None:
            return
        try:
            write_json_atomic(self.status_file, self.status_document())
        except OSError as exc:
            logger.warning("status file %s not written: %s", self.status_file, exc.strerror)


def _installed(keyset: Keyset) -> list[int]:
    return [v.version for v in keyset.versions if v.state in CONSUMING_STATES]
