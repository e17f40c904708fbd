"""Who talks to whom: an upstream site's nodes, the downstream sites, and the links between them.

A topology is read from TOML (``keybroker rotation start --topology FILE``) or
sent to the API as the same structure in JSON::

    name = "core"                       # names the link keysets: rotation/<name>/<node>/<site>

    [upstream]
    site = "up1"
    nodes = ["up1-a", "up1-b"]

    [downstream]
    sites = ["fra1", "ams1"]

    [[links]]                           # one per (upstream node, downstream site)
    node = "up1-a"
    site = "fra1"
    # keyset = "…"                      # optional: an existing keyset to use instead

Each link is one AEAD keyset held by two principals: ``node/<node>`` (the
upstream end) and ``site/<site>`` (the downstream end). Everything here is
validated up front so a typo fails before anything in the broker changes.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from keybroker.errors import DecodeError
from keybroker.pki import PrincipalId, PrincipalKind

#: Names of sites, nodes and topologies: what principal names and keyset names accept.
_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
MAX_LINKS: Final = 100_000
KEYSET_PREFIX: Final = "rotation/"


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise DecodeError(
            f"{what} must be 1-32 characters of a-z, 0-9, '.', '_' or '-' "
            f"starting with a letter or digit; got {value!r:.40}"
        )
    return value


@dataclass(frozen=True, order=True)
class Link:
    """One upstream node ↔ downstream site pair and the keyset that protects it."""

    node: str
    site: str
    keyset: str

    @property
    def name(self) -> str:
        """How reports and the log name the link: ``<node>↔<site>`` written ``node/site``."""
        return f"{self.node}/{self.site}"

    @property
    def upstream(self) -> PrincipalId:
        return PrincipalId(PrincipalKind.NODE, self.node)

    @property
    def downstream(self) -> PrincipalId:
        return PrincipalId(PrincipalKind.SITE, self.site)


@dataclass(frozen=True)
class Topology:
    name: str
    upstream_site: str
    nodes: tuple[str, ...]
    sites: tuple[str, ...]
    links: tuple[Link, ...]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Topology:
        """Validate a parsed document; :class:`DecodeError` names the first problem."""
        if not isinstance(data, Mapping):
            raise DecodeError("a topology is a table")
        unknown = set(data) - {"name", "upstream", "downstream", "links"}
        if unknown:
            raise DecodeError(f"unknown topology keys: {', '.join(sorted(unknown))}")
        name = _name(data.get("name"), "the topology name")
        up = _table(data, "upstream", {"site", "nodes"})
        down = _table(data, "downstream", {"sites"})
        upstream_site = _name(up.get("site"), "upstream.site")
        nodes = _names(up.get("nodes"), "upstream.nodes")
        sites = _names(down.get("sites"), "downstream.sites")
        raw_links = data.get("links")
        if not isinstance(raw_links, list) or not raw_links:
            raise DecodeError("a topology needs at least one [[links]] entry")
        if len(raw_links) > MAX_LINKS:
            raise DecodeError(f"at most {MAX_LINKS} links")
        links: list[Link] = []
        seen: set[tuple[str, str]] = set()
        keysets: set[str] = set()
        for i, raw in enumerate(raw_links):
            if not isinstance(raw, Mapping) or set(raw) - {"node", "site", "keyset"}:
                raise DecodeError(f"links[{i}] takes node, site and optionally keyset")
            node = _name(raw.get("node"), f"links[{i}].node")
            site = _name(raw.get("site"), f"links[{i}].site")
            if node not in nodes:
                raise DecodeError(f"links[{i}]: {node!r} is not in upstream.nodes")
            if site not in sites:
                raise DecodeError(f"links[{i}]: {site!r} is not in downstream.sites")
            if (node, site) in seen:
                raise DecodeError(f"links[{i}]: {node}/{site} is listed twice")
            keyset = raw.get("keyset", f"{KEYSET_PREFIX}{name}/{node}/{site}")
            if not isinstance(keyset, str) or not 0 < len(keyset) <= 128:
                raise DecodeError(f"links[{i}].keyset must be a keyset name")
            if keyset in keysets:
                raise DecodeError(f"links[{i}]: keyset {keyset!r} is used by two links")
            seen.add((node, site))
            keysets.add(keyset)
            links.append(Link(node=node, site=site, keyset=keyset))
        return cls(
            name=name,
            upstream_site=upstream_site,
            nodes=nodes,
            sites=sites,
            links=tuple(links),
        )

    @classmethod
    def from_toml(cls, text: str) -> Topology:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise DecodeError(f"topology is not valid TOML: {exc}") from None
        return cls.from_mapping(data)

    @classmethod
    def from_file(cls, path: Path) -> Topology:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DecodeError(f"cannot read topology {path}: {exc}") from None
        return cls.from_toml(text)

    def to_mapping(self) -> dict[str, Any]:
        """The document :meth:`from_mapping` reads (what the API and the CLI send)."""
        return {
            "name": self.name,
            "upstream": {"site": self.upstream_site, "nodes": list(self.nodes)},
            "downstream": {"sites": list(self.sites)},
            "links": [{"node": k.node, "site": k.site, "keyset": k.keyset} for k in self.links],
        }

    def link(self, name: str) -> Link:
        for link in self.links:
            if link.name == name:
                return link
        raise DecodeError(f"no link {name!r} in topology {self.name!r}")


def _table(data: Mapping[str, Any], key: str, allowed: set[str]) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, Mapping):
        raise DecodeError(f"the topology needs an [{key}] table")
    unknown = set(value) - allowed
    if unknown:
        raise DecodeError(f"unknown keys in [{key}]: {', '.join(sorted(unknown))}")
    return value


def _names(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise DecodeError(f"{what} must be a non-empty list of names")
    if len(value) > MAX_LINKS:
        raise DecodeError(f"{what}: at most {MAX_LINKS} names")
    names = tuple(_name(v, what) for v in value)
    if len(set(names)) != len(names):
        raise DecodeError(f"{what} lists a name twice")
    return names
