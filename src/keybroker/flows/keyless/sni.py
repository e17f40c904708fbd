"""Peek the server name (SNI) out of a TLS ClientHello before the handshake starts.

The edge must choose the service, and so the certificate chain and the remote key, before it
hands the socket to tlslite-ng, which ignores ``VirtualHost.hostnames`` when it picks a
certificate. So the edge reads the first bytes with ``MSG_PEEK`` (they stay in the socket for
tlslite) and asks :func:`peek_server_name` for the name:

* a ``str``: the normalised host name (ASCII, lower case, no trailing dot, every ``xn--`` label a
  valid IDNA A-label);
* ``None``: a complete ClientHello without a ``host_name`` entry;
* :class:`NeedMoreData`: the ClientHello is not complete yet (it may span several records);
  ``needed`` says how many bytes from the start to peek next, never more than ``limit``;
* :class:`~keybroker.errors.RemoteProtocolError` (usually its subclass
  :class:`~keybroker.errors.DecodeError`): anything else. No other exception escapes.

The records are framed here; the handshake message itself is parsed by tlslite's own
``ClientHello().parse``, the parser the handshake will use a moment later, so a ClientHello this
module accepts is one tlslite can read. :func:`peek_socket_server_name` is the blocking loop
around it for a connected socket.
"""

from __future__ import annotations

import codecs
import contextlib
import ipaddress
import re
import socket

from tlslite.extensions import SNIExtension  # type: ignore[import-untyped,unused-ignore]
from tlslite.messages import ClientHello  # type: ignore[import-untyped,unused-ignore]
from tlslite.utils.codec import Parser  # type: ignore[import-untyped,unused-ignore]

from keybroker.errors import DecodeError, RemoteProtocolError, TransportError

__all__ = [
    "MAX_PEEK",
    "NeedMoreData",
    "normalise_server_name",
    "peek_server_name",
    "peek_socket_server_name",
]

_RECORD_HEADER = 5
_MAX_FRAGMENT = 2**14  # RFC 8446 §5.1: TLSPlaintext.length MUST NOT exceed 2^14

#: The most bytes (record headers included) the edge will peek for a ClientHello: 16 KiB of
#: ClientHello in one full record, a little less across several. Real ones are well under
#: 4 KiB, even with post-quantum key shares.
MAX_PEEK = _RECORD_HEADER + _MAX_FRAGMENT
_CONTENT_HANDSHAKE = 22
_HANDSHAKE_HEADER = 4
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_NAME_TYPE_HOST = 0
_MAX_NAME = 253
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class NeedMoreData(Exception):
    """The data ends before the ClientHello does: peek ``needed`` bytes (from the start) and retry.

    Not a :class:`~keybroker.errors.KeybrokerError`: nothing is wrong yet. ``needed`` is always
    more than what was passed in and never more than the ``limit`` the caller gave.
    """

    def __init__(self, needed: int) -> None:
        super().__init__(f"the ClientHello is incomplete; peek at least {needed} bytes")
        self.needed = needed


def peek_server_name(data: bytes | bytearray, *, limit: int = MAX_PEEK) -> str | None:
    """The normalised SNI host name in the ClientHello at the start of ``data``, or ``None``.

    ``data`` is what the client sent first (one or more TLS records). Bytes after the record that
    ends the ClientHello are ignored. Raises :class:`NeedMoreData` when the ClientHello is not
    complete and :class:`~keybroker.errors.RemoteProtocolError` on anything that is not a
    ClientHello, is malformed, needs more than ``limit`` bytes, or names an invalid host.
    """
    message = _handshake_message(bytes(data), limit)
    hello = _parse_client_hello(message)
    return _server_name(hello)


