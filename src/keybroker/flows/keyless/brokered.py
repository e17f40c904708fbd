"""The key server's side of broker-held keys: keys delivered by the broker, grants read from it.

A key server that takes its keys from the broker is an enrolled ``service``
principal (``keybroker enroll service/ks1 …``) with its encrypted keyring.
:class:`KeyServerPrincipal` opens that keyring; from it:

* :class:`BrokerKeySource` (a key server ``KeySource``) fetches the deliveries of
  ``keyless/*`` keysets, checks the broker CA's signature on each, HPKE-opens it
  into the keyring, **saves the keyring before acknowledging** with a proof of
  possession (:class:`~keybroker.client.principal.PrincipalClient` does both), and
  forgets the versions the broker disabled or destroyed and the keysets it no longer
  holds. The keys it serves are those the broker lists as primary or enabled
  (``GET /v1/keyless/keys``) that are in the keyring; each leaves
  :mod:`keybroker.keys` through the one explicit export
  (:meth:`~keybroker.keys.Keyset.export_secret_material` with
  :data:`~keybroker.keys.SECRET_ACCESS`) into a
  :class:`~.operations.LocalKeyStore`, which does the key operations.
* :class:`BrokerAuthorizer` (a key server ``Authorizer``) reads the same route:
  an edge may use a key only if it has an active ``use`` grant on the keyset holding
  it, and ``RSA_DECRYPT`` only where that key's policy allows it. Anything else,
  including a key the broker never mentioned, is ``NOT_AUTHORIZED``. Until its first
  :meth:`~BrokerAuthorizer.reload` it refuses everything (fail closed).
* :func:`server_tls_credentials` / :func:`server_tls_files`: the key server's TLS
  server certificate is its enrolment certificate (a ``service`` principal's is
  for TLS servers too), with the identity key from its keyring.
  ``keybroker keyserver --keyring`` runs a key server on all three.
* :func:`client_tls_files`: an edge's client certificate, key and the broker CA,
  from *its* keyring (``node/edge1``), as the files ``keybroker edge`` reads
  (``keybroker keyless tls-files``).

Both ``reload`` methods are synchronous, as the key server's reload hook calls
them: each talks to the broker in a private event loop (in a worker thread if the
caller runs an event loop itself) and blocks until done. Each updates its object
in place — building the new state first, so a failure leaves the old one — and
returns it, so both ``source.reload()`` and ``source = source.reload()`` work.
A reload that cannot reach the broker raises and changes nothing; the key source
keeps serving the keys it has (which the authorizer, which keeps its last view,
lets through only for edges it knew to be granted).

Nothing here logs, prints or puts in an exception a key byte: keys are named by
keyset, version and hex SKI.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final, NoReturn, TypeVar

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from keybroker.api.keyless_schemas import KeylessKeys
from keybroker.api.settings import utc_now
from keybroker.client._http import DEFAULT_TIMEOUT
from keybroker.client.keyring import KekSource, Keyring
from keybroker.client.principal import PrincipalClient
from keybroker.errors import (
    AuthorizationError,
    ConfigurationError,
    KeybrokerError,
    TransportError,
)
from keybroker.flows.keyless.codes import ErrorCode, Op
from keybroker.flows.keyless.operations import KeyOperationError, LocalKeyStore, ski_of
from keybroker.flows.keyless.service_keys import (
    KEYSET_PREFIX,
    TLS_KEY_TYPES,
    private_key_from_material,
)
from keybroker.keys import SECRET_ACCESS, KeyEncryptionKey
from keybroker.pki import PrincipalId, load_certificate, principal_of

logger = logging.getLogger("keybroker.keyless.brokered")

_T = TypeVar("_T")
Clock = Callable[[], datetime]

#: Broker states that mean "forget your copy".
RETIRED_STATES: Final = frozenset({"disabled", "destroyed"})
_KEYS_PATH: Final = "/v1/keyless/keys"


def _run_blocking(work: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``work()`` to completion in a private event loop, from synchronous code.

    A caller that is itself inside a running loop (a key server's reload hook on its
    event loop) cannot start another loop in its thread, so the private loop then
    runs in a worker thread while the caller waits.
    """

    async def main() -> _T:
        return await work()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keyless-broker") as pool:
        return pool.submit(asyncio.run, main()).result()


