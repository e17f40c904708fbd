"""SNI peeking: real ClientHellos (from Python's ``ssl``), fragmented and truncated ones,
malformed ones and names, a fuzzer that lets nothing but ``RemoteProtocolError`` (or the
``NeedMoreData`` signal) out, and the socket helper over real TCP connections."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tlslite.extensions import SNIExtension, TLSExtension
from tlslite.messages import ClientHello

from keybroker.errors import DecodeError, RemoteProtocolError, TransportError
from keybroker.flows.keyless.sni import (
    MAX_PEEK,
    NeedMoreData,
    normalise_server_name,
    peek_server_name,
    peek_socket_server_name,
)


def python_client_hello(server_hostname: str | None) -> bytes:
    """The first flight of Python's ``ssl`` (OpenSSL) client, as it would hit the socket."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


@cache
def real_hello() -> bytes:
    return python_client_hello("www.example.com")


def records(
    message: bytes, size: int, content_type: int = 22, version: bytes = b"\x03\x01"
) -> bytes:
    """``message`` cut into records of ``size`` bytes."""
    out = b""
    for start in range(0, len(message), size):
        chunk = message[start : start + size]
        out += bytes([content_type]) + version + len(chunk).to_bytes(2, "big") + chunk
    return out


def handshake_message(data: bytes) -> bytes:
    """The handshake message carried by the single record ``data``."""
    assert len(data) == 5 + int.from_bytes(data[3:5], "big")
    return data[5:]


def tlslite_hello(*extensions: TLSExtension) -> bytes:
    hello = ClientHello().create(
        (3, 3), bytearray(32), bytearray(0), [0x1301, 0xC02F], extensions=list(extensions)
    )
    return records(bytes(hello.write()), 2**14)


def sni(*names: tuple[int, bytes]) -> SNIExtension:
    ext = SNIExtension().create()
    ext.serverNames = [SNIExtension.ServerName(kind, bytearray(name)) for kind, name in names]
    return ext


def raw_extension(ext_type: int, body: bytes) -> TLSExtension:
    return TLSExtension(extType=ext_type).create(bytearray(body))


def outcome(data: bytes, limit: int = MAX_PEEK) -> str | None:
    """The result, letting only the two documented exceptions through as values."""
    try:
        return peek_server_name(data, limit=limit)
    except NeedMoreData as more:
        assert len(data) < more.needed <= limit
        return "<more>"
    except RemoteProtocolError:
        return "<error>"


# --- real ClientHellos ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("www.example.com", "www.example.com"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),  # Python sends the A-label
        ("127.0.0.1", None),  # no SNI for an address
        (None, None),
    ],
)
def test_real_client_hello(sent: str | None, expected: str | None) -> None:
    data = python_client_hello(sent)
    if sent == "Example.COM":
        assert b"Example.COM" in data  # the client really sent it mixed-case
    assert peek_server_name(data) == expected


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 37, 256, 2**14])
def test_fragmented_client_hello(size: int) -> None:
    message = handshake_message(real_hello())
    assert peek_server_name(records(message, size)) == "www.example.com"


@pytest.mark.parametrize("size", [1, 7, 2**14])
def test_every_prefix_asks_for_more(size: int) -> None:
    data = records(handshake_message(real_hello()), size)
    for end in range(len(data)):
        with pytest.raises(NeedMoreData) as more:
            peek_server_name(data[:end])
        assert end < more.value.needed <= len(data)
    assert peek_server_name(data) == "www.example.com"


