"""Pieces every keys module shares: the key-id prefix, pickling refusal, names, time."""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Final, NoReturn, Protocol, TypeVar

from keybroker.errors import CryptoError, KeysetError
from keybroker.keys.lifecycle import CONSUMING_STATES, KeyState

# Tink-style output prefix (Tink's "TINK" prefix type): one format byte, then
# the 4-byte big-endian key id, so decrypt/verify/open try exactly one version.
FORMAT_V1: Final = 0x01
HEADER: Final = struct.Struct(">BI")
PREFIX_SIZE: Final = HEADER.size
MAX_KEY_ID: Final = 0xFFFFFFFF


def prefix(key_id: int) -> bytes:
    return HEADER.pack(FORMAT_V1, key_id)


class Entry(Protocol):
    @property
    def version(self) -> int: ...

    @property
    def state(self) -> KeyState: ...


E = TypeVar("E", bound=Entry)


def select(by_prefix: Mapping[bytes, E], data: bytes, min_size: int, keyset_name: str) -> E:
    """The version a prefixed blob names, if it may consume.

    Short blobs, unknown formats and unknown key ids raise :class:`CryptoError`
    as any forgery would; a known version that is disabled or destroyed raises
    :class:`KeysetError`, so an operator can tell a retired key from an attack.
    """
    entry = by_prefix.get(bytes(data[:PREFIX_SIZE])) if len(data) >= min_size else None
    if entry is None:
        raise CryptoError()
    if entry.state not in CONSUMING_STATES:
        raise unusable(entry, keyset_name)
    return entry


def unusable(entry: Entry, keyset_name: str) -> KeysetError:
    return KeysetError(
        f"key version {entry.version} of keyset {keyset_name!r} is {entry.state.value}"
    )


class NoPickle:
    """Refuse pickle and copy: key material leaves only encrypted (``encrypt_to_bytes``)."""

    __slots__ = ()

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")

    def __getstate__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")


# Names appear in AAD, logs and reprs: keep them printable and unambiguous.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")


def check_name(name: str) -> str:
    if not (isinstance(name, str) and _NAME_RE.fullmatch(name)):
        raise KeysetError("keyset names are 1-200 characters of letters, digits and . _ : / @ + -")
    return name


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


def check_time(now: datetime | None) -> datetime | None:
    if now is not None and (not isinstance(now, datetime) or now.utcoffset() is None):
        raise ValueError("timestamps must be timezone-aware datetimes")
    return now


def to_micros(when: datetime | None) -> int | None:
    return None if when is None else (when - _EPOCH) // _MICROSECOND


def from_micros(micros: int | None) -> datetime | None:
    return None if micros is None else _EPOCH + micros * _MICROSECOND


def check_key_id(key_id: int) -> int:
    if not (isinstance(key_id, int) and 0 <= key_id <= MAX_KEY_ID):
        raise KeysetError("key ids are 32-bit unsigned integers")
    return key_id


def check_version(version: int) -> int:
    if not (isinstance(version, int) and version >= 1):
        raise KeysetError("version numbers start at 1")
    return version
