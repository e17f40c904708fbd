"""Public keysets: what verifies signatures and seals to a recipient, with no secret in it.

A :class:`PublicKeyset` is an immutable snapshot of a signing or HPKE
keyset's public keys, key ids and states. It is not secret: export it with
:meth:`PublicKeyset.to_bytes` and rebuild it anywhere with
:meth:`PublicKeyset.from_bytes` (a peer's bytes: anything malformed raises
:class:`DecodeError`). A principal's sealing key known only as 32 raw bytes
becomes one with :meth:`PublicKeyset.from_public_key`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Final, cast

from keybroker.encoding import Message, message_label
from keybroker.errors import DecodeError, KeybrokerError, KeysetError
from keybroker.keys import _material
from keybroker.keys._common import (
    PREFIX_SIZE,
    NoPickle,
    check_key_id,
    check_name,
    check_version,
    prefix,
    select,
)
from keybroker.keys.lifecycle import KeyState
from keybroker.keys.templates import KeyTemplate, Purpose, as_purpose, get_template

_MIN_SIGNATURE: Final = PREFIX_SIZE + 1


@dataclass(frozen=True, slots=True)
class PublicVersion:
    """One version's public half, as listed by :attr:`PublicKeyset.versions`."""

    version: int
    key_id: int
    template: KeyTemplate
    state: KeyState
    public_key: bytes

    def __repr__(self) -> str:
        return f"{self.version}:{self.key_id:#010x}:{self.state.value}"


class _PublicEntry:
    __slots__ = ("key", "prefix", "public", "state", "version")

    def __init__(self, info: PublicVersion, key: _material.Public) -> None:
        self.public = info
        self.key = key
        self.version = info.version
        self.state = info.state
        self.prefix = prefix(info.key_id)


@dataclass(frozen=True)
class _PublicVersionRecord(Message):
    LABEL: ClassVar[str] = message_label("keybroker/keys/public-version", 1)
    version: int
    key_id: int
    template: str
    state: str
    public_key: bytes


@dataclass(frozen=True)
class _PublicKeysetRecord(Message):
    LABEL: ClassVar[str] = message_label("keybroker/keys/public-keyset", 1)
    name: str
    purpose: str
    versions: list[_PublicVersionRecord]


