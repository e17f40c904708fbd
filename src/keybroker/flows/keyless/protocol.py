"""Sans-IO framing and connection state of the key-server protocol (bytes in, events out).

Wire format (numbers in :mod:`.codes`)::

    frame  = header body
    header = major u8 | minor u8 | length u16 (of body) | id u32      big-endian, 8 bytes
    body   = item*
    item   = tag u8 | length u16 | data

A request carries an :attr:`Tag.OPCODE` item (one byte) and, depending on the
operation, an SKI (20 bytes), an SNI (an ASCII host name), the client's and the
edge's IP addresses (4 or 16 bytes), a certificate id and a payload. It is
padded with a :attr:`Tag.PADDING` item of zeros so that the whole frame is
:data:`REQUEST_PAD_TO` bytes whenever a padding item fits; a larger request
(or one 1 or 2 bytes short of the target, where no 3-byte item header fits)
goes unpadded. A response carries an opcode (:attr:`Op.RESPONSE`,
:attr:`Op.PONG` or :attr:`Op.ERROR`) and a payload (for ``ERROR``: one byte,
the :class:`ErrorCode`).

Decoding is strict: a tag seen twice, an item running past the body, an opcode
item that is not one byte, an SKI that is not 20 bytes, an IP address that is
neither 4 nor 16 bytes, an SNI that is not a host name, a frame whose length
disagrees with its header — each raises :class:`DecodeError` with ``code`` set
to the :class:`ErrorCode` to answer with. Tags keybroker does not use (including
:attr:`Tag.RSA_MODULUS_SHA256`) are skipped, but still may not repeat. The
minor version is ignored; a different major version is ``VERSION_MISMATCH``.

Connections (:class:`ServerConnection`, :class:`ClientConnection`) keep no
sockets, tasks or clocks: the driver feeds them received bytes and writes the
bytes they return. Framing is length-prefixed, so after a request with a sound
header but a bad body the server answers that id with an error and carries on;
only a header it cannot trust (wrong major version, oversized) breaks the
connection. The client trusts its key server: anything unexpected from it is a
:class:`RemoteProtocolError` and the driver drops the connection.

Payloads are digests, signatures and premaster secrets: no ``repr`` here shows
their bytes, only their lengths.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from keybroker.errors import (
    ConfigurationError,
    DecodeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from keybroker.flows.keyless.codes import (
    HEADER_LENGTH,
    MAX_BODY_LENGTH,
    MAX_PENDING,
    REQUEST_PAD_TO,
    VERSION_MAJOR,
    VERSION_MINOR,
    ErrorCode,
    Op,
    Tag,
)

HEADER: Final = struct.Struct(">BBHI")
ITEM: Final = struct.Struct(">BH")
#: Request ids are unsigned 32-bit integers.
MAX_ID: Final = 0xFFFF_FFFF
#: Default largest request body a server accepts: room for a padded request and a payload
#: of a few kilobytes (a 4096-bit RSA block is 512 bytes).
DEFAULT_MAX_FRAME: Final = 4096
#: A Subject Key Identifier: the SHA-1 of the public key.
SKI_LENGTH: Final = 20
MAX_SNI_LENGTH: Final = 255
MAX_CERT_ID_LENGTH: Final = 255

#: The three opcodes a key server answers with.
REPLY_OPS: Final = frozenset({Op.RESPONSE, Op.PONG, Op.ERROR})
#: Every opcode a request may carry.
REQUEST_OPS: Final = frozenset(op for op in Op if op not in REPLY_OPS)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Dot-separated labels of letters, digits, hyphens and underscores (some real names have
# underscores); no empty labels, no trailing dot (RFC 6066 forbids it in SNI).
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*", re.ASCII)
_KNOWN_TAGS: Final = frozenset(int(tag) for tag in Tag)
_OPCODES: Final = frozenset(int(op) for op in Op)
_ERROR_CODES: Final = frozenset(int(code) for code in ErrorCode)
# Visible ASCII, no spaces.
_CERT_ID: Final = re.compile(r"[\x21-\x7e]+", re.ASCII)
# The fast request decoder's view of the same rules: _HOSTNAME over bytes (ASCII only).
_HOSTNAME_BYTES: Final = re.compile(rb"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*")
_REQUEST_OP_BY_NUMBER: Final = {int(op): op for op in REQUEST_OPS}
_T_OPCODE: Final = int(Tag.OPCODE)
_T_SKI: Final = int(Tag.SKI)
_T_SNI: Final = int(Tag.SNI)
_T_PAYLOAD: Final = int(Tag.PAYLOAD)
_T_PADDING: Final = int(Tag.PADDING)
#: header | OPCODE item | the next item's header. Written for a RESPONSE frame but its
#: payload (the next item is PAYLOAD); read first from a request in the layout
#: encode_request writes (the next item is SNI).
_LEAD: Final = struct.Struct(">BBHIBHBBH")
_OK_BODY_OVERHEAD: Final = 2 * ITEM.size + 1
_OP_RESPONSE: Final = int(Op.RESPONSE)
#: After the SNI in that layout: the SKI item, then the PAYLOAD item's header.
_MIDDLE: Final = struct.Struct(">BH20sBH")


def _check_id(value: object, what: str) -> None:
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise LocalProtocolError(
            f"{what} id must be an integer in [0, 2**32)", code=ErrorCode.FORMAT
        )


def _describe(payload: bytes) -> str:
    return f"<{len(payload)} bytes>"


@dataclass(frozen=True, repr=False)
class Request:
    """One key-server request. Constructing an invalid one raises :class:`LocalProtocolError`."""

    id: int
    op: Op
    #: Subject Key Identifier of the key to use (20 bytes); ``None`` for PING.
    ski: bytes | None = None
    #: The host name the TLS client asked for.
    sni: str | None = None
    client_ip: IPAddress | None = None
    server_ip: IPAddress | None = None
    cert_id: str | None = None
    #: What to sign or decrypt (PING: what PONG echoes). Never shown by ``repr``.
    payload: bytes = b""

    def __post_init__(self) -> None:
        _check_id(self.id, "request")
        if not isinstance(self.op, Op):
            raise LocalProtocolError("op must be an Op", code=ErrorCode.BAD_OPCODE)
        if self.op in REPLY_OPS:
            raise LocalProtocolError(
                f"{self.op.name} is a reply, not a request", code=ErrorCode.UNEXPECTED_OPCODE
            )
        if self.ski is not None and (
            not isinstance(self.ski, bytes) or len(self.ski) != SKI_LENGTH
        ):
            raise LocalProtocolError(f"an SKI is {SKI_LENGTH} bytes", code=ErrorCode.FORMAT)
        if self.sni is not None and not _is_hostname(self.sni):
            raise LocalProtocolError(
                "SNI must be an ASCII host name of at most 255 bytes", code=ErrorCode.FORMAT
            )
        for name in ("client_ip", "server_ip"):
            value = getattr(self, name)
            if value is not None and not isinstance(
                value, ipaddress.IPv4Address | ipaddress.IPv6Address
            ):
                raise LocalProtocolError(f"{name} must be an IP address", code=ErrorCode.FORMAT)
        if self.cert_id is not None and not (
            isinstance(self.cert_id, str)
            and len(self.cert_id) <= MAX_CERT_ID_LENGTH
            and _CERT_ID.fullmatch(self.cert_id)
        ):
            raise LocalProtocolError(
                "cert_id must be 1 to 255 visible ASCII characters", code=ErrorCode.FORMAT
            )
        if not isinstance(self.payload, bytes):
            raise LocalProtocolError("payload must be bytes", code=ErrorCode.FORMAT)

    def __repr__(self) -> str:
        parts = [f"id={self.id}", f"op={self.op.name}"]
        if self.ski is not None:
            parts.append(f"ski={self.ski.hex()}")
        if self.sni is not None:
            parts.append(f"sni={self.sni!r}")
        if self.client_ip is not None:
            parts.append(f"client_ip={self.client_ip}")
        if self.server_ip is not None:
            parts.append(f"server_ip={self.server_ip}")
        if self.cert_id is not None:
            parts.append(f"cert_id={self.cert_id!r}")
        parts.append(f"payload={_describe(self.payload)}")
        return f"Request({', '.join(parts)})"


@dataclass(frozen=True, repr=False)
class Response:
    """One key-server reply: ``RESPONSE`` (the result), ``PONG`` (the echo) or ``ERROR``."""

    id: int
    op: Op
    payload: bytes = b""

    def __post_init__(self) -> None:
        _check_id(self.id, "response")
        if not isinstance(self.op, Op) or self.op not in REPLY_OPS:
            raise LocalProtocolError(
                "a response's op is RESPONSE, PONG or ERROR", code=ErrorCode.UNEXPECTED_OPCODE
            )
        if not isinstance(self.payload, bytes):
            raise LocalProtocolError("payload must be bytes", code=ErrorCode.FORMAT)
        if self.op is Op.ERROR and (len(self.payload) != 1 or self.payload[0] not in _ERROR_CODES):
            raise LocalProtocolError(
                "an ERROR's payload is one byte, a known error code", code=ErrorCode.FORMAT
            )

    @classmethod
    def ok(cls, id: int, payload: bytes) -> Response:
        """The successful result of a key operation."""
        return cls(id, Op.RESPONSE, payload)

    @classmethod
    def pong(cls, id: int, payload: bytes = b"") -> Response:
        """The answer to a PING, echoing its payload."""
        return cls(id, Op.PONG, payload)

    @classmethod
    def error(cls, id: int, code: ErrorCode) -> Response:
        """A failed request."""
        if code not in _ERROR_CODES:
            raise LocalProtocolError(f"unknown error code {code!r}", code=ErrorCode.INTERNAL)
        return cls(id, Op.ERROR, bytes([code]))

    @property
    def error_code(self) -> ErrorCode | None:
        """The error of an ``ERROR`` reply; ``None`` for ``RESPONSE`` and ``PONG``."""
        if self.op is not Op.ERROR:
            return None
        return ErrorCode(self.payload[0])

    def __repr__(self) -> str:
        if self.op is Op.ERROR:
            code = self.error_code
            assert code is not None
            return f"Response(id={self.id}, op=ERROR, error={code.name})"
        return f"Response(id={self.id}, op={self.op.name}, payload={_describe(self.payload)})"


# -- codec -----------------------------------------------------------------------------


def _is_hostname(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= MAX_SNI_LENGTH
        and _HOSTNAME.fullmatch(value) is not None
    )


def _item(tag: Tag, data: bytes) -> bytes:
    if len(data) > MAX_BODY_LENGTH:
        raise LocalProtocolError(
            f"{tag.name} item of {len(data)} bytes does not fit", code=ErrorCode.FORMAT
        )
    return ITEM.pack(tag, len(data)) + data


def _frame(frame_id: int, body: bytes) -> bytes:
    if len(body) > MAX_BODY_LENGTH:
        raise LocalProtocolError(
            f"a body of {len(body)} bytes exceeds {MAX_BODY_LENGTH}", code=ErrorCode.FORMAT
        )
    _check_id(frame_id, "frame")
    return HEADER.pack(VERSION_MAJOR, VERSION_MINOR, len(body), frame_id) + body


def encode_request(request: Request) -> bytes:
    """The padded frame of ``request``; :class:`LocalProtocolError` if it cannot be framed.

    Items go opcode first, then in ascending tag order, then padding.
    """
    items = [_item(Tag.OPCODE, bytes([request.op]))]
    if request.sni is not None:
        items.append(_item(Tag.SNI, request.sni.encode("ascii")))
    if request.client_ip is not None:
        items.append(_item(Tag.CLIENT_IP, request.client_ip.packed))
    if request.ski is not None:
        items.append(_item(Tag.SKI, request.ski))
    if request.server_ip is not None:
        items.append(_item(Tag.SERVER_IP, request.server_ip.packed))
    if request.cert_id is not None:
        items.append(_item(Tag.CERT_ID, request.cert_id.encode("ascii")))
    if request.payload:
        items.append(_item(Tag.PAYLOAD, request.payload))
    body = b"".join(items)
    room = REQUEST_PAD_TO - HEADER_LENGTH - len(body) - ITEM.size
    if room >= 0:
        body += ITEM.pack(Tag.PADDING, room) + bytes(room)
    return _frame(request.id, body)


def encode_response(response: Response) -> bytes:
    """The frame of ``response`` (unpadded); :class:`LocalProtocolError` if it does not fit."""
    body = _item(Tag.OPCODE, bytes([response.op]))
    if response.payload:
        body += _item(Tag.PAYLOAD, response.payload)
    return _frame(response.id, body)


def _split(frame: bytes) -> tuple[int, bytes]:
    """``(id, body)`` of one whole frame."""
    if len(frame) < HEADER_LENGTH:
        raise DecodeError(
            f"a frame of {len(frame)} bytes is shorter than the header", code=ErrorCode.FORMAT
        )
    major, _minor, length, frame_id = HEADER.unpack_from(frame)
    if major != VERSION_MAJOR:
        raise DecodeError(
            f"major version {major}, not {VERSION_MAJOR}", code=ErrorCode.VERSION_MISMATCH
        )
    if len(frame) != HEADER_LENGTH + length:
        raise DecodeError(
            f"header declares a {length}-byte body, the frame has {len(frame) - HEADER_LENGTH}",
            code=ErrorCode.FORMAT,
        )
    return frame_id, bytes(frame[HEADER_LENGTH:])


def _items(body: bytes) -> dict[int, bytes]:
    """The data of each known tag; unknown tags are skipped, but no tag may appear twice."""
    seen: set[int] = set()
    items: dict[int, bytes] = {}
    offset = 0
    while offset < len(body):
        if len(body) - offset < ITEM.size:
            raise DecodeError("a truncated item header ends the body", code=ErrorCode.FORMAT)
        tag, length = ITEM.unpack_from(body, offset)
        offset += ITEM.size
        end = offset + length
        if end > len(body):
            raise DecodeError(f"item {tag:#04x} runs past the body", code=ErrorCode.FORMAT)
        if tag in seen:
            raise DecodeError(f"tag {tag:#04x} appears twice", code=ErrorCode.FORMAT)
        seen.add(tag)
        if tag in _KNOWN_TAGS and tag != Tag.PADDING:
            items[tag] = body[offset:end]
        offset = end
    return items


def _opcode(items: dict[int, bytes]) -> Op:
    data = items.get(Tag.OPCODE)
    if data is None:
        raise DecodeError("no opcode", code=ErrorCode.FORMAT)
    if len(data) != 1:
        raise DecodeError(f"an opcode of {len(data)} bytes", code=ErrorCode.FORMAT)
    if data[0] not in _OPCODES:
        raise DecodeError(f"unknown opcode {data[0]:#04x}", code=ErrorCode.BAD_OPCODE)
    return Op(data[0])


def _ip(items: dict[int, bytes], tag: Tag) -> IPAddress | None:
    data = items.get(tag)
    if data is None:
        return None
    if len(data) not in (4, 16):
        raise DecodeError(f"{tag.name} of {len(data)} bytes", code=ErrorCode.FORMAT)
    return ipaddress.ip_address(data)


def _ascii(items: dict[int, bytes], tag: Tag) -> str | None:
    data = items.get(tag)
    if data is None:
        return None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError(f"{tag.name} is not ASCII", code=ErrorCode.FORMAT) from None


def _decode_request_body(request_id: int, body: bytes) -> Request:
    items = _items(body)
    op = _opcode(items)
    try:
        return Request(
            request_id,
            op,
            ski=items.get(Tag.SKI),
            sni=_ascii(items, Tag.SNI),
            client_ip=_ip(items, Tag.CLIENT_IP),
            server_ip=_ip(items, Tag.SERVER_IP),
            cert_id=_ascii(items, Tag.CERT_ID),
            payload=items.get(Tag.PAYLOAD, b""),
        )
    except LocalProtocolError as exc:  # the peer's fields, so the peer's error
        raise DecodeError(str(exc), code=exc.code) from None


#: What :func:`_fast_fields` reads from a body: opcode, SKI, SNI (ASCII bytes), payload.
_Fields: TypeAlias = tuple[Op, bytes | None, bytes | None, bytes]

#: A key operation as :meth:`ServerConnection.receive_operations` hands it over: request id,
#: opcode (a request opcode other than PING), SKI (20 bytes), payload.
Operation: TypeAlias = tuple[int, Op, bytes, bytes]


#: Host names (SNI item bytes) found valid, so that the next request naming one is not
#: matched again; bounded (names come from peers): once full, further names are matched
#: each time.
_GOOD_SNI: Final[set[bytes]] = set()
_GOOD_SNI_MAX: Final = 1024


def _good_sni(sni: bytes) -> bool:
    if sni in _GOOD_SNI:
        return True
    if len(sni) > MAX_SNI_LENGTH or _HOSTNAME_BYTES.fullmatch(sni) is None:
        return False
    if len(_GOOD_SNI) < _GOOD_SNI_MAX:
        _GOOD_SNI.add(sni)
    return True


def _fast_fields(data: bytes, start: int, end: int) -> _Fields | None:
    """The fields of the body ``data[start:end]``, if it has the usual shape; else ``None``.

    The usual shape is what an edge sends: items OPCODE (a request opcode), SKI (20 bytes),
    SNI (a host name), PAYLOAD and PADDING, each at most once, in any order, none running
    past the body. Such a body decodes to the same request with :func:`_decode_request_body`,
    whose checks are all made here. Anything else (another tag, a bad length, an error of any
    kind) gives ``None``, and the full decoder then decides, with its exact error codes.
    (:meth:`ServerConnection.receive_data` first tries the layout :func:`encode_request`
    writes with two fixed-layout reads, and comes here for anything else.)
    """
    op: Op | None = None
    ski: bytes | None = None
    sni: bytes | None = None
    payload = b""
    seen = 0
    offset = start
    unpack = ITEM.unpack_from
    while offset < end:
        if end - offset < 3:
            return None
        tag, length = unpack(data, offset)
        offset += 3
        item_end = offset + length
        if item_end > end:
            return None
        bit = 1 << tag
        if seen & bit:
            return None
        seen |= bit
        if tag == _T_PAYLOAD:
            payload = data[offset:item_end]
        elif tag == _T_SKI:
            if length != SKI_LENGTH:
                return None
            ski = data[offset:item_end]
        elif tag == _T_OPCODE:
            if length != 1:
                return None
            op = _REQUEST_OP_BY_NUMBER.get(data[offset])
            if op is None:
                return None
        elif tag == _T_SNI:
            sni = data[offset:item_end]
            if not _good_sni(sni):
                return None
        elif tag != _T_PADDING:  # padding is skipped; anything else takes the full decoder
            return None
        offset = item_end
    if op is None:
        return None
    return op, ski, sni, payload


def _request_of(request_id: int, fields: _Fields) -> Request:
    """The :class:`Request` of checked fields, built without checking them again."""
    op, ski, sni, payload = fields
    request: Request = object.__new__(Request)
    request.__dict__.update(
        id=request_id,
        op=op,
        ski=ski,
        sni=None if sni is None else sni.decode("ascii"),
        client_ip=None,
        server_ip=None,
        cert_id=None,
        payload=payload,
    )
    return request


def _fast_request(request_id: int, data: bytes, start: int, end: int) -> Request | None:
    """The request whose body is ``data[start:end]``, if it has the usual shape (see
    :func:`_fast_fields`); else ``None``. Equal to :func:`_decode_request_body`'s."""
    fields = _fast_fields(data, start, end)
    return None if fields is None else _request_of(request_id, fields)


