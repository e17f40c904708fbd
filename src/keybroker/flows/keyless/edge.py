"""The keyless edge: a TLS terminator that holds certificate chains but no private key.

``keybroker edge --config edge.toml`` listens for TLS, picks the service by the client's
SNI, terminates TLS with tlslite-ng using a :func:`~keybroker.flows.keyless.tlskeys.remote_key`
(every private-key operation goes to the key server, see :mod:`.keyclient`), and relays
HTTP/1.1 to the service's origin. The operator page is ``docs/keyless-edge.md``.

**Processes.** :func:`run_edge` binds the listening socket, then forks ``workers`` processes
that all accept on it (pre-fork); the parent only supervises: it restarts a worker that dies,
rotates the session-ticket keys and writes the counters. Each worker has its own key-server
client (:class:`~.keyclient.KeyClient`, one pipelined connection) and serves every
connection in its own thread, because tlslite blocks the handshake for the key server's
round trip. :class:`Edge` is one worker; tests run it in-process. A worker lives no longer
than its supervisor, however the supervisor ends (even SIGKILL): on Linux the kernel kills
it (``PR_SET_PDEATHSIG``), and everywhere a watchdog thread sees the end of the lifeline
pipe, closes the listening socket and exits (:func:`_exit_with_parent`). No orphan keeps
the port, so a restarted edge can listen on it again.

**Per connection.** ``TCP_NODELAY``; peek the ClientHello for the SNI
(:func:`~keybroker.flows.keyless.sni.peek_socket_server_name`); choose the service: the
service with that exact host name, or, for a client that sends no SNI, the
``default_service`` if one is configured. Anything else gets a fatal ``unrecognized_name``
alert before any handshake (serving another name's certificate would only fail the
client's verification later, with a less useful message). Then ``handshakeServer`` with
the service's chain, its remote key (built once per service), TLS 1.2 and 1.3 with ECDHE and
AEAD suites only (no static RSA, no CBC, no DHE), ALPN ``http/1.1``, and the service's
session cache and ticket keys. A key server that is down or refuses makes the remote key
return an empty signature, which tlslite answers with an ``internal_error`` alert: the
client gets an alert within the key client's timeout, never a hang.

**Speed.** With ``[edge] fast_crypto = true`` (the default) the edge calls
:func:`.fasttls.install` and uses :class:`~.fasttls.FastTLSConnection`: tlslite's X25519,
P-256/P-384 ECDH, AES-GCM, ChaCha20-Poly1305 and TLS 1.3 key schedule run on
``cryptography`` instead of pure Python (several times fewer CPU milliseconds per
handshake; ``docs/benchmarks.md``, section ``keyless``). The self-check of each signature
the key server returns is done with ``cryptography`` too (:mod:`.tlskeys`).

**Resumption** needs no key operation. TLS 1.3 resumes with session tickets (PSK with
ECDHE); TLS 1.2 with tickets (RFC 5077) or, for clients without tickets, session IDs in a
per-worker, per-service :class:`tlslite.sessioncache.SessionCache`. Ticket keys are random,
made at start in the parent and rotated every ``ticket_rotation`` seconds; they live in a
:class:`TicketKeyRing`, an anonymous shared memory page made before the fork (excluded from
core dumps), so every worker encrypts and decrypts tickets with the same keys and a ticket
from one worker resumes on any other. The ring holds the current and the previous key, so
a ticket is accepted for between one and two rotation periods (its advertised lifetime is
one period). Each service encrypts with its own key, derived from the ring's key and the
host name with HKDF, so a ticket issued for one host name never resumes on another
(tlslite's TLS 1.3 path does not compare the SNI itself). Ticket keys are never logged or
shown by any ``repr``.

**HTTP.** One request at a time per connection, keep-alive with the client, a fresh
connection to the origin per request (``Connection: close`` towards it). Bounded request
head (``max_header_bytes``, at most 100 fields), bounded body (``max_body_bytes``,
``Content-Length`` only: a chunked request body is answered ``411``), timeouts everywhere.
The edge sets ``X-Forwarded-For`` (the client's address, replacing whatever the client
sent), ``X-Forwarded-Proto: https`` and drops ``Forwarded``; the ``Host`` field must name
the service the client reached with SNI, else ``421 Misdirected Request``. Responses are
streamed back; a chunked or close-delimited body is re-framed for the client.

**Counters** (:class:`EdgeStats`, shared memory, one row per worker): connections,
handshakes (full and resumed), handshake failures, key-server failures, unknown SNI,
requests and origin errors; the parent logs them and writes them to ``stats_file``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import http.client
import json
import logging
import mmap
import os
import re
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from tlslite.errors import TLSAbruptCloseError  # type: ignore[import-untyped,unused-ignore]
from tlslite.handshakesettings import (  # type: ignore[import-untyped,unused-ignore]
    HandshakeSettings,
)
from tlslite.sessioncache import SessionCache  # type: ignore[import-untyped,unused-ignore]
from tlslite.tlsconnection import TLSConnection  # type: ignore[import-untyped,unused-ignore]

from keybroker.errors import (
    ConfigurationError,
    DecodeError,
    RemoteProtocolError,
    TransportError,
)
from keybroker.flows.keyless import fasttls
from keybroker.flows.keyless.codes import Op
from keybroker.flows.keyless.keyclient import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    KeyClient,
    KeyServerAddress,
    client_context,
    parse_address,
)
from keybroker.flows.keyless.sni import normalise_server_name, peek_socket_server_name
from keybroker.flows.keyless.tlskeys import (
    KeyOperationFailed,
    KeyOperator,
    RemoteKey,
    certificate_chain,
    remote_key,
)

__all__ = [
    "COUNTERS",
    "Edge",
    "EdgeConfig",
    "EdgeSettings",
    "EdgeStats",
    "KeyServerConfig",
    "Origin",
    "ServiceConfig",
    "TicketKeyRing",
    "WorkerCounters",
    "key_client",
    "load_config",
    "parse_config",
    "run_edge",
    "tls_settings",
]

_log = logging.getLogger("keybroker.keyless.edge")

#: What :class:`EdgeStats` counts, per worker.
COUNTERS: Final = (
    "connections",
    "handshakes",
    "full_handshakes",
    "resumed_handshakes",
    "handshake_failures",
    "key_failures",
    "unknown_sni",
    "bad_client_hello",
    "requests",
    "origin_errors",
)
_ALERT_UNRECOGNIZED_NAME: Final = 112
_MAX_FIELDS: Final = 100
_MAX_REQUESTS_PER_CONNECTION: Final = 1000
_CHUNK: Final = 65536
_TICKET_KEY_SIZE: Final = 32
_MAX_TICKET_LIFETIME: Final = 7 * 24 * 3600
_ACCEPT_POLL: Final = 0.25
_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """Where a service's HTTP requests go: plain HTTP on ``host:port``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class ServiceConfig:
    """One ``[[service]]``: a host name, its certificate chain, its origin and its key's SKI."""

    hostname: str
    chain_path: Path
    #: The chain as PEM (certificates only: a file holding a private key is refused).
    chain_pem: bytes = dataclasses.field(repr=False)
    leaf: x509.Certificate = dataclasses.field(repr=False)
    origin: Origin
    #: The SKI the key server knows the key by (``key_id``), if not the leaf's own.
    key_id: bytes | None = None

    @property
    def ski(self) -> bytes:
        """The SKI computed from the leaf's public key (what :func:`remote_key` sends)."""
        return x509.SubjectKeyIdentifier.from_public_key(self.leaf.public_key()).digest