class KeyServerPrincipal:
    """An enrolled key server's link to its broker: its keyring (encrypted at rest) and URL.

    ``passphrase`` or ``kek`` opens the keyring (as for ``keybroker enroll``);
    ``url`` overrides the broker URL recorded at enrolment; ``transport`` replaces
    the network (tests). One object is shared by the key source and the authorizer:
    calls are serialised, so the keyring is changed by one of them at a time.
    """

    def __init__(
        self,
        keyring_path: Path,
        *,
        passphrase: str | bytes | None = None,
        kek: KeyEncryptionKey | None = None,
        url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock = utc_now,
    ) -> None:
        self._path = Path(keyring_path)
        self._source = KekSource(passphrase=passphrase, kek=kek)
        self._keyring = Keyring.load(self._path, self._source)
        self._url = url
        self._transport = transport
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyServerPrincipal({self._keyring.principal}, {self._path})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("KeyServerPrincipal holds a keyring and cannot be pickled")

    @property
    def principal(self) -> PrincipalId:
        return self._keyring.principal

    @property
    def keyring(self) -> Keyring:
        """The keyring as last loaded or saved (a reload may replace the object)."""
        return self._keyring

    def call(self, work: Callable[[PrincipalClient], Awaitable[_T]]) -> _T:
        """Run ``work`` with a :class:`PrincipalClient` of this key server, synchronously.

        Each call has its own client (its own connections, in its own event loop) and
        hands the keyring it may have changed back to this object.
        """

        async def run() -> _T:
            client = PrincipalClient(
                self._keyring,
                self._path,
                self._source,
                url=self._url,
                transport=self._transport,
                timeout=self._timeout,
                clock=self._clock,
            )
            try:
                return await work(client)
            finally:
                self._keyring = client.keyring
                await client.aclose()

        with self._lock:
            return _run_blocking(run)


# -- the key source ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Served:
    """Where the key behind one SKI is in the keyring."""

    keyset: str
    version: int
    template: str


@dataclass(frozen=True)
class _Snapshot:
    keys: LocalKeyStore = field(repr=False)
    served: Mapping[bytes, _Served]
    #: Keys the broker lists that are not (yet) in the keyring: deliveries on their way.
    waiting: int = 0
    loaded_at: datetime | None = None


def _snapshot(
    keyring: Keyring, wanted: Mapping[tuple[str, int], tuple[str, bytes]] | None
) -> tuple[LocalKeyStore, dict[bytes, _Served], int]:
    """A :class:`LocalKeyStore` of the keyring's keyless keys.

    ``wanted`` maps ``(keyset, version)`` to the template and SKI the broker lists;
    ``None`` takes every keyless version the keyring holds (before the first
    reload). A version whose template or SKI disagrees with the broker's is left out.
    """
    store = LocalKeyStore()
    served: dict[bytes, _Served] = {}
    waiting = 0
    entries: list[tuple[str, int, str, bytes | None]]
    if wanted is None:
        entries = [
            (name, info.version, info.template.name, None)
            for name, keyset in sorted(keyring.received.items())
            if name.startswith(KEYSET_PREFIX)
            for info in keyset.versions
        ]
    else:
        entries = [(name, v, tpl, ski) for (name, v), (tpl, ski) in sorted(wanted.items())]
    for name, version, template, ski in entries:
        keyset = keyring.received.get(name)
        held = None if keyset is None else {v.version: v for v in keyset.versions}.get(version)
        if keyset is None or held is None:
            waiting += 1
            continue
        if held.template.name != template or template not in TLS_KEY_TYPES:
            logger.error(
                "%s v%d is a %s key here but the broker lists it as %s; not served",
                name,
                version,
                held.template.name,
                template,
            )
            continue
        # The one way the key leaves keybroker.keys (audited: SECRET_ACCESS).
        material = keyset.export_secret_material(version, SECRET_ACCESS)
        private_key = private_key_from_material(template, material)
        got = ski_of(private_key.public_key())
        if ski is not None and got != ski:
            logger.error(
                "%s v%d is not the key %s the broker lists; not served", name, version, ski.hex()
            )
            continue
        store.add(private_key)
        served[got] = _Served(name, version, template)
    return store, served, waiting


