"""The key-server protocol: byte layout, round trips, strict decoding, and both connections."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keybroker.errors import (
    ConfigurationError,
    DecodeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from keybroker.flows.keyless.codes import (
    MAX_PENDING,
    REQUEST_PAD_TO,
    ErrorCode,
    Op,
    Tag,
)
from keybroker.flows.keyless.protocol import (
    DEFAULT_MAX_FRAME,
    MAX_ID,
    REPLY_OPS,
    REQUEST_OPS,
    BadRequest,
    ClientConnection,
    ConnectionBroken,
    Event,
    Request,
    RequestReceived,
    Response,
    ServerConnection,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

SKI = bytes(range(20))
SIGN = Op.ECDSA_SIGN_SHA256


# -- helpers written from the protocol description, independent of the implementation ----


def item(tag: int, data: bytes) -> bytes:
    return bytes([tag]) + len(data).to_bytes(2, "big") + data


def raw(body: bytes, *, frame_id: int = 1, major: int = 1, minor: int = 0) -> bytes:
    return bytes([major, minor]) + len(body).to_bytes(2, "big") + frame_id.to_bytes(4, "big") + body


def tags_of(frame: bytes) -> list[int]:
    """The tags of a frame's items, in order."""
    body = frame[8:]
    assert int.from_bytes(frame[2:4], "big") == len(body)
    tags, offset = [], 0
    while offset < len(body):
        tags.append(body[offset])
        offset += 3 + int.from_bytes(body[offset + 1 : offset + 3], "big")
    assert offset == len(body)
    return tags


def op_item(op: int) -> bytes:
    return item(Tag.OPCODE, bytes([op]))


# -- strategies -----------------------------------------------------------------------------

ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
hostnames = st.from_regex(r"[A-Za-z0-9_-]{1,20}(\.[A-Za-z0-9_-]{1,20}){0,3}", fullmatch=True)
cert_ids = st.from_regex(r"[\x21-\x7e]{1,40}", fullmatch=True)


def requests(op: st.SearchStrategy[Op] | None = None) -> st.SearchStrategy[Request]:
    return st.builds(
        Request,
        id=st.integers(0, MAX_ID),
        op=op if op is not None else st.sampled_from(sorted(REQUEST_OPS)),
        ski=st.none() | st.binary(min_size=20, max_size=20),
        sni=st.none() | hostnames,
        client_ip=st.none() | ips,
        server_ip=st.none() | ips,
        cert_id=st.none() | cert_ids,
        payload=st.binary(max_size=1500),
    )


responses = st.one_of(
    st.builds(Response.ok, st.integers(0, MAX_ID), st.binary(max_size=1500)),
    st.builds(Response.pong, st.integers(0, MAX_ID), st.binary(max_size=100)),
    st.builds(Response.error, st.integers(0, MAX_ID), st.sampled_from(ErrorCode)),
)


# -- the byte layout --------------------------------------------------------------------------


def test_request_byte_layout_is_pinned() -> None:
    request = Request(
        0x01020304,
        Op.RSA_SIGN_SHA256,
        ski=SKI,
        sni="example.com",
        client_ip=IPv4Address("192.0.2.1"),
        server_ip=IPv6Address("2001:db8::1"),
        cert_id="c1",
        payload=b"\xaa" * 32,
    )
    items = (
        "11 0001 05"  # opcode RSA_SIGN_SHA256
        "02 000b 6578616d706c652e636f6d"  # SNI "example.com"
        "03 0004 c0000201"  # client IP 192.0.2.1
        "04 0014 000102030405060708090a0b0c0d0e0f10111213"  # SKI
        "05 0010 20010db8000000000000000000000001"  # server IP 2001:db8::1
        "06 0002 6331"  # cert id "c1"
        "12 0020" + "aa" * 32  # payload
    )
    # 107 bytes of items; padding data fills 1016 - 107 - 3 = 906 = 0x038a bytes.
    expected = bytes.fromhex("01 00 03f8 01020304" + items + "20 038a") + bytes(906)
    assert len(expected) == 1024
    assert encode_request(request) == expected
    assert decode_request(expected) == request


def test_ping_byte_layout_is_pinned() -> None:
    # opcode (4 bytes) + padding header (3) + 1009 = 0x03f1 zeros = 1016-byte body
    expected = bytes.fromhex("01 00 03f8 00000009 11 0001 f1 20 03f1") + bytes(1009)
    assert encode_request(Request(9, Op.PING)) == expected