@dataclass(frozen=True)
class KeyServerConfig:
    """``[keyserver]``: where the key servers are and the edge's mutual-TLS files."""

    addresses: tuple[KeyServerAddress, ...]
    ca: Path
    cert: Path
    key: Path
    server_name: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT


@dataclass(frozen=True)
class EdgeSettings:
    """``[edge]``: listening, processes, TLS and HTTP limits."""

    listen: tuple[str, int] = ("0.0.0.0", 443)  # noqa: S104 - an edge listens publicly
    workers: int = 2
    alpn: tuple[str, ...] = ("http/1.1",)
    min_version: str = "1.2"
    session_tickets: bool = True
    ticket_rotation: float = 3600.0
    session_cache: int = 10000
    default_service: str | None = None
    max_connections: int = 256
    handshake_timeout: float = 10.0
    idle_timeout: float = 15.0
    origin_timeout: float = 30.0
    max_header_bytes: int = 16384
    max_body_bytes: int = 64 * 1024 * 1024
    stats_file: Path | None = None
    stats_interval: float = 60.0
    #: Run tlslite's hot primitives on ``cryptography`` (:mod:`.fasttls`); ``false`` leaves
    #: tlslite as installed (slower; for comparison and debugging).
    fast_crypto: bool = True


@dataclass(frozen=True)
class EdgeConfig:
    """A whole edge configuration, as :func:`load_config` reads it."""

    edge: EdgeSettings
    keyserver: KeyServerConfig
    services: tuple[ServiceConfig, ...]

    def with_workers(self, workers: int) -> EdgeConfig:
        """The same configuration with ``workers`` processes."""
        if workers < 1:
            raise ConfigurationError("workers must be at least 1")
        return dataclasses.replace(self, edge=dataclasses.replace(self.edge, workers=workers))


def load_config(path: Path | str) -> EdgeConfig:
    """Read an edge configuration (TOML); relative paths are relative to its directory."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from exc
    return parse_config(data, base=path.parent)


def parse_config(data: Mapping[str, Any], *, base: Path) -> EdgeConfig:
    """An :class:`EdgeConfig` from parsed TOML; :class:`ConfigurationError` on any mistake."""
    _only(data, {"edge", "keyserver", "service"}, "the configuration")
    services_data = data.get("service")
    if not isinstance(services_data, list) or not services_data:
        raise ConfigurationError("at least one [[service]] is needed")
    services = tuple(_service(item, base) for item in services_data)
    names = [service.hostname for service in services]
    if len(set(names)) != len(names):
        raise ConfigurationError("two [[service]] entries have the same hostname")
    keyserver_data = data.get("keyserver")
    if not isinstance(keyserver_data, dict):
        raise ConfigurationError("a [keyserver] table is needed")
    edge = _edge(data.get("edge", {}), base)
    if edge.default_service is not None and edge.default_service not in names:
        raise ConfigurationError(f"default_service {edge.default_service!r} is no [[service]]")
    return EdgeConfig(edge, _keyserver(keyserver_data, base), services)


def _only(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigurationError(f"unknown key(s) in {where}: {', '.join(unknown)}")


def _get(table: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = table.get(name)
    if value is None:
        raise ConfigurationError(f"{where}: {name} is required")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigurationError(f"{where}: {name} has the wrong type")
    return value


def _optional(
    table: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any, where: str
) -> Any:
    if name not in table:
        return default
    return _get(table, name, kind, where)


def _path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _hostname(value: str, where: str) -> str:
    try:
        return normalise_server_name(value.encode("ascii"))
    except (UnicodeEncodeError, DecodeError) as exc:
        raise ConfigurationError(f"{where}: {value!r} is not a host name") from exc


def _service(item: Any, base: Path) -> ServiceConfig:
    if not isinstance(item, dict):
        raise ConfigurationError("each [[service]] must be a table")
    where = f"[[service]] {item.get('hostname', '?')}"
    _only(item, {"hostname", "chain", "origin", "key_id"}, where)
    hostname = _hostname(_get(item, "hostname", str, where), where)
    chain_path = _path(_get(item, "chain", str, where), base)
    try:
        pem = chain_path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot read the chain: {exc}") from exc
    if b"PRIVATE KEY" in pem:
        raise ConfigurationError(
            f"{where}: {chain_path} holds a private key; the edge takes certificates only"
        )
    certificate_chain(pem)  # tlslite can read it
    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except ValueError as exc:
        raise ConfigurationError(f"{where}: the chain is not PEM certificates") from exc
    if not _certificate_names(leaf, hostname):
        raise ConfigurationError(f"{where}: the leaf certificate is not valid for {hostname}")
    remote_key(leaf, _NoOperator(), sni=None)  # a key type the edge can serve
    origin = _origin(_get(item, "origin", str, where), where)
    key_id = None
    if "key_id" in item:
        text = _get(item, "key_id", str, where).replace(":", "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{40}", text):
            raise ConfigurationError(f"{where}: key_id must be 20 bytes of hex (an SKI)")
        key_id = bytes.fromhex(text)
    return ServiceConfig(hostname, chain_path, pem, leaf, origin, key_id)


def _certificate_names(leaf: x509.Certificate, hostname: str) -> bool:
    """Whether the leaf's DNS names cover ``hostname`` (exactly, or by a one-label wildcard)."""
    try:
        names = leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    for name in names:
        pattern = name.lower().rstrip(".")
        if pattern == hostname:
            return True
        if (
            pattern.startswith("*.")
            and "." in hostname
            and hostname.split(".", 1)[1] == pattern[2:]
        ):
            return True
    return False