def test_needed_leads_to_the_end() -> None:
    """Following ``needed`` reaches the whole ClientHello in a few peeks, never past it."""
    data = records(handshake_message(real_hello()), 100)
    peeked, peeks = 5, 0
    while True:
        peeks += 1
        try:
            assert peek_server_name(data[:peeked]) == "www.example.com"
            break
        except NeedMoreData as more:
            peeked = more.needed
    assert peeked == len(data)
    assert peeks == 2 * -(-len(handshake_message(real_hello())) // 100)  # header, then record


def test_records_after_the_client_hello_are_ignored() -> None:
    change_cipher_spec = b"\x14\x03\x03\x00\x01\x01"
    data = real_hello() + change_cipher_spec + b"\x17\x03\x03\x00\x05hello" + b"junk"
    assert peek_server_name(data) == "www.example.com"


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"example.com", "example.com"),
        (b"EXAMPLE.com.", "example.com"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        (b"XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        (b"a" * 63 + b".example", "a" * 63 + ".example"),
        (b".".join([b"a" * 63] * 3) + b"." + b"b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),
        (b"1.2.3.4.example", "1.2.3.4.example"),
        (b"localhost", "localhost"),
        (b"a-b.c-d", "a-b.c-d"),
    ],
)
def test_valid_names(raw: bytes, expected: str) -> None:
    assert normalise_server_name(raw) == expected
    assert peek_server_name(tlslite_hello(sni((0, raw)))) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b".",
        b"example..com",
        b".example.com",
        b"example.com..",
        b"-example.com",
        b"example-.com",
        b"exa mple.com",
        b"under_score.example",
        b"example.com\x00",
        "bücher.example".encode(),  # a U-label: SNI carries A-labels
        b"\xff.example",
        b"xn--zz.example",  # not Punycode
        b"xn--abc-.example",  # Punycode of plain ASCII: no valid A-label
        b"a" * 64 + b".example",
        b".".join([b"a" * 63] * 4),  # 255 characters
        b"127.0.0.1",
        b"::1",
        b"[::1]",
    ],
)
def test_invalid_names(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        normalise_server_name(raw)
    with pytest.raises(RemoteProtocolError):
        peek_server_name(tlslite_hello(sni((0, raw))))


def test_server_name_list_rules() -> None:
    assert peek_server_name(tlslite_hello()) is None  # no extension at all
    assert peek_server_name(tlslite_hello(sni((7, b"not a host name")))) is None
    assert peek_server_name(tlslite_hello(sni((7, b"\xff"), (0, b"ok.example")))) == "ok.example"
    bad = [
        tlslite_hello(sni((0, b"a.example"), (0, b"b.example"))),  # two host_names
        tlslite_hello(raw_extension(0, b"")),  # empty extension
        tlslite_hello(raw_extension(0, b"\x00\x00")),  # empty list
        tlslite_hello(raw_extension(0, b"\x00\x05\x00\x00\x09abc")),  # name overruns
        tlslite_hello(raw_extension(0, b"\x00\x06\x00\x00\x03abc\x00")),  # trailing byte
        tlslite_hello(sni((0, b"a.example")), sni((0, b"a.example"))),  # extension twice
    ]
    for data in bad:
        with pytest.raises(RemoteProtocolError):
            peek_server_name(data)


# --- framing ----------------------------------------------------------------------------------


def test_not_a_client_hello() -> None:
    message = handshake_message(real_hello())
    bad = [
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + bytes(37),  # SSLv2-style hello
        b"\x15\x03\x03\x00\x02\x02\x28",  # an alert
        records(message, 2**14, content_type=23),
        records(message, 2**14, version=b"\x02\x00"),
        records(message, 2**14, version=b"\x03\x05"),
        records(b"\x02" + message[1:], 2**14),  # a ServerHello
        b"\x16\x03\x01\x00\x00" + real_hello(),  # an empty handshake record
        b"\x16\x03\x01\x40\x01" + bytes(2**14 + 1),  # a record over 2^14
        records(message + b"\x01\x00\x00\x00", 2**14),  # more after the ClientHello
        records(message, 100)[:105] + records(message[100:], 2**14, content_type=21),
    ]
    for data in bad:
        with pytest.raises(RemoteProtocolError):
            peek_server_name(data)


def test_malformed_client_hello_body() -> None:
    message = bytearray(handshake_message(real_hello()))
    body_length = int.from_bytes(message[1:4], "big")
    for cut in (1, 2, 40, 100, body_length - 1):
        short = bytes([1]) + cut.to_bytes(3, "big") + message[4 : 4 + cut]
        with pytest.raises(DecodeError):
            peek_server_name(records(short, 2**14))
    bumped = bytearray(message)
    bumped[4 + 2 + 32] = 33  # session_id longer than 32 bytes
    with pytest.raises(DecodeError):
        peek_server_name(records(bytes(bumped), 2**14))


def test_limit() -> None:
    data = real_hello()
    assert peek_server_name(data, limit=len(data)) == "www.example.com"
    with pytest.raises(RemoteProtocolError):
        peek_server_name(data, limit=len(data) - 1)
    with pytest.raises(RemoteProtocolError):  # the header alone says it will not fit
        peek_server_name(data[:5], limit=len(data) - 1)
    fragmented = records(handshake_message(data), 1)
    with pytest.raises(RemoteProtocolError):
        peek_server_name(fragmented[:1000], limit=1000)
    huge = b"\x16\x03\x01\x40\x00\x01\x01\x00\x00"  # claims a 64 KiB ClientHello
    with pytest.raises(RemoteProtocolError):
        peek_server_name(huge + bytes(2**14 - 4) + b"\x16\x03\x01\x40\x00")
    assert outcome(huge) == "<more>"


# --- fuzzing ----------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data: bytes) -> None:
    outcome(data)


@FUZZ
@given(st.binary(max_size=3000), st.integers(1, 2**14))
def test_fuzz_handshake_body(body: bytes, size: int) -> None:
    """Any body, correctly framed, so the fuzz reaches tlslite's parser."""
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    result = outcome(records(message, size))
    assert result in ("<more>", "<error>", None) or normalise_server_name(result.encode()) == result


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=8),
    st.integers(0, 600),
    st.integers(1, 600),
)
def test_fuzz_mutated_real_client_hello(edits: list[tuple[int, int]], cut: int, size: int) -> None:
    data = bytearray(records(handshake_message(real_hello()), size))
    for position, value in edits:
        data[position % len(data)] = value
    outcome(bytes(data))
    outcome(bytes(data[: len(data) - cut]))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=300)), max_size=4))