def test_response_byte_layouts_are_pinned() -> None:
    assert encode_response(Response.error(7, ErrorCode.KEY_NOT_FOUND)) == bytes.fromhex(
        "01 00 0008 00000007 11 0001 ff 12 0001 02"
    )
    assert encode_response(Response.ok(0xDEADBEEF, b"\x01\x02")) == bytes.fromhex(
        "01 00 0009 deadbeef 11 0001 f0 12 0002 0102"
    )
    assert encode_response(Response.pong(0, b"")) == bytes.fromhex("01 00 0004 00000000 11 0001 f2")


# -- round trips ------------------------------------------------------------------------------

FIELD_VALUES = {
    "ski": SKI,
    "sni": "edge-1.example.net",
    "client_ip": IPv6Address("2001:db8::42"),
    "server_ip": IPv4Address("198.51.100.7"),
    "cert_id": "cert-0001",
    "payload": b"\x01" * 48,
}


def test_every_opcode_with_every_combination_of_fields_round_trips() -> None:
    names = sorted(FIELD_VALUES)
    count = 0
    for op in sorted(REQUEST_OPS):
        for present in itertools.product((False, True), repeat=len(names)):
            fields = {
                name: FIELD_VALUES[name] for name, on in zip(names, present, strict=True) if on
            }
            request = Request(count, op, **fields)
            frame = encode_request(request)
            assert len(frame) == REQUEST_PAD_TO
            assert decode_request(frame) == request
            count += 1
    assert count == len(REQUEST_OPS) * 64


@pytest.mark.parametrize("op", sorted(REQUEST_OPS), ids=lambda op: op.name)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_requests_round_trip(op: Op, data: st.DataObject) -> None:
    request = data.draw(requests(st.just(op)))
    assert decode_request(encode_request(request)) == request


@settings(max_examples=300, deadline=None)
@given(responses)
def test_responses_round_trip(response: Response) -> None:
    assert decode_response(encode_response(response)) == response


def test_largest_response_fits_and_one_more_byte_does_not() -> None:
    # body = opcode item (4) + payload item header (3) + payload
    biggest = Response.ok(1, b"\x00" * (0xFFFF - 7))
    assert decode_response(encode_response(biggest)) == biggest
    with pytest.raises(LocalProtocolError):
        encode_response(Response.ok(1, b"\x00" * (0xFFFF - 6)))


# -- padding ----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(requests())
def test_requests_are_padded_to_1024_bytes_when_a_padding_item_fits(request: Request) -> None:
    frame = encode_request(request)
    unpadded = encode_request_without_padding(request)
    if len(unpadded) + 3 <= REQUEST_PAD_TO:
        assert len(frame) == REQUEST_PAD_TO
        assert tags_of(frame)[-1] == Tag.PADDING
        assert frame[len(unpadded) + 3 :] == bytes(REQUEST_PAD_TO - len(unpadded) - 3)
    else:
        assert frame == unpadded
        assert Tag.PADDING not in tags_of(frame)


def encode_request_without_padding(request: Request) -> bytes:
    frame = encode_request(request)
    tags = tags_of(frame)
    if tags[-1] != Tag.PADDING:
        return frame
    # strip the last item and fix the length field
    body, offset = frame[8:], 0
    for _ in tags[:-1]:
        offset += 3 + int.from_bytes(body[offset + 1 : offset + 3], "big")
    return raw(body[:offset], frame_id=request.id)


@pytest.mark.parametrize(
    ("payload_length", "frame_length", "padded"),
    [
        (0, 1024, True),
        (1006, 1024, True),  # 8 + 4 + 3 + 1006 = 1021: a zero-length padding item fits
        (1007, 1022, False),  # no room for a 3-byte padding item
        (1008, 1023, False),
        (1009, 1024, False),  # exactly 1024 unpadded
        (1010, 1025, False),
        (3000, 3015, False),
    ],
)
def test_padding_boundaries(payload_length: int, frame_length: int, padded: bool) -> None:
    request = Request(1, Op.RSA_DECRYPT, payload=b"\x07" * payload_length)
    frame = encode_request(request)
    assert len(frame) == frame_length
    assert (Tag.PADDING in tags_of(frame)) is padded
    assert decode_request(frame) == request


# -- tolerated input --------------------------------------------------------------------------