def _decode_response_body(response_id: int, body: bytes) -> Response:
    items = _items(body)
    op = _opcode(items)
    try:
        return Response(response_id, op, items.get(Tag.PAYLOAD, b""))
    except LocalProtocolError as exc:
        raise DecodeError(str(exc), code=exc.code) from None


def decode_request(frame: bytes) -> Request:
    """The request in one whole frame; :class:`DecodeError` (with ``code``) if malformed."""
    request_id, body = _split(frame)
    return _decode_request_body(request_id, body)


def decode_response(frame: bytes) -> Response:
    """The response in one whole frame; :class:`DecodeError` (with ``code``) if malformed."""
    response_id, body = _split(frame)
    return _decode_response_body(response_id, body)


# -- connections -----------------------------------------------------------------------


@dataclass(frozen=True)
class RequestReceived:
    """A well-formed request: perform it, answer with :meth:`ServerConnection.send_response`."""

    request: Request


@dataclass(frozen=True)
class BadRequest:
    """A sound header but a bad body (or one request too many): answer ``id`` with the error."""

    id: int
    error_code: ErrorCode

    def reply(self) -> Response:
        """The error response the driver sends."""
        return Response.error(self.id, self.error_code)


@dataclass(frozen=True)
class ConnectionBroken:
    """A header that cannot be trusted: answer ``id`` with the error, then close the connection."""

    id: int
    error_code: ErrorCode

    def reply(self) -> Response:
        """The error response the driver sends before closing."""
        return Response.error(self.id, self.error_code)


