"""Fuzzing the key-server protocol: a peer's bytes may only ever raise RemoteProtocolError.

Random bytes, and near-valid frames (valid frames with flipped bytes, truncations,
extensions, rewritten lengths, or TLV items assembled from plausible pieces), go
into both decoders and both connections. The decoders either return a message
that survives a round trip or raise :class:`RemoteProtocolError` carrying a real
:class:`ErrorCode`. The server never raises at all: it reports events, and every
event it reports can be answered through ``send_response``.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keybroker.errors import DecodeError, LocalProtocolError, RemoteProtocolError
from keybroker.flows.keyless.codes import ErrorCode, Op, Tag
from keybroker.flows.keyless.protocol import (
    HEADER,
    MAX_ID,
    REQUEST_OPS,
    BadRequest,
    ClientConnection,
    ConnectionBroken,
    Event,
    Operation,
    Request,
    RequestReceived,
    Response,
    ServerConnection,
    _decode_request_body,  # the full decoder, which the server's fast path stands in for
    _fast_request,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

FUZZ = settings(max_examples=500, deadline=None)
#: Connections take a few frames per example.
FUZZ_CONNECTIONS = settings(max_examples=300, deadline=None)

# -- valid messages ---------------------------------------------------------------------------

ips = st.one_of(
    st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
    st.builds(IPv6Address, st.integers(0, 2**128 - 1)),
)
requests = st.builds(
    Request,
    id=st.integers(0, MAX_ID),
    op=st.sampled_from(sorted(REQUEST_OPS)),
    ski=st.none() | st.binary(min_size=20, max_size=20),
    sni=st.none() | st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9_-]{1,10}){0,2}", fullmatch=True),
    client_ip=st.none() | ips,
    server_ip=st.none() | ips,
    cert_id=st.none() | st.from_regex(r"[\x21-\x7e]{1,20}", fullmatch=True),
    payload=st.binary(max_size=600),
)
# Ids 0..3 so that the client below has them outstanding.
responses = st.one_of(
    st.builds(Response.ok, st.integers(0, 3), st.binary(max_size=300)),
    st.builds(Response.pong, st.integers(0, 3), st.binary(max_size=8)),
    st.builds(Response.error, st.integers(0, 3), st.sampled_from(ErrorCode)),
)

# -- near-valid frames ------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, frames: st.SearchStrategy[bytes]) -> bytes:
    """A valid frame, then a few flips, truncations, extensions or length rewrites."""
    frame = bytearray(draw(frames))
    for _ in range(draw(st.integers(1, 4))):
        kinds = ["flip", "flip", "set", "set", "truncate", "extend", "length", "version"]
        kind = draw(st.sampled_from(kinds))
        if kind in ("flip", "set") and frame:
            at = draw(st.integers(0, len(frame) - 1))
            if kind == "flip":
                frame[at] ^= 1 << draw(st.integers(0, 7))
            else:
                frame[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del frame[draw(st.integers(0, len(frame))) :]
        elif kind == "extend":
            frame += draw(st.binary(min_size=1, max_size=20))
        elif kind == "length" and len(frame) >= 4:
            frame[2:4] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
        elif kind == "version" and frame:
            frame[0] = draw(st.integers(0, 3))
    return bytes(frame)


@st.composite
def assembled(draw: st.DrawFn) -> bytes:
    """A header that is usually right and TLV items made of plausible pieces."""
    tags = draw(st.lists(st.sampled_from([*Tag, 0x00, 0x99, 0xFF]), max_size=6))
    if draw(st.integers(0, 4)):  # usually an opcode somewhere
        tags.insert(draw(st.integers(0, len(tags))), Tag.OPCODE)
    items = b""
    for tag in tags:
        if tag == Tag.OPCODE:
            data = bytes([draw(st.sampled_from([*Op, 0x00, 0x42]))])
        else:
            data = draw(st.sampled_from([b"", bytes(4), bytes(16), bytes(20), b"a.example"]))
            data = draw(st.just(data) | st.binary(max_size=24))
        # the declared length is usually right
        declared = len(data) if draw(st.integers(0, 7)) else draw(st.integers(0, 40))
        items += bytes([tag]) + declared.to_bytes(2, "big") + data
    return draw(framed(st.just(items)))


def framed(bodies: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A header that is usually right (ids 0..3) in front of ``bodies``."""

    def frame(major: int, minor: int, frame_id: int, body: bytes) -> bytes:
        return (
            bytes([major, minor])
            + len(body).to_bytes(2, "big")
            + frame_id.to_bytes(4, "big")
            + body
        )

    majors = st.sampled_from([1, 1, 1, 1, 1, 0, 2, 255])
    return st.builds(frame, majors, st.integers(0, 255), st.integers(0, 3), bodies)


