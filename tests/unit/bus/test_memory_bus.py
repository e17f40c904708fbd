"""MemoryBus semantics, and the interface rules every bus shares (checked here without I/O).

The same contract runs against real NATS and Mosquitto in tests/e2e/test_bus_services.py.
"""

from __future__ import annotations

import asyncio

import pytest

from keybroker.bus import MAX_PAYLOAD, BusMessage, MemoryBus, open_bus
from keybroker.errors import ConfigurationError, LocalProtocolError

A = "kb.aaaa"
B = "kb.bbbb"


async def next_message(sub: object, timeout: float = 5.0) -> BusMessage:
    message: BusMessage = await asyncio.wait_for(anext(sub), timeout)  # type: ignore[call-overload]
    return message


async def test_round_trip_and_fan_out() -> None:
    async with MemoryBus() as bus, bus.subscribe(A) as one, bus.subscribe(A) as two:
        await bus.publish(A, b"ping")
        for sub in (one, two):
            message = await next_message(sub)
            assert (message.topic, message.payload) == (A, b"ping")


async def test_topic_isolation() -> None:
    async with MemoryBus() as bus, bus.subscribe(A) as sub_a, bus.subscribe(B) as sub_b:
        await bus.publish(B, b"for b")
        await bus.publish(A, b"for a")
        assert (await next_message(sub_a)).payload == b"for a"
        assert (await next_message(sub_b)).payload == b"for b"


async def test_live_subscription_misses_what_was_published_before() -> None:
    async with MemoryBus() as bus:
        await bus.publish(A, b"too early")
        async with bus.subscribe(A) as sub:
            await bus.publish(A, b"marker")
            assert (await next_message(sub)).payload == b"marker"


async def test_durable_gets_what_was_published_while_away() -> None:
    async with MemoryBus() as bus:
        async with bus.subscribe(A, durable="d1"):
            pass
        await bus.publish(A, b"one")
        await bus.publish(A, b"two")
        async with bus.subscribe(A, durable="d1") as sub:
            for expected in (b"one", b"two"):
                message = await next_message(sub)
                assert message.payload == expected
                await message.ack()


async def test_unacked_is_redelivered_acked_is_not() -> None:
    async with MemoryBus() as bus:
        async with bus.subscribe(A, durable="d1") as sub:
            await bus.publish(A, b"first")
            await bus.publish(A, b"second")
            first = await next_message(sub)
            second = await next_message(sub)
            await second.ack()
        async with bus.subscribe(A, durable="d1") as sub:
            again = await next_message(sub)
            assert again.payload == first.payload == b"first"
            await again.ack()
            await bus.publish(A, b"marker")
            assert (await next_message(sub)).payload == b"marker"


async def test_ack_is_idempotent_and_repr_hides_payload() -> None:
    async with MemoryBus() as bus, bus.subscribe(A, durable="d1") as sub:
        await bus.publish(A, b"secret-looking bytes")
        message = await next_message(sub)
        assert not message.acked
        await message.ack()
        await message.ack()
        assert message.acked
        assert "secret" not in repr(message)
        assert "20 bytes" in repr(message)


async def test_one_open_subscription_per_durable() -> None:
    async with MemoryBus() as bus, bus.subscribe(A, durable="d1"):
        with pytest.raises(LocalProtocolError, match="already open"):
            async with bus.subscribe(A, durable="d1"):
                pass
    # …and the failed attempt did not release the first one's claim.


async def test_durable_name_belongs_to_one_topic() -> None:
    async with MemoryBus() as bus:
        async with bus.subscribe(A, durable="d1"):
            pass
        with pytest.raises(ConfigurationError, match="another topic"):
            async with bus.subscribe(B, durable="d1"):
                pass


async def test_payload_bytes_exact_and_limit() -> None:
    payloads = [b"", bytes(range(256)), bytes(MAX_PAYLOAD)]
    async with MemoryBus() as bus, bus.subscribe(A) as sub:
        for payload in payloads:
            await bus.publish(A, payload)
        for payload in payloads:
            assert (await next_message(sub)).payload == payload
        with pytest.raises(LocalProtocolError, match="max_payload"):
            await bus.publish(A, bytes(MAX_PAYLOAD + 1))
        with pytest.raises(LocalProtocolError):
            await bus.publish(A, "text")  # type: ignore[arg-type]


async def test_bad_topic_or_durable_refused() -> None:
    async with MemoryBus() as bus:
        with pytest.raises(LocalProtocolError):
            await bus.publish("kb.>", b"x")
        with pytest.raises(LocalProtocolError):
            bus.subscribe("kb.*")
        with pytest.raises(LocalProtocolError):
            bus.subscribe(A, durable="a.b")


async def test_close_ends_iteration() -> None:
    bus = MemoryBus()
    sub = bus.subscribe(A)
    await sub.open()
    waiting = asyncio.ensure_future(anext(sub))
    await asyncio.sleep(0)
    await bus.close()
    with pytest.raises(StopAsyncIteration):
        await waiting
    with pytest.raises(LocalProtocolError, match="closed"):
        await bus.publish(A, b"x")
    with pytest.raises(LocalProtocolError, match="closed"):
        bus.subscribe(A)
    await bus.close()  # idempotent


async def test_async_for_stops_when_subscription_closes() -> None:
    async with MemoryBus() as bus:
        received: list[bytes] = []
        async with bus.subscribe(A) as sub:

            async def consume() -> None:
                async for message in sub:
                    received.append(message.payload)
                    if message.payload == b"stop":
                        await sub.close()

            task = asyncio.ensure_future(consume())
            for payload in (b"1", b"2", b"stop"):
                await bus.publish(A, payload)
            await asyncio.wait_for(task, 5)
        assert received == [b"1", b"2", b"stop"]


async def test_iterating_unopened_subscription_is_a_local_error() -> None:
    async with MemoryBus() as bus:
        with pytest.raises(LocalProtocolError, match="open the subscription"):
            await anext(bus.subscribe(A))


async def test_timed_out_wait_loses_nothing() -> None:
    """A caller that gives up waiting (wait_for) must not make the next message vanish."""
    async with MemoryBus() as bus, bus.subscribe(A) as sub:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(sub), 0.01)
        await bus.publish(A, b"after the timeout")
        assert (await next_message(sub)).payload == b"after the timeout"


async def test_bounded_durable_queue_drops_oldest() -> None:
    async with MemoryBus(max_queued=2) as bus:
        async with bus.subscribe(A, durable="d1"):
            pass
        for payload in (b"1", b"2", b"3"):
            await bus.publish(A, payload)
        async with bus.subscribe(A, durable="d1") as sub:
            assert (await next_message(sub)).payload == b"2"
            assert (await next_message(sub)).payload == b"3"


async def test_open_bus_memory() -> None:
    bus = await open_bus("memory://")
    assert isinstance(bus, MemoryBus)
    await bus.close()
