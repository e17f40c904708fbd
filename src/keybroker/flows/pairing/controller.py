"""The controller's driver: connect to a device, run :class:`~.protocol.Controller`, talk.

A short loop around the sans-IO machine: every frame read is handed to it,
every :class:`~.protocol.Send` it returns is written, and the outcome is what
its events said. A peer that breaks the protocol is told so with a Refusal
(reason ``protocol-violation``) before the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from keybroker.errors import RemoteProtocolError, TransportError
from keybroker.flows.pairing.framing import read_frame, write_frame
from keybroker.flows.pairing.messages import Refusal
from keybroker.flows.pairing.protocol import (
    Controller,
    DevicePaired,
    Event,
    MessageReceived,
    PairingRefused,
    Send,
)
from keybroker.flows.pairing.refusals import RefusalReason

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class ControllerOutcome:
    paired: DevicePaired | None = None
    refusal: PairingRefused | None = None
    replies: list[bytes] = field(default_factory=list, repr=False)


async def _send_all(writer: asyncio.StreamWriter, events: Sequence[Event]) -> None:
    for event in events:
        if isinstance(event, Send):
            await write_frame(writer, event.data)


async def pair_with_device(
    host: str,
    port: int,
    controller: Controller,
    *,
    messages: Sequence[bytes] = (),
    clock: Clock = utc_now,
    timeout: float = 30.0,
    on_event: Callable[[Event], None] | None = None,
) -> ControllerOutcome:
    """Pair with the device at ``host:port``, then send ``messages`` and collect one reply each."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        raise TransportError(f"cannot connect to the device at {host}:{port}: {exc}") from None
    outcome = ControllerOutcome()
    try:
        async with asyncio.timeout(timeout):
            await _run(reader, writer, controller, messages, clock, on_event, outcome)
    except TimeoutError:
        raise TransportError(f"the device at {host}:{port} did not answer in time") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return outcome


async def _run(  # noqa: PLR0917 - the driver's whole state, passed once
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    controller: Controller,
    messages: Sequence[bytes],
    clock: Clock,
    on_event: Callable[[Event], None] | None,
    outcome: ControllerOutcome,
) -> None:
    await _send_all(writer, controller.start())
    while outcome.paired is None or len(outcome.replies) < len(messages):
        data = await read_frame(reader)
        if data is None:
            raise TransportError("the device closed the connection")
        try:
            events = controller.receive(data, clock())
        except RemoteProtocolError as exc:
            refusal = Refusal(reason=RefusalReason.PROTOCOL_VIOLATION.value, detail=str(exc))
            with contextlib.suppress(OSError):
                await write_frame(writer, refusal.encode())
            outcome.refusal = PairingRefused(RefusalReason.PROTOCOL_VIOLATION, str(exc), by_us=True)
            return
        await _send_all(writer, events)
        for event in events:
            if on_event is not None and not isinstance(event, Send):
                on_event(event)
            if isinstance(event, PairingRefused):
                outcome.refusal = event
                return
            if isinstance(event, MessageReceived):
                outcome.replies.append(event.plaintext)
            if isinstance(event, DevicePaired):
                outcome.paired = event
                for message in messages:
                    await _send_all(writer, controller.send(message))
