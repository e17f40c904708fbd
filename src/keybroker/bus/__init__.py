"""The bus: how the broker tells a principal, in real time, that something waits for it.

::

    bus = await open_bus("nats://127.0.0.1:4222")        # or mqtt://…, memory://
    topic = principal_topic("device/alice-phone", salt)   # "kb.3f9c…", reveals no name

    async with bus:
        await bus.publish(topic, sealed_ping)             # opaque bytes
        async with bus.subscribe(topic, durable="d-3f9c") as sub:
            async for message in sub:
                handle(message.payload)                   # idempotently
                await message.ack()

**What travels here is never key material.** A payload is either a bare
"something waits" ping or ciphertext sealed (HPKE) to its one recipient; the
bus, the message server and anyone subscribed to ``#``/``>`` see only opaque
bytes on opaque topics. The bus is a hint, not the record: deliveries live in
the broker and are fetched and acked through its API, which also offers a
long-poll fallback that needs no bus at all.

Implementations (semantics in :mod:`keybroker.bus.interface`):

* :class:`~keybroker.bus.memory.MemoryBus` — in-process; unit tests and the embedded default.
* :class:`~keybroker.bus.natsbus.NatsBus` — NATS; JetStream durable pull consumers
  (``pip install 'keybroker[nats]'``).
* :class:`~keybroker.bus.mqttbus.MqttBus` — MQTT 5 (Mosquitto); persistent sessions,
  QoS 1, TCP_NODELAY (``pip install 'keybroker[mqtt]'``).

``NatsBus`` and ``MqttBus`` are imported on first use, so this package works
without their optional dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keybroker.bus.interface import MAX_PAYLOAD, Bus, BusMessage, Subscription
from keybroker.bus.memory import MemoryBus
from keybroker.bus.topics import check_durable, check_topic, principal_topic
from keybroker.bus.urls import open_bus

if TYPE_CHECKING:
    from keybroker.bus.mqttbus import MqttBus
    from keybroker.bus.natsbus import NatsBus

__all__ = [
    "MAX_PAYLOAD",
    "Bus",
    "BusMessage",
    "MemoryBus",
    "MqttBus",
    "NatsBus",
    "Subscription",
    "check_durable",
    "check_topic",
    "open_bus",
    "principal_topic",
]


def __getattr__(name: str) -> Any:
    if name == "NatsBus":
        from keybroker.bus.natsbus import NatsBus

        return NatsBus
    if name == "MqttBus":
        from keybroker.bus.mqttbus import MqttBus

        return MqttBus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