def test_unknown_tags_and_padding_are_ignored_in_any_order() -> None:
    body = (
        item(0x99, b"future")
        + item(Tag.PAYLOAD, b"digest")
        + item(Tag.RSA_MODULUS_SHA256, b"\x00" * 32)
        + item(Tag.PADDING, b"\xff" * 5)
        + item(Tag.SKI, SKI)
        + item(0xF0, b"")
        + op_item(SIGN)
    )
    assert decode_request(raw(body, frame_id=5, minor=7)) == Request(
        5, SIGN, ski=SKI, payload=b"digest"
    )
    reply = item(0x77, b"x") + op_item(Op.RESPONSE) + item(Tag.PADDING, bytes(10))
    assert decode_response(raw(reply + item(Tag.PAYLOAD, b"sig"))) == Response.ok(1, b"sig")


def test_an_empty_payload_item_is_an_empty_payload() -> None:
    frame = raw(op_item(Op.PING) + item(Tag.PAYLOAD, b""))
    assert decode_request(frame) == Request(1, Op.PING)


# -- malformed input --------------------------------------------------------------------------

FORMAT, BAD_OPCODE = ErrorCode.FORMAT, ErrorCode.BAD_OPCODE
SIGN_ITEMS = op_item(SIGN) + item(Tag.SKI, SKI)

MALFORMED_REQUEST_BODIES = {
    "empty body": (b"", FORMAT),
    "no opcode": (item(Tag.SKI, SKI), FORMAT),
    "opcode twice": (SIGN_ITEMS + op_item(SIGN), FORMAT),
    "ski twice": (SIGN_ITEMS + item(Tag.SKI, SKI), FORMAT),
    "unknown tag twice": (SIGN_ITEMS + item(0x99, b"") + item(0x99, b""), FORMAT),
    "padding twice": (SIGN_ITEMS + item(Tag.PADDING, b"") + item(Tag.PADDING, b""), FORMAT),
    "item runs past the body": (SIGN_ITEMS + bytes([Tag.PAYLOAD, 0, 10]) + b"short", FORMAT),
    "truncated item header": (SIGN_ITEMS + bytes([Tag.PAYLOAD, 0]), FORMAT),
    "one stray byte": (SIGN_ITEMS + b"\x12", FORMAT),
    "empty opcode": (item(Tag.OPCODE, b"") + item(Tag.SKI, SKI), FORMAT),
    "two-byte opcode": (item(Tag.OPCODE, bytes([SIGN, 0])) + item(Tag.SKI, SKI), FORMAT),
    "unknown opcode": (op_item(0x42) + item(Tag.SKI, SKI), BAD_OPCODE),
    "unknown opcode 0x00": (op_item(0x00), BAD_OPCODE),
    "reply opcode RESPONSE": (op_item(Op.RESPONSE), ErrorCode.UNEXPECTED_OPCODE),
    "reply opcode ERROR": (op_item(Op.ERROR), ErrorCode.UNEXPECTED_OPCODE),
    "short ski": (op_item(SIGN) + item(Tag.SKI, SKI[:19]), FORMAT),
    "long ski": (op_item(SIGN) + item(Tag.SKI, SKI + b"\x00"), FORMAT),
    "empty ski": (op_item(SIGN) + item(Tag.SKI, b""), FORMAT),
    "client ip of 5 bytes": (SIGN_ITEMS + item(Tag.CLIENT_IP, b"\x01" * 5), FORMAT),
    "client ip of 0 bytes": (SIGN_ITEMS + item(Tag.CLIENT_IP, b""), FORMAT),
    "server ip of 15 bytes": (SIGN_ITEMS + item(Tag.SERVER_IP, b"\x01" * 15), FORMAT),
    "sni with a space": (SIGN_ITEMS + item(Tag.SNI, b"exa mple.com"), FORMAT),
    "sni not ascii": (SIGN_ITEMS + item(Tag.SNI, "é.example".encode()), FORMAT),
    "sni with a NUL": (SIGN_ITEMS + item(Tag.SNI, b"a.example\x00"), FORMAT),
    "sni with a newline": (SIGN_ITEMS + item(Tag.SNI, b"a.example\n"), FORMAT),
    "empty sni": (SIGN_ITEMS + item(Tag.SNI, b""), FORMAT),
    "sni with an empty label": (SIGN_ITEMS + item(Tag.SNI, b"a..example"), FORMAT),
    "sni with a trailing dot": (SIGN_ITEMS + item(Tag.SNI, b"a.example."), FORMAT),
    "sni label of 64": (SIGN_ITEMS + item(Tag.SNI, b"a" * 64 + b".example"), FORMAT),
    "sni of 256 bytes": (
        SIGN_ITEMS + item(Tag.SNI, b".".join([b"a" * 63] * 3 + [b"a" * 62, b"a"])),
        FORMAT,
    ),
    "empty cert id": (SIGN_ITEMS + item(Tag.CERT_ID, b""), FORMAT),
    "cert id with a space": (SIGN_ITEMS + item(Tag.CERT_ID, b"a b"), FORMAT),
    "cert id of 256 bytes": (SIGN_ITEMS + item(Tag.CERT_ID, b"c" * 256), FORMAT),
}


