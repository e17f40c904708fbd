"""The device's driver: listen in pairing mode, run :class:`~.protocol.Device` per connection.

After pairing the device answers each application message with ``respond(message)``
under the common key (the CLI's device acknowledges what it received). The key a
session installed is in :attr:`DeviceSession.keyset`; a device that serves more
than one session passes it to the next session's machine as ``held``, so a
re-pairing must continue it (see :mod:`.protocol`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from keybroker.errors import KeybrokerError, RemoteProtocolError
from keybroker.flows.pairing.framing import read_frame, write_frame
from keybroker.flows.pairing.protocol import (
    Device,
    Event,
    KeyInstalled,
    MessageReceived,
    PairingRefused,
    Send,
)
from keybroker.keys import Keyset

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class DeviceSession:
    """What one connection ended with."""

    installed: KeyInstalled | None = None
    keyset: Keyset | None = None  # what was installed (its repr shows ids only)
    refusal: PairingRefused | None = None
    error: str | None = None
    received: list[bytes] = field(default_factory=list, repr=False)


async def run_device_session(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    device: Device,
    *,
    respond: Callable[[bytes], bytes | None],
    clock: Clock = utc_now,
    on_event: Callable[[Event], None] | None = None,
) -> DeviceSession:
    """Serve one controller on an open connection until it closes, refuses or errs."""
    session = DeviceSession()
    try:
        while (data := await read_frame(reader)) is not None:
            events = device.receive(data, clock())
            for event in events:
                if isinstance(event, Send):
                    await write_frame(writer, event.data)
                    continue
                if on_event is not None:
                    on_event(event)
                if isinstance(event, KeyInstalled):
                    session.installed = event
                    session.keyset = device.keyset
                elif isinstance(event, PairingRefused):
                    session.refusal = event
                    return session
                elif isinstance(event, MessageReceived):
                    session.received.append(event.plaintext)
                    reply = respond(event.plaintext)
                    if reply is not None:
                        for out in device.send(reply):
                            if isinstance(out, Send):
                                await write_frame(writer, out.data)
    except RemoteProtocolError as exc:
        session.error = f"protocol violation by the controller: {exc}"
    except (KeybrokerError, OSError) as exc:
        session.error = str(exc)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return session


async def serve_device(
    host: str,
    port: int,
    make_device: Callable[[], Device],
    *,
    respond: Callable[[bytes], bytes | None],
    on_listening: Callable[[str, int], None],
    on_session: Callable[[DeviceSession], None],
    sessions: int | None = 1,
    clock: Clock = utc_now,
    on_event: Callable[[Event], None] | None = None,
) -> None:
    """Accept controllers one at a time; stop after ``sessions`` (None: serve until cancelled)."""
    done = asyncio.Event()
    served = 0
    lock = asyncio.Lock()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        async with lock:  # one pairing at a time, as a device in pairing mode
            if done.is_set():
                writer.close()
                return
            session = await run_device_session(
                reader, writer, make_device(), respond=respond, clock=clock, on_event=on_event
            )
            on_session(session)
            served += 1
            if sessions is not None and served >= sessions:
                done.set()

    server = await asyncio.start_server(handle, host, port)
    async with server:
        bound = server.sockets[0].getsockname()
        on_listening(str(bound[0]), int(bound[1]))
        await done.wait()