Event = RequestReceived | BadRequest | ConnectionBroken


def _check_limits(max_pending: int, max_frame: int, min_frame: int) -> None:
    if not 1 <= max_pending <= MAX_ID + 1:
        raise ConfigurationError("max_pending must be between 1 and 2**32")
    if not min_frame <= max_frame <= MAX_BODY_LENGTH:
        raise ConfigurationError(f"max_frame must be between {min_frame} and {MAX_BODY_LENGTH}")


class ServerConnection:
    """The key server's side of one connection.

    :meth:`receive_data` turns bytes into :data:`Event` objects and never raises for
    anything the peer sends. Every :class:`RequestReceived`, :class:`BadRequest` and
    :class:`ConnectionBroken` is owed exactly one answer through :meth:`send_response`
    (replies may go in any order). At most ``max_pending`` requests are outstanding;
    the next is a :class:`BadRequest` with ``OVERLOADED``. A body longer than
    ``max_frame`` breaks the connection as soon as its header arrives, so the bytes
    held back never exceed ``HEADER_LENGTH + max_frame``.
    """

    def __init__(self, max_pending: int = MAX_PENDING, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        # A limit below a padded request's body would refuse every request.
        _check_limits(max_pending, max_frame, REQUEST_PAD_TO - HEADER_LENGTH)
        self._max_pending = max_pending
        self._max_frame = max_frame
        self._buffer = bytearray()
        #: Outstanding requests: id → opcode (which decides the reply's opcode).
        self._outstanding: dict[int, Op] = {}
        #: Error answers owed for BadRequest / ConnectionBroken events, per id.
        self._owed_errors: Counter[int] = Counter()
        self._broken = False

    @property
    def pending(self) -> int:
        """Requests received and not yet answered (owed error answers not counted)."""
        return len(self._outstanding)

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)

    @property
    def broken(self) -> bool:
        """Whether a :class:`ConnectionBroken` was reported (no more data is accepted)."""
        return self._broken

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for every frame ``data`` completes; stops at a :class:`ConnectionBroken`."""
        return self._receive(data, None)

    def receive_operations(self, data: bytes, operations: list[Operation]) -> list[Event]:
        """:meth:`receive_data`, but each key operation of the usual shape (an edge's
        request: see :func:`_fast_fields`, with an SKI, not a PING) is appended to
        ``operations`` as an :data:`Operation` instead of being returned as a
        :class:`RequestReceived` (no objects per request: the key server's hot path). Each
        is outstanding and owed one answer exactly as a :class:`RequestReceived` is."""
        return self._receive(data, operations)

    def _receive(  # noqa: PLR0915 - one loop on purpose: the key server's hot path
        self, data: bytes, operations: list[Operation] | None
    ) -> list[Event]:
        if self._broken:
            raise LocalProtocolError("the connection is broken: close it, do not feed it")
        buffer = self._buffer
        # Frames are read from one bytes object: ``data`` itself when nothing is held back
        # (no copy), else what is held back followed by ``data``.
        if buffer or type(data) is not bytes:
            buffer += data
            view = bytes(buffer)
            buffer.clear()
        else:
            view = data
        size = len(view)
        events: list[Event] = []
        outstanding = self._outstanding
        max_frame = self._max_frame
        max_pending = self._max_pending
        ping = Op.PING
        lead = _LEAD.unpack_from
        lead_size = _LEAD.size
        middle = _MIDDLE.unpack_from
        middle_size = _MIDDLE.size
        item = ITEM.unpack_from
        request_ops = _REQUEST_OP_BY_NUMBER
        good_sni = _GOOD_SNI
        offset = 0
        while size - offset >= HEADER_LENGTH:
            # First the layout encode_request writes (see _fast_fields), read in place.
            if size - offset >= lead_size:
                (major, _minor, length, request_id, tag_op, op_length, number, tag_sni,
                 sni_length) = lead(view, offset)  # fmt: skip
                sni_end = offset + lead_size + sni_length
                end = offset + HEADER_LENGTH + length
                if (
                    major == VERSION_MAJOR
                    and length <= max_frame
                    and end <= size
                    and tag_op == _T_OPCODE
                    and op_length == 1
                    and tag_sni == _T_SNI
                    and sni_end + middle_size <= end
                ):
                    tag_ski, ski_length, ski, tag_payload, payload_size = middle(view, sni_end)
                    payload_end = sni_end + middle_size + payload_size
                    op = request_ops.get(number)
                    sni = view[offset + lead_size : sni_end]
                    if (
                        tag_ski == _T_SKI
                        and ski_length == SKI_LENGTH
                        and tag_payload == _T_PAYLOAD
                        and op is not None
                        and op is not ping
                        and (
                            payload_end == end
                            or (
                                payload_end + 3 <= end
                                and item(view, payload_end) == (_T_PADDING, end - payload_end - 3)
                            )
                        )
                        and (sni in good_sni or _good_sni(sni))
                        and request_id not in outstanding
                        and len(outstanding) < max_pending
                    ):
                        offset = end
                        outstanding[request_id] = op
                        payload = view[payload_end - payload_size : payload_end]
                        if operations is not None:
                            operations.append((request_id, op, ski, payload))
                        else:
                            events.append(
                                RequestReceived(_request_of(request_id, (op, ski, sni, payload)))
                            )
                        continue
            major, _minor, length, request_id = HEADER.unpack_from(view, offset)
            if major != VERSION_MAJOR or length > max_frame:
                code = ErrorCode.VERSION_MISMATCH if major != VERSION_MAJOR else ErrorCode.FORMAT
                self._broken = True
                self._owed_errors[request_id] += 1
                events.append(ConnectionBroken(request_id, code))
                return events
            start = offset + HEADER_LENGTH
            end = start + length
            if size < end:
                break
            offset = end
            fields = _fast_fields(view, start, end)
            if (
                fields is not None
                and request_id not in outstanding
                and len(outstanding) < max_pending
            ):
                op, ski = fields[0], fields[1]
                outstanding[request_id] = op
                if operations is not None and ski is not None and op is not ping:
                    operations.append((request_id, op, ski, fields[3]))
                else:
                    events.append(RequestReceived(_request_of(request_id, fields)))
            else:
                events.append(self._accept(request_id, view[start:end]))
        if offset < size:
            buffer += view[offset:]
        return events

    def _accept(self, request_id: int, body: bytes) -> Event:
        try:
            request = _decode_request_body(request_id, body)
        except DecodeError as exc:
            return self._bad(request_id, ErrorCode(exc.code))
        if request_id in self._outstanding:
            return self._bad(request_id, ErrorCode.FORMAT)
        if len(self._outstanding) >= self._max_pending:
            return self._bad(request_id, ErrorCode.OVERLOADED)
        self._outstanding[request_id] = request.op
        return RequestReceived(request)

    def _bad(self, request_id: int, code: ErrorCode) -> BadRequest:
        self._owed_errors[request_id] += 1
        return BadRequest(request_id, code)

    def send_response(self, response: Response) -> bytes:
        """The frame answering an outstanding request (or a bad one); :class:`LocalProtocolError`
        if nothing is owed to ``response.id`` or the opcode does not answer the request's."""
        frame = encode_response(response)
        response_id = response.id
        if response.op is Op.ERROR and self._owed_errors[response_id] > 0:
            self._owed_errors[response_id] -= 1
            if not self._owed_errors[response_id]:
                del self._owed_errors[response_id]
            return frame
        asked = self._outstanding.get(response_id)
        if asked is None:
            raise LocalProtocolError(f"no request {response_id} is waiting for an answer")
        expected = Op.PONG if asked is Op.PING else Op.RESPONSE
        if response.op not in (expected, Op.ERROR):
            raise LocalProtocolError(
                f"{asked.name} is answered with {expected.name} or ERROR, not {response.op.name}"
            )
        del self._outstanding[response_id]
        return frame

    def send_ok(self, request_id: int, payload: bytes) -> bytes:
        """``send_response(Response.ok(request_id, payload))``, the same frame and the same
        checks, without building the :class:`Response` (the key server's common reply)."""
        if (
            type(payload) is bytes
            and 0 < len(payload) <= MAX_BODY_LENGTH - _OK_BODY_OVERHEAD
            and self._outstanding.get(request_id, Op.PING) is not Op.PING
        ):
            del self._outstanding[request_id]
            size = len(payload)
            head = _LEAD.pack(
                VERSION_MAJOR, VERSION_MINOR, _OK_BODY_OVERHEAD + size, request_id,
                _T_OPCODE, 1, _OP_RESPONSE, _T_PAYLOAD, size,
            )  # fmt: skip
            return head + payload
        return self.send_response(Response.ok(request_id, payload))

    def send_oks(self, request_ids: Sequence[int], payloads: Sequence[bytes]) -> bytes:
        """The frames of ``send_ok(request_ids[i], payloads[i])`` for every ``i``, joined
        (the same frames and checks, one call for a batch of replies)."""
        if len(request_ids) != len(payloads):
            raise LocalProtocolError("as many payloads as request ids are needed")
        outstanding = self._outstanding
        pack = _LEAD.pack
        ping = Op.PING
        limit = MAX_BODY_LENGTH - _OK_BODY_OVERHEAD
        frames: list[bytes] = []
        for request_id, payload in zip(request_ids, payloads, strict=True):
            size = len(payload)
            if (
                type(payload) is bytes
                and 0 < size <= limit
                and outstanding.get(request_id, ping) is not ping
            ):
                del outstanding[request_id]
                head = pack(
                    VERSION_MAJOR, VERSION_MINOR, _OK_BODY_OVERHEAD + size, request_id,
                    _T_OPCODE, 1, _OP_RESPONSE, _T_PAYLOAD, size,
                )  # fmt: skip
                frames.append(head + payload)
            else:
                frames.append(self.send_response(Response.ok(request_id, payload)))
        return b"".join(frames)


@dataclass(frozen=True)
class _Sent:
    op: Op
    #: For a PING, the payload the PONG must echo.
    echo: bytes | None


class ClientConnection:
    """The edge's side of one connection to a key server.

    :meth:`send_request` allocates ids (counting up from ``first_id``, wrapping at 2**32,
    skipping ids still outstanding). :meth:`receive_data` returns the responses in the
    order they arrive, matched to outstanding ids. Anything unexpected from the server
    — a malformed frame, an unknown id, a reply opcode that does not answer the request,
    a PONG that does not echo its PING — raises :class:`RemoteProtocolError` and breaks
    the connection: the driver fails every pending request and drops it.
    """

    def __init__(
        self,
        max_pending: int = MAX_PENDING,
        *,
        max_frame: int = MAX_BODY_LENGTH,
        first_id: int = 0,
    ) -> None:
        _check_limits(max_pending, max_frame, 0)
        if type(first_id) is not int or not 0 <= first_id <= MAX_ID:
            raise ConfigurationError("first_id must be in [0, 2**32)")
        self._max_pending = max_pending
        self._max_frame = max_frame
        self._next_id = first_id
        self._buffer = bytearray()
        self._outstanding: dict[int, _Sent] = {}
        self._broken = False

    @property
    def pending(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._outstanding)

    @property
    def broken(self) -> bool:
        """Whether the server sent something that broke the connection."""
        return self._broken

    def send_request(
        self,
        op: Op,
        *,
        ski: bytes | None = None,
        payload: bytes = b"",
        sni: str | None = None,
        client_ip: IPAddress | None = None,
        server_ip: IPAddress | None = None,
        cert_id: str | None = None,
    ) -> tuple[int, bytes]:
        """``(id, frame)`` of a new request; :class:`LocalProtocolError` if refused."""
        if self._broken:
            raise LocalProtocolError("the connection is broken: drop it")
        if len(self._outstanding) >= self._max_pending:
            raise LocalProtocolError(
                f"{self._max_pending} requests are already outstanding", code=ErrorCode.OVERLOADED
            )
        request_id = self._next_id
        while request_id in self._outstanding:
            request_id = (request_id + 1) & MAX_ID
        request = Request(
            request_id,
            op,
            ski=ski,
            sni=sni,
            client_ip=client_ip,
            server_ip=server_ip,
            cert_id=cert_id,
            payload=payload,
        )
        frame = encode_request(request)
        self._outstanding[request_id] = _Sent(op, payload if op is Op.PING else None)
        self._next_id = (request_id + 1) & MAX_ID
        return request_id, frame

    def ping(self, payload: bytes = b"") -> tuple[int, bytes]:
        """``(id, frame)`` of a PING; the PONG must echo ``payload``."""
        return self.send_request(Op.PING, payload=payload)

    def receive_data(self, data: bytes) -> list[Response]:
        """Responses completed by ``data``; :class:`RemoteProtocolError` if the server errs."""
        if self._broken:
            raise LocalProtocolError("the connection is broken: drop it, do not feed it")
        try:
            return self._receive(data)
        except RemoteProtocolError:
            self._broken = True
            self._buffer.clear()
            raise

    def _receive(self, data: bytes) -> list[Response]:
        buffer = self._buffer
        buffer += data
        responses: list[Response] = []
        offset = 0
        while len(buffer) - offset >= HEADER_LENGTH:
            major, _minor, length, response_id = HEADER.unpack_from(buffer, offset)
            if major != VERSION_MAJOR:
                raise DecodeError(
                    f"major version {major}, not {VERSION_MAJOR}", code=ErrorCode.VERSION_MISMATCH
                )
            if length > self._max_frame:
                raise DecodeError(
                    f"a {length}-byte body exceeds {self._max_frame}", code=ErrorCode.FORMAT
                )
            end = offset + HEADER_LENGTH + length
            if len(buffer) < end:
                break
            response = _decode_response_body(
                response_id, bytes(buffer[offset + HEADER_LENGTH : end])
            )
            offset = end
            self._match(response)
            responses.append(response)
        del buffer[:offset]
        return responses

    def _match(self, response: Response) -> None:
        sent = self._outstanding.pop(response.id, None)
        if sent is None:
            raise RemoteProtocolError(
                f"a response to id {response.id}, which is not outstanding", code=ErrorCode.FORMAT
            )
        if response.op is Op.ERROR:
            return
        expected = Op.PONG if sent.op is Op.PING else Op.RESPONSE
        if response.op is not expected:
            raise RemoteProtocolError(
                f"{sent.op.name} answered with {response.op.name}",
                code=ErrorCode.UNEXPECTED_OPCODE,
            )
        if sent.echo is not None and response.payload != sent.echo:
            raise RemoteProtocolError("a PONG that does not echo its PING", code=ErrorCode.FORMAT)


__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "ITEM",
    "MAX_ID",
    "REPLY_OPS",
    "REQUEST_OPS",
    "SKI_LENGTH",
    "BadRequest",
    "ClientConnection",
    "ConnectionBroken",
    "Event",
    "IPAddress",
    "Operation",
    "Request",
    "RequestReceived",
    "Response",
    "ServerConnection",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]