class BrokerKeySource:
    """The keys the broker delivered to this key server (a key server ``KeySource``).

    Built from the keyring alone (no network): it serves what was delivered and not
    retired before. :meth:`reload` synchronises with the broker (see the module
    docstring). Thread-safe: :meth:`perform` reads one immutable snapshot.
    """

    def __init__(self, principal: KeyServerPrincipal) -> None:
        self._principal = principal
        self._snap = self._build(principal.keyring, None, None)

    @staticmethod
    def _build(
        keyring: Keyring,
        wanted: Mapping[tuple[str, int], tuple[str, bytes]] | None,
        loaded_at: datetime | None,
    ) -> _Snapshot:
        keys, served, waiting = _snapshot(keyring, wanted)
        return _Snapshot(keys, served, waiting, loaded_at)

    def __repr__(self) -> str:
        return f"<BrokerKeySource {self.describe()}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("BrokerKeySource holds private keys and cannot be pickled")

    @property
    def principal(self) -> PrincipalId:
        return self._principal.principal

    @property
    def store(self) -> LocalKeyStore:
        """The keys served now, as a :class:`LocalKeyStore` (replaced by each reload)."""
        return self._snap.keys

    def skis(self) -> list[bytes]:
        """The SKIs of the keys served, sorted."""
        return self._snap.keys.skis()

    def perform(self, ski: bytes, op: int, payload: bytes) -> bytes:
        """:meth:`LocalKeyStore.perform` on the keys served now."""
        return self._snap.keys.perform(ski, op, payload)

    def where(self, ski: bytes) -> tuple[str, int] | None:
        """The keyset and version the served key ``ski`` is, or ``None``."""
        found = self._snap.served.get(bytes(ski))
        return None if found is None else (found.keyset, found.version)

    def worker_keys(self) -> Mapping[bytes, bytes]:
        """SKI → unencrypted PKCS#8 DER of each key served, for a key server's process pool
        (:func:`~.operations.init_worker`). Another explicit export: the bytes go to the
        pool's workers only; the caller must keep them nowhere else."""
        out: dict[bytes, bytes] = {}
        keyring = self._principal.keyring
        for ski, where in self._snap.served.items():
            keyset = keyring.received.get(where.keyset)
            if keyset is None:
                continue
            material = keyset.export_secret_material(where.version, SECRET_ACCESS)
            key = private_key_from_material(where.template, material)
            out[ski] = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        return out

    def describe(self) -> str:
        """One line for logs: whose keys, how many, how many still on their way."""
        snap = self._snap
        when = (
            "never synchronised"
            if snap.loaded_at is None
            else f"synchronised {snap.loaded_at:%Y-%m-%d %H:%M:%S}"
        )
        waiting = f", {snap.waiting} awaiting delivery" if snap.waiting else ""
        return f"broker keys of {self.principal}: {len(snap.served)} keys{waiting}, {when}"

    def reload(self) -> BrokerKeySource:
        """Install and acknowledge new deliveries, forget retired keys, serve what the broker
        lists; return ``self``, updated. Raises (changing nothing served) if the broker
        cannot be asked."""
        keyring, wanted, now = self._principal.call(self._synchronise)
        before = self._snap
        self._snap = self._build(keyring, wanted, now)
        changed = before.loaded_at is None or (before.served, before.waiting) != (
            self._snap.served,
            self._snap.waiting,
        )
        # Periodic reloads: one line when what is served changes, not one per reload.
        logger.log(logging.INFO if changed else logging.DEBUG, "%s", self.describe())
        return self

    async def _synchronise(
        self, client: PrincipalClient
    ) -> tuple[Keyring, dict[tuple[str, int], tuple[str, bytes]], datetime]:
        await _receive(client)
        await _retire(client)
        view = await _view(client)
        wanted = {
            (held.keyset, key.version): (key.template, bytes.fromhex(key.ski))
            for held in view.keysets
            for key in held.keys
        }
        return client.keyring, wanted, utc_now()


async def _receive(client: PrincipalClient) -> int:
    """Install, save and acknowledge every outstanding keyless delivery; the number acked."""
    acked = 0
    for delivery in await client.fetch_deliveries(0):
        if not delivery.keyset.startswith(KEYSET_PREFIX):
            continue  # another flow's delivery: its own agent takes it
        try:
            info = client.open_delivery(delivery)  # CA signature checked, keyring saved
            await client.ack(delivery)
        except TransportError:
            raise
        except KeybrokerError as exc:
            logger.warning(
                "delivery %s of %s v%d not taken: %s",
                delivery.delivery_id,
                delivery.keyset,
                delivery.version,
                type(exc).__name__,
            )
            continue
        acked += 1
        logger.info(
            "installed and acknowledged %s v%d (key id %#010x)",
            delivery.keyset,
            info.version,
            info.key_id,
        )
    return acked


