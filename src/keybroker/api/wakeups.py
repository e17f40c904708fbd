"""Waking long-polls on every replica through the bus.

A delivery made through one replica wakes that replica's long-polls at once
(:class:`~keybroker.api.auth.Waker`); without a bus, the other replicas find it
when they next look at the database (``poll_interval_seconds``). With a bus
configured, the replica that made the delivery also publishes a ping on one
wake topic that every replica subscribes to, live, and each wakes its own
long-polls. The ping carries nothing (not even whom it is for): waiters
re-read the database, which stays the only record. A bus that is down costs
latency, never correctness, so publish failures are logged and swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from keybroker.api.auth import Waker
from keybroker.bus import Bus, open_bus
from keybroker.errors import KeybrokerError

logger = logging.getLogger("keybroker.api.wakeups")

PING = b"1"


class BusWakeups:
    def __init__(self, bus: Bus, topic: str, waker: Waker) -> None:
        self._bus = bus
        self._topic = topic
        self._waker = waker
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @classmethod
    async def start(cls, url: str, topic: str, waker: Waker) -> BusWakeups:
        """Connect and subscribe; returns once the subscription is live."""
        wakeups = cls(await open_bus(url), topic, waker)
        wakeups._task = asyncio.create_task(wakeups._listen(), name="keybroker-bus-wakeups")
        ready = asyncio.create_task(wakeups._ready.wait())
        done, _ = await asyncio.wait({ready, wakeups._task}, return_when=asyncio.FIRST_COMPLETED)
        if wakeups._task in done:
            ready.cancel()
            wakeups._task.result()  # raises what stopped it
        return wakeups

    async def _listen(self) -> None:
        async with self._bus.subscribe(self._topic) as sub:
            self._ready.set()
            async for _message in sub:
                self._waker.wake()

    async def notify(self) -> None:
        """Tell every replica that something was delivered (best effort)."""
        try:
            await self._bus.publish(self._topic, PING)
        except KeybrokerError as exc:
            logger.warning("bus wake-up not sent (%s); replicas will poll", type(exc).__name__)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, KeybrokerError):
                await self._task
        await self._bus.close()
