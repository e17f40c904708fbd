"""The in-process bus: asyncio queues, for unit tests and the embedded default.

It keeps the shared semantics of :mod:`keybroker.bus.interface` within one
process and one event loop: a durable name remembers its topic, its pending
messages and its un-acked ones for as long as the :class:`MemoryBus` lives;
closing a durable subscription puts its un-acked messages back at the head of
its queue. Nothing survives the process. A durable queue holds at most
``max_queued`` messages; beyond that the oldest is dropped (and logged), as a
message server with limits would.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

from keybroker.bus.interface import MAX_PAYLOAD, Bus, BusMessage, Subscription
from keybroker.errors import ConfigurationError

_log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUED = 10_000


@dataclass
class _Durable:
    topic: str
    pending: deque[tuple[int, bytes]] = field(default_factory=deque)
    unacked: dict[int, bytes] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryBus(Bus):
    """A bus inside this process. Every :class:`MemoryBus` is its own world."""

    def __init__(self, *, max_payload: int = MAX_PAYLOAD, max_queued: int = DEFAULT_MAX_QUEUED):
        super().__init__(max_payload=max_payload)
        self._max_queued = max_queued
        self._seq = itertools.count(1)
        self._live: dict[str, set[_MemorySubscription]] = {}
        self._durables: dict[str, _Durable] = {}

    async def _publish(self, topic: str, payload: bytes) -> None:
        seq = next(self._seq)
        for sub in self._live.get(topic, ()):
            sub.queue.put_nowait(payload)
        for name, durable in self._durables.items():
            if durable.topic != topic:
                continue
            if len(durable.pending) >= self._max_queued:
                durable.pending.popleft()
                _log.warning("memory bus: durable %r is full; dropped its oldest message", name)
            durable.pending.append((seq, payload))
            durable.ready.set()

    def _subscription(self, topic: str, durable: str | None) -> Subscription:
        return _MemorySubscription(self, topic, durable)

    async def _close(self) -> None:
        self._live.clear()

    def _durable_state(self, name: str, topic: str) -> _Durable:
        state = self._durables.get(name)
        if state is None:
            state = self._durables[name] = _Durable(topic)
        elif state.topic != topic:
            raise ConfigurationError(
                f"durable {name!r} belongs to another topic; use one durable name per topic"
            )
        return state


class _MemorySubscription(Subscription):
    def __init__(self, bus: MemoryBus, topic: str, durable: str | None) -> None:
        super().__init__(bus, topic, durable)
        self._memory = bus
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._state: _Durable | None = None

    async def _open(self) -> None:
        if self.durable is None:
            self._memory._live.setdefault(self.topic, set()).add(self)
            return
        self._state = self._memory._durable_state(self.durable, self.topic)

    async def _receive(self) -> BusMessage:
        state = self._state
        if state is None:
            return BusMessage(self.topic, await self.queue.get())
        while not state.pending:
            state.ready.clear()
            await state.ready.wait()
        seq, payload = state.pending.popleft()
        state.unacked[seq] = payload

        async def ack() -> None:
            state.unacked.pop(seq, None)

        return BusMessage(self.topic, payload, ack)

    async def _close(self) -> None:
        state = self._state
        if state is None:
            self._memory._live.get(self.topic, set()).discard(self)
            return
        # Un-acked messages go back to the head of the queue, oldest first.
        state.pending.extendleft(sorted(state.unacked.items(), reverse=True))
        state.unacked.clear()