@pytest.mark.parametrize(
    ("body", "code"), MALFORMED_REQUEST_BODIES.values(), ids=MALFORMED_REQUEST_BODIES.keys()
)
def test_malformed_request_bodies_carry_the_right_code(body: bytes, code: ErrorCode) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_request(raw(body))
    assert caught.value.code == code


def test_sni_limits_are_inclusive() -> None:
    longest = ".".join(["a" * 63] * 4)[:255]
    assert len(longest) == 255
    frame = raw(SIGN_ITEMS + item(Tag.SNI, longest.encode()))
    assert decode_request(frame).sni == longest
    under = "Edge_1.xn--bcher-kva.example"
    assert decode_request(raw(SIGN_ITEMS + item(Tag.SNI, under.encode()))).sni == under


MALFORMED_RESPONSE_BODIES = {
    "no opcode": (item(Tag.PAYLOAD, b"x"), FORMAT),
    "opcode twice": (op_item(Op.RESPONSE) + op_item(Op.RESPONSE), FORMAT),
    "payload twice": (op_item(Op.RESPONSE) + item(Tag.PAYLOAD, b"") * 2, FORMAT),
    "unknown opcode": (op_item(0x99), BAD_OPCODE),
    "a request opcode": (op_item(Op.RSA_DECRYPT), ErrorCode.UNEXPECTED_OPCODE),
    "error without a code": (op_item(Op.ERROR), FORMAT),
    "error with two bytes": (op_item(Op.ERROR) + item(Tag.PAYLOAD, b"\x02\x02"), FORMAT),
    "unknown error code": (op_item(Op.ERROR) + item(Tag.PAYLOAD, b"\x42"), FORMAT),
    "item runs past the body": (op_item(Op.RESPONSE) + bytes([Tag.PAYLOAD, 1, 0]), FORMAT),
}


@pytest.mark.parametrize(
    ("body", "code"), MALFORMED_RESPONSE_BODIES.values(), ids=MALFORMED_RESPONSE_BODIES.keys()
)
def test_malformed_response_bodies_carry_the_right_code(body: bytes, code: ErrorCode) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_response(raw(body))
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("decode", "good"),
    [
        (decode_request, encode_request(Request(3, Op.PING))),
        (decode_response, encode_response(Response.pong(3))),
    ],
    ids=["request", "response"],
)
def test_malformed_frames(decode: Callable[[bytes], object], good: bytes) -> None:
    cases = {
        "empty": (b"", FORMAT),
        "shorter than a header": (good[:7], FORMAT),
        "truncated body": (good[:-1], FORMAT),
        "trailing byte": (good + b"\x00", FORMAT),
        "major version 2": (b"\x02" + good[1:], ErrorCode.VERSION_MISMATCH),
        "major version 0": (b"\x00" + good[1:], ErrorCode.VERSION_MISMATCH),
    }
    for name, (frame, code) in cases.items():
        with pytest.raises(DecodeError) as caught:
            decode(frame)
        assert caught.value.code == code, name
    # a different minor version is fine
    assert decode(good[:1] + b"\x09" + good[2:]) == decode(good)


# -- our own misuse ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: Request(-1, Op.PING),
        lambda: Request(MAX_ID + 1, Op.PING),
        lambda: Request(True, Op.PING),
        lambda: Request(1, 0x05),
        lambda: Request(1, Op.RESPONSE),
        lambda: Request(1, Op.PONG),
        lambda: Request(1, SIGN, ski=b"short"),
        lambda: Request(1, SIGN, sni="not a host"),
        lambda: Request(1, SIGN, sni="a" * 256),
        lambda: Request(1, SIGN, client_ip=b"\x01\x02\x03\x04"),
        lambda: Request(1, SIGN, cert_id=""),
        lambda: Request(1, SIGN, payload="text"),
        lambda: Response(1, Op.RSA_DECRYPT),
        lambda: Response(1, Op.ERROR),
        lambda: Response(1, Op.ERROR, b"\x42"),
        lambda: Response(-1, Op.RESPONSE),
        lambda: Response.error(1, 0x42),
        lambda: Response.error(1, 300),
        lambda: encode_request(Request(1, Op.RSA_DECRYPT, payload=bytes(0x10000))),
        # opcode 4 + SKI 23 + payload header 3 + 65506 = 65536 bytes of body
        lambda: encode_request(Request(1, Op.RSA_DECRYPT, ski=SKI, payload=bytes(0xFFFF - 29))),
        lambda: encode_response(Response.ok(1, bytes(0xFFFF))),
    ],
)
def test_misuse_raises_local_protocol_error(make: Callable[[], object]) -> None:
    with pytest.raises(LocalProtocolError):
        make()


