"""Which edge may use which key on the key server, and how.

An edge is a broker principal (``node/edge1``): the key server learns it from
the one ``keybroker://`` URI SAN of the edge's client certificate
(:func:`keybroker.pki.validation.principal_of`). Before any key operation the
server asks its :class:`Authorizer`; a refusal is answered with
``NOT_AUTHORIZED`` and the connection goes on.

The server checks authorisation *before* it looks the key up, so an edge
cannot probe which keys the server holds: a key it was not granted is
``NOT_AUTHORIZED`` whether it exists or not, and ``KEY_NOT_FOUND`` only ever
answers a granted key that is not loaded.

:class:`StaticAuthorizer` reads a grants table from a TOML or JSON file::

    # Optional: names and per-key policy. A key with no entry here can still be
    # granted by its SKI and gets the default policy.
    [keys.www]
    ski = "5f2a0c0e9d8b7a6f5e4d3c2b1a0f9e8d7c6b5a49"   # 40 hex digits (colons allowed)
    allow_decrypt = false                            # the default

    [edges]
    "node/edge1" = ["www", "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"]
    "keybroker://node/edge2" = ["www"]                # the URI form works too

The same document as JSON: ``{"keys": {"www": {"ski": "…"}}, "edges":
{"node/edge1": ["www"]}}``. Anything unexpected (an unknown table or field, a
name used in ``edges`` but not defined in ``keys``, a malformed SKI or
principal, two names for one SKI) is a
:class:`~keybroker.errors.ConfigurationError` whose message names the file and
the offending key, and the table is not used.

``RSA_DECRYPT`` is the one operation with a policy: refused with
``NOT_AUTHORIZED`` unless the key's ``allow_decrypt`` is true. It serves TLS
1.2 static-RSA key exchange only, and an edge that may decrypt with a key can
also decrypt recorded sessions that used it, so it is opt-in per key.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from keybroker.errors import ConfigurationError, DecodeError
from keybroker.flows.keyless.codes import ErrorCode, Op
from keybroker.flows.keyless.operations import KeyOperationError
from keybroker.pki.principal import URI_PREFIX, PrincipalId

__all__ = [
    "Authorizer",
    "KeyPolicy",
    "StaticAuthorizer",
    "parse_ski",
]

_SKI_HEX: Final = re.compile(r"[0-9a-fA-F]{40}")
_KEY_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_TOP_LEVEL: Final = frozenset({"keys", "edges"})
_KEY_FIELDS: Final = frozenset({"ski", "allow_decrypt"})


class Authorizer(Protocol):
    """Decides whether ``edge`` may do ``op`` with the key named ``ski``.

    Called on the event loop for every key operation, so it must be quick and
    must not block. Implementations are immutable snapshots: :meth:`reload`
    returns the authorizer to use from now on and leaves ``self`` untouched,
    so requests already admitted keep the decision they got.
    """

    def check(self, edge: PrincipalId, ski: bytes, op: Op) -> None:
        """Return if allowed; raise :class:`KeyOperationError` with ``NOT_AUTHORIZED`` if not."""
        ...

    def reload(self) -> Authorizer:
        """A fresh authorizer from the same source; ``ConfigurationError`` if it is unusable."""
        ...

    def describe(self) -> str:
        """One line for logs: where the grants come from and how many there are."""
        ...


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """What the grants table says about one key."""

    ski: bytes
    #: The key's name in the grants table, if it has one.
    name: str | None = None
    #: Whether ``RSA_DECRYPT`` is allowed with this key.
    allow_decrypt: bool = False

    def __repr__(self) -> str:
        return (
            f"KeyPolicy(ski={self.ski.hex()}, name={self.name!r}, "
            f"allow_decrypt={self.allow_decrypt})"
        )


def parse_ski(text: object, where: str) -> bytes:
    """The 20 bytes of an SKI written as 40 hex digits (optionally colon-separated).

    ``where`` names the setting in the :class:`ConfigurationError` raised otherwise.
    """
    if not isinstance(text, str):
        raise ConfigurationError(f"{where}: an SKI is a string of 40 hex digits")
    compact = text.replace(":", "")
    if not _SKI_HEX.fullmatch(compact):
        raise ConfigurationError(f"{where}: {text!r:.60} is not an SKI (40 hex digits)")
    return bytes.fromhex(compact)


def _parse_edge(text: str, where: str) -> PrincipalId:
    try:
        if text.startswith(URI_PREFIX):
            return PrincipalId.from_uri(text)
        return PrincipalId.parse(text)
    except DecodeError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None


class StaticAuthorizer:
    """A fixed grants table: edge → SKIs it may use, plus a :class:`KeyPolicy` per key.

    Build it with :meth:`from_file` (TOML when the name ends in ``.toml``,
    JSON otherwise), :meth:`from_mapping`, or directly. :meth:`reload` re-reads
    the file it came from (an authorizer not made from a file returns itself).
    """

    __slots__ = ("_grants", "_path", "_policies")

    def __init__(
        self,
        grants: Mapping[PrincipalId, Iterable[bytes]],
        policies: Iterable[KeyPolicy] = (),
        *,
        path: Path | None = None,
    ) -> None:
        """``grants``: SKIs per edge; ``policies``: keys whose policy is not the default."""
        self._grants: dict[PrincipalId, frozenset[bytes]] = {
            edge: frozenset(bytes(ski) for ski in skis) for edge, skis in grants.items()
        }
        self._policies: dict[bytes, KeyPolicy] = {}
        for policy in policies:
            if policy.ski in self._policies:
                raise ConfigurationError(f"two policies for key {policy.ski.hex()}")
            self._policies[policy.ski] = policy
        self._path = path

    @classmethod
    def from_file(cls, path: str | Path) -> StaticAuthorizer:
        """Read a grants table (TOML if the file name ends in ``.toml``, else JSON)."""
        location = Path(path)
        try:
            text = location.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"grants file {location}: cannot read it ({exc})") from None
        try:
            if location.suffix.lower() == ".toml":
                data: object = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigurationError(f"grants file {location}: not valid ({exc})") from None
        return cls.from_mapping(data, origin=str(location), path=location)

    @classmethod
    def from_mapping(
        cls, data: object, *, origin: str = "grants", path: Path | None = None
    ) -> StaticAuthorizer:
        """Build from a parsed grants document (see the module docstring for its shape)."""
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"{origin}: the grants document must be a table")
        for top in data:
            if top not in _TOP_LEVEL:
                raise ConfigurationError(
                    f"{origin}: unknown key {top!r} (expected 'keys' and 'edges')"
                )
        policies = _parse_keys(data.get("keys", {}), origin)
        by_name = {policy.name: policy for policy in policies.values() if policy.name}
        edges_table = data.get("edges", {})
        if not isinstance(edges_table, Mapping):
            raise ConfigurationError(f"{origin}: 'edges' must be a table of edge → key list")
        grants: dict[PrincipalId, set[bytes]] = {}
        for edge_text, entries in edges_table.items():
            where = f"{origin}: edges.{edge_text!r}"
            edge = _parse_edge(str(edge_text), where)
            if edge in grants:
                raise ConfigurationError(f"{where}: {edge} is listed twice")
            if not isinstance(entries, list):
                raise ConfigurationError(f"{where}: must be a list of key names or SKIs")
            granted: set[bytes] = set()
            for index, entry in enumerate(entries):
                item = f"{where}[{index}]"
                if not isinstance(entry, str):
                    raise ConfigurationError(f"{item}: must be a key name or an SKI")
                named = by_name.get(entry)
                if named is not None:
                    granted.add(named.ski)
                elif _SKI_HEX.fullmatch(entry.replace(":", "")):
                    granted.add(parse_ski(entry, item))
                else:
                    raise ConfigurationError(
                        f"{item}: {entry!r:.60} is neither a key defined under [keys] nor an SKI"
                    )
            grants[edge] = granted
        return cls(grants, policies.values(), path=path)

    def check(self, edge: PrincipalId, ski: bytes, op: Op) -> None:
        """``NOT_AUTHORIZED`` unless ``edge`` was granted ``ski`` (and, for RSA_DECRYPT, the
        key's policy allows decryption)."""
        granted = self._grants.get(edge)
        if granted is None or ski not in granted:
            raise KeyOperationError(
                f"{edge} is not granted key {ski.hex()}", code=ErrorCode.NOT_AUTHORIZED
            )
        if op is Op.RSA_DECRYPT and not self.policy(ski).allow_decrypt:
            raise KeyOperationError(
                f"RSA_DECRYPT is not allowed with key {ski.hex()} (allow_decrypt is false)",
                code=ErrorCode.NOT_AUTHORIZED,
            )

    def policy(self, ski: bytes) -> KeyPolicy:
        """The policy of the key ``ski`` (the default one if the table has no entry)."""
        return self._policies.get(ski) or KeyPolicy(ski)

    def granted(self, edge: PrincipalId) -> frozenset[bytes]:
        """The SKIs ``edge`` may use (empty for an edge not in the table)."""
        return self._grants.get(edge, frozenset())

    def edges(self) -> list[PrincipalId]:
        """The edges in the table, sorted."""
        return sorted(self._grants, key=str)

    def skis(self) -> frozenset[bytes]:
        """Every SKI granted to some edge."""
        return frozenset().union(*self._grants.values()) if self._grants else frozenset()

    def reload(self) -> StaticAuthorizer:
        """The table re-read from its file (``self`` if it was not read from a file)."""
        if self._path is None:
            return self
        return StaticAuthorizer.from_file(self._path)

    def describe(self) -> str:
        """Where the table came from, with its size."""
        source = str(self._path) if self._path is not None else "in-memory grants"
        decrypt = sum(1 for policy in self._policies.values() if policy.allow_decrypt)
        return (
            f"{source}: {len(self._grants)} edges, {len(self.skis())} keys granted, "
            f"{decrypt} with RSA_DECRYPT allowed"
        )

    def __repr__(self) -> str:
        return f"<StaticAuthorizer {self.describe()}>"


def _parse_keys(table: object, origin: str) -> dict[bytes, KeyPolicy]:
    if not isinstance(table, Mapping):
        raise ConfigurationError(f"{origin}: 'keys' must be a table of key name → settings")
    policies: dict[bytes, KeyPolicy] = {}
    for name, settings in table.items():
        where = f"{origin}: keys.{name}"
        if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
            raise ConfigurationError(
                f"{where}: a key name is 1-63 letters, digits, '.', '_' or '-'"
            )
        if _SKI_HEX.fullmatch(name):
            raise ConfigurationError(f"{where}: a key name may not look like an SKI")
        if not isinstance(settings, Mapping):
            raise ConfigurationError(f"{where}: must be a table with 'ski'")
        for field in settings:
            if field not in _KEY_FIELDS:
                raise ConfigurationError(
                    f"{where}.{field}: unknown setting (expected 'ski', 'allow_decrypt')"
                )
        if "ski" not in settings:
            raise ConfigurationError(f"{where}.ski: missing")
        ski = parse_ski(settings["ski"], f"{where}.ski")
        allow_decrypt = settings.get("allow_decrypt", False)
        if not isinstance(allow_decrypt, bool):
            raise ConfigurationError(f"{where}.allow_decrypt: must be true or false")
        if ski in policies:
            other = policies[ski].name
            raise ConfigurationError(f"{where}.ski: the same key as keys.{other}")
        policies[ski] = KeyPolicy(ski, name, allow_decrypt)
    return policies
