"""Frames on a TCP stream: a 4-byte big-endian length, then one canonical message.

Hand-written because it is four lines: asyncio's ``readexactly`` does the work.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Final

from keybroker.errors import DecodeError, TransportError
from keybroker.flows.pairing.messages import MAX_FRAME

_LENGTH: Final = struct.Struct(">I")


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame, or None at a clean end of stream (between frames).

    A frame larger than :data:`MAX_FRAME` raises DecodeError before it is read; a
    stream that ends inside a frame raises TransportError.
    """
    try:
        header = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise TransportError("connection closed inside a frame header") from None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME:
        raise DecodeError(f"frame of {length} bytes; at most {MAX_FRAME}")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise TransportError("connection closed inside a frame") from None


def frame(data: bytes) -> bytes:
    if len(data) > MAX_FRAME:
        raise DecodeError(f"frame of {len(data)} bytes; at most {MAX_FRAME}")
    return _LENGTH.pack(len(data)) + data


async def write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(frame(data))
    await writer.drain()