def _origin(text: str, where: str) -> Origin:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigurationError(f"{where}: origin must be http://host:port, not {text!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigurationError(f"{where}: origin must be http://host:port, not {text!r}")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ConfigurationError(f"{where}: bad origin port in {text!r}") from exc
    return Origin(parts.hostname, port)


def _keyserver(table: Mapping[str, Any], base: Path) -> KeyServerConfig:
    where = "[keyserver]"
    _only(
        table,
        {"address", "addresses", "ca", "cert", "key", "server_name", "timeout", "connect_timeout"},
        where,
    )
    if ("address" in table) == ("addresses" in table):
        raise ConfigurationError(f"{where}: give either address or addresses")
    addresses: tuple[KeyServerAddress, ...]
    if "address" in table:
        addresses = (parse_address(_get(table, "address", str, where)),)
    else:
        listed = _get(table, "addresses", list, where)
        if not listed or not all(isinstance(entry, str) for entry in listed):
            raise ConfigurationError(f"{where}: addresses must be a list of HOST:PORT")
        addresses = tuple(parse_address(entry) for entry in listed)
    timeout = float(_optional(table, "timeout", (int, float), DEFAULT_TIMEOUT, where))
    connect = float(
        _optional(table, "connect_timeout", (int, float), DEFAULT_CONNECT_TIMEOUT, where)
    )
    if not 0 < timeout <= 60 or not 0 < connect <= 60:
        raise ConfigurationError(f"{where}: timeouts must be in (0, 60] seconds")
    return KeyServerConfig(
        addresses=addresses,
        ca=_path(_get(table, "ca", str, where), base),
        cert=_path(_get(table, "cert", str, where), base),
        key=_path(_get(table, "key", str, where), base),
        server_name=_optional(table, "server_name", str, None, where),
        timeout=timeout,
        connect_timeout=connect,
    )


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigurationError(f"[edge]: listen must be HOST:PORT, not {text!r}")
    return host, int(port)


def _edge(table: Any, base: Path) -> EdgeSettings:
    where = "[edge]"
    if not isinstance(table, dict):
        raise ConfigurationError("[edge] must be a table")
    fields = {field.name: field for field in dataclasses.fields(EdgeSettings)}
    _only(table, set(fields), where)
    defaults = EdgeSettings()
    values: dict[str, Any] = {}
    if "listen" in table:
        values["listen"] = _listen(_get(table, "listen", str, where))
    for name in ("workers", "session_cache", "max_connections", "max_header_bytes"):
        values[name] = _optional(table, name, int, getattr(defaults, name), where)
    values["max_body_bytes"] = _optional(
        table, "max_body_bytes", int, defaults.max_body_bytes, where
    )
    for name in (
        "ticket_rotation",
        "handshake_timeout",
        "idle_timeout",
        "origin_timeout",
        "stats_interval",
    ):
        values[name] = float(_optional(table, name, (int, float), getattr(defaults, name), where))
    values["session_tickets"] = _optional(table, "session_tickets", bool, True, where)
    values["fast_crypto"] = _optional(table, "fast_crypto", bool, True, where)
    values["min_version"] = _optional(table, "min_version", str, "1.2", where)
    alpn = _optional(table, "alpn", list, list(defaults.alpn), where)
    if not alpn or not all(entry in ("http/1.1", "http/1.0") for entry in alpn):
        raise ConfigurationError(f"{where}: alpn lists http/1.1 (and http/1.0); nothing else")
    values["alpn"] = tuple(alpn)
    if "default_service" in table:
        values["default_service"] = _hostname(_get(table, "default_service", str, where), where)
    if "stats_file" in table:
        values["stats_file"] = _path(_get(table, "stats_file", str, where), base)
    settings = EdgeSettings(**values)
    if settings.workers < 1 or settings.max_connections < 1:
        raise ConfigurationError(f"{where}: workers and max_connections must be at least 1")
    if settings.min_version not in ("1.2", "1.3"):
        raise ConfigurationError(f'{where}: min_version is "1.2" or "1.3"')
    if not 1 <= settings.ticket_rotation <= _MAX_TICKET_LIFETIME:
        raise ConfigurationError(f"{where}: ticket_rotation must be 1 s to 7 days")
    if settings.session_cache < 0 or settings.max_header_bytes < 1024:
        raise ConfigurationError(f"{where}: session_cache >= 0 and max_header_bytes >= 1024")
    if min(settings.handshake_timeout, settings.idle_timeout, settings.origin_timeout) <= 0:
        raise ConfigurationError(f"{where}: timeouts must be positive")
    if settings.stats_interval <= 0 or settings.max_body_bytes < 0:
        raise ConfigurationError(f"{where}: stats_interval > 0 and max_body_bytes >= 0")
    return settings


class _NoOperator:
    """Stands in for the key client while a configuration is checked; performs nothing."""

    def operate(self, op: Op, ski: bytes, payload: bytes, *, sni: str | None) -> bytes:
        raise KeyOperationFailed("no key operations while loading the configuration")


def key_client(config: KeyServerConfig, context: ssl.SSLContext | None = None) -> KeyClient:
    """The key-server client ``config`` describes (``context``: an already loaded one)."""
    return KeyClient(
        config.addresses,
        context or client_context(config.ca, config.cert, config.key),
        server_name=config.server_name,
        timeout=config.timeout,
        connect_timeout=config.connect_timeout,
    )


# --- ticket keys and counters in memory shared across workers ----------------------------------


def _shared_memory(size: int, *, secret: bool) -> mmap.mmap:
    # An anonymous mapping is MAP_SHARED: forked workers see the parent's writes.
    memory = mmap.mmap(-1, size)
    if secret and hasattr(mmap, "MADV_DONTDUMP"):
        with contextlib.suppress(OSError):
            memory.madvise(mmap.MADV_DONTDUMP)
    return memory


class TicketKeyRing:
    """Session-ticket keys shared by the edge's processes: the current and the previous one.

    Made before ``fork``; one process (the supervisor, or a lone :class:`Edge`) calls
    :meth:`rotate`, every worker reads :meth:`snapshot`. Writers bump a sequence number
    around each change (odd while writing), readers retry until they read an even,
    unchanged one, so no lock is shared across processes and a worker killed at any
    moment can block nobody. Neither the keys nor anything derived from them is ever
    shown by ``repr`` or logged. Not picklable.
    """

    _HEADER = struct.Struct("<QQd")  # sequence, generation, rotated at (Unix time)

    def __init__(self, keep: int = 2) -> None:
        if keep < 1:
            raise ConfigurationError("a ticket key ring keeps at least one key")
        self._keep = keep
        self._memory = _shared_memory(self._HEADER.size + keep * _TICKET_KEY_SIZE, secret=True)
        self._write_lock = threading.Lock()

    def rotate(self) -> int:
        """Make a fresh random key current (the oldest is dropped); the new generation."""
        with self._write_lock:
            sequence, generation, _ = self._HEADER.unpack_from(self._memory, 0)
            start = self._HEADER.size
            keys = self._memory[start : start + (self._keep - 1) * _TICKET_KEY_SIZE]
            self._HEADER.pack_into(self._memory, 0, sequence + 1, generation, 0.0)
            self._memory[start : start + self._keep * _TICKET_KEY_SIZE] = (
                os.urandom(_TICKET_KEY_SIZE) + keys
            )
            self._HEADER.pack_into(self._memory, 0, sequence + 2, generation + 1, time.time())
            return int(generation + 1)

    def snapshot(self) -> tuple[int, float, tuple[bytes, ...]]:
        """``(generation, rotated_at, keys)``, newest key first; generation 0 has no keys."""
        start = self._HEADER.size
        while True:
            before, generation, rotated_at = self._HEADER.unpack_from(self._memory, 0)
            if before & 1:
                time.sleep(0)
                continue
            raw = self._memory[start : start + self._keep * _TICKET_KEY_SIZE]
            after = self._HEADER.unpack_from(self._memory, 0)[0]
            if after == before:
                break
        empty = bytes(_TICKET_KEY_SIZE)
        keys = tuple(
            key
            for key in (raw[i : i + _TICKET_KEY_SIZE] for i in range(0, len(raw), _TICKET_KEY_SIZE))
            if key != empty
        )
        return int(generation), float(rotated_at), keys

    @property
    def generation(self) -> int:
        """How many times the ring was rotated."""
        return self.snapshot()[0]

    def close(self) -> None:
        """Wipe and unmap the keys."""
        with self._write_lock:
            if not self._memory.closed:
                self._memory[:] = bytes(len(self._memory))
                self._memory.close()

    def __repr__(self) -> str:
        return f"<TicketKeyRing generation={self.generation} keep={self._keep}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a TicketKeyRing is shared by fork, never pickled")