class PublicKeyset(NoPickle):
    """Public keys of a ``sign`` or ``hpke`` keyset: :meth:`verify` or :meth:`seal`."""

    __slots__ = ("_by_key_id", "_by_prefix", "_name", "_primary", "_purpose", "_versions")

    def __init__(
        self,
        name: str,
        purpose: Purpose,
        entries: Iterable[tuple[PublicVersion, _material.Public]],
    ) -> None:
        """Internal; use ``Keyset.public_keyset``, ``from_bytes`` or ``from_public_key``."""
        self._name = name
        self._purpose = purpose
        self._versions: dict[int, _PublicEntry] = {}
        self._by_key_id: dict[int, _PublicEntry] = {}
        self._by_prefix: dict[bytes, _PublicEntry] = {}
        self._primary: _PublicEntry | None = None
        for info, key in entries:
            entry = _PublicEntry(info, key)
            if info.version in self._versions or info.key_id in self._by_key_id:
                raise KeysetError("duplicate version or key id")
            if purpose not in info.template.purposes or not info.template.asymmetric:
                raise KeysetError(f"template {info.template.name} does not serve {purpose.value}")
            if info.state is KeyState.PRIMARY:
                if self._primary is not None:
                    raise KeysetError("more than one primary version")
                self._primary = entry
            self._versions[info.version] = entry
            self._by_key_id[info.key_id] = entry
            self._by_prefix[entry.prefix] = entry

    # -- construction from outside data ---------------------------------------

    @classmethod
    def from_public_key(
        cls,
        template: KeyTemplate | str,
        public_key: bytes,
        *,
        key_id: int,
        name: str = "recipient",
    ) -> PublicKeyset:
        """A one-version keyset (version 1, primary) around a raw public key.

        ``public_key`` is in the template's public format (32 raw bytes for
        X25519 and Ed25519). It comes from a peer, so a malformed or (X25519)
        low-order key raises :class:`DecodeError`.
        """
        tpl = get_template(template)
        info = PublicVersion(1, check_key_id(key_id), tpl, KeyState.PRIMARY, bytes(public_key))
        purposes = sorted(tpl.purposes)
        if not tpl.asymmetric:
            raise KeysetError(f"template {tpl.name} has no public key")
        return cls(check_name(name), purposes[0], [(info, tpl.kind.load_public(info.public_key))])

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicKeyset:
        """Rebuild from :meth:`to_bytes`. Any malformation raises :class:`DecodeError`."""
        record = _PublicKeysetRecord.decode(data)
        try:
            purpose = as_purpose(record.purpose)
            entries = []
            for v in record.versions:
                tpl = get_template(v.template)
                info = PublicVersion(
                    check_version(v.version),
                    check_key_id(v.key_id),
                    tpl,
                    KeyState(v.state),
                    v.public_key,
                )
                entries.append((info, tpl.kind.load_public(v.public_key)))
            return cls(check_name(record.name), purpose, entries)
        except DecodeError:
            raise
        except (KeybrokerError, ValueError) as exc:
            raise DecodeError(f"invalid public keyset: {exc}") from None

    def to_bytes(self) -> bytes:
        """Canonical encoding (label ``keybroker/keys/public-keyset/v1``); not secret."""
        return _PublicKeysetRecord(
            name=self._name,
            purpose=self._purpose.value,
            versions=[
                _PublicVersionRecord(
                    version=e.public.version,
                    key_id=e.public.key_id,
                    template=e.public.template.name,
                    state=e.state.value,
                    public_key=e.public.public_key,
                )
                for e in self._versions.values()
            ],
        ).encode()

    # -- reading ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def purpose(self) -> Purpose:
        return self._purpose

    @property
    def versions(self) -> tuple[PublicVersion, ...]:
        return tuple(self._versions[v].public for v in sorted(self._versions))

    @property
    def primary(self) -> PublicVersion | None:
        return None if self._primary is None else self._primary.public

    def public_key_bytes(self, version: int | None = None) -> bytes:
        """The public key of ``version`` (default: the primary), in its public format."""
        return self._entry(version).public.public_key

    def public_key_pem(self, version: int | None = None) -> bytes:
        return self._entry(version).key.pem()

    # -- primitives --------------------------------------------------------------

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return ``None`` if ``signature`` (key-id prefixed) is valid for ``data``.

        Raises :class:`CryptoError` for a bad signature or unknown key id and
        :class:`KeysetError` for a version that is disabled or destroyed.
        """
        self._require(Purpose.SIGN)
        entry = select(self._by_prefix, signature, _MIN_SIGNATURE, self._name)
        cast(_material.VerifyingKey, entry.key).verify(signature[PREFIX_SIZE:], data)

    def seal(self, plaintext: bytes, info: bytes) -> bytes:
        """HPKE-seal ``plaintext`` to the primary version; ``info`` binds the context.

        Returns ``key-id prefix || enc || ciphertext``. HPKE base mode does not
        say who sealed: authenticate the sender some other way (a signature).
        """
        self._require(Purpose.HPKE)
        entry = self._primary
        if entry is None:
            raise KeysetError(f"keyset {self._name!r} has no primary version")
        return entry.prefix + cast(_material.HpkePublic, entry.key).seal(plaintext, info)

    # -- internals ---------------------------------------------------------------

    def _require(self, purpose: Purpose) -> None:
        if self._purpose is not purpose:
            raise KeysetError(f"keyset {self._name!r} is for {self._purpose.value}, not {purpose}")

    def _entry(self, version: int | None) -> _PublicEntry:
        entry = self._primary if version is None else self._versions.get(version)
        if entry is None:
            what = "primary version" if version is None else f"version {version}"
            raise KeysetError(f"keyset {self._name!r} has no {what}")
        return entry

    def __repr__(self) -> str:
        versions = ", ".join(repr(self._versions[v].public) for v in sorted(self._versions))
        return f"PublicKeyset({self._name!r}, {self._purpose.value}, [{versions}])"
