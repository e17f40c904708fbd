from __future__ import annotations

import contextlib
from dataclasses import dataclass

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keybroker.encoding import Message, decode, encode, message_label
from keybroker.errors import DecodeError, LocalProtocolError, RemoteProtocolError

LABEL = message_label("keybroker/test/sample", 1)


@dataclass(frozen=True)
class Inner(Message):
    LABEL = message_label("keybroker/test/inner", 1)
    tag: str
    blob: bytes


@dataclass(frozen=True)
class Sample(Message):
    LABEL = message_label("keybroker/test/sample", 1)
    count: int
    payload: bytes
    names: list[str]
    inner: Inner
    flag: bool
    note: str | None = None
    pairs: tuple[int, ...] = ()


def plain_values(keys: st.SearchStrategy[str], max_leaves: int) -> st.SearchStrategy[object]:
    """Nested plain values (what a message body may hold), maps keyed by ``keys``."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**64), max_value=2**64 - 1)
        | st.binary(max_size=64)
        | st.text(max_size=32),
        lambda children: (
            st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=6)
        ),
        max_leaves=max_leaves,
    )


plain = plain_values(st.text(max_size=8), 20)
bodies = st.dictionaries(st.text(max_size=8), plain, max_size=6)

samples = st.builds(
    Sample,
    count=st.integers(min_value=-(2**63), max_value=2**63),
    payload=st.binary(max_size=128),
    names=st.lists(st.text(max_size=16), max_size=4),
    inner=st.builds(Inner, tag=st.text(max_size=8), blob=st.binary(max_size=16)),
    flag=st.booleans(),
    note=st.none() | st.text(max_size=16),
    pairs=st.lists(st.integers(min_value=0, max_value=1000), max_size=4).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(bodies)
def test_decode_inverts_encode(body: dict[str, object]) -> None:
    data = encode(LABEL, body)
    label, got = decode(LABEL, data)
    assert label == LABEL
    assert got == _lists(body)
    # canonical: the encoding of the decoded value is the same bytes
    assert encode(LABEL, got) == data


def _lists(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


@settings(max_examples=300, deadline=None)
@given(samples)
def test_message_round_trip(msg: Sample) -> None:
    assert Sample.decode(msg.encode()) == msg


# Keys around the 23/24-byte boundary of a text string's head, and non-ASCII keys whose
# UTF-8 length differs from their length in characters: where a wrong sort would show.
keys = (
    st.text(max_size=8)
    | st.text(min_size=20, max_size=30)
    | st.sampled_from(
        ["é", "e", "ée", "z", "\u00ff", "\U0001f511", "aa", "ab", "b", "A" * 23, "A" * 24, "B" * 23]
    )
)
deep = plain_values(keys, 30)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(keys, deep, max_size=8))
def test_encoding_is_exactly_cbor2s_deterministic_encoding(body: dict[str, object]) -> None:
    # encode() sorts the maps itself and uses cbor2's plain encoder; the bytes must be
    # those of cbor2's canonical mode, to the last one.
    assert encode(LABEL, body) == cbor2.dumps([LABEL, body], canonical=True)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(keys, deep, max_size=8), st.randoms(use_true_random=False))
def test_decode_accepts_exactly_the_deterministic_encoding(
    body: dict[str, object], rng: object
) -> None:
    # The same value with every map's keys shuffled, encoded as is: decode() must accept
    # it exactly when it is the deterministic encoding.
    def shuffled(value: object) -> object:
        if isinstance(value, dict):
            items = list(value.items())
            rng.shuffle(items)  # type: ignore[attr-defined]
            return {k: shuffled(v) for k, v in items}
        if isinstance(value, list):
            return [shuffled(v) for v in value]
        return value

    data = cbor2.dumps([LABEL, shuffled(body)])
    canonical = data == cbor2.dumps([LABEL, body], canonical=True)
    try:
        decode(LABEL, data)
    except DecodeError:
        assert not canonical
    else:
        assert canonical


def test_keys_that_are_not_valid_unicode_are_refused_when_encoding() -> None:
    with pytest.raises(LocalProtocolError):
        encode(LABEL, {"a\ud800": 1, "b": 2})


def test_map_order_does_not_change_the_bytes() -> None:
    assert encode(LABEL, {"a": 1, "bb": 2, "c": 3}) == encode(LABEL, {"c": 3, "bb": 2, "a": 1})


def test_label_separates_domains() -> None:
    other = message_label("keybroker/test/other", 1)
    data = encode(other, {"count": 1})
    with pytest.raises(DecodeError):
        decode(LABEL, data)
    v2 = message_label("keybroker/test/sample", 2)
    with pytest.raises(DecodeError):
        decode(LABEL, encode(v2, {}))
    assert decode((LABEL, v2), encode(v2, {}))[0] == v2


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        cbor2.dumps([LABEL, {"a": 1}]) + b"\x00",  # trailing byte
        cbor2.dumps([LABEL, {"a": 1}])[:-1],  # truncated
        cbor2.dumps({"label": LABEL}),  # not an array
        cbor2.dumps([LABEL, {"a": 1}, 3]),  # wrong arity
        cbor2.dumps([LABEL, [1, 2]]),  # body not a map
        cbor2.dumps([LABEL, {1: 1}]),  # non-text key
        cbor2.dumps([LABEL, {"a": 1.5}]),  # float
        bytes.fromhex("82") + cbor2.dumps(LABEL) + bytes.fromhex("a1616101616102"),  # dup key
        bytes.fromhex("82") + cbor2.dumps(LABEL) + bytes.fromhex("a161611801"),  # 1 as uint8
        bytes.fromhex("82") + cbor2.dumps(LABEL) + bytes.fromhex("bf616101ff"),  # indefinite map
        bytes.fromhex("82") + cbor2.dumps(LABEL) + bytes.fromhex("a16161c11a00000001"),  # tag 1
        cbor2.dumps([LABEL, {"a": 2**70}]),  # bignum tag
        cbor2.dumps([LABEL, {"b": 1, "a": 2}], canonical=False),  # unsorted keys
    ],
)
def test_non_canonical_or_malformed_is_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(LABEL, data)


def test_depth_and_size_limits() -> None:
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(LocalProtocolError):
        encode(LABEL, {"x": deep})
    with pytest.raises(DecodeError):
        decode(LABEL, cbor2.dumps([LABEL, {"x": deep}], canonical=True))
    big = encode(LABEL, {"x": b"\x00" * 2000})
    with pytest.raises(DecodeError):
        decode(LABEL, big, max_size=1000)


def test_encoder_refuses_unsupported_types_and_labels() -> None:
    with pytest.raises(LocalProtocolError):
        encode(LABEL, {"x": 1.0})
    with pytest.raises(LocalProtocolError):
        encode(LABEL, {"x": object()})
    with pytest.raises(LocalProtocolError):
        encode("not-a-label", {})
    with pytest.raises(LocalProtocolError):
        message_label("Keybroker/Bad", 1)


def test_message_fields_are_type_checked() -> None:
    good = Sample(1, b"p", ["n"], Inner("t", b"b"), True)
    _, body = decode(Sample.LABEL, good.encode())
    for field, bad in [
        ("count", "1"),
        ("count", True),
        ("payload", "text"),
        ("names", ["ok", 3]),
        ("flag", 1),
        ("note", 5),
        ("inner", {"tag": "t"}),
    ]:
        data = encode(Sample.LABEL, body | {field: bad})
        with pytest.raises(DecodeError):
            Sample.decode(data)
    with pytest.raises(DecodeError):
        Sample.decode(encode(Sample.LABEL, body | {"extra": 1}))
    missing = dict(body)
    del missing["count"]
    with pytest.raises(DecodeError):
        Sample.decode(encode(Sample.LABEL, missing))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_raise_only_remote_protocol_error(data: bytes) -> None:
    # Anything else escaping (ValueError, IndexError, TypeError...) fails the test.
    with contextlib.suppress(RemoteProtocolError):
        Sample.decode(data)


@settings(max_examples=500, deadline=None)
@given(samples, st.data())
def test_fuzz_mutated_messages_raise_only_remote_protocol_error(
    msg: Sample, data: st.DataObject
) -> None:
    raw = bytearray(msg.encode())
    pos = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(min_value=1, max_value=255))
    with contextlib.suppress(RemoteProtocolError):
        Sample.decode(bytes(raw))


def test_str_and_int_enums_encode_as_their_values() -> None:
    import enum

    class Colour(enum.StrEnum):
        RED = "red"

    class Mixed(str, enum.Enum):  # noqa: UP042 - str() of a member is "Mixed.RED", its data "r"
        RED = "r"

    class Level(enum.IntEnum):
        HIGH = 3

    body = {"a": Colour.RED, "b": Mixed.RED, "c": Level.HIGH, "d": [Colour.RED]}
    plain = {"a": "red", "b": "r", "c": 3, "d": ["red"]}
    assert encode(LABEL, body) == encode(LABEL, plain)
    assert encode(LABEL, body) == cbor2.dumps([LABEL, plain], canonical=True)


def test_only_small_key_sets_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    # Decoded keys come from peers: a map of many long keys is checked, never cached.
    from keybroker import encoding

    monkeypatch.setattr(encoding, "_SORTED_KEYS", {})  # other tests may have filled it
    big = {f"{i:04d}" + "k" * 60: i for i in range(40)}
    decode(LABEL, encode(LABEL, {"m": big}))
    assert all(len(keys) < 40 for keys in encoding._SORTED_KEYS)
    decode(LABEL, encode(LABEL, {"b": 1, "a": 2}))
    assert encoding._SORTED_KEYS[("a", "b")] == ("a", "b")


@dataclass(frozen=True)
class Flat(Message):
    """Every field a leaf: Message.encode writes it without the general walk. Field names
    around the 23/24-byte head boundary and of unequal lengths, where a wrong order shows."""

    LABEL = message_label("keybroker/test/flat", 1)
    zz: object
    a: object
    abcdefghijklmnopqrstuvw: object  # 23 bytes
    abcdefghijklmnopqrstuvwx: object  # 24 bytes
    b_: object


flat_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.binary(max_size=16)
    | st.text(max_size=16)
    | st.lists(st.integers(min_value=0, max_value=9), max_size=3)
)


@settings(max_examples=500, deadline=None)
@given(st.lists(flat_values, min_size=5, max_size=5))
def test_a_flat_message_encodes_as_the_general_path_does(values: list[object]) -> None:
    from keybroker.encoding import _to_plain

    msg = Flat(*values)
    try:
        expected = encode(Flat.LABEL, _to_plain(msg))  # type: ignore[arg-type]
    except LocalProtocolError:
        with pytest.raises(LocalProtocolError, match="integer out of range"):
            msg.encode()
        return
    assert msg.encode() == expected
    assert expected == cbor2.dumps([Flat.LABEL, _to_plain(msg)], canonical=True)


def test_a_message_class_with_a_malformed_label_is_refused() -> None:
    @dataclass(frozen=True)
    class Bad(Message):
        LABEL = "Not/A/Label"
        x: int

    for _ in range(2):  # not remembered as good on the way
        with pytest.raises(LocalProtocolError, match="malformed message label"):
            Bad(1).encode()