def test_fuzz_server_name_entries(entries: list[tuple[int, bytes]]) -> None:
    result = outcome(tlslite_hello(sni(*entries)))
    hosts = [name for kind, name in entries if kind == 0]
    if len(hosts) > 1:
        assert result == "<error>"
    elif not entries:
        assert result == "<error>"  # an empty server_name list
    elif not hosts:
        assert result is None


# --- over a socket ----------------------------------------------------------------------------


@contextlib.contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with client, server:
        yield client, server


def send_slowly(
    sock: socket.socket, data: bytes, pieces: list[int], then_close: bool
) -> threading.Thread:
    def run() -> None:
        start = 0
        for end in [*pieces, len(data)]:
            time.sleep(0.05)
            sock.sendall(data[start:end])
            start = end
        if then_close:
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_socket_peek_waits_for_a_split_client_hello_and_consumes_nothing() -> None:
    data = records(handshake_message(real_hello()), 200) + b"\x14\x03\x03\x00\x01\x01"
    with tcp_pair() as (client, server):
        server.settimeout(5)
        sender = send_slowly(client, data, [3, 5, 150, 300], then_close=True)
        started = time.monotonic()
        assert peek_socket_server_name(server) == "www.example.com"
        assert time.monotonic() - started >= 0.2  # it waited for the pieces
        sender.join()
        received = b""
        while chunk := server.recv(65536):
            received += chunk
    assert received == data  # everything is still there for the TLS library


def test_socket_peek_when_the_client_closes_early() -> None:
    data = real_hello()
    with tcp_pair() as (client, server):
        server.settimeout(5)
        send_slowly(client, data[:-10], [], then_close=True).join()
        with pytest.raises(RemoteProtocolError):
            peek_socket_server_name(server)


def test_socket_peek_times_out() -> None:
    with tcp_pair() as (client, server):
        server.settimeout(0.3)
        client.sendall(real_hello()[:100])
        started = time.monotonic()
        with pytest.raises(TransportError):
            peek_socket_server_name(server)
        assert time.monotonic() - started < 3


def test_socket_peek_garbage() -> None:
    with tcp_pair() as (client, server):
        server.settimeout(5)
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        with pytest.raises(RemoteProtocolError):
            peek_socket_server_name(server)
