"""The one canonical encoding for everything keybroker signs, seals or logs.

Why deterministic CBOR (RFC 8949 §4.2) through cbor2, and not JSON or protobuf:
signatures and MACs are computed over bytes, so two honest encoders must
produce the *same* bytes for the same value. JSON has no canonical form that
libraries agree on (number formatting, key order, escaping); protobuf leaves
field order and unknown fields to the implementation. CBOR's core
deterministic encoding fixes all of that, carries byte strings natively (no
base64 round trips around key material) and is small.

Every encoded message is a two-element CBOR array ``[label, body]`` where
``label`` is ``"keybroker/<area>/<type>/v<version>"``. The label is inside the
signed bytes, so a signature over one message type can never be replayed as
another (domain separation), and the version lets a type evolve.

Decoding is strict, because a peer controls these bytes:

* the label must be exactly one the caller accepts;
* the input must be *the* canonical encoding of what it decodes to (re-encoding
  gives the same bytes), so there is one byte string per value: no trailing
  data, no duplicate map keys, no indefinite lengths, no non-minimal integers;
* only plain types are allowed: int, bytes, str, bool, None, lists and maps
  with string keys; no floats and no CBOR tags (no surprise datetimes or
  bignums whose meaning differs between libraries);
* size and depth are bounded.

Every failure raises :class:`~keybroker.errors.DecodeError` and nothing else.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self, cast

import cbor2

from keybroker.errors import DecodeError, LocalProtocolError

#: Largest message decode() accepts, in bytes. Callers with bigger payloads pass max_size.
MAX_MESSAGE_SIZE = 1 << 20
MAX_DEPTH = 16

_LABEL_RE = re.compile(r"^keybroker(/[a-z0-9][a-z0-9-]*)+/v[1-9][0-9]*$")

Value = int | bytes | str | bool | None | list["Value"] | dict[str, "Value"]


def message_label(name: str, version: int) -> str:
    """Build the domain-separation label ``<name>/v<version>`` and check its shape."""
    label = f"{name}/v{version}"
    if not _LABEL_RE.match(label):
        raise LocalProtocolError(f"malformed message label {label!r}")
    return label


def _key_order(key: str) -> tuple[int, bytes]:
    """Where a text key sorts in a deterministic map (RFC 8949 §4.2.1: bytewise order of
    the encoded keys; a text string's head grows with its length, so shorter first, then
    its UTF-8 bytes) — the order ``cbor2.dumps(canonical=True)`` writes."""
    raw = key.encode("utf-8")
    return (len(raw), raw)


#: Values that need no check and no rebuilding (an ``int`` needs its range checked).
_LEAVES: frozenset[type] = frozenset({bytes, str, bool, type(None)})
#: The deterministic order of each key tuple seen (a map's keys in their order in the
#: map): messages repeat a handful of field sets, so each is sorted once.
_SORTED_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {}
_KEY_CACHE_SIZE = 4096
_CACHED_KEYS_MAX = 32
_CACHED_KEY_CHARS_MAX = 512


def _in_range(value: int) -> bool:
    """Inside CBOR major types 0/1 (no bignum tags)."""
    return -(1 << 64) <= value < (1 << 64)


def _check_decoded(value: object, depth: int) -> None:
    """Raise :class:`DecodeError` unless a decoded ``value`` is plain (the types in the
    module docstring, maps with text keys) with every map's keys in deterministic order,
    which :func:`decode` relies on. cbor2 decodes to exact built-in types only."""
    if depth > MAX_DEPTH:
        raise DecodeError("message nested too deeply")
    kind = type(value)
    if kind in _LEAVES:
        return
    if kind is int:
        if not _in_range(cast("int", value)):
            raise DecodeError("integer out of range")
        return
    if kind is list:
        for item in cast("list[object]", value):
            _check_decoded(item, depth + 1)
        return
    if kind is dict:
        mapping = cast("dict[object, object]", value)
        for key, item in mapping.items():
            if type(key) is not str:
                raise DecodeError("map keys must be text strings")
            if type(item) not in _LEAVES:
                _check_decoded(item, depth + 1)
        keys = cast("tuple[str, ...]", tuple(mapping))
        if len(keys) > 1 and _sorted_keys(keys) != keys:
            raise DecodeError("message is not canonically encoded")
        return
    raise DecodeError(f"type {kind.__name__} is not allowed in a canonical message")


def _sorted_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    """``keys`` in deterministic order (:func:`_key_order`), each tuple sorted once."""
    known = _SORTED_KEYS.get(keys)
    if known is not None:
        return known
    try:
        ordered = tuple(sorted(keys, key=_key_order))
    except UnicodeEncodeError:
        raise LocalProtocolError("map keys must be valid Unicode text") from None
    # Only small key sets, a bounded number of them: decoded keys come from peers, and a
    # message's field names are a few short words.
    if (
        len(_SORTED_KEYS) < _KEY_CACHE_SIZE
        and len(keys) <= _CACHED_KEYS_MAX
        and sum(map(len, keys)) <= _CACHED_KEY_CHARS_MAX
    ):
        _SORTED_KEYS[keys] = ordered
    return ordered


def _canonical(value: object, depth: int) -> object:
    """``value`` checked to be plain (the types in the module docstring, maps with text
    keys; subclasses of str, bytes and int taken as their base's data), with every map
    rebuilt in deterministic key order, so that cbor2's plain encoder writes the
    deterministic encoding.

    Why not ``cbor2.dumps(canonical=True)``: for plain values the two differ only in map
    key order (integers, lengths and heads are minimal either way; floats, tags, sets and
    indefinite lengths are refused here), and sorting only the maps (each set of keys
    once) is 2.5 times faster than cbor2's canonical mode, which encodes every key to
    sort it. The property tests in ``tests/unit/test_encoding.py`` hold the two to the
    same bytes."""
    if depth > MAX_DEPTH:
        raise LocalProtocolError("message nested too deeply")
    kind = type(value)
    if kind in _LEAVES:
        return value
    if kind is int:
        if not _in_range(cast("int", value)):
            raise LocalProtocolError("integer out of range")
        return value
    if isinstance(value, (list, tuple)):
        return [_canonical(item, depth + 1) for item in value]
    if isinstance(value, dict):
        for key in value:
            if type(key) is not str:
                raise LocalProtocolError("map keys must be text strings")
        keys = _sorted_keys(tuple(value)) if len(value) > 1 else tuple(value)
        out: dict[str, object] = {}
        for key in keys:
            item = value[key]
            out[key] = item if type(item) in _LEAVES else _canonical(item, depth + 1)
        return out
    # Subclasses (str and int enums) as their base's data, which is what cbor2 writes.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, int):
        return _canonical(int(value), depth)
    raise LocalProtocolError(f"type {kind.__name__} is not allowed in a canonical message")


def _refuse_tag(_decoder: object, tag: object) -> object:
    raise DecodeError("CBOR tags are not allowed")


_GOOD_LABELS: set[str] = set()


def encode(label: str, body: Mapping[str, Any]) -> bytes:
    """Encode ``body`` as the message type ``label`` in canonical CBOR."""
    if label not in _GOOD_LABELS:
        if not isinstance(label, str) or not _LABEL_RE.match(label):
            raise LocalProtocolError(f"malformed message label {label!r}")
        if len(_GOOD_LABELS) < 1024:  # the labels are the code's constants: a few dozen
            _GOOD_LABELS.add(label)
    return cbor2.dumps([label, _canonical(dict(body), 1)])


def decode(
    accepted: str | tuple[str, ...], data: bytes, *, max_size: int = MAX_MESSAGE_SIZE
) -> tuple[str, dict[str, Any]]:
    """Decode a message whose label is one of ``accepted``; return ``(label, body)``.

    Raises :class:`DecodeError` for anything that is not the canonical encoding
    of such a message.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("message must be bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise DecodeError(f"message larger than {max_size} bytes")
    labels = (accepted,) if isinstance(accepted, str) else accepted
    try:
        obj = cbor2.loads(
            data,
            tag_hook=_refuse_tag,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            max_depth=MAX_DEPTH + 2,
        )
    except DecodeError:
        raise
    except Exception as exc:  # cbor2 raises several types; the peer must see one.
        raise DecodeError("not a valid CBOR message") from exc
    if not (isinstance(obj, list) and len(obj) == 2):
        raise DecodeError("message must be a [label, body] array")
    label, body = obj
    if not isinstance(label, str) or label not in labels:
        raise DecodeError("unexpected message type")
    if not isinstance(body, dict):
        raise DecodeError("message body must be a map")
    # Plain, and every map's keys in deterministic order: then the plain encoder writes the
    # deterministic encoding, and the input must be exactly that (minimal heads, no
    # trailing bytes).
    _check_decoded(body, 1)
    if cbor2.dumps(obj) != data:
        raise DecodeError("message is not canonically encoded")
    return label, body


# ---------------------------------------------------------------------------
# Frozen dataclass messages
# ---------------------------------------------------------------------------


class Message:
    """Base for frozen dataclass messages with a canonical ``encode()``/``decode()``.

    Subclasses are ``@dataclass(frozen=True)`` and set ``LABEL`` (built with
    :func:`message_label`). Field types may be int, bytes, str, bool, ``X | None``,
    ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` or another :class:`Message`;
    :meth:`decode` checks every field against its annotation.
    """

    LABEL: ClassVar[str]

    def encode(self) -> bytes:
        cls = type(self)
        order = _ENCODE_ORDER.get(cls)
        if order is None:
            order = _encode_order(cls)
        body: dict[str, object] = {}
        for name in order:
            value = getattr(self, name)
            kind = type(value)
            if kind in _LEAVES or (kind is int and _in_range(value)):
                body[name] = value
            else:  # anything else (nested, a subclass, out of range): the general path
                return encode(self.LABEL, _to_plain(self))  # type: ignore[arg-type]
        return cbor2.dumps([self.LABEL, body])

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Self:
        _, body = decode(cls.LABEL, data, max_size=max_size)
        return _from_plain(cls, body)


_M = typing.TypeVar("_M", bound=Message)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    """A message class's field names, read once (``dataclasses.fields`` walks the class
    each call; a message class does not change once defined)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES.setdefault(cls, tuple(f.name for f in dataclasses.fields(cls)))
    return names


#: Each message class's field names in deterministic map order, for the flat messages
#: (every field a leaf) that :meth:`Message.encode` writes without walking them twice.
_ENCODE_ORDER: dict[type, tuple[str, ...]] = {}


def _encode_order(cls: type) -> tuple[str, ...]:
    label = getattr(cls, "LABEL", None)
    if not isinstance(label, str) or not _LABEL_RE.match(label):
        raise LocalProtocolError(f"malformed message label {label!r}")
    order = tuple(sorted(_field_names(cls), key=_key_order))
    return _ENCODE_ORDER.setdefault(cls, order)


def _to_plain(value: object) -> object:
    if isinstance(value, Message) and dataclasses.is_dataclass(value):
        return {name: _to_plain(getattr(value, name)) for name in _field_names(type(value))}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


Coercer = Callable[[Any, str], Any]

_SCHEMAS: dict[object, tuple[tuple[tuple[str, Coercer], ...], frozenset[str]]] = {}


def _schema(cls: type[Message]) -> tuple[tuple[tuple[str, Coercer], ...], frozenset[str]]:
    """Each init field of a message class with the function that checks and converts a
    decoded value for it, and the set of their names.

    ``typing.get_type_hints`` re-evaluates every annotation string on each call, and
    walking an annotation (origin, arguments) on every decoded value costs as much as
    the decoding: message classes are immutable once defined, so both are done once.
    """
    known = _SCHEMAS.get(cls)
    if known is not None:
        return known
    if not dataclasses.is_dataclass(cls):
        raise LocalProtocolError(f"{cls.__name__} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    fields = tuple((name, _coercer(hints[name])) for name in names)
    return _SCHEMAS.setdefault(cls, (fields, frozenset(names)))


def _from_plain(cls: type[_M], body: dict[str, Any]) -> _M:
    fields, names = _schema(cls)
    if body.keys() != names:
        raise DecodeError(f"{cls.LABEL}: unexpected or missing fields")
    return cls(**{name: coerce(body[name], f"{cls.LABEL}.{name}") for name, coerce in fields})


_COERCERS: dict[Any, Coercer] = {}


def _coercer(tp: Any) -> Coercer:
    """The function that checks a decoded value against the field type ``tp`` and converts
    it (arrays to tuples, maps to messages), raising :class:`DecodeError` naming ``where``."""
    known = _COERCERS.get(tp)
    if known is None:
        known = _COERCERS.setdefault(tp, _make_coercer(tp))
    return known


def _make_coercer(tp: Any) -> Coercer:
    origin = typing.get_origin(tp)
    if tp is Any:
        return lambda value, _where: value
    if origin in (typing.Union, types.UnionType):
        arms = [_coercer(arm) for arm in typing.get_args(tp)]

        def union(value: Any, where: str) -> Any:
            for arm in arms:
                try:
                    return arm(value, where)
                except DecodeError:
                    continue
            raise DecodeError(f"{where}: wrong type")

        return union
    if tp is type(None):

        def null(value: Any, where: str) -> None:
            if value is None:
                return
            raise DecodeError(f"{where}: expected null")

        return null
    if origin is list or origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        item = _coercer(item_tp)
        as_tuple = origin is tuple

        def array(value: Any, where: str) -> Any:
            if not isinstance(value, list):
                raise DecodeError(f"{where}: expected an array")
            items = [item(v, where) for v in value]
            return tuple(items) if as_tuple else items

        return array
    if origin is dict:
        _, val_tp = typing.get_args(tp) or (str, Any)
        val = _coercer(val_tp)

        def mapping(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise DecodeError(f"{where}: expected a map")
            return {k: val(v, where) for k, v in value.items()}

        return mapping
    if isinstance(tp, type) and issubclass(tp, Message):
        message = tp

        def nested(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise DecodeError(f"{where}: expected a map")
            return _from_plain(message, value)

        return nested
    if tp is bool:

        def boolean(value: Any, where: str) -> Any:
            if isinstance(value, bool):
                return value
            raise DecodeError(f"{where}: expected a boolean")

        return boolean
    if tp is int:

        def integer(value: Any, where: str) -> Any:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise DecodeError(f"{where}: expected an integer")

        return integer
    if tp in (bytes, str):
        name = tp.__name__

        def text_or_bytes(value: Any, where: str) -> Any:
            if isinstance(value, tp):
                return value
            raise DecodeError(f"{where}: expected {name}")

        return text_or_bytes

    def unsupported(_value: Any, where: str) -> Any:
        raise LocalProtocolError(f"{where}: unsupported field type {tp!r}")

    return unsupported