def test_largest_request_fits() -> None:
    request = Request(1, Op.RSA_DECRYPT, ski=SKI, payload=bytes(0xFFFF - 30))
    frame = encode_request(request)
    assert len(frame) == 8 + 0xFFFF
    assert decode_request(frame) == request


def test_error_code_property() -> None:
    assert Response.error(1, ErrorCode.OVERLOADED).error_code is ErrorCode.OVERLOADED
    assert Response.ok(1, b"x").error_code is None
    assert Response.pong(1).error_code is None


def test_reprs_show_payload_lengths_not_bytes() -> None:
    secret = b"PREMASTER-SECRET\xfe\xed"
    request = Request(1, Op.RSA_DECRYPT, ski=SKI, sni="a.example", payload=secret)
    response = Response.ok(1, secret)
    for text in (repr(request), repr(response), repr(RequestReceived(request))):
        assert "PREMASTER" not in text
        assert secret.hex() not in text
        assert "feed" not in text
        assert "<18 bytes>" in text
    assert "KEY_NOT_FOUND" in repr(Response.error(1, ErrorCode.KEY_NOT_FOUND))
    assert "a.example" in repr(request)


# -- the server's connection ------------------------------------------------------------------


def sign_request(request_id: int, payload: bytes = b"d" * 32) -> Request:
    return Request(request_id, SIGN, ski=SKI, sni="a.example", payload=payload)


def test_server_receives_and_answers() -> None:
    server = ServerConnection()
    request = sign_request(1)
    assert server.receive_data(encode_request(request)) == [RequestReceived(request)]
    assert server.pending == 1
    frame = server.send_response(Response.ok(1, b"signature"))
    assert decode_response(frame) == Response.ok(1, b"signature")
    assert server.pending == 0
    with pytest.raises(LocalProtocolError):
        server.send_response(Response.ok(1, b"again"))


def test_send_ok_is_send_response_of_an_ok_reply() -> None:
    """The key server's shortcut frames the same bytes with the same checks."""
    server = ServerConnection()
    server.receive_data(b"".join(encode_request(sign_request(n)) for n in (1, 2, 3)))
    server.receive_data(encode_request(Request(4, Op.PING, payload=b"hi")))
    for request_id, payload in ((1, b"signature"), (2, b""), (3, b"s" * 512)):
        assert server.send_ok(request_id, payload) == encode_response(
            Response.ok(request_id, payload)
        )
    for request_id in (1, 4, 9):  # answered already, a PING, never asked
        with pytest.raises(LocalProtocolError):
            server.send_ok(request_id, b"signature")
    assert server.pending == 1


def test_server_answers_ping_with_pong_only() -> None:
    server = ServerConnection()
    server.receive_data(encode_request(Request(4, Op.PING, payload=b"hi")))
    with pytest.raises(LocalProtocolError):
        server.send_response(Response.ok(4, b"hi"))
    assert server.pending == 1
    assert decode_response(server.send_response(Response.pong(4, b"hi"))) == Response.pong(4, b"hi")
    server.receive_data(encode_request(sign_request(5)))
    with pytest.raises(LocalProtocolError):
        server.send_response(Response.pong(5))
    server.send_response(Response.error(5, ErrorCode.CRYPTO))
    assert server.pending == 0


def test_server_refuses_a_response_nobody_asked_for() -> None:
    server = ServerConnection()
    for response in (Response.ok(9, b""), Response.error(9, ErrorCode.INTERNAL)):
        with pytest.raises(LocalProtocolError):
            server.send_response(response)


def test_bad_body_yields_bad_request_and_the_connection_goes_on() -> None:
    server = ServerConnection()
    bad = raw(op_item(SIGN) + item(Tag.SKI, b"short"), frame_id=7)
    unknown_op = raw(op_item(0x42), frame_id=8)
    good = encode_request(sign_request(9))
    events = server.receive_data(bad + unknown_op + good)
    assert events == [
        BadRequest(7, ErrorCode.FORMAT),
        BadRequest(8, ErrorCode.BAD_OPCODE),
        RequestReceived(sign_request(9)),
    ]
    assert server.pending == 1
    assert not server.broken
    for event in events[:2]:
        assert isinstance(event, BadRequest)
        frame = server.send_response(event.reply())
        assert decode_response(frame).error_code == event.error_code
    # each error is owed once
    with pytest.raises(LocalProtocolError):
        server.send_response(Response.error(7, ErrorCode.FORMAT))