async def _retire(client: PrincipalClient) -> list[tuple[str, int]]:
    """Forget every keyless version the broker disabled or destroyed, and every keyless
    keyset this key server no longer holds."""
    held = {h.name: h for h in await client.holdings() if h.name.startswith(KEYSET_PREFIX)}
    forgotten: list[tuple[str, int]] = []
    for name, keyset in sorted(client.keyring.received.items()):
        if not name.startswith(KEYSET_PREFIX):
            continue
        holding = held.get(name)
        states = {} if holding is None else {v.version: v for v in holding.versions}
        for info in keyset.versions:
            broker = states.get(info.version)
            if holding is not None and (broker is None or broker.state not in RETIRED_STATES):
                continue
            if broker is not None and broker.key_id != info.key_id:
                logger.warning("%s v%d: the broker lists another key id; kept", name, info.version)
                continue
            if client.forget_version(name, info.version):
                forgotten.append((name, info.version))
                why = "no longer held" if holding is None else broker.state if broker else ""
                logger.info("forgot %s v%d (%s)", name, info.version, why)
    return forgotten


async def _view(client: PrincipalClient) -> KeylessKeys:
    """What the broker says this key server holds; nothing if it holds no keyless keyset."""
    try:
        return await client.call(KeylessKeys, "GET", _KEYS_PATH)
    except AuthorizationError as exc:
        if any(name.startswith(KEYSET_PREFIX) for name in client.keyring.received):
            raise
        logger.info("the broker lists no keyless keys for %s: %s", client.principal, exc)
        return KeylessKeys(keysets=[])


# -- the authorizer ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grant:
    keyset: str
    allow_decrypt: bool
    edges: frozenset[PrincipalId]