def peek_socket_server_name(sock: socket.socket, *, limit: int = MAX_PEEK) -> str | None:
    """:func:`peek_server_name` over a connected TCP socket, leaving every byte in the socket.

    Blocks until the ClientHello is complete (each wait is bounded by the socket's timeout). It
    sets ``SO_RCVLOWAT`` to the bytes still needed, so a ClientHello split across TCP segments
    costs a wait rather than a busy loop (Linux semantics), and restores it to 1 afterwards.
    Raises :class:`~keybroker.errors.TransportError` on a socket error or timeout, and
    :class:`~keybroker.errors.RemoteProtocolError` as :func:`peek_server_name` does, or when the
    client closes before its ClientHello is complete.
    """
    needed = _RECORD_HEADER
    try:
        while True:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, needed)
            data = sock.recv(needed, socket.MSG_PEEK)
            if len(data) < needed:
                raise RemoteProtocolError("the client closed before its ClientHello was complete")
            try:
                return peek_server_name(data, limit=limit)
            except NeedMoreData as more:
                needed = more.needed
    except OSError as exc:  # TimeoutError included
        raise TransportError(f"peeking the ClientHello failed: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):  # the socket is gone; nothing to restore
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def normalise_server_name(raw: bytes | bytearray) -> str:
    """The SNI ``host_name`` bytes as a normalised host name, or :class:`DecodeError`.

    Lower case, one trailing dot dropped; ASCII letters, digits and hyphens only (RFC 6066 §3:
    an internationalised name travels as IDNA A-labels); each ``xn--`` label must decode and
    round-trip; literal IP addresses are refused, as RFC 6066 requires.
    """
    try:
        name = bytes(raw).decode("ascii").lower()
    except UnicodeDecodeError:
        raise DecodeError("the server name is not ASCII (IDNA A-labels are required)") from None
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > _MAX_NAME:
        raise DecodeError("the server name is empty or longer than 253 characters")
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            raise DecodeError("the server name has an invalid label")
        if label.startswith("xn--"):
            try:
                codecs.decode(label.encode("ascii"), "idna")
            except UnicodeError:
                raise DecodeError("the server name has an invalid IDNA A-label") from None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    raise DecodeError("the server name is an IP address literal, which SNI does not allow")


def _handshake_message(data: bytes, limit: int) -> bytes:
    """Reassemble the first handshake message (header included) from the records in ``data``."""
    message = bytearray()
    total: int | None = None  # header + body length, once the header is in
    pos = 0
    while True:
        header_end = pos + _RECORD_HEADER
        if header_end > limit:
            raise RemoteProtocolError(f"the ClientHello needs more than {limit} bytes")
        if len(data) < header_end:
            raise NeedMoreData(header_end)
        content_type, major, minor = data[pos], data[pos + 1], data[pos + 2]
        length = int.from_bytes(data[pos + 3 : header_end], "big")
        if content_type != _CONTENT_HANDSHAKE:
            raise DecodeError("the client's first bytes are not a TLS handshake record")
        if major != 3 or minor > 4:
            raise DecodeError("the record has an unknown protocol version")
        if length == 0 or length > _MAX_FRAGMENT:
            raise DecodeError("the handshake record has an invalid length")
        end = header_end + length
        if end > limit:
            raise RemoteProtocolError(f"the ClientHello needs more than {limit} bytes")
        if len(data) < end:
            raise NeedMoreData(end)
        message += data[header_end:end]
        pos = end
        if message[0] != _CLIENT_HELLO:
            raise DecodeError("the first handshake message is not a ClientHello")
        if total is None and len(message) >= _HANDSHAKE_HEADER:
            total = _HANDSHAKE_HEADER + int.from_bytes(message[1:_HANDSHAKE_HEADER], "big")
            if _RECORD_HEADER + total > limit:
                raise RemoteProtocolError(f"the ClientHello needs more than {limit} bytes")
        if total is not None and len(message) >= total:
            if len(message) > total:
                raise DecodeError("the record that ends the ClientHello carries more data")
            return bytes(message)


def _parse_client_hello(message: bytes) -> ClientHello:
    hello = ClientHello()
    try:
        # ClientHello.parse reads from the 3-byte length on; the type byte is already checked.
        hello.parse(Parser(bytearray(message[1:])))
    except Exception as exc:
        # tlslite raises its DecodeError (a SyntaxError) for most malformations, but its parsers
        # are not documented to raise nothing else, and this input is the attacker's: whatever
        # the parser chokes on is the peer's garbage.
        raise DecodeError(f"malformed ClientHello: {type(exc).__name__}") from exc
    return hello


def _server_name(hello: ClientHello) -> str | None:
    found = [ext for ext in hello.extensions or () if ext.extType == _EXT_SERVER_NAME]
    if not found:
        return None
    if len(found) > 1:
        raise DecodeError("the ClientHello has more than one server_name extension")
    ext = found[0]
    if not isinstance(ext, SNIExtension) or not ext.serverNames:
        raise DecodeError("the server_name extension is empty")
    hosts = [entry.name for entry in ext.serverNames if entry.name_type == _NAME_TYPE_HOST]
    if len(hosts) > 1:
        raise DecodeError("the server_name extension has more than one host_name")
    if not hosts:
        return None
    return normalise_server_name(hosts[0])