class EdgeStats:
    """The :data:`COUNTERS` of every worker, in memory shared across ``fork``."""

    _ITEM = struct.Struct("<Q")

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self._memory = _shared_memory(workers * len(COUNTERS) * self._ITEM.size, secret=False)

    def slot(self, index: int) -> WorkerCounters:
        """Worker ``index``'s counters (only that worker writes them)."""
        if not 0 <= index < self.workers:
            raise IndexError(index)
        return WorkerCounters(self._memory, index * len(COUNTERS) * self._ITEM.size)

    def per_worker(self) -> list[dict[str, int]]:
        """Every worker's counters."""
        return [self.slot(index).snapshot() for index in range(self.workers)]

    def totals(self) -> dict[str, int]:
        """The counters summed over the workers."""
        total = dict.fromkeys(COUNTERS, 0)
        for row in self.per_worker():
            for name, value in row.items():
                total[name] += value
        return total


class WorkerCounters:
    """One worker's row of :class:`EdgeStats`; :meth:`add` is thread-safe within the worker."""

    _ITEM = struct.Struct("<Q")

    def __init__(self, memory: mmap.mmap, offset: int) -> None:
        self._memory = memory
        self._offset = offset
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name``."""
        where = self._offset + COUNTERS.index(name) * self._ITEM.size
        with self._lock:
            (value,) = self._ITEM.unpack_from(self._memory, where)
            self._ITEM.pack_into(self._memory, where, value + amount)

    def snapshot(self) -> dict[str, int]:
        """The counters now."""
        return {
            name: int(self._ITEM.unpack_from(self._memory, self._offset + i * self._ITEM.size)[0])
            for i, name in enumerate(COUNTERS)
        }

    def __getitem__(self, name: str) -> int:
        return self.snapshot()[name]


# --- TLS ---------------------------------------------------------------------------------------


def tls_settings(edge: EdgeSettings) -> HandshakeSettings:
    """The handshake settings every service starts from (ticket keys are added per service).

    TLS 1.2 (unless ``min_version = "1.3"``) and 1.3; ECDHE only (X25519, P-256, P-384);
    AES-GCM and ChaCha20-Poly1305 only; resumption with ECDHE only (``psk_dhe_ke``) so
    that resumed sessions keep forward secrecy; no heartbeat. The common part is
    :func:`.fasttls.lean_settings`.
    """
    settings = fasttls.lean_settings(min_version=(3, 3) if edge.min_version == "1.2" else (3, 4))
    settings.psk_modes = ["psk_dhe_ke"]
    settings.ticketCipher = "aes256gcm"
    settings.ticketLifetime = max(1, min(_MAX_TICKET_LIFETIME, int(edge.ticket_rotation)))
    settings.ticketKeys = []
    settings.ticket_count = 0
    settings.validate()
    return settings


def _service_ticket_key(key: bytes, hostname: str) -> bytearray:
    derived = HKDF(
        algorithm=hashes.SHA256(),
        length=_TICKET_KEY_SIZE,
        salt=None,
        info=b"keybroker edge session ticket key\x00" + hostname.encode("ascii"),
    ).derive(key)
    return bytearray(derived)


class _Tally(threading.local):
    ops: int = 0
    failed: int = 0


class _EdgeOperator:
    """The worker's operator as the remote keys see it: renames SKIs (``key_id``) and counts,
    per thread, the operations of the handshake running on it (zero means it resumed)."""

    def __init__(self, inner: KeyOperator, aliases: Mapping[bytes, bytes]) -> None:
        self._inner = inner
        self._aliases = dict(aliases)
        self._tally = _Tally()

    def begin(self) -> None:
        """Start counting for the calling thread's handshake."""
        self._tally.ops = 0
        self._tally.failed = 0

    def counts(self) -> tuple[int, int]:
        """``(operations, failed operations)`` since :meth:`begin` on this thread."""
        return self._tally.ops, self._tally.failed

    def operate(self, op: Op, ski: bytes, payload: bytes, *, sni: str | None) -> bytes:
        self._tally.ops += 1
        try:
            return self._inner.operate(op, self._aliases.get(ski, ski), payload, sni=sni)
        except KeyOperationFailed:
            self._tally.failed += 1
            raise

    def __repr__(self) -> str:
        return f"<EdgeOperator inner={self._inner!r}>"


class _Service:
    """What a worker keeps per service: chain, remote key, session cache, settings."""

    def __init__(
        self,
        config: ServiceConfig,
        operator: _EdgeOperator,
        base: HandshakeSettings,
        edge: EdgeSettings,
    ) -> None:
        self.config = config
        self.hostname = config.hostname
        self.chain = certificate_chain(config.chain_pem)
        self.key: RemoteKey = remote_key(config.leaf, operator, sni=config.hostname)
        self.session_cache = (
            SessionCache(maxEntries=edge.session_cache, maxAge=int(edge.ticket_rotation))
            if edge.session_cache
            else None
        )
        self._base = base
        self._tickets: bool = edge.session_tickets
        self._lock = threading.Lock()
        self._settings: tuple[int, HandshakeSettings] | None = None

    def settings(self, ring: TicketKeyRing) -> HandshakeSettings:
        """Settings with this service's ticket keys for the ring's current generation."""
        if not self._tickets:
            return self._base
        generation, _, keys = ring.snapshot()
        cached = self._settings
        if cached is not None and cached[0] == generation:
            return cached[1]
        with self._lock:
            settings = self._base.validate()  # a copy
            settings.ticketKeys = [_service_ticket_key(key, self.hostname) for key in keys]
            settings.ticket_count = 2 if keys else 0
            self._settings = (generation, settings)
            return settings

    def __repr__(self) -> str:
        return f"<service {self.hostname} origin={self.config.origin}>"