def test_wrong_major_version_breaks_the_connection() -> None:
    server = ServerConnection()
    good = encode_request(sign_request(1))
    bad = b"\x02" + encode_request(sign_request(2))[1:]
    events = server.receive_data(good + bad + encode_request(sign_request(3)))
    assert events == [
        RequestReceived(sign_request(1)),
        ConnectionBroken(2, ErrorCode.VERSION_MISMATCH),
    ]
    assert server.broken
    assert server.buffered == 0
    with pytest.raises(LocalProtocolError):
        server.receive_data(encode_request(sign_request(4)))
    broken = events[1]
    assert isinstance(broken, ConnectionBroken)
    assert decode_response(server.send_response(broken.reply())) == Response.error(
        2, ErrorCode.VERSION_MISMATCH
    )
    # the request that arrived before the break may still be answered
    server.send_response(Response.ok(1, b"sig"))


def test_oversized_frame_breaks_the_connection_as_soon_as_its_header_arrives() -> None:
    server = ServerConnection(max_frame=2000)
    header = bytes.fromhex("01 00") + (2001).to_bytes(2, "big") + (5).to_bytes(4, "big")
    assert server.receive_data(header[:7]) == []
    assert server.receive_data(header[7:]) == [ConnectionBroken(5, ErrorCode.FORMAT)]
    # exactly max_frame is fine
    server = ServerConnection(max_frame=2000)
    request = Request(6, Op.RSA_DECRYPT, payload=b"\x01" * (2000 - 7))
    frame = encode_request(request)
    assert len(frame) == 8 + 2000
    assert server.receive_data(frame) == [RequestReceived(request)]


def test_default_max_frame_and_bounded_buffer() -> None:
    server = ServerConnection()
    frame = encode_request(Request(1, Op.RSA_DECRYPT, payload=b"\x01" * (DEFAULT_MAX_FRAME - 7)))
    assert server.receive_data(frame[:-1]) == []
    assert server.buffered == 8 + DEFAULT_MAX_FRAME - 1
    assert len(server.receive_data(frame[-1:])) == 1
    assert server.buffered == 0
    too_big = raw(op_item(Op.RSA_DECRYPT) + item(Tag.PAYLOAD, bytes(DEFAULT_MAX_FRAME - 6)))
    assert server.receive_data(too_big[:8]) == [ConnectionBroken(1, ErrorCode.FORMAT)]


def test_overload() -> None:
    server = ServerConnection(max_pending=2)
    frames = b"".join(encode_request(sign_request(i)) for i in (1, 2, 3))
    assert server.receive_data(frames) == [
        RequestReceived(sign_request(1)),
        RequestReceived(sign_request(2)),
        BadRequest(3, ErrorCode.OVERLOADED),
    ]
    assert server.pending == 2
    server.send_response(Response.error(3, ErrorCode.OVERLOADED))
    server.send_response(Response.ok(1, b"sig"))
    assert server.receive_data(encode_request(sign_request(3))) == [
        RequestReceived(sign_request(3))
    ]
    assert server.receive_data(encode_request(sign_request(4))) == [
        BadRequest(4, ErrorCode.OVERLOADED)
    ]


def test_default_max_pending() -> None:
    server = ServerConnection()
    frames = b"".join(encode_request(Request(i, Op.PING)) for i in range(MAX_PENDING + 1))
    events = server.receive_data(frames)
    assert all(isinstance(event, RequestReceived) for event in events[:MAX_PENDING])
    assert events[MAX_PENDING:] == [BadRequest(MAX_PENDING, ErrorCode.OVERLOADED)]


def test_duplicate_outstanding_id() -> None:
    server = ServerConnection()
    frame = encode_request(sign_request(1))
    assert server.receive_data(frame + frame) == [
        RequestReceived(sign_request(1)),
        BadRequest(1, ErrorCode.FORMAT),
    ]
    assert server.pending == 1
    server.send_response(Response.error(1, ErrorCode.FORMAT))
    server.send_response(Response.ok(1, b"sig"))
    with pytest.raises(LocalProtocolError):
        server.send_response(Response.ok(1, b"sig"))
    # once answered, the id may be used again
    assert server.receive_data(frame) == [RequestReceived(sign_request(1))]