request_like = st.one_of(
    st.binary(max_size=1100),
    framed(st.binary(max_size=60)),
    mutated(requests.map(encode_request)),
    assembled(),
)
response_like = st.one_of(
    st.binary(max_size=400),
    framed(st.binary(max_size=60)),
    mutated(responses.map(encode_response)),
    assembled(),
)


def check_remote_error(exc: RemoteProtocolError) -> None:
    assert exc.code in set(ErrorCode), exc


# -- decoders ---------------------------------------------------------------------------------


@FUZZ
@given(request_like)
def test_decode_request_raises_only_remote_protocol_errors(frame: bytes) -> None:
    try:
        request = decode_request(frame)
    except RemoteProtocolError as exc:
        check_remote_error(exc)
    else:
        assert isinstance(request, Request)
        assert decode_request(encode_request(request)) == request


@FUZZ
@given(response_like)
def test_decode_response_raises_only_remote_protocol_errors(frame: bytes) -> None:
    try:
        response = decode_response(frame)
    except RemoteProtocolError as exc:
        check_remote_error(exc)
    else:
        assert isinstance(response, Response)
        assert decode_response(encode_response(response)) == response


#: What an edge sends: a key operation with an SKI, an SNI and a digest (or a PING).
edge_requests = st.builds(
    Request,
    id=st.integers(0, MAX_ID),
    op=st.sampled_from(sorted(REQUEST_OPS)),
    ski=st.none() | st.binary(min_size=20, max_size=20),
    sni=st.none()
    | st.from_regex(r"[A-Za-z0-9_-]{1,20}(\.[A-Za-z0-9_-]{1,20}){0,3}", fullmatch=True),
    payload=st.binary(max_size=600),
)


@FUZZ
@given(st.one_of(request_like, edge_requests.map(encode_request)))
def test_the_fast_request_decoder_agrees_with_the_full_one(frame: bytes) -> None:
    """Whatever it accepts, the full decoder decodes to the same request; it may decline."""
    request_id = int.from_bytes(frame[4:8], "big") if len(frame) >= 8 else 0
    fast = _fast_request(request_id, frame, 8, len(frame)) if len(frame) >= 8 else None
    try:
        full: Request | None = _decode_request_body(request_id, frame[8:])
    except DecodeError:
        full = None
    if fast is not None:
        assert full is not None
        assert fast == full
        assert repr(fast) == repr(full)


@FUZZ
@given(edge_requests)
def test_the_fast_request_decoder_takes_what_an_edge_sends(request: Request) -> None:
    frame = encode_request(request)
    assert _fast_request(request.id, frame, 8, len(frame)) == request


def expected_events(data: bytes, max_frame: int = 4096) -> list[Event]:
    """What a fresh server connection must report for ``data``, frame by frame, from the
    full decoder (a second request with an outstanding id is a ``FORMAT`` error)."""
    events: list[Event] = []
    outstanding: set[int] = set()
    offset = 0
    while len(data) - offset >= 8:
        major, _minor, length, request_id = HEADER.unpack_from(data, offset)
        if major != 1:
            return [*events, ConnectionBroken(request_id, ErrorCode.VERSION_MISMATCH)]
        if length > max_frame:
            return [*events, ConnectionBroken(request_id, ErrorCode.FORMAT)]
        if len(data) - offset - 8 < length:
            break
        body = data[offset + 8 : offset + 8 + length]
        offset += 8 + length
        try:
            request = _decode_request_body(request_id, body)
        except DecodeError as exc:
            events.append(BadRequest(request_id, ErrorCode(exc.code)))
            continue
        if request_id in outstanding:
            events.append(BadRequest(request_id, ErrorCode.FORMAT))
            continue
        outstanding.add(request_id)
        events.append(RequestReceived(request))
    return events


#: Frames near what an edge sends, and runs of them: the server's fast paths see them all.
edge_like = st.one_of(
    request_like, edge_requests.map(encode_request), mutated(edge_requests.map(encode_request))
)
edge_runs = st.lists(edge_like, min_size=1, max_size=4).map(b"".join)


@FUZZ
@given(edge_runs)
def test_the_server_connection_reports_what_the_full_decoder_decodes(frame: bytes) -> None:
    """Frame by frame, fast paths or not, the server reports exactly the full decoder's
    request or error. ``receive_operations`` hands some key operations (with an SKI, not a
    PING) over as tuples of the same fields and reports everything else as ``receive_data``
    does."""
    expected = expected_events(frame)
    assert ServerConnection().receive_data(frame) == expected
    server = ServerConnection()
    operations: list[Operation] = []
    events = server.receive_operations(frame, operations)
    requests = {e.request.id: e.request for e in expected if isinstance(e, RequestReceived)}
    assert [e for e in events if not isinstance(e, RequestReceived)] == [
        e for e in expected if not isinstance(e, RequestReceived)
    ]
    reported = {e.request.id: e.request for e in events if isinstance(e, RequestReceived)}
    assert all(requests.get(request_id) == request for request_id, request in reported.items())
    for request_id, op, ski, payload in operations:
        assert request_id not in reported
        request = requests[request_id]
        assert (request.op, request.ski, request.payload) == (op, ski, payload)
        assert op is not Op.PING and ski is not None
    assert {*reported, *(operation[0] for operation in operations)} == set(requests)
    assert server.pending == len(requests)