# --- HTTP --------------------------------------------------------------------------------------

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request fields the edge sets itself (or drops), whatever the client sent.
_EDGE_SET: Final = frozenset(
    {"content-length", "expect", "x-forwarded-for", "x-forwarded-proto", "forwarded"}
)
_REASONS: Final = {
    400: "Bad Request",
    411: "Length Required",
    413: "Content Too Large",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class _HttpError(Exception):
    """A request the edge answers itself with ``status`` and then closes."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class _ClientGone(Exception):
    """The client closed or stalled in the middle of a request."""


def _write(conn: Any, data: bytes) -> None:
    """Send ``data`` to the TLS client; :class:`_ClientGone` if it cannot be sent."""
    try:
        conn.write(data)
    except Exception as exc:  # tlslite errors, resets, timeouts
        raise _ClientGone(f"writing to the client failed: {type(exc).__name__}") from exc


@dataclass
class _Request:
    method: str
    target: str
    version: str
    fields: list[tuple[str, str]]
    host: str | None
    length: int | None
    keep_alive: bool
    expect_continue: bool


def _simple_response(status: int) -> bytes:
    """The edge's own short answer (an error), after which it closes the connection."""
    reason = _REASONS.get(status, "Error")
    body = f"{status} {reason}\n".encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _TlsReader:
    """Buffered reads from a tlslite connection; waits for data on the raw socket.

    Waiting with ``poll`` before reading (instead of a timed-out tlslite read, which marks
    the session as not resumable) keeps an idle keep-alive connection's session resumable.
    """

    def __init__(self, conn: Any, sock: socket.socket) -> None:
        self._conn = conn
        self._sock = sock
        self._buffer = bytearray()

    def wait(self, timeout: float) -> bool:
        """Whether request bytes are available within ``timeout`` seconds."""
        if self._buffer or self._tlslite_buffered():
            return True
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def _tlslite_buffered(self) -> bool:
        """Whether tlslite holds bytes already read from the socket (so ``poll`` would lie).

        tlslite keeps decrypted data in ``TLSConnection._readBuffer`` and raw bytes in its
        ``BufferedSocket._read_buffer``. Should a later tlslite rename them, this answers
        ``True``, and the read blocks under the socket timeout instead.
        """
        raw = getattr(self._conn.sock, "_read_buffer", None)
        plain = getattr(self._conn, "_readBuffer", None)
        if raw is None or plain is None:
            return True
        return bool(raw) or bool(plain)

    def _fill(self) -> bool:
        try:
            data = self._conn.read()
        except Exception as exc:  # tlslite alerts, timeouts, resets
            raise _ClientGone(str(exc)) from exc
        if not data:
            return False
        self._buffer += data
        return True

    def read_head(self, limit: int) -> bytes | None:
        """The next request head (through the empty line); ``None`` if the client closed."""
        while True:
            while self._buffer.startswith(b"\r\n"):  # RFC 9112 §2.2: skip empty lines first
                del self._buffer[:2]
            end = self._buffer.find(b"\r\n\r\n")
            if end >= 0:
                if end + 4 > limit:
                    raise _HttpError(431, "request head too large")
                head = bytes(self._buffer[: end + 4])
                del self._buffer[: end + 4]
                return head
            if len(self._buffer) > limit:
                raise _HttpError(431, "request head too large")
            if not self._fill():
                if self._buffer:
                    raise _HttpError(400, "the request head is incomplete")
                return None

    def read_some(self, most: int) -> bytes:
        """Up to ``most`` body bytes (at least one); :class:`_ClientGone` at the end."""
        if not self._buffer and not self._fill():
            raise _ClientGone("the client closed in the middle of a request body")
        data = bytes(self._buffer[:most])
        del self._buffer[:most]
        return data


def _parse_request(head: bytes) -> _Request:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise _HttpError(400, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if re.fullmatch(rb"HTTP/\d\.\d", version):
            raise _HttpError(505, "unsupported HTTP version")
        raise _HttpError(400, "malformed request line")
    if not (_TARGET.fullmatch(target) or (target == b"*" and method == b"OPTIONS")):
        raise _HttpError(400, "the request target must be a path")
    if len(lines) - 1 > _MAX_FIELDS:
        raise _HttpError(431, "too many header fields")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # also refuses obs-fold and "Name :"
            raise _HttpError(400, "malformed header field")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise _HttpError(400, "malformed header field value")
        fields.append((name.decode("ascii"), value.decode("latin-1")))
    lower = [(name.lower(), value) for name, value in fields]
    hosts = [value for name, value in lower if name == "host"]
    if len(hosts) > 1 or (version == b"HTTP/1.1" and not hosts):
        raise _HttpError(400, "exactly one Host field is required")
    if any(name == "transfer-encoding" for name, _ in lower):
        raise _HttpError(411, "only Content-Length request bodies are supported")
    lengths = {value for name, value in lower if name == "content-length"}
    length = None
    if lengths:
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise _HttpError(400, "bad Content-Length")
        length = int(next(iter(lengths)))
    connection = {
        token.strip().lower()
        for name, value in lower
        if name == "connection"
        for token in value.split(",")
    }
    keep_alive = version == b"HTTP/1.1" and "close" not in connection
    expect = any(name == "expect" and value.lower() == "100-continue" for name, value in lower)
    forward = [
        (name, value)
        for name, value in fields
        if name.lower() not in _HOP_BY_HOP
        and name.lower() not in _EDGE_SET
        and name.lower() not in connection
    ]
    return _Request(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        version=version.decode("ascii"),
        fields=forward,
        host=hosts[0] if hosts else None,
        length=length,
        keep_alive=keep_alive,
        expect_continue=expect,
    )


def _host_matches(host: str, hostname: str) -> bool:
    name = host.strip().lower()
    if name.startswith("["):
        return False
    name = name.rsplit(":", 1)[0] if ":" in name else name
    return name.rstrip(".") == hostname


# --- the worker --------------------------------------------------------------------------------


def _left_before_tickets(conn: Any, exc: Exception) -> bool:
    """Whether a TLS 1.3 handshake failed only because the client had gone when tlslite sent
    the session tickets, which it does after checking the client's Finished.

    tlslite makes ``conn.session`` (``None`` until then) right after that check, with a
    resumption master secret, which only TLS 1.3 sessions have. A write to a client that
    has closed ends in ``TLSAbruptCloseError`` (or a reset, as ``OSError``).
    """
    session = getattr(conn, "session", None)
    return isinstance(exc, TLSAbruptCloseError | OSError) and bool(
        getattr(session, "resumptionMasterSecret", None)
    )


def _bind(listen: tuple[str, int], backlog: int = 1024) -> socket.socket:
    host, port = listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc}") from exc


class Edge:
    """One edge worker: accepts TLS connections and serves each in a thread.

    ``operator`` performs the key operations (a :class:`~.keyclient.KeyClient` in
    production). ``listener``: a bound, listening socket to accept on (shared by the
    workers of :func:`run_edge`); by default the edge binds ``config.edge.listen`` itself.
    ``tickets``: the shared :class:`TicketKeyRing`; by default the edge makes its own and
    rotates it itself. ``counters``: this worker's row of an :class:`EdgeStats`.
    The edge does not close ``operator``.
    """

    def __init__(
        self,
        config: EdgeConfig,
        operator: KeyOperator,
        *,
        listener: socket.socket | None = None,
        tickets: TicketKeyRing | None = None,
        counters: WorkerCounters | None = None,
    ) -> None:
        self.config = config
        self._settings = config.edge
        self._tls_class: type[Any] = TLSConnection
        if config.edge.fast_crypto:
            fasttls.install()
            self._tls_class = fasttls.FastTLSConnection
        elif fasttls.installed():
            _log.info("edge: fast_crypto is off, but this process has installed it already")
        aliases = {service.ski: service.key_id for service in config.services if service.key_id}
        self._operator = _EdgeOperator(operator, aliases)
        base = tls_settings(config.edge)
        self.services: dict[str, _Service] = {
            service.hostname: _Service(service, self._operator, base, config.edge)
            for service in config.services
        }
        default = config.edge.default_service
        self._default = self.services[default] if default else None
        self._owns_ring = tickets is None
        self._ring = tickets if tickets is not None else TicketKeyRing()
        if self._owns_ring and config.edge.session_tickets:
            self._ring.rotate()
        self._rotate_lock = threading.Lock()
        self._owns_listener = listener is None
        self._listener = listener if listener is not None else _bind(config.edge.listen)
        self.counters = counters if counters is not None else EdgeStats(1).slot(0)
        self._slots = threading.BoundedSemaphore(config.edge.max_connections)
        self._alpn = [bytearray(name.encode("ascii")) for name in config.edge.alpn]
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._accept_thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The host and port the edge accepts on."""
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    @property
    def tickets(self) -> TicketKeyRing:
        """The ticket key ring in use."""
        return self._ring

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Edge:
        """Accept in a background thread; returns ``self``."""
        thread = threading.Thread(target=self.serve_forever, name="edge-accept", daemon=True)
        self._accept_thread = thread
        thread.start()
        return self

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop`."""
        self._listener.settimeout(_ACCEPT_POLL)
        try:
            while not self._stopping.is_set():
                if not self._slots.acquire(timeout=_ACCEPT_POLL):
                    continue
                try:
                    sock, peer = self._listener.accept()
                except TimeoutError:
                    self._slots.release()
                    continue
                except OSError as exc:
                    self._slots.release()
                    if self._stopping.is_set():
                        break
                    _log.warning("edge: accept failed: %s", exc)
                    time.sleep(0.05)
                    continue
                thread = threading.Thread(
                    target=self._connection, args=(sock, peer), name="edge-conn", daemon=True
                )
                with self._threads_lock:
                    self._threads.add(thread)
                try:
                    thread.start()
                except RuntimeError as exc:  # no more threads: shed this connection
                    with self._threads_lock:
                        self._threads.discard(thread)
                    sock.close()
                    self._slots.release()
                    _log.warning("edge: cannot start a connection thread: %s", exc)
        finally:
            self._stopped.set()

    def stop(self) -> None:
        """Stop accepting (safe from a signal handler); connections in flight go on."""
        self._stopping.set()

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, give connections in flight up to ``grace`` seconds, release."""
        self.stop()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=grace)
        deadline = time.monotonic() + grace
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._owns_listener:
            self._listener.close()
        with self._threads_lock:
            idle = not self._threads
        if self._owns_ring and idle:  # a straggler may still read it
            self._ring.close()

    def __enter__(self) -> Edge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        host, port = self.address
        return f"<Edge {host}:{port} services={sorted(self.services)}>"

    # -- one connection -------------------------------------------------------------------

    def _route(self, sni: str | None) -> _Service | None:
        if sni is None:
            return self._default
        return self.services.get(sni)

    def _connection(self, sock: socket.socket, peer: Any) -> None:
        client_ip = str(peer[0])
        self.counters.add("connections")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self._settings.handshake_timeout)
            try:
                sni = peek_socket_server_name(sock)
            except TransportError as exc:
                _log.debug("edge: %s gave no ClientHello: %s", client_ip, exc)
                return
            except RemoteProtocolError as exc:
                self.counters.add("bad_client_hello")
                _log.info("edge: bad ClientHello from %s: %s", client_ip, exc)
                return
            service = self._route(sni)
            if service is None:
                self.counters.add("unknown_sni")
                _log.info("edge: no service for SNI %r (client %s)", sni, client_ip)
                with contextlib.suppress(OSError):
                    sock.sendall(bytes([21, 3, 3, 0, 2, 2, _ALERT_UNRECOGNIZED_NAME]))
                return
            conn = self._handshake(sock, service, client_ip)
            if conn is not None:
                self._serve_http(conn, sock, service, client_ip)
        except Exception:
            _log.exception("edge: connection from %s failed", client_ip)
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            self._slots.release()
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _handshake(self, sock: socket.socket, service: _Service, client_ip: str) -> Any:
        self._maybe_rotate()
        settings = service.settings(self._ring)
        conn = self._tls_class(sock)
        self._operator.begin()
        started = time.perf_counter()
        try:
            conn.handshakeServer(
                certChain=service.chain,
                privateKey=service.key,
                sessionCache=service.session_cache,
                settings=settings,
                alpn=self._alpn,
            )
        except Exception as exc:  # tlslite alerts, socket errors, timeouts
            ops, failed = self._operator.counts()
            if _left_before_tickets(conn, exc):
                # The client checked our Finished and sent its own, then closed before
                # tlslite wrote the TLS 1.3 session tickets (openssl s_time, health checks):
                # for the client the handshake is complete, so it counts as one.
                self.counters.add("handshakes")
                self.counters.add("full_handshakes" if ops else "resumed_handshakes")
                _log.debug("edge: %s from %s left before its tickets", service.hostname, client_ip)
                return None
            self.counters.add("handshake_failures")
            if failed:
                self.counters.add("key_failures")
            _log.info(
                "edge: handshake for %s from %s failed (%d key operation(s), %d failed): %s: %s",
                service.hostname,
                client_ip,
                ops,
                failed,
                type(exc).__name__,
                exc,
            )
            return None
        ops, _ = self._operator.counts()
        resumed = bool(conn.resumed) or ops == 0
        self.counters.add("handshakes")
        self.counters.add("resumed_handshakes" if resumed else "full_handshakes")
        _log.debug(
            "edge: %s %s %s from %s, %s, %.1f ms",
            service.hostname,
            conn.getVersionName(),
            conn.getCipherName(),
            client_ip,
            "resumed" if resumed else "full",
            (time.perf_counter() - started) * 1000,
        )
        return conn

    def _maybe_rotate(self) -> None:
        if not (self._owns_ring and self._settings.session_tickets):
            return
        _, rotated_at, _ = self._ring.snapshot()
        if time.time() - rotated_at < self._settings.ticket_rotation:
            return
        with self._rotate_lock:
            _, rotated_at, _ = self._ring.snapshot()
            if time.time() - rotated_at >= self._settings.ticket_rotation:
                generation = self._ring.rotate()
                _log.info("edge: session ticket keys rotated (generation %d)", generation)

    # -- HTTP -----------------------------------------------------------------------------

    def _serve_http(self, conn: Any, sock: socket.socket, service: _Service, ip: str) -> None:
        # A client closing without close_notify ends a request stream, not a session.
        conn.ignoreAbruptClose = True
        reader = _TlsReader(conn, sock)
        idle = self._settings.idle_timeout
        try:
            for _ in range(_MAX_REQUESTS_PER_CONNECTION):
                if not reader.wait(idle):
                    break
                sock.settimeout(idle)
                try:
                    head = reader.read_head(self._settings.max_header_bytes)
                    if head is None:
                        break
                    request = _parse_request(head)
                    if request.host is not None and not _host_matches(
                        request.host, service.hostname
                    ):
                        raise _HttpError(421, "Host does not name this TLS server")
                except _HttpError as err:
                    _log.info("edge: %s from %s: %d %s", service.hostname, ip, err.status, err)
                    _write(conn, _simple_response(err.status))
                    break
                self.counters.add("requests")
                if not self._proxy(conn, reader, request, service, ip):
                    break
        except _ClientGone as exc:
            _log.debug("edge: client %s went away: %s", ip, exc)
            return
        finally:
            with contextlib.suppress(Exception):  # tlslite may have closed the socket already
                sock.settimeout(1.0)
                conn.close()

    def _proxy(
        self, conn: Any, reader: _TlsReader, request: _Request, service: _Service, ip: str
    ) -> bool:
        """Relay one request; whether the client connection may carry another."""
        limit = self._settings.max_body_bytes
        if request.length is not None and request.length > limit:
            _write(conn, _simple_response(413))
            return False
        origin_config = service.config.origin
        origin = http.client.HTTPConnection(
            origin_config.host, origin_config.port, timeout=self._settings.origin_timeout
        )
        try:
            try:
                self._send_head(origin, request, service, ip)
            except OSError as exc:
                return self._origin_failed(conn, service, exc)
            if request.length:
                if request.expect_continue:
                    _write(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
                failure = self._send_body(origin, reader, request.length)
                if failure is not None:
                    return self._origin_failed(conn, service, failure)
            try:
                response = origin.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                return self._origin_failed(conn, service, exc)
            return self._relay(conn, request, response)
        finally:
            origin.close()

    @staticmethod
    def _send_head(
        origin: http.client.HTTPConnection, request: _Request, service: _Service, ip: str
    ) -> None:
        origin.putrequest(request.method, request.target, skip_host=True, skip_accept_encoding=True)
        if request.host is None:
            origin.putheader("Host", service.hostname)
        for name, value in request.fields:
            origin.putheader(name, value)
        origin.putheader("X-Forwarded-For", ip)
        origin.putheader("X-Forwarded-Proto", "https")
        if request.length is not None:
            origin.putheader("Content-Length", str(request.length))
        origin.putheader("Connection", "close")
        origin.endheaders()

    @staticmethod
    def _send_body(
        origin: http.client.HTTPConnection, reader: _TlsReader, length: int
    ) -> OSError | None:
        remaining = length
        failure: OSError | None = None
        while remaining:
            chunk = reader.read_some(min(_CHUNK, remaining))  # _ClientGone ends it all
            remaining -= len(chunk)
            if failure is None:
                try:
                    origin.send(chunk)
                except OSError as exc:
                    failure = exc  # keep reading, so the 502 is not lost in a reset
        return failure

    def _origin_failed(self, conn: Any, service: _Service, exc: BaseException) -> bool:
        self.counters.add("origin_errors")
        status = 504 if isinstance(exc, TimeoutError) else 502
        _log.warning(
            "edge: origin %s of %s failed: %s: %s",
            service.config.origin,
            service.hostname,
            type(exc).__name__,
            exc,
        )
        _write(conn, _simple_response(status))
        return False

    @staticmethod
    def _relay(conn: Any, request: _Request, response: http.client.HTTPResponse) -> bool:
        keep = request.keep_alive
        named = {
            token.strip().lower()
            for value in response.msg.get_all("Connection", [])
            for token in value.split(",")
        }
        fields = [
            (name, value)
            for name, value in response.msg.items()
            if name.lower() not in _HOP_BY_HOP and name.lower() not in named
        ]
        status = response.status
        no_body = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        chunked = False
        if not no_body:
            if response.chunked and request.version == "HTTP/1.1":
                chunked = True
                fields.append(("Transfer-Encoding", "chunked"))
            elif response.length is None:
                keep = False  # the body ends when the connection does
        if not keep:
            fields.append(("Connection", "close"))
        head = f"HTTP/1.1 {status} {response.reason}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in fields
        )
        pending = head.encode("latin-1") + b"\r\n"
        if not no_body:
            while True:
                try:
                    chunk = response.read1(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    # Too late for a 502: cut the client off so it sees the body is short.
                    _log.warning("edge: origin failed mid-body: %s", type(exc).__name__)
                    if pending:
                        _write(conn, pending)
                    return False
                if not chunk:
                    break
                if chunked:
                    chunk = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
                _write(conn, pending + chunk)
                pending = b""
            if chunked:
                pending += b"0\r\n\r\n"
        if pending:
            _write(conn, pending)
        return keep


# --- the supervisor ----------------------------------------------------------------------------


def run_edge(
    config: EdgeConfig,
    *,
    ready: Callable[[str, int], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run the edge until SIGTERM or SIGINT (or ``stop``): pre-fork ``workers`` processes.

    Loads the mutual-TLS files and binds before forking, so a bad configuration fails here,
    then calls ``ready(host, port)``. Call from the main thread of a process that has not
    started other threads (``fork`` copies only the calling thread).
    """
    settings = config.edge
    if threading.active_count() > 1:
        _log.warning("edge: forking workers while other threads run; only this one survives")
    context = client_context(config.keyserver.ca, config.keyserver.cert, config.keyserver.key)
    listener = _bind(settings.listen)
    ring = TicketKeyRing()
    if settings.session_tickets:
        ring.rotate()
    stats = EdgeStats(settings.workers)
    stopping = stop or threading.Event()
    supervisor = _Supervisor(config, context, listener, ring=ring, stats=stats, stopping=stopping)
    previous = {
        sig: signal.signal(sig, supervisor.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        supervisor.start_workers()
        host, port = listener.getsockname()[:2]
        _log.info(
            "edge: listening on %s:%d with %d worker(s), %d service(s)",
            host,
            port,
            settings.workers,
            len(config.services),
        )
        if ready is not None:
            ready(str(host), int(port))
        supervisor.watch()
    finally:
        supervisor.stop_workers()
        supervisor.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.close()
        ring.close()


class _Supervisor:
    """The parent process of :func:`run_edge`: forks, restarts and stops the workers,
    rotates the ticket keys and reports the counters.

    It holds the only write end of the *lifeline*, a pipe whose read end every worker
    inherits: when the supervisor ends, however it ends, the workers read end-of-file
    (:func:`_exit_with_parent`).
    """

    def __init__(
        self,
        config: EdgeConfig,
        context: ssl.SSLContext,
        listener: socket.socket,
        *,
        ring: TicketKeyRing,
        stats: EdgeStats,
        stopping: threading.Event,
    ) -> None:
        self._config = config
        self._context = context
        self._listener = listener
        self._ring = ring
        self._stats = stats
        self._stopping = stopping
        self._children: dict[int, int] = {}  # pid → worker index
        self._restart_at: dict[int, float] = {}  # worker index → when to fork it again
        self._lifeline_read, self._lifeline_write = os.pipe()  # not inherited by exec

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping.set()

    def start_workers(self) -> None:
        for index in range(self._stats.workers):
            self._fork(index)

    def _fork(self, index: int) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid:
            self._children[pid] = index
            return
        # Until the worker installs its own handlers, a stop signal simply ends it.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = 1
        try:
            os.close(self._lifeline_write)  # only the supervisor may hold it
            _exit_with_parent(parent, self._lifeline_read, self._listener)
            code = _worker_main(
                self._config, self._context, self._listener, self._ring, self._stats.slot(index)
            )
        except BaseException:
            _log.exception("edge: worker %d crashed", index)
        finally:
            logging.shutdown()
            os._exit(code)

    def watch(self) -> None:
        settings = self._config.edge
        next_stats = time.monotonic() + settings.stats_interval
        while not self._stopping.wait(0.2):
            self._reap()
            now = time.monotonic()
            for index, when in list(self._restart_at.items()):
                if when <= now and not self._stopping.is_set():
                    del self._restart_at[index]
                    self._fork(index)
            if settings.session_tickets:
                _, rotated_at, _ = self._ring.snapshot()
                if time.time() - rotated_at >= settings.ticket_rotation:
                    generation = self._ring.rotate()
                    _log.info("edge: session ticket keys rotated (generation %d)", generation)
            if now >= next_stats:
                next_stats = now + settings.stats_interval
                self.report()

    def _exited(self, pid: int) -> int | None:
        """The exit status of worker ``pid`` if it has ended (reaped), else ``None``."""
        try:
            found, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return -1  # already gone
        return os.waitstatus_to_exitcode(status) if found else None

    def _reap(self) -> None:
        for pid, index in list(self._children.items()):
            status = self._exited(pid)
            if status is None:
                continue
            del self._children[pid]
            if not self._stopping.is_set():
                _log.error(
                    "edge: worker %d (pid %d) exited with status %d; restarting it",
                    index,
                    pid,
                    status,
                )
                self._restart_at[index] = time.monotonic() + 1.0

    def stop_workers(self, grace: float = 10.0) -> None:
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._children and time.monotonic() < deadline:
            for pid in list(self._children):
                if self._exited(pid) is not None:
                    del self._children[pid]
            if self._children:
                time.sleep(0.05)
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self._children.clear()
        self.report()

    def close(self) -> None:
        """Release the lifeline (after :meth:`stop_workers`: a worker left would exit)."""
        for fd in (self._lifeline_write, self._lifeline_read):
            with contextlib.suppress(OSError):
                os.close(fd)

    def report(self) -> None:
        totals = self._stats.totals()
        _log.info("edge: %s", " ".join(f"{name}={value}" for name, value in totals.items()))
        path = self._config.edge.stats_file
        if path is None:
            return
        document = {
            "pid": os.getpid(),
            "time": time.time(),
            "ticket_generation": self._ring.generation,
            "total": totals,
            "workers": self._stats.per_worker(),
        }
        temporary = path.with_name(path.name + ".tmp")
        try:
            temporary.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
            temporary.replace(path)
        except OSError as exc:
            _log.warning("edge: cannot write %s: %s", path, exc)


def _load_prctl() -> Callable[..., int] | None:
    """``prctl(2)`` from the C library (Linux only), else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


#: Looked up once, at import in the supervisor, so that a freshly forked worker only calls it.
_prctl = _load_prctl()


def _exit_with_parent(parent: int, lifeline: int, listener: socket.socket) -> None:
    """In a worker just forked by ``parent``: end this process as soon as ``parent`` ends.

    However the supervisor ends (SIGKILL, a crash, the OOM killer), a worker left behind
    would keep the listening socket and go on accepting with nobody to stop or restart it,
    and a new edge could not listen on the port. So:

    * on Linux the kernel sends this process SIGKILL when the thread that forked it ends
      (``PR_SET_PDEATHSIG``; the supervisor forks from the thread that runs
      :func:`run_edge`, and reaps every worker before that returns); the kernel closes the
      listening socket with the rest;
    * a supervisor that ended before the ``prctl`` call would go unnoticed by it, so the
      parent process id is checked again afterwards;
    * everywhere, a watchdog thread waits on ``lifeline``, the read end of a pipe whose
      write end only the supervisor holds: end-of-file means the supervisor is gone. It
      closes the listening socket first, then exits at once (connections in flight are
      cut).
    """

    def orphaned() -> NoReturn:
        with contextlib.suppress(OSError):
            listener.close()
        with contextlib.suppress(Exception):
            _log.warning("edge: the supervisor (pid %d) is gone; this worker exits", parent)
        os._exit(1)

    if _prctl is not None and _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        _log.warning(
            "edge: cannot ask to die with the supervisor: %s", os.strerror(ctypes.get_errno())
        )
    if os.getppid() != parent:
        orphaned()

    def watch() -> None:
        while True:
            try:
                if os.read(lifeline, 1):
                    continue  # nobody writes to it; ignore, keep waiting for end-of-file
            except OSError as exc:
                _log.warning("edge: cannot watch the supervisor: %s", exc)
                return
            orphaned()

    threading.Thread(target=watch, name="edge-lifeline", daemon=True).start()


def _worker_main(
    config: EdgeConfig,
    context: ssl.SSLContext,
    listener: socket.socket,
    ring: TicketKeyRing,
    counters: WorkerCounters,
) -> int:
    """Body of one worker process: its own key client, an :class:`Edge` on the shared socket."""
    client = key_client(config.keyserver, context)
    edge = Edge(config, client, listener=listener, tickets=ring, counters=counters)

    def stop(signum: int, frame: FrameType | None) -> None:
        edge.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        edge.serve_forever()
        edge.shutdown()
    finally:
        client.close()
    return 0