def test_server_limits_are_checked() -> None:
    for kwargs in ({"max_pending": 0}, {"max_frame": 1015}, {"max_frame": 0x10000}):
        with pytest.raises(ConfigurationError):
            ServerConnection(**kwargs)
    ServerConnection(max_pending=1, max_frame=1016)


def feed(server: ServerConnection, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        if server.broken:
            break
        events += server.receive_data(chunk)
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


stream_frames = st.lists(
    st.one_of(
        st.integers(0, 4).map(lambda i: encode_request(sign_request(i))),
        st.builds(lambda i, body: raw(body, frame_id=i), st.integers(0, 4), st.binary(max_size=40)),
        st.integers(0, 4).map(lambda i: encode_request(Request(i, Op.PING, payload=b"p"))),
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(
    frames=stream_frames,
    tail=st.sampled_from([b"", b"\x02\x00\x00\x00\x00\x00\x00\x01", b"\x01\x00\xff\xff\x00\x00"]),
    cuts=st.lists(st.integers(0, 20_000), max_size=10),
)
def test_chunking_does_not_change_the_events(
    frames: list[bytes], tail: bytes, cuts: list[int]
) -> None:
    data = b"".join(frames) + tail
    whole = feed(ServerConnection(max_pending=2), [data])
    assert (
        feed(ServerConnection(max_pending=2), [data[i : i + 1] for i in range(len(data))]) == whole
    )
    assert feed(ServerConnection(max_pending=2), split(data, cuts)) == whole
    assert len(whole) == len(frames) + (1 if tail.startswith(b"\x02") else 0)


# -- the client's connection ------------------------------------------------------------------


def test_client_sends_requests_with_fresh_ids() -> None:
    client = ClientConnection()
    first, frame = client.send_request(
        SIGN, ski=SKI, payload=b"digest", sni="a.example", client_ip=IPv4Address("192.0.2.9")
    )
    assert decode_request(frame) == Request(
        first, SIGN, ski=SKI, sni="a.example", client_ip=IPv4Address("192.0.2.9"), payload=b"digest"
    )
    assert len(frame) == REQUEST_PAD_TO
    second, _ = client.ping(b"x")
    assert (first, second) == (0, 1)
    assert client.pending == 2


def test_out_of_order_responses_are_matched_to_ids() -> None:
    client = ClientConnection()
    ids = [client.send_request(SIGN, ski=SKI, payload=bytes([i]))[0] for i in range(3)]
    ping_id, _ = client.ping(b"are you there")
    replies = [
        Response.ok(ids[2], b"sig2"),
        Response.pong(ping_id, b"are you there"),
        Response.error(ids[0], ErrorCode.KEY_NOT_FOUND),
        Response.ok(ids[1], b"sig1"),
    ]
    data = b"".join(encode_response(reply) for reply in replies)
    assert client.receive_data(data[:10]) == []
    assert client.receive_data(data[10:]) == replies
    assert client.pending == 0


def test_client_byte_at_a_time() -> None:
    client = ClientConnection()
    ids = [client.ping(bytes([i]))[0] for i in range(3)]
    data = b"".join(encode_response(Response.pong(i, bytes([i]))) for i in reversed(ids))
    got: list[Response] = []
    for i in range(len(data)):
        got += client.receive_data(data[i : i + 1])
    assert got == [Response.pong(i, bytes([i])) for i in reversed(ids)]


@pytest.mark.parametrize(
    "reply",
    [
        Response.ok(99, b"sig"),  # unknown id
        Response.pong(0, b"wrong echo"),
        Response.ok(0, b"ping answered with RESPONSE"),
        Response.pong(1),  # a sign request answered with PONG
    ],
)
def test_client_unexpected_responses_break_the_connection(reply: Response) -> None:
    client = ClientConnection()
    client.ping(b"echo me")
    client.send_request(SIGN, ski=SKI, payload=b"digest")
    with pytest.raises(RemoteProtocolError):
        client.receive_data(encode_response(reply))
    assert client.broken
    with pytest.raises(LocalProtocolError):
        client.receive_data(encode_response(Response.pong(0, b"echo me")))
    with pytest.raises(LocalProtocolError):
        client.ping()


def test_client_a_response_twice_is_remote_error() -> None:
    client = ClientConnection()
    request_id, _ = client.send_request(SIGN, ski=SKI, payload=b"digest")
    frame = encode_response(Response.ok(request_id, b"sig"))
    assert client.receive_data(frame) == [Response.ok(request_id, b"sig")]
    with pytest.raises(RemoteProtocolError):
        client.receive_data(frame)


def test_client_errors_answer_any_request() -> None:
    client = ClientConnection()
    ping_id, _ = client.ping(b"x")
    sign_id, _ = client.send_request(SIGN, ski=SKI, payload=b"d")
    replies = [
        Response.error(ping_id, ErrorCode.INTERNAL),
        Response.error(sign_id, ErrorCode.CRYPTO),
    ]
    assert client.receive_data(b"".join(map(encode_response, replies))) == replies


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (raw(op_item(0x42), frame_id=0), ErrorCode.BAD_OPCODE),
        (raw(op_item(Op.ERROR), frame_id=0), ErrorCode.FORMAT),
        (b"\x02" + encode_response(Response.pong(0))[1:], ErrorCode.VERSION_MISMATCH),
    ],
)
def test_client_malformed_responses(frame: bytes, code: ErrorCode) -> None:
    client = ClientConnection()
    client.ping()
    with pytest.raises(DecodeError) as caught:
        client.receive_data(frame)
    assert caught.value.code == code
    assert client.broken


def test_client_oversized_response_fails_on_its_header() -> None:
    client = ClientConnection(max_frame=16)
    client.ping(b"x" * 9)
    assert client.receive_data(encode_response(Response.pong(0, b"x" * 9))) == [
        Response.pong(0, b"x" * 9)
    ]
    client.ping(b"x" * 10)
    with pytest.raises(DecodeError) as caught:
        client.receive_data(encode_response(Response.pong(1, b"x" * 10))[:8])
    assert caught.value.code == ErrorCode.FORMAT


def test_client_max_pending() -> None:
    client = ClientConnection(max_pending=2)
    first, _ = client.ping()
    client.ping()
    with pytest.raises(LocalProtocolError) as caught:
        client.ping()
    assert caught.value.code == ErrorCode.OVERLOADED
    assert client.pending == 2
    client.receive_data(encode_response(Response.pong(first)))
    assert client.ping()[0] == 2


def test_client_refused_request_allocates_nothing() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError):
        client.send_request(SIGN, ski=b"short")
    assert client.pending == 0
    assert client.ping()[0] == 0