class BrokerAuthorizer:
    """Which edge may use which key, as the broker's grants say (a key server ``Authorizer``).

    Refuses everything until the first :meth:`reload`. ``max_age`` (seconds), if
    given, makes it refuse everything once its view is older than that (the broker
    unreachable for too long); by default a view stays in force until replaced.
    """

    def __init__(
        self,
        principal: KeyServerPrincipal,
        *,
        max_age: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_age is not None and max_age <= 0:
            raise ConfigurationError("max_age must be positive")
        self._principal = principal
        self._max_age = max_age
        self._monotonic = monotonic
        self._table: Mapping[bytes, tuple[_Grant, ...]] = {}
        self._loaded: float | None = None
        self._keysets = 0

    def __repr__(self) -> str:
        return f"<BrokerAuthorizer {self.describe()}>"

    def check(self, edge: PrincipalId, ski: bytes, op: Op) -> None:
        """Return if ``edge`` may do ``op`` with the key ``ski``; else raise
        :class:`KeyOperationError` with ``NOT_AUTHORIZED``."""
        table, loaded = self._table, self._loaded
        if loaded is None:
            raise KeyOperationError(
                "no grants read from the broker yet", code=ErrorCode.NOT_AUTHORIZED
            )
        if self._max_age is not None and self._monotonic() - loaded > self._max_age:
            raise KeyOperationError(
                "the grants read from the broker are too old", code=ErrorCode.NOT_AUTHORIZED
            )
        key = bytes(ski)
        mine = [g for g in table.get(key, ()) if edge in g.edges]
        if not mine:
            raise KeyOperationError(
                f"{edge} is not granted key {key.hex()}", code=ErrorCode.NOT_AUTHORIZED
            )
        if op is Op.RSA_DECRYPT and not any(g.allow_decrypt for g in mine):
            raise KeyOperationError(
                f"RSA_DECRYPT is not allowed with key {key.hex()}", code=ErrorCode.NOT_AUTHORIZED
            )

    def reload(self) -> BrokerAuthorizer:
        """Read the grants again (``GET /v1/keyless/keys``); return ``self``, updated.

        Raises (keeping the last view) if the broker cannot be asked.
        """
        view = self._principal.call(_view)
        table: dict[bytes, list[_Grant]] = {}
        for held in view.keysets:
            edges = frozenset(PrincipalId.parse(e) for e in held.edges)
            for key in held.keys:
                # The policy is the template's: both must say decrypt (a view that disagrees
                # with the template it names allows only signing).
                kind = TLS_KEY_TYPES.get(key.template)
                allow_decrypt = key.allow_decrypt and kind is not None and kind.allow_decrypt
                grant = _Grant(held.keyset, allow_decrypt, edges)
                table.setdefault(bytes.fromhex(key.ski), []).append(grant)
        new = {ski: tuple(grants) for ski, grants in table.items()}
        first = self._loaded is None
        if not first:
            self._log_changes(self._table, new)
        self._table = new
        self._keysets = len(view.keysets)
        self._loaded = self._monotonic()
        logger.log(logging.INFO if first else logging.DEBUG, "%s", self.describe())
        return self

    @staticmethod
    def _log_changes(
        old: Mapping[bytes, tuple[_Grant, ...]], new: Mapping[bytes, tuple[_Grant, ...]]
    ) -> None:
        """One line per edge that may now, or may no longer, use a keyset."""

        def pairs(table: Mapping[bytes, tuple[_Grant, ...]]) -> set[tuple[str, str]]:
            return {
                (str(e), g.keyset) for grants in table.values() for g in grants for e in g.edges
            }

        before, after = pairs(old), pairs(new)
        for edge, keyset in sorted(after - before):
            logger.info("grants: %s may now use %s", edge, keyset)
        for edge, keyset in sorted(before - after):
            logger.info("grants: %s may no longer use %s", edge, keyset)

    def refresh(self) -> BrokerAuthorizer:
        """:meth:`reload` under the name the broker side uses."""
        return self.reload()

    def describe(self) -> str:
        """One line for logs: whose grants, how many keys and edges."""
        if self._loaded is None:
            return f"broker grants of {self._principal.principal}: not read yet"
        edges = {e for grants in self._table.values() for g in grants for e in g.edges}
        decrypt = sum(1 for grants in self._table.values() if any(g.allow_decrypt for g in grants))
        return (
            f"broker grants of {self._principal.principal}: {self._keysets} keysets, "
            f"{len(self._table)} keys, {len(edges)} edges, {decrypt} with RSA_DECRYPT allowed"
        )


def open_brokered(
    keyring_path: Path,
    *,
    passphrase: str | bytes | None = None,
    kek: KeyEncryptionKey | None = None,
    url: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    max_age: float | None = None,
    clock: Clock = utc_now,
) -> tuple[BrokerKeySource, BrokerAuthorizer]:
    """The key source and authorizer of the key server enrolled with ``keyring_path``,
    sharing one :class:`KeyServerPrincipal`, both synchronised with the broker once
    (raises if it cannot be reached)."""
    principal = KeyServerPrincipal(
        keyring_path, passphrase=passphrase, kek=kek, url=url, transport=transport, clock=clock
    )
    source = BrokerKeySource(principal).reload()
    return source, BrokerAuthorizer(principal, max_age=max_age).reload()


# -- the key server's own TLS certificate ------------------------------------------------------


@dataclass(frozen=True)
class ServerTlsCredentials:
    """A principal's TLS identity: its enrolment certificate and identity key (a key
    server's for TLS servers, an edge's for TLS clients)."""

    principal: PrincipalId
    certificate_pem: bytes
    #: The broker CA, which edges trust for the key server (and the key server for edges).
    ca_pem: bytes
    private_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey = field(repr=False)

    def key_pem(self) -> bytes:
        """The identity key as unencrypted PKCS#8 PEM (for TLS libraries that need bytes)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def server_tls_credentials(
    keyring: Path | Keyring,
    passphrase: str | bytes | None = None,
    *,
    kek: KeyEncryptionKey | None = None,
) -> ServerTlsCredentials:
    """The key server's certificate, the broker CA and the identity key, from its keyring.

    :class:`ConfigurationError` unless the certificate is this principal's and is for
    TLS servers (EKU serverAuth: the broker issues it to ``service`` principals).
    """
    return _tls_credentials(keyring, passphrase, kek, ExtendedKeyUsageOID.SERVER_AUTH)


def client_tls_credentials(
    keyring: Path | Keyring,
    passphrase: str | bytes | None = None,
    *,
    kek: KeyEncryptionKey | None = None,
) -> ServerTlsCredentials:
    """An edge's (any principal's) TLS client certificate, the broker CA and its identity
    key, from its keyring: what it presents to a key server over mutual TLS."""
    return _tls_credentials(keyring, passphrase, kek, ExtendedKeyUsageOID.CLIENT_AUTH)


def _tls_credentials(
    keyring: Path | Keyring,
    passphrase: str | bytes | None,
    kek: KeyEncryptionKey | None,
    usage: x509.ObjectIdentifier,
) -> ServerTlsCredentials:
    held = (
        keyring
        if isinstance(keyring, Keyring)
        else Keyring.load(Path(keyring), KekSource(passphrase=passphrase, kek=kek))
    )
    if not held.certificate_pem:
        raise ConfigurationError(f"{held.principal} has no certificate yet; enrol it first")
    cert = load_certificate(held.certificate_pem)
    if principal_of(cert) != held.principal:
        raise ConfigurationError("the keyring's certificate is for another principal")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = x509.ExtendedKeyUsage([])
    if usage not in eku:
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            raise ConfigurationError(
                f"the certificate of {held.principal} is not for TLS servers; a key server "
                "enrols as a service principal (service/<name>)"
            )
        raise ConfigurationError(f"the certificate of {held.principal} is not for TLS clients")
    # The identity key object, for a TLS library (audited: SECRET_ACCESS).
    key = held.identity.signer().private_key(SECRET_ACCESS)
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigurationError("identity keys are Ed25519 or P-256")
    if key.public_key() != cert.public_key():
        raise ConfigurationError("the keyring's certificate is not for its identity key")
    return ServerTlsCredentials(held.principal, held.certificate_pem, held.ca_pem, key)


def server_tls_files(
    keyring: Path | Keyring,
    passphrase: str | bytes | None = None,
    *,
    kek: KeyEncryptionKey | None = None,
    directory: Path | None = None,
) -> tuple[Path, Path]:
    """Write the key server's certificate and key for a TLS library that reads files.

    Returns ``(certificate file, key file)`` in ``directory`` (default: beside the
    keyring), named after the principal (``service-ks1.crt``, ``service-ks1.key``).
    The key file is unencrypted PKCS#8 PEM created with mode **0600** (written to a
    temporary 0600 file, then renamed over the old one): a TLS listener such as
    ``ssl.SSLContext.load_cert_chain`` needs the key in a file. Prefer
    :func:`server_tls_credentials` where the library takes a key object.
    """
    creds = server_tls_credentials(keyring, passphrase, kek=kek)
    if directory is None:
        if not isinstance(keyring, Path | str):
            raise ConfigurationError("pass directory= when the keyring is not a file")
        directory = Path(keyring).resolve().parent
    stem = str(creds.principal).replace("/", "-")
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    _write_private(key_path, creds.key_pem(), 0o600)
    _write_private(cert_path, creds.certificate_pem, 0o644)
    return cert_path, key_path


@dataclass(frozen=True)
class ClientTlsFiles:
    """Where :func:`client_tls_files` wrote an edge's mutual-TLS files (the ``[keyserver]``
    ``cert``, ``key`` and ``ca`` of ``keybroker edge``)."""

    principal: PrincipalId
    cert: Path
    key: Path
    ca: Path
    not_after: datetime


def client_tls_files(
    keyring: Path | Keyring,
    passphrase: str | bytes | None = None,
    *,
    kek: KeyEncryptionKey | None = None,
    directory: Path,
) -> ClientTlsFiles:
    """Write an edge's client certificate, its identity key and the broker CA for a TLS
    library that reads files (``keybroker edge``'s ``[keyserver]`` section).

    In ``directory`` (made with mode 0700 if missing): ``<kind>-<name>.crt``,
    ``<kind>-<name>.key`` — the principal's **identity** key (never a service key), as
    unencrypted PKCS#8 created with mode **0600** (temporary 0600 file renamed over the
    old one) — and ``broker-ca.pem``, the CA that issues key servers' certificates (and
    edges'). Run it again after the principal re-enrols.
    """
    creds = client_tls_credentials(keyring, passphrase, kek=kek)
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stem = str(creds.principal).replace("/", "-")
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    ca_path = directory / "broker-ca.pem"
    _write_private(key_path, creds.key_pem(), 0o600)
    _write_private(cert_path, creds.certificate_pem, 0o644)
    _write_private(ca_path, creds.ca_pem, 0o644)
    not_after = load_certificate(creds.certificate_pem).not_valid_after_utc
    return ClientTlsFiles(creds.principal, cert_path, key_path, ca_path, not_after)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically; the file never exists with another mode."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # whatever the umask did
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = [
    "BrokerAuthorizer",
    "BrokerKeySource",
    "ClientTlsFiles",
    "KeyServerPrincipal",
    "ServerTlsCredentials",
    "client_tls_credentials",
    "client_tls_files",
    "open_brokered",
    "server_tls_credentials",
    "server_tls_files",
]