@FUZZ
@given(st.lists(edge_requests, max_size=6, unique_by=lambda request: request.id))
def test_what_an_edge_sends_is_handed_over_as_operations(requests: list[Request]) -> None:
    server = ServerConnection()
    operations: list[Operation] = []
    events = server.receive_operations(
        b"".join(encode_request(request) for request in requests), operations
    )
    keyed = [r for r in requests if r.op is not Op.PING and r.ski is not None]
    assert operations == [(r.id, r.op, r.ski, r.payload) for r in keyed]
    assert events == [RequestReceived(r) for r in requests if r not in keyed]


@FUZZ
@given(
    st.lists(edge_requests, max_size=8, unique_by=lambda request: request.id),
    st.lists(st.binary(max_size=300), max_size=8),
)
def test_send_oks_frames_as_send_ok_does(requests: list[Request], payloads: list[bytes]) -> None:
    """One call for a batch: the same frames, the same checks, as one call per reply."""
    one, batch = ServerConnection(), ServerConnection()
    wire = b"".join(encode_request(request) for request in requests)
    one.receive_data(wire)
    batch.receive_data(wire)
    answers = [
        (request.id, payload)
        for request, payload in zip(requests, payloads, strict=False)
        if request.op is not Op.PING and payload
    ]
    expected = b"".join(one.send_ok(request_id, payload) for request_id, payload in answers)
    assert batch.send_oks([a[0] for a in answers], [a[1] for a in answers]) == expected
    assert batch.pending == one.pending
    for request_id, payload in answers:  # nothing is owed twice
        with pytest.raises(LocalProtocolError):
            batch.send_oks([request_id], [payload])


def test_send_oks_refuses_unequal_lists() -> None:
    server = ServerConnection()
    server.receive_data(encode_request(Request(1, Op.ECDSA_SIGN_SHA256, ski=bytes(20))))
    with pytest.raises(LocalProtocolError, match="as many payloads"):
        server.send_oks([1], [])
    assert server.pending == 1


# -- connections ------------------------------------------------------------------------------


def answer(event: RequestReceived | BadRequest | ConnectionBroken) -> Response:
    if isinstance(event, RequestReceived):
        request = event.request
        if request.op is Op.PING:
            return Response.pong(request.id, request.payload)
        return Response.ok(request.id, b"result")
    return event.reply()


@FUZZ_CONNECTIONS
@given(
    chunks=st.lists(request_like, max_size=4),
    max_pending=st.integers(1, 3),
    answer_as_we_go=st.booleans(),
)
def test_server_reports_only_events_and_every_event_can_be_answered(
    chunks: list[bytes], max_pending: int, answer_as_we_go: bool
) -> None:
    server = ServerConnection(max_pending=max_pending)
    unanswered: list[Response] = []
    for chunk in chunks:
        if server.broken:
            break
        events = server.receive_data(chunk)
        assert all(isinstance(e, RequestReceived | BadRequest | ConnectionBroken) for e in events)
        assert not any(isinstance(e, ConnectionBroken) for e in events[:-1])
        assert server.buffered < 8 + 4096
        unanswered += [answer(event) for event in events]
        if answer_as_we_go:
            for response in unanswered:
                assert server.send_response(response)
            unanswered = []
            assert server.pending == 0
    for response in unanswered:
        assert server.send_response(response)
    assert server.pending == 0


@FUZZ_CONNECTIONS
@given(chunks=st.lists(response_like, max_size=4))
def test_client_raises_only_remote_protocol_errors(chunks: list[bytes]) -> None:
    client = ClientConnection()
    client.ping(b"p")
    for _ in range(3):
        client.send_request(Op.ECDSA_SIGN_SHA256, ski=bytes(20), payload=b"digest")
    received: list[Response] = []
    try:
        for chunk in chunks:
            received += client.receive_data(chunk)
    except RemoteProtocolError as exc:
        check_remote_error(exc)
        assert client.broken
    else:
        assert not client.broken
        assert all(isinstance(r, Response) for r in received)
        # each response answered a different outstanding request
        assert len({r.id for r in received}) == len(received) == 4 - client.pending