def test_ids_wrap() -> None:
    client = ClientConnection(first_id=MAX_ID - 1)
    assert [client.ping()[0] for _ in range(3)] == [MAX_ID - 1, MAX_ID, 0]


def test_ids_skip_outstanding_ones() -> None:
    client = ClientConnection(first_id=MAX_ID)
    ids = [client.ping()[0] for _ in range(3)]
    assert ids == [MAX_ID, 0, 1]
    client.receive_data(encode_response(Response.pong(0)))
    # Pretend the counter went all the way round (2**32 requests later).
    client._next_id = MAX_ID
    assert [client.ping()[0] for _ in range(2)] == [0, 2]


def test_client_limits_are_checked() -> None:
    for kwargs in ({"max_pending": 0}, {"max_frame": 0x10000}, {"first_id": MAX_ID + 1}):
        with pytest.raises(ConfigurationError):
            ClientConnection(**kwargs)


# -- both ends --------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(requests=st.lists(requests(), min_size=1, max_size=10), order=st.randoms())
def test_client_and_server_talk(requests: list[Request], order: random.Random) -> None:
    client, server = ClientConnection(), ServerConnection()
    wire = b""
    sent: dict[int, Request] = {}
    for request in requests:
        request_id, frame = client.send_request(
            request.op,
            ski=request.ski,
            payload=request.payload,
            sni=request.sni,
            client_ip=request.client_ip,
            server_ip=request.server_ip,
            cert_id=request.cert_id,
        )
        sent[request_id] = request
        wire += frame
    events = server.receive_data(wire)
    assert [type(event) for event in events] == [RequestReceived] * len(requests)
    received = [event.request for event in events if isinstance(event, RequestReceived)]
    assert {r.id: r.payload for r in received} == {i: r.payload for i, r in sent.items()}
    order.shuffle(received)
    replies = [
        Response.pong(r.id, r.payload) if r.op is Op.PING else Response.ok(r.id, r.payload[::-1])
        for r in received
    ]
    back = b"".join(server.send_response(reply) for reply in replies)
    assert client.receive_data(back) == replies
    assert client.pending == server.pending == 0


def test_reply_ops_and_request_ops_partition_the_opcodes() -> None:
    assert set(Op) == REPLY_OPS | REQUEST_OPS
    assert not REPLY_OPS & REQUEST_OPS
