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
from collections.abc import Mapping
from typing import Any, ClassVar, Self

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


def _check_plain(value: object, depth: int, *, local: bool) -> None:
    err: type[LocalProtocolError] | type[DecodeError] = LocalProtocolError if local else DecodeError
    if depth > MAX_DEPTH:
        raise err("message nested too deeply")
    if value is None or isinstance(value, (bool, bytes, str)):
        return
    if isinstance(value, int):
        # Keep integers inside CBOR major types 0/1 (no bignum tags).
        if not -(1 << 64) <= value < (1 << 64):
            raise err("integer out of range")
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(item, depth + 1, local=local)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise err("map keys must be text strings")
            _check_plain(item, depth + 1, local=local)
        return
    raise err(f"type {type(value).__name__} is not allowed in a canonical message")


def _dumps(obj: object) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _refuse_tag(_decoder: object, tag: object) -> object:
    raise DecodeError("CBOR tags are not allowed")


def encode(label: str, body: Mapping[str, Any]) -> bytes:
    """Encode ``body`` as the message type ``label`` in canonical CBOR."""
    if not _LABEL_RE.match(label):
        raise LocalProtocolError(f"malformed message label {label!r}")
    plain = dict(body)
    _check_plain(plain, 1, local=True)
    return _dumps([label, plain])


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
    _check_plain(body, 1, local=False)
    if _dumps(obj) != data:
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
        return encode(self.LABEL, _to_plain(self))  # type: ignore[arg-type]

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Self:
        _, body = decode(cls.LABEL, data, max_size=max_size)
        return _from_plain(cls, body)


_M = typing.TypeVar("_M", bound=Message)


def _to_plain(value: object) -> object:
    if isinstance(value, Message) and dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


_SCHEMAS: dict[object, tuple[dict[str, Any], frozenset[str]]] = {}


def _schema(cls: type[Message]) -> tuple[dict[str, Any], frozenset[str]]:
    """The resolved field types and init-field names of a message class.

    ``typing.get_type_hints`` re-evaluates every annotation string on each call;
    message classes are immutable once defined, so resolve them once.
    """
    known = _SCHEMAS.get(cls)
    if known is not None:
        return known
    if not dataclasses.is_dataclass(cls):
        raise LocalProtocolError(f"{cls.__name__} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = frozenset(f.name for f in dataclasses.fields(cls) if f.init)
    return _SCHEMAS.setdefault(cls, (hints, fields))


def _from_plain(cls: type[_M], body: dict[str, Any]) -> _M:
    hints, fields = _schema(cls)
    if body.keys() != fields:
        raise DecodeError(f"{cls.LABEL}: unexpected or missing fields")
    kwargs = {name: _coerce(hints[name], body[name], f"{cls.LABEL}.{name}") for name in fields}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(arm, value, where)
            except DecodeError:
                continue
        raise DecodeError(f"{where}: wrong type")
    if tp is type(None):
        if value is None:
            return None
        raise DecodeError(f"{where}: expected null")
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise DecodeError(f"{where}: expected an array")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, where) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected a map")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {k: _coerce(val_tp, v, where) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Message):
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected a map")
        return _from_plain(tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DecodeError(f"{where}: expected a boolean")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DecodeError(f"{where}: expected an integer")
    if tp in (bytes, str):
        if isinstance(value, tp):
            return value
        raise DecodeError(f"{where}: expected {tp.__name__}")
    raise LocalProtocolError(f"{where}: unsupported field type {tp!r}")
