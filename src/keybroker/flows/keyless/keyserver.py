"""The key server of keyless TLS (``keybroker keyserver``).

Edges connect over mutual TLS and send framed requests (:mod:`.protocol`);
the key server performs each key operation with a private key it holds and
answers with the result or an :class:`~.codes.ErrorCode`. Operator's guide:
``docs/keyless-keyserver.md``.

How a request travels:

1. **Accept.** An ``asyncio`` server (uvloop when the CLI runs it) with an
   ``ssl.SSLContext`` that requires a client certificate from the broker CA,
   TLS 1.2 or later. After the handshake the edge's identity is the one
   ``keybroker://`` URI SAN of its certificate
   (:func:`~keybroker.pki.validation.principal_of`); a certificate without
   one is answered ``NOT_AUTHORIZED`` on its first request and dropped.
2. **Frame.** One :class:`asyncio.BufferedProtocol` per connection feeds a sans-IO
   :class:`~.protocol.ServerConnection`, which bounds outstanding requests
   (``OVERLOADED``) and frame size (an oversized or wrong-version header is
   answered and the connection closed). A malformed body is answered with its
   error code and the connection goes on.
3. **Admit** (on the event loop). PING is answered at once. A key operation
   is checked (:func:`~.operations.check_op`), then authorised
   (:class:`~.authz.Authorizer`) *before* the key is looked up, so an edge
   learns nothing about keys it was not granted.
   The key operations of one read that have an edge's usual shape come out of
   the codec as plain tuples (no objects per request); with ``pool = "inline"``
   they are admitted once per distinct (key, opcode), signed right there, and
   their replies framed together (:meth:`_EdgeConnection._operations`). TLS
   decrypts straight into the connection's buffer (a buffered protocol).
4. **Perform** (off the event loop). Admitted operations are queued and,
   once per loop iteration, handed to an executor in batches of at most
   ``max_batch`` (one per idle worker, or one if every worker is busy): a
   thread pool calling the :class:`KeySource`, or a process pool whose
   workers hold copies of the keys (:func:`~.operations.init_worker`).
   Replies are written as each batch completes, so they go out **out of
   order**; batches that complete together wake the loop once, and the
   writes of one loop iteration are coalesced into one TLS write.

**Reload** (:meth:`KeyServer.reload`, SIGHUP in the CLI, and every ``refresh``
seconds if set) builds a new *generation* — ``KeySource.reload()``,
``Authorizer.reload()``, the server certificate, and for a process pool a new
pool — and swaps it in only if all of it loads. Every request is bound to the
generation current when it arrived, so requests in flight finish with the old
keys and the old grants (broker keys and grants update in place instead, see
:mod:`.brokered`); the old generation's key source and pool are closed once its
last request is answered.

**Shutdown** (:meth:`KeyServer.aclose`, SIGTERM/SIGINT): stop accepting, stop
reading, let in-flight operations finish (up to a grace period), write their
replies, close.

**Broker keys** (``keyring`` in :class:`KeyServerConfig`): the server runs as an
enrolled ``service`` principal. Its keys come from
:class:`~.brokered.BrokerKeySource`, its grants from
:class:`~.brokered.BrokerAuthorizer`, its TLS server certificate and key from
its enrolment identity (:func:`identity_tls_context`) and the edges' CA is the
broker CA its keyring pins; both are re-read from the broker every ``refresh``
seconds (default :data:`DEFAULT_REFRESH`) and on SIGHUP.

No payload, result or key byte is ever logged, put in a metric label or shown
by a ``repr``; keys are named by hex SKI only.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import functools
import logging
import math
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import stat
import tempfile
import threading
import tomllib
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeAlias, cast, runtime_checkable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from keybroker.errors import (
    CertificateInvalid,
    ConfigurationError,
    IdentityMismatch,
    KeybrokerError,
)
from keybroker.flows.keyless.authz import Authorizer, StaticAuthorizer
from keybroker.flows.keyless.codes import (
    ECDSA_OPS,
    MAX_PENDING,
    RSA_PKCS1_OPS,
    RSA_PSS_OPS,
    SIGN_HASH,
    ErrorCode,
    Op,
)
from keybroker.flows.keyless.operations import (
    KeyOperationError,
    LocalKeyStore,
    PrivateKey,
    check_op,
    init_worker,
    key_kind,
    worker_perform,
)
from keybroker.flows.keyless.protocol import (
    DEFAULT_MAX_FRAME,
    BadRequest,
    ConnectionBroken,
    Operation,
    Request,
    RequestReceived,
    Response,
    ServerConnection,
)
from keybroker.pki.principal import PrincipalId
from keybroker.pki.validation import principal_of

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_METRICS_PORT",
    "DEFAULT_PASSPHRASE_ENV",
    "DEFAULT_PIN_ENV",
    "DEFAULT_POOL",
    "DEFAULT_REFRESH",
    "ExportableKeySource",
    "KeyServer",
    "KeyServerConfig",
    "KeyServerMetrics",
    "KeyServerSettings",
    "KeySource",
    "PemKeySource",
    "Pkcs11KeySource",
    "Pool",
    "TlsFiles",
    "build_key_server",
    "default_workers",
    "edge_identity",
    "format_address",
    "identity_tls_context",
    "load_config_file",
    "parse_address",
    "perform_batch",
    "run_keyserver",
    "serve_until_stopped",
    "server_tls_context",
]

_log = logging.getLogger("keybroker.keyless.keyserver")

#: Where the key server listens unless told otherwise (gokeyless's port).
DEFAULT_LISTEN: Final = "127.0.0.1:2407"
#: The conventional health/metrics port (gokeyless's); off unless asked for.
DEFAULT_METRICS_PORT: Final = 2406
#: The executor used unless told otherwise; chosen by measurement (see the operator's guide).
DEFAULT_POOL: Final = "thread"
#: Environment variable holding the PKCS#11 user PIN unless another is named.
DEFAULT_PIN_ENV: Final = "KEYBROKER_PKCS11_PIN"
#: Environment variable holding the keyring passphrase (broker keys) unless another is named.
DEFAULT_PASSPHRASE_ENV: Final = "KEYBROKER_KEYRING_PASSPHRASE"  # noqa: S105 - a variable name
#: Seconds between synchronisations with the broker (broker keys) unless told otherwise.
DEFAULT_REFRESH: Final = 5.0

Pool: TypeAlias = Literal["thread", "process", "inline"]
#: The executor kinds (``inline``: on the event loop itself, see :class:`KeyServerSettings`).
POOLS: Final = ("thread", "process", "inline")
#: One key operation as the executor sees it: SKI, opcode, payload.
Job: TypeAlias = tuple[bytes, int, bytes]
#: What a job yields: the result bytes, or an :class:`ErrorCode` as an ``int``.
Result: TypeAlias = bytes | int

_LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_PEM_SUFFIXES: Final = (".pem", ".key")
_PKCS8_LABEL: Final = b"-----BEGIN PRIVATE KEY-----"
#: Distinct refusals logged per connection; later ones are only counted.
_REFUSALS_LOGGED: Final = 16


def _admitted(op: Op) -> bool:
    try:
        check_op(op)
    except KeyOperationError:
        return False
    return True


#: The opcodes :func:`~.operations.check_op` lets through (looked up, not re-checked, per request).
_ADMITTED_OPS: Final = frozenset(op for op in Op if _admitted(op))
#: Metric label of each opcode (``Op.name`` is a property, slower than a lookup).
_OP_NAMES: Final = {op: op.name for op in Op}


#: Most key-server processes behind one listener.
MAX_PROCESSES: Final = 64


def default_workers() -> int:
    """Cores this process may run on (the default number of workers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------
# Key sources
# ---------------------------------------------------------------------------


@runtime_checkable
class KeySource(Protocol):
    """Where the key server's private keys live, named by SKI.

    The contract, for anyone adding a source (the broker-delivered one, say):

    * :meth:`perform` is called from executor threads, concurrently: it must
      be thread-safe (or serialise itself, as PKCS#11 does), and it raises
      :class:`~.operations.KeyOperationError` with the wire code for every
      failure a peer may cause (``KEY_NOT_FOUND``, ``UNEXPECTED_OPCODE``,
      ``FORMAT``, ``CRYPTO``…), with :mod:`.operations`' meaning for each
      opcode. Anything else it raises is answered ``INTERNAL`` and logged.
    * :meth:`reload` returns the source to use *from now on* and must not
      change what ``self`` serves: requests already admitted finish on
      ``self``. Return a new object (or ``self`` if nothing can change). On a
      bad new key set raise :class:`~keybroker.errors.ConfigurationError`;
      the server then keeps the old source.
    * :meth:`skis` and :meth:`describe` are cheap and show no key material.
    * An optional ``close()`` is called once the server no longer uses the
      source (after a reload, when its last request is answered, or at
      shutdown).

    A source that can hand its keys to worker processes also implements
    :class:`ExportableKeySource`; only those work with ``pool = "process"``.
    """

    def skis(self) -> Sequence[bytes]:
        """The SKIs of the keys this source serves."""
        ...

    def perform(self, ski: bytes, op: Op, payload: bytes) -> bytes:
        """Do ``op`` with the key ``ski`` on ``payload``; ``KeyOperationError`` on failure."""
        ...

    def reload(self) -> KeySource:
        """The source to use from now on (see the class docstring)."""
        ...

    def describe(self) -> str:
        """One line for logs: kind of source, where, how many keys."""
        ...


@runtime_checkable
class FastSigningKeySource(KeySource, Protocol):
    """A key source that can hand out the function it signs digests with (immutable
    sources only: the key server keeps what it gets for one batch of requests)."""

    def fast_signer(self, ski: bytes, op: Op) -> tuple[int, Callable[[bytes], bytes]] | None:
        """The digest length and signing function for ``op`` with ``ski``, or ``None``."""
        ...


@runtime_checkable
class ExportableKeySource(KeySource, Protocol):
    """A :class:`KeySource` whose keys may be copied into process-pool workers."""

    def worker_keys(self) -> Mapping[bytes, bytes]:
        """SKI → unencrypted PKCS#8 DER, for :func:`~.operations.init_worker`."""
        ...


@dataclass(frozen=True, slots=True)
class _PemKey:
    path: Path
    key: PrivateKey = field(repr=False)
    der: bytes = field(repr=False)


def _check_private_file(path: Path, what: str) -> None:
    """ConfigurationError unless ``path`` is a regular file only its owner can read."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigurationError(f"{what}: cannot read {path} ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(f"{what}: {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ConfigurationError(
            f"{what}: {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
            "chmod 600 it"
        )


def _load_pem_key(path: Path, what: str) -> _PemKey:
    _check_private_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{what}: cannot read {path} ({exc.strerror})") from None
    if data.count(b"-----BEGIN ") != 1 or _PKCS8_LABEL not in data:
        raise ConfigurationError(
            f"{what}: {path} is not one unencrypted PKCS#8 PEM key ({_PKCS8_LABEL.decode()})"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigurationError(
            f"{what}: {path} is not a readable unencrypted PKCS#8 private key"
        ) from None
    if key_kind(key) is None:
        raise ConfigurationError(
            f"{what}: {path} holds a {type(key).__name__}; keyless serves RSA, EC and Ed25519"
        )
    private = cast("PrivateKey", key)
    der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _PemKey(path, private, der)


#: A digest length and a function signing such a digest.
_Signer: TypeAlias = tuple[int, Callable[[bytes], bytes]]


def _no_signer(digest: bytes) -> bytes:  # pragma: no cover - guarded by the length -1
    raise AssertionError("never called")


_NO_SIGNER: Final[_Signer] = (-1, _no_signer)


def _fast_signer(key: PrivateKey, op: Op) -> _Signer | None:
    """For a digest-signing ``op`` that ``key`` answers: the digest length, and a function
    signing a digest of that length as :func:`~.operations.perform` does (ECDSA; RSA-PSS
    with MGF1 and a salt as long as the digest; RSA PKCS#1 v1.5), its algorithm objects
    made here once (they are immutable, so threads share them). ``None`` otherwise."""
    name = SIGN_HASH.get(op)
    algorithm: hashes.HashAlgorithm | None = {
        "sha1": hashes.SHA1(),  # noqa: S303 - the opcode asks for it, as in operations
        "sha224": hashes.SHA224(),
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }.get(name or "")
    if algorithm is None:
        return None
    prehashed = utils.Prehashed(algorithm)
    if op in ECDSA_OPS and isinstance(key, ec.EllipticCurvePrivateKey):
        ecdsa = ec.ECDSA(prehashed)
        return algorithm.digest_size, lambda digest: key.sign(digest, ecdsa)
    if isinstance(key, rsa.RSAPrivateKey) and op in RSA_PSS_OPS | RSA_PKCS1_OPS:
        scheme: padding.AsymmetricPadding = padding.PKCS1v15()
        if op in RSA_PSS_OPS:
            scheme = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
        return algorithm.digest_size, lambda digest: key.sign(digest, scheme, prehashed)
    return None


class PemKeySource:
    """Keys from unencrypted PKCS#8 PEM files: every ``*.pem`` / ``*.key`` in a directory
    (names starting with ``.`` are skipped) and/or the files listed.

    Each file holds one key, readable by its owner only (mode 0600 or
    stricter); its SKI is computed from the key. Immutable: :meth:`reload`
    reads the files again into a *new* source. A directory with no key, a
    file that is not such a key, or two files with the same key are
    :class:`~keybroker.errors.ConfigurationError`.
    """

    __slots__ = ("_directory", "_files", "_names", "_pem", "_signers", "_store")

    def __init__(
        self, directory: str | Path | None = None, files: Iterable[str | Path] = ()
    ) -> None:
        """Read the keys now; ``ConfigurationError`` (naming ``keys_dir``) if any is unusable."""
        self._directory = Path(directory) if directory is not None else None
        self._files = tuple(Path(path) for path in files)
        paths = list(self._files)
        if self._directory is not None:
            try:
                entries = sorted(self._directory.iterdir())
            except OSError as exc:
                raise ConfigurationError(
                    f"keys_dir: cannot list {self._directory} ({exc.strerror})"
                ) from None
            paths += [
                entry
                for entry in entries
                if entry.suffix.lower() in _PEM_SUFFIXES
                and not entry.name.startswith(".")
                and entry.is_file()
            ]
        store = LocalKeyStore()
        pem: dict[bytes, _PemKey] = {}
        for path in paths:
            loaded = _load_pem_key(path, "keys_dir")
            ski = store.add(loaded.key)
            if ski in pem:
                raise ConfigurationError(
                    f"keys_dir: {path} and {pem[ski].path} hold the same key ({ski.hex()})"
                )
            pem[ski] = loaded
        if not pem:
            where = self._directory if self._directory is not None else "the files given"
            raise ConfigurationError(f"keys_dir: no PKCS#8 PEM key (*.pem, *.key) in {where}")
        self._store = store
        self._pem = pem
        self._names = {ski: loaded.path.name for ski, loaded in pem.items()}
        #: (SKI, opcode) -> :func:`_fast_signer`'s answer, learnt at its first success.
        self._signers: dict[tuple[bytes, int], _Signer] = {}

    def skis(self) -> list[bytes]:
        """The SKIs of the keys read, sorted."""
        return self._store.skis()

    def perform(self, ski: bytes, op: Op, payload: bytes) -> bytes:
        """:meth:`~.operations.LocalKeyStore.perform`.

        Once a digest signature with a key and an opcode has succeeded, the next ones with a
        digest of the right length go straight to the key with the padding and hash objects
        made once (:func:`_fast_signer`); anything else, and any failure, takes the full
        path, which gives the same result or the same error.
        """
        if type(ski) is not bytes:
            return self._store.perform(ski, op, payload)
        signer = self._signers.get((ski, op))
        if signer is not None:
            size, sign = signer
            if len(payload) == size:
                try:
                    return sign(payload)
                except (ValueError, UnsupportedAlgorithm):
                    pass  # the full path answers with its exact error
            return self._store.perform(ski, op, payload)
        result = self._store.perform(ski, op, payload)
        loaded = self._pem.get(ski)
        if loaded is not None:
            self._signers[ski, op] = _fast_signer(loaded.key, Op(op)) or _NO_SIGNER
        return result

    def fast_signer(self, ski: bytes, op: Op) -> tuple[int, Callable[[bytes], bytes]] | None:
        """The shortcut :meth:`perform` takes for ``op`` with the key ``ski`` once one has
        succeeded: the digest length and a function signing such a digest (it may raise
        where :meth:`perform` would answer an error; call :meth:`perform` then). ``None``
        until then, or if there is none."""
        signer = self._signers.get((ski, op))
        return None if signer is None or signer is _NO_SIGNER else signer

    def reload(self) -> PemKeySource:
        """A new source read from the same directory and files."""
        return PemKeySource(self._directory, self._files)

    def describe(self) -> str:
        """``pem <where>: N keys (file: ski, …)``."""
        where = str(self._directory) if self._directory is not None else "files"
        keys = ", ".join(f"{self._names[ski]}={ski.hex()}" for ski in self.skis())
        return f"pem {where}: {len(self._pem)} keys ({keys})"

    def worker_keys(self) -> dict[bytes, bytes]:
        """SKI → PKCS#8 DER of every key, for process-pool workers."""
        return {ski: loaded.der for ski, loaded in self._pem.items()}

    def __repr__(self) -> str:
        return f"<PemKeySource {self.describe()}>"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("PemKeySource cannot be pickled; give workers worker_keys()")


class Pkcs11KeySource:
    """The keys of one PKCS#11 token (:class:`~.pkcs11keys.Pkcs11KeyStore`).

    Keys never leave the token, so this source cannot feed a process pool; its
    calls are serialised by the process-wide PKCS#11 lock (python-pkcs11 is
    not thread-safe), so one or two threads are as fast as many. The PIN is
    kept (it is needed to log in again on :meth:`reload`) and never shown.
    :meth:`reload` opens a second store on the shared login, finds the keys
    afresh, and returns it as a new source; the server closes the old one
    when its requests are answered.
    """

    __slots__ = ("_module", "_pin", "_store", "_token")

    def __init__(self, module_path: str | None, token_label: str, user_pin: str) -> None:
        """Log in and find the token's keys; ``ConfigurationError`` on a bad module/token/PIN."""
        from keybroker.flows.keyless.pkcs11keys import Pkcs11KeyStore

        self._module = module_path
        self._token = token_label
        self._pin = user_pin
        self._store = Pkcs11KeyStore(module_path, token_label, user_pin)
        if not len(self._store):
            self._store.close()
            raise ConfigurationError(
                f"pkcs11_token: no signing key whose CKA_ID is an SKI in token {token_label!r}"
            )

    def skis(self) -> list[bytes]:
        """The SKIs of the keys found in the token, sorted."""
        return self._store.skis()

    def perform(self, ski: bytes, op: Op, payload: bytes) -> bytes:
        """:meth:`~.pkcs11keys.Pkcs11KeyStore.perform` (RSA_DECRYPT is always refused)."""
        return self._store.perform(ski, op, payload)

    def reload(self) -> Pkcs11KeySource:
        """A new source on the same token, its keys found again."""
        return Pkcs11KeySource(self._module, self._token, self._pin)

    def describe(self) -> str:
        """``pkcs11 token 'label': N keys (ski, …)``."""
        keys = ", ".join(ski.hex() for ski in self.skis())
        return f"pkcs11 token {self._token!r}: {len(self.skis())} keys ({keys})"

    def close(self) -> None:
        """Release the token login (idempotent)."""
        self._store.close()

    def __repr__(self) -> str:
        return f"<Pkcs11KeySource {self.describe()}>"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("Pkcs11KeySource cannot be pickled")


# ---------------------------------------------------------------------------
# Executors
# ---------------------------------------------------------------------------


def perform_batch(keys: KeySource | None, jobs: Sequence[Job]) -> list[Result]:
    """Run ``jobs`` in order with ``keys`` (``None``: this worker's :func:`init_worker` keys).

    Never raises: each job yields its result bytes or an :class:`ErrorCode`.
    """
    results: list[Result] = []
    for ski, op, payload in jobs:
        try:
            if keys is None:
                results.append(worker_perform(ski, op, payload))
            else:
                results.append(keys.perform(ski, op if type(op) is Op else Op(op), payload))
        except KeyOperationError as exc:
            results.append(int(exc.code))
        except Exception as exc:  # every job is owed an answer
            # The type only: a foreign exception's message might quote its inputs.
            _log.error(
                "%s with key %s failed unexpectedly (%s)",
                Op(op).name,
                ski.hex(),
                type(exc).__name__,
            )
            results.append(int(ErrorCode.INTERNAL))
    return results


def _process_batch(jobs: Sequence[Job]) -> list[Result]:
    """What a process-pool worker runs: one batch on its own copy of the keys."""
    return perform_batch(None, jobs)


def _process_ready() -> int:
    """A no-op run once per new worker, so that a worker that cannot start is seen at once."""
    return os.getpid()


def _init_process_worker(keys: Mapping[bytes, bytes]) -> None:
    """Process-pool initializer: load the keys; live exactly as long as the key server.

    A terminal's Ctrl-C and a service manager's SIGTERM reach the whole
    process group, but the key server decides when work stops (its graceful
    shutdown lets queued operations finish), so workers ignore them. In
    exchange a worker exits by itself as soon as the key server's process is
    gone, however it went (even SIGKILL): no orphan keeps a copy of the keys.
    """
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:

        def exit_with_parent() -> None:
            parent.join()  # returns when the parent's end of our sentinel pipe closes
            os._exit(0)

        threading.Thread(target=exit_with_parent, name="keyless-parent", daemon=True).start()
    init_worker(keys)


def _process_pool(workers: int, keys: Mapping[bytes, bytes]) -> concurrent.futures.Executor:
    context = multiprocessing.get_context("forkserver")
    # Fork from a clean server process (never from this one, whose threads may hold locks),
    # with this module already imported there.
    context.set_forkserver_preload([__name__])
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_process_worker, initargs=(dict(keys),)
    )


#: Called on the loop with a job's result and the loop's time of delivery.
Callback: TypeAlias = Callable[[Result, float], None]


class _Dispatcher:
    """Queues admitted jobs and hands them to an executor in batches, once per loop iteration.

    Jobs queued in one iteration are split into batches of at most
    ``max_batch`` jobs, as many as there are idle workers (workers minus the
    batches submitted and not yet delivered; one batch if none is idle: the
    jobs wait for a worker anyway, and a bigger batch means fewer hand-offs).
    Each batch's results are delivered on the loop as soon as that batch is
    done; batches that finish while the loop has not yet taken the earlier ones
    are delivered together: one cross-thread wake-up for all, one clock reading.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        make_executor: Callable[[], concurrent.futures.Executor],
        run_batch: Callable[[Sequence[Job]], list[Result]],
        *,
        workers: int,
        max_batch: int,
        owns_executor: bool,
        inline: bool = False,
    ) -> None:
        self._loop = loop
        self._inline = inline
        self._make_executor = make_executor
        self._executor = make_executor()
        self._run_batch = run_batch
        self._workers = workers
        self._max_batch = max_batch
        self._owns_executor = owns_executor
        self._jobs: list[Job] = []
        self._callbacks: list[Callback] = []
        self._scheduled = False
        self._closed = False
        #: Batches done, waiting for the loop (appended by executor threads).
        self._finished: deque[tuple[list[Callback], concurrent.futures.Executor, Any]] = deque()
        #: Whether a wake-up of the loop for ``_finished`` is on its way.
        self._waking = False
        #: Batches submitted and not yet delivered (on the loop only).
        self._running = 0

    @property
    def inline(self) -> bool:
        """Whether jobs run on the loop itself (then :meth:`run_now` may be used)."""
        return self._inline

    def run_now(self, jobs: Sequence[Job]) -> list[Result]:
        """Run ``jobs`` at once on the calling thread (an inline dispatcher's batch)."""
        return self._run_batch(jobs)

    async def warm_up(self) -> None:
        """Start every worker of a process pool and check it loaded its keys."""
        futures = [self._executor.submit(_process_ready) for _ in range(self._workers)]
        await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))

    def submit(self, job: Job, callback: Callback) -> None:
        """Queue ``job``; ``callback(result)`` runs on the loop when it is done."""
        self._jobs.append(job)
        self._callbacks.append(callback)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        jobs, callbacks = self._jobs, self._callbacks
        self._jobs, self._callbacks = [], []
        if self._inline:
            results = self._run_batch(jobs)  # never raises: each job gets a result
            now = self._loop.time()
            for callback, result in zip(callbacks, results, strict=True):
                callback(result, now)
            return
        idle = min(self._workers, max(1, self._workers - self._running))
        size = min(self._max_batch, max(1, math.ceil(len(jobs) / idle)))
        executor = self._executor
        for start in range(0, len(jobs), size):
            batch = jobs[start : start + size]
            waiting = callbacks[start : start + size]
            try:
                future = executor.submit(self._run_batch, batch)
            except (RuntimeError, concurrent.futures.BrokenExecutor) as exc:
                self._failed(waiting, exc, executor)
                continue
            self._running += 1
            future.add_done_callback(functools.partial(self._done, waiting, executor))

    def _done(
        self,
        callbacks: list[Callback],
        executor: concurrent.futures.Executor,
        future: concurrent.futures.Future[Any],
    ) -> None:
        # In an executor thread: hand the batch to the loop, waking it unless a wake-up is
        # already on its way. The append comes before the test, and the loop clears the flag
        # before it empties the queue, so a batch is never left behind (the GIL orders both).
        self._finished.append((callbacks, executor, future))
        if not self._waking:
            self._waking = True
            with contextlib.suppress(RuntimeError):  # the loop is gone at the end of shutdown
                self._loop.call_soon_threadsafe(self._deliver_finished)

    def _deliver_finished(self) -> None:
        self._waking = False
        now = self._loop.time()
        finished = self._finished
        while finished:
            self._deliver(*finished.popleft(), now)

    def _deliver(
        self,
        callbacks: list[Callback],
        executor: concurrent.futures.Executor,
        future: concurrent.futures.Future[Any],
        now: float,
    ) -> None:
        self._running -= 1
        try:
            results: list[Result] = future.result()
        except BaseException as exc:
            self._failed(callbacks, exc, executor)
            return
        for callback, result in zip(callbacks, results, strict=True):
            callback(result, now)

    def _failed(
        self,
        callbacks: list[Callback],
        exc: BaseException,
        executor: concurrent.futures.Executor,
    ) -> None:
        _log.error(
            "a batch of %d key operations failed in the executor (%s)",
            len(callbacks),
            type(exc).__name__,
        )
        # Every batch of a dead pool fails; only the first replaces it.
        if (
            isinstance(exc, BrokenProcessPool)
            and self._owns_executor
            and not self._closed
            and executor is self._executor
        ):
            _log.warning("a key worker process died; starting a new pool")
            executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._make_executor()
        now = self._loop.time()
        for callback in callbacks:
            callback(int(ErrorCode.INTERNAL), now)

    def close(self) -> None:
        """Stop the executor if this dispatcher owns it (queued batches still run)."""
        self._closed = True
        if self._owns_executor:
            self._executor.shutdown(wait=False)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


class KeyServerMetrics(Collector):
    """The key server's counters, kept by the event loop, exported for Prometheus.

    Plain integers updated on the loop (no locks on the request path), turned
    into metric families when scraped. Labels are opcode names, result names
    (``ok`` or an error code) and reasons — never SKIs, edges or payloads.
    """

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._buckets: dict[str, list[int]] = {}
        self._sums: defaultdict[str, float] = defaultdict(float)
        self.connections_open = 0
        self.connections_accepted = 0
        self.connections_closed: defaultdict[str, int] = defaultdict(int)
        self.pending = 0
        self.keys_loaded = 0
        self.generation = 0
        self.reloads: defaultdict[str, int] = defaultdict(int)

    def observe(self, op: str, result: str, seconds: float, count: int = 1) -> None:
        """Count ``count`` answered requests, each with this latency."""
        self.requests[op, result] += count
        counts = self._buckets.get(op)
        if counts is None:
            counts = self._buckets[op] = [0] * (len(_LATENCY_BUCKETS) + 1)
        counts[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += count
        self._sums[op] += seconds * count

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        """The metric families (called by ``prometheus_client`` on a scrape)."""
        requests = CounterMetricFamily(
            "keyless_requests",
            "Requests answered, by opcode and result (ok or the error code).",
            labels=["op", "result"],
        )
        for (op, result), count in sorted(dict(self.requests).items()):
            requests.add_metric([op, result], count)
        yield requests
        latency = HistogramMetricFamily(
            "keyless_request_duration_seconds",
            "Time from a request's arrival to its reply being queued for writing.",
            labels=["op"],
        )
        for op, counts in sorted(dict(self._buckets).items()):
            cumulative, total = [], 0
            for bound, count in zip((*_LATENCY_BUCKETS, math.inf), counts, strict=True):
                total += count
                cumulative.append((_bound(bound), total))
            latency.add_metric([op], cumulative, self._sums[op])
        yield latency
        yield GaugeMetricFamily(
            "keyless_connections", "Edge connections open.", value=self.connections_open
        )
        yield CounterMetricFamily(
            "keyless_connections_accepted",
            "Edge connections that completed the TLS handshake.",
            value=self.connections_accepted,
        )
        closed = CounterMetricFamily(
            "keyless_connections_closed", "Edge connections closed, by reason.", labels=["reason"]
        )
        for reason, count in sorted(dict(self.connections_closed).items()):
            closed.add_metric([reason], count)
        yield closed
        yield GaugeMetricFamily(
            "keyless_pending_requests",
            "Key operations admitted and not yet answered.",
            value=self.pending,
        )
        yield GaugeMetricFamily(
            "keyless_keys_loaded", "Keys the current key source serves.", value=self.keys_loaded
        )
        yield GaugeMetricFamily(
            "keyless_config_generation",
            "Configuration generation (1 at start, +1 per successful reload).",
            value=self.generation,
        )
        reloads = CounterMetricFamily(
            "keyless_reloads", "Reloads attempted, by result.", labels=["result"]
        )
        for result in ("ok", "failed"):
            reloads.add_metric([result], self.reloads[result])
        yield reloads


def _bound(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


# ---------------------------------------------------------------------------
# TLS and identity
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The server certificate chain and key, and the CA that issues edge certificates."""

    cert: Path
    key: Path
    client_ca: Path
    #: The key file's password, if it is encrypted (held in memory only).
    password: bytes | None = field(default=None, repr=False)


def _load_server_chain(context: ssl.SSLContext, files: TlsFiles) -> None:
    _check_private_file(files.key, "key")
    try:
        context.load_cert_chain(files.cert, files.key, password=files.password)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cert/key: cannot use {files.cert} with {files.key} "
            f"({getattr(exc, 'reason', None) or exc})"
        ) from None


def server_tls_context(files: TlsFiles) -> ssl.SSLContext:
    """The key server's TLS context: mutual TLS, client certificates from ``client_ca`` only.

    TLS 1.2 or later; TLS 1.2 restricted to ECDHE with AEAD ciphers. Raises
    :class:`~keybroker.errors.ConfigurationError` naming ``cert``, ``key`` or
    ``client_ca`` when a file is unusable.
    """
    context = _server_context()
    _load_server_chain(context, files)
    try:
        context.load_verify_locations(cafile=files.client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"client_ca: cannot use {files.client_ca} as the edges' CA "
            f"({getattr(exc, 'reason', None) or exc})"
        ) from None
    return context


def _server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def identity_tls_context(
    certificate_pem: bytes,
    private_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
    client_ca_pem: bytes,
) -> ssl.SSLContext:
    """The key server's TLS context from key objects: an enrolled principal's identity.

    As :func:`server_tls_context`, with the certificate, its key and the edges' CA (the
    broker CA) given as PEM bytes and a key object. ``ssl`` loads a key only from a file,
    so the key is written **encrypted** (PKCS#8 under a random password held in memory)
    to a 0600 file in a private (0700) temporary directory, loaded, and the directory is
    deleted at once: the key is never on disk in clear, and not on disk at all once the
    context holds it.
    """
    context = _server_context()
    password = secrets.token_bytes(32)
    encrypted = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    directory = Path(tempfile.mkdtemp(prefix="keybroker-keyserver-"))  # mode 0700
    try:
        cert = directory / "server.crt"
        key = directory / "server.key"
        cert.write_bytes(certificate_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as sink:
            sink.write(encrypted)
        _load_server_chain(context, TlsFiles(cert, key, cert, password))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    try:
        context.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"client_ca: the broker CA of the keyring is unusable "
            f"({getattr(exc, 'reason', None) or type(exc).__name__})"
        ) from None
    return context


def edge_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PrincipalId:
    """The broker principal named by the peer's certificate (its one ``keybroker://`` URI SAN).

    Raises :class:`~keybroker.errors.KeybrokerError` (an
    :class:`~keybroker.errors.IdentityMismatch` for a certificate without a
    usable keybroker URI) when there is none.
    """
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise IdentityMismatch("no client certificate")
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        raise CertificateInvalid("an unreadable client certificate") from None
    return principal_of(certificate)


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyServerSettings:
    """How the server runs (everything but where the keys, grants and certificates are)."""

    #: Executor workers (threads or processes).
    workers: int = field(default_factory=default_workers)
    #: ``"thread"``: a thread pool calling the key source; ``"process"``: worker processes
    #: holding copies of the keys (exportable sources only); ``"inline"``: the event loop
    #: signs itself, all the jobs of one loop iteration in turn (no hand-off at all: for
    #: one process per core, ``processes`` > 1, where the GIL hand-offs of a pool cost
    #: about a third of an ECDSA signature; a slow signature delays that process's other
    #: connections, so not for RSA keys on a single process).
    pool: Pool = DEFAULT_POOL
    #: Requests one connection may have outstanding (more are answered ``OVERLOADED``).
    max_pending: int = MAX_PENDING
    #: Largest request body accepted (a larger header closes the connection).
    max_frame: int = DEFAULT_MAX_FRAME
    #: Edge connections at once; more are closed right after the handshake.
    max_connections: int = 1024
    #: Seconds a connection may sit with nothing outstanding and nothing received.
    idle_timeout: float = 300.0
    #: Seconds a TLS handshake may take.
    handshake_timeout: float = 10.0
    #: Seconds shutdown waits for in-flight operations.
    shutdown_grace: float = 10.0
    #: Most jobs per executor batch; ``None``: 16 for threads, 64 for processes (measured:
    #: fewer cross-thread wake-ups and GIL hand-offs, or pickling round trips, per job).
    #: The jobs of one loop iteration are split among the idle workers (all of them in one
    #: batch, up to this size, when every worker is busy: they would wait anyway).
    max_batch: int | None = None

    def __post_init__(self) -> None:
        if type(self.workers) is not int or not 1 <= self.workers <= 256:
            raise ConfigurationError("workers: must be an integer from 1 to 256")
        if self.pool not in POOLS:
            raise ConfigurationError(
                f"pool: must be 'thread', 'process' or 'inline', not {self.pool!r}"
            )
        if type(self.max_pending) is not int or not 1 <= self.max_pending <= MAX_PENDING:
            raise ConfigurationError(f"max_pending: must be an integer from 1 to {MAX_PENDING}")
        if type(self.max_connections) is not int or self.max_connections < 1:
            raise ConfigurationError("max_connections: must be a positive integer")
        for name in ("idle_timeout", "handshake_timeout", "shutdown_grace"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ConfigurationError(f"{name}: must be a positive number of seconds")
        if self.max_batch is not None and (
            type(self.max_batch) is not int or not 1 <= self.max_batch <= 1024
        ):
            raise ConfigurationError("max_batch: must be an integer from 1 to 1024")
        try:
            ServerConnection(self.max_pending, self.max_frame)
        except ConfigurationError as exc:
            raise ConfigurationError(f"max_frame: {exc}") from None

    @property
    def batch(self) -> int:
        """The effective batch size."""
        if self.max_batch is not None:
            return self.max_batch
        return 16 if self.pool == "thread" else 64


# ---------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------


class _Generation:
    """One consistent configuration: key source, authorizer and the dispatcher for the keys."""

    __slots__ = ("authorizer", "dispatcher", "in_flight", "key_count", "keys", "number", "retired")

    def __init__(
        self, number: int, keys: KeySource, authorizer: Authorizer, dispatcher: _Dispatcher
    ) -> None:
        self.number = number
        self.keys = keys
        self.authorizer = authorizer
        self.dispatcher = dispatcher
        self.key_count = len(keys.skis())
        self.in_flight = 0
        self.retired = False


#: Bytes of the read buffer: what TLS decrypts in one go (more waits for the next loop
#: iteration); as much as the TLS layer reads ahead before it stops reading.
_READ_BUFFER: Final = 256 * 1024


class _EdgeConnection(asyncio.BufferedProtocol):
    """One edge's connection: bytes in, events out, replies written as operations finish.

    A buffered protocol: TLS decrypts straight into a buffer, every record available at
    once (uvloop's other path allocates a 256 KiB object per TLS record and ends each read
    with an exception: a tenth of a P-256 signature's cost per request, measured). The
    buffer is the server's, one for all its connections: the transport calls
    :meth:`get_buffer`, fills it and calls :meth:`buffer_updated` in one go on the loop's
    thread, and :meth:`buffer_updated` copies the bytes out before returning (to
    :meth:`data_received`), so no two connections ever hold it at once.
    """

    def __init__(self, server: KeyServer) -> None:
        self._server = server
        self._read_buffer = server.read_buffer
        self._loop = server.loop
        self._metrics = server.metrics
        settings = server.settings
        self._conn = ServerConnection(settings.max_pending, settings.max_frame)
        self._idle_timeout = settings.idle_timeout
        self._transport: asyncio.Transport | None = None
        self._edge: PrincipalId | None = None
        self.peer = "?"
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self.closed = False
        self._closing = False
        self._reading = True
        self._write_paused = False
        self.close_reason = "peer"
        self.in_flight = 0
        self._last_active = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._refusals: set[tuple[bytes, Op]] = set()

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """After the TLS handshake: identify the edge, apply limits, start the idle timer."""
        self._transport = cast("asyncio.Transport", transport)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self.peer = f"{peername[0]}:{peername[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._last_active = self._loop.time()
        if not self._server.connection_opened(self):
            self._abandon("limit")
            return
        try:
            self._edge = edge_identity(transport.get_extra_info("ssl_object"))
        except KeybrokerError as exc:
            _log.warning(
                "connection from %s: refusing its requests, its certificate names no "
                "keybroker principal (%s)",
                self.peer,
                exc,
            )
        else:
            _log.debug("connection from %s: edge %s", self.peer, self._edge)
        self._idle_handle = self._loop.call_later(self._idle_timeout, self._check_idle)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where TLS writes what it decrypts (all of it, or as much as fits)."""
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` decrypted bytes are in the buffer: take them."""
        self.data_received(bytes(self._read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        """Turn bytes into requests and answer or dispatch each."""
        if self._closing:
            return
        now = self._loop.time()
        self._last_active = now
        operations: list[Operation] = []
        events = self._conn.receive_operations(data, operations)
        if operations:
            self._operations(operations, now)
        for event in events:
            if isinstance(event, RequestReceived):
                self._request(event.request, now)
            elif isinstance(event, BadRequest):
                self._answer(event.reply(), "INVALID", now)
            elif isinstance(event, ConnectionBroken):
                self._answer(event.reply(), "INVALID", now)
                _log.info(
                    "connection from %s: closed after a frame it cannot trust (%s)",
                    self.peer,
                    event.error_code.name,
                )
                self._abandon("broken")
                return
        if (events or operations) and self._edge is None:
            self._abandon("unauthenticated")

    def eof_received(self) -> bool:
        """The edge closed its side: close ours too (replies still owed are dropped)."""
        return False

    def pause_writing(self) -> None:
        """The edge does not read its replies: stop reading its requests until it does."""
        self._write_paused = True
        self._set_reading(False)

    def resume_writing(self) -> None:
        """Replies drained: read requests again (unless shutting down)."""
        self._write_paused = False
        if not self._closing and not self._server.stopping:
            self._set_reading(True)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; operations still running are answered into the void."""
        self.closed = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if exc is not None and self.close_reason == "peer":
            self.close_reason = "error"
        self._server.connection_closed(self)

    # -- requests ----------------------------------------------------------------------

    def _request(self, request: Request, now: float) -> None:
        op = request.op
        if self._edge is not None and op is Op.PING:
            self._answer(Response.pong(request.id, request.payload), op.name, now)
            return
        self._submit(request.id, op, request.ski, request.payload, now)

    def _admit(self, authorizer: Authorizer, ski: bytes | None, op: Op) -> ErrorCode | None:
        """``None`` if this edge may have ``op`` done with the key ``ski``, else the error
        to answer with (checked before the key is looked up)."""
        if self._edge is None:
            return ErrorCode.NOT_AUTHORIZED
        try:
            checked = op if op in _ADMITTED_OPS else check_op(op)
            if ski is None:
                raise KeyOperationError(f"{op.name} without an SKI", code=ErrorCode.FORMAT)
            authorizer.check(self._edge, ski, checked)
        except KeyOperationError as exc:
            if exc.code is ErrorCode.NOT_AUTHORIZED and ski is not None:
                self._log_refusal(ski, op, exc)
            return exc.code
        except Exception as exc:  # an authorizer's bug: refuse, keep the connection
            _log.error("authorizer failed on %s (%s)", op.name, type(exc).__name__)
            return ErrorCode.INTERNAL
        return None

    def _submit(
        self, request_id: int, op: Op, ski: bytes | None, payload: bytes, now: float
    ) -> None:
        """Admit one key operation and hand it to the dispatcher (or answer its refusal)."""
        generation = self._server.generation
        refused = self._admit(generation.authorizer, ski, op)
        if refused is not None or ski is None:
            self._answer(
                Response.error(request_id, ErrorCode.FORMAT if refused is None else refused),
                _OP_NAMES[op],
                now,
            )
            return
        generation.in_flight += 1
        self.in_flight += 1
        self._metrics.pending += 1
        generation.dispatcher.submit(
            (ski, op, payload),
            functools.partial(self._completed, (request_id, op, now, generation)),
        )

    def _operations(self, operations: list[Operation], now: float) -> None:
        """The key operations of one read. With an inline dispatcher they are performed
        here and now, in one batch: each distinct (key, opcode) is admitted once (nothing
        can change the grants while this runs), the results are framed together and
        counted per opcode (latency: from the read to the end of the batch, the same for
        all). Otherwise each is submitted as any other request."""
        generation = self._server.generation
        dispatcher = generation.dispatcher
        if not dispatcher.inline:
            for request_id, op, ski, payload in operations:
                self._submit(request_id, op, ski, payload, now)
            return
        authorizer = generation.authorizer
        keys = generation.keys
        fast_signer = keys.fast_signer if isinstance(keys, FastSigningKeySource) else None
        #: (SKI, opcode) -> the refusal, or None and the digest length and signing function
        #: to use (-1 and None: the full path).
        plans: dict[tuple[bytes, Op], tuple[ErrorCode | None, int, Callable[[bytes], bytes] | None]]
        plans = {}
        ids: list[int] = []
        ops: list[Op] = []
        results: list[bytes] = []
        for request_id, op, ski, payload in operations:
            try:
                refused, size, sign = plans[ski, op]
            except KeyError:
                refused = self._admit(authorizer, ski, op)
                signer = None
                if refused is None and fast_signer is not None:
                    signer = fast_signer(ski, op)
                size, sign = signer if signer is not None else (-1, None)
                plans[ski, op] = (refused, size, sign)
            if refused is not None:
                self._answer(Response.error(request_id, refused), _OP_NAMES[op], now)
                continue
            result: Result
            if sign is not None and len(payload) == size:
                try:
                    result = sign(payload)
                except Exception:  # the full path answers with its exact error
                    result = dispatcher.run_now([(ski, op, payload)])[0]
            else:
                result = dispatcher.run_now([(ski, op, payload)])[0]  # never raises
            if isinstance(result, bytes):
                ids.append(request_id)
                ops.append(op)
                results.append(result)
            else:
                self._answer(Response.error(request_id, ErrorCode(result)), _OP_NAMES[op], now)
        if not ids:
            return
        seconds = self._loop.time() - now
        self._out.append(self._conn.send_oks(ids, results))
        for op, count in Counter(ops).items():
            self._metrics.observe(_OP_NAMES[op], "ok", seconds, count)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _completed(
        self, admitted: tuple[int, Op, float, _Generation], result: Result, now: float
    ) -> None:
        request_id, op, started, generation = admitted
        self.in_flight -= 1
        metrics = self._metrics
        metrics.pending -= 1
        self._server.operation_done(generation)
        if self.closed or self._closing:
            metrics.requests[_OP_NAMES[op], "abandoned"] += 1
            return
        self._last_active = now
        if isinstance(result, bytes):
            # The common reply, framed without a Response object (the same bytes and checks).
            frame = self._conn.send_ok(request_id, result)
            metrics.observe(_OP_NAMES[op], "ok", now - started)
            self._write(frame)
        else:
            self._answer(Response.error(request_id, ErrorCode(result)), _OP_NAMES[op], started)

    def _log_refusal(self, ski: bytes, op: Op, exc: KeyOperationError) -> None:
        if len(self._refusals) >= _REFUSALS_LOGGED or (ski, op) in self._refusals:
            return
        self._refusals.add((ski, op))
        _log.info("edge %s (%s): %s refused: %s", self._edge, self.peer, op.name, exc)

    def _answer(self, response: Response, op: str, started: float) -> None:
        frame = self._conn.send_response(response)
        code = response.error_code
        self._metrics.observe(op, "ok" if code is None else code.name, self._loop.time() - started)
        self._write(frame)

    def _write(self, frame: bytes) -> None:
        """Queue ``frame``; what is queued in one loop iteration goes out in one write."""
        self._out.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None and not self.closed:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    # -- lifecycle ---------------------------------------------------------------------

    def _set_reading(self, reading: bool) -> None:
        transport = self._transport
        if transport is None or self.closed or reading == self._reading:
            return
        self._reading = reading
        with contextlib.suppress(RuntimeError, AttributeError):
            if reading:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _abandon(self, reason: str) -> None:
        """Write what is owed so far and close (TLS close_notify after the data)."""
        if self._closing:
            return
        self._closing = True
        self.close_reason = reason
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def _check_idle(self) -> None:
        if self.closed or self._closing:
            return
        idle_for = self._loop.time() - self._last_active
        if self.in_flight == 0 and idle_for >= self._idle_timeout:
            _log.debug("connection from %s: idle for %.0f s, closing", self.peer, idle_for)
            self._abandon("idle")
            return
        wait = self._idle_timeout - idle_for if self.in_flight == 0 else self._idle_timeout
        self._idle_handle = self._loop.call_later(max(wait, 0.01), self._check_idle)

    def stop_reading(self) -> None:
        """Shutdown, step 1: accept no more requests."""
        self._set_reading(False)

    def close_gracefully(self) -> None:
        """Shutdown, last step: write what is owed and close."""
        self._abandon("shutdown")

    def abort(self) -> None:
        """Shutdown, when the edge does not let the close finish."""
        if self._transport is not None and not self.closed:
            self._transport.abort()


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


class KeyServer:
    """The key server: listener, connections, executor, reload, health and metrics.

    Usage (inside a running event loop)::

        server = KeyServer(keys, authorizer, server_tls_context(files), tls_files=files)
        host, port = await server.start("127.0.0.1", 2407)
        await server.start_metrics("127.0.0.1", 2406)      # optional
        ...
        await server.reload()                               # e.g. on SIGHUP
        await server.aclose()                               # graceful

    ``keys`` must serve at least one key unless ``allow_empty`` (a key server on
    broker keys may start before it holds any: it is not healthy until it does).
    Raises :class:`~keybroker.errors.ConfigurationError` for unusable settings (for
    instance ``pool="process"`` with keys that cannot leave this process).
    """

    def __init__(
        self,
        keys: KeySource,
        authorizer: Authorizer,
        ssl_context: ssl.SSLContext,
        settings: KeyServerSettings | None = None,
        *,
        tls_files: TlsFiles | None = None,
        registry: CollectorRegistry | None = None,
        allow_empty: bool = False,
    ) -> None:
        """Configure; nothing runs until :meth:`start` (which needs a running loop)."""
        self.settings = settings if settings is not None else KeyServerSettings()
        if self.settings.pool == "process" and not isinstance(keys, ExportableKeySource):
            raise ConfigurationError(
                f"pool: 'process' needs keys that can be copied into worker processes "
                f"(keys_dir); {type(keys).__name__} keys stay in this process, use 'thread'"
            )
        if not keys.skis() and not allow_empty:
            raise ConfigurationError(f"the key source has no keys: {keys.describe()}")
        self._allow_empty = allow_empty
        #: Whether the last reload failed (repeated failures of periodic reloads log quietly).
        self._reload_failing = False
        self._initial = (keys, authorizer)
        self._ssl_context = ssl_context
        self._tls_files = tls_files
        self.metrics = KeyServerMetrics()
        #: The connections' read buffer (see :class:`_EdgeConnection`).
        self.read_buffer = memoryview(bytearray(_READ_BUFFER))
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(self.metrics)
        self._generation: _Generation | None = None
        self._retiring: set[_Generation] = set()
        self._connections: set[_EdgeConnection] = set()
        self._server: asyncio.Server | None = None
        #: Connections come from a supervisor (:meth:`adopt`) instead of a listener.
        self._adopting = False
        self._metrics_server: asyncio.Server | None = None
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reload_lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._background: set[asyncio.Future[Any]] = set()
        self.stopping = False
        self.address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None

    # -- properties --------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the server runs on (set by :meth:`start`)."""
        if self._loop is None:
            raise RuntimeError("the key server has not been started")
        return self._loop

    @property
    def generation(self) -> _Generation:
        """The current configuration generation."""
        if self._generation is None:
            raise RuntimeError("the key server has not been started")
        return self._generation

    @property
    def keys(self) -> KeySource:
        """The key source in use."""
        return self.generation.keys

    @property
    def authorizer(self) -> Authorizer:
        """The authorizer in use."""
        return self.generation.authorizer

    @property
    def connections(self) -> int:
        """Edge connections open."""
        return len(self._connections)

    @property
    def pending(self) -> int:
        """Key operations admitted and not yet answered, over all connections."""
        return self.metrics.pending

    @property
    def healthy(self) -> bool:
        """Listening (or taking connections from a supervisor), not shutting down, and
        serving at least one key."""
        listening = self._adopting or (self._server is not None and self._server.is_serving())
        return (
            listening
            and not self.stopping
            and self._generation is not None
            and self._generation.key_count > 0
        )

    # -- start -------------------------------------------------------------------------

    def _dispatcher(self, keys: KeySource) -> _Dispatcher:
        settings = self.settings
        if settings.pool == "process":
            exported = dict(cast("ExportableKeySource", keys).worker_keys())
            return _Dispatcher(
                self.loop,
                functools.partial(_process_pool, settings.workers, exported),
                _process_batch,
                workers=settings.workers,
                max_batch=settings.batch,
                owns_executor=True,
            )
        threads = self._threads
        assert threads is not None
        return _Dispatcher(
            self.loop,
            lambda: threads,
            functools.partial(perform_batch, keys),
            workers=settings.workers,
            max_batch=settings.batch,
            owns_executor=False,
            inline=settings.pool == "inline",
        )

    async def _new_generation(
        self, number: int, keys: KeySource, authorizer: Authorizer
    ) -> _Generation:
        dispatcher = self._dispatcher(keys)
        if self.settings.pool == "process":
            try:
                await dispatcher.warm_up()
            except Exception as exc:
                dispatcher.close()
                raise ConfigurationError(
                    f"the key worker processes did not start ({type(exc).__name__})"
                ) from None
        generation = _Generation(number, keys, authorizer, dispatcher)
        self._warn_missing(generation)
        return generation

    @staticmethod
    def _warn_missing(generation: _Generation) -> None:
        skis_of = getattr(generation.authorizer, "skis", None)
        if not callable(skis_of):
            return
        loaded = set(generation.keys.skis())
        for ski in sorted(set(skis_of()) - loaded):
            _log.warning("key %s is granted but not loaded: it answers KEY_NOT_FOUND", ski.hex())

    async def _prepare(self) -> None:
        if self._server is not None or self._loop is not None:
            raise RuntimeError("the key server is already started")
        self._loop = asyncio.get_running_loop()
        self._threads = concurrent.futures.ThreadPoolExecutor(
            self.settings.workers, thread_name_prefix="keyless-op"
        )
        keys, authorizer = self._initial
        self._generation = await self._new_generation(1, keys, authorizer)
        self._publish_generation()

    def _started(self, where: str) -> None:
        keys, authorizer = self._initial
        _log.info(
            "key server %s; keys: %s; grants: %s; %d %s workers",
            where,
            keys.describe(),
            authorizer.describe(),
            self.settings.workers,
            self.settings.pool,
        )

    async def start(self, host: str = "127.0.0.1", port: int = 2407) -> tuple[str, int]:
        """Start the workers and listen; returns the address bound (``port=0``: any)."""
        await self._prepare()
        assert self._loop is not None and self._generation is not None
        try:
            self._server = await self._loop.create_server(
                lambda: _EdgeConnection(self),
                host,
                port,
                ssl=self._ssl_context,
                ssl_handshake_timeout=self.settings.handshake_timeout,
                backlog=1024,
                reuse_address=True,
            )
        except OSError as exc:
            self._generation.dispatcher.close()
            if self._threads is not None:
                self._threads.shutdown(wait=False)
            raise ConfigurationError(f"listen: cannot listen on {host}:{port} ({exc})") from None
        bound = self._server.sockets[0].getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        self._started("on {}:{}".format(*self.address))
        return self.address

    async def start_without_listening(self) -> None:
        """Start the workers but no listener: connections come through :meth:`adopt`
        (a pre-forked worker process handed accepted sockets by its supervisor)."""
        await self._prepare()
        self._adopting = True
        self._started("worker ready")

    def adopt(self, sock: socket.socket) -> None:
        """Serve an accepted TCP connection (TLS handshake included) like one of ours."""
        if self.stopping:
            sock.close()
            return
        sock.setblocking(False)
        self._spawn(asyncio.ensure_future(self._serve_adopted(sock)))

    async def _serve_adopted(self, sock: socket.socket) -> None:
        try:
            peer = sock.getpeername()
        except OSError:
            peer = "?"
        try:
            await self.loop.connect_accepted_socket(
                lambda: _EdgeConnection(self),
                sock,
                ssl=self._ssl_context,
                ssl_handshake_timeout=self.settings.handshake_timeout,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            # As asyncio's own listener does: a failed handshake is the peer's business.
            _log.debug("connection from %s failed before serving (%s)", peer, exc)
            sock.close()

    def _publish_generation(self) -> None:
        generation = self.generation
        self.metrics.keys_loaded = generation.key_count
        self.metrics.generation = generation.number

    # -- connections (called by _EdgeConnection) ---------------------------------------

    def connection_opened(self, connection: _EdgeConnection) -> bool:
        """Register a connection; ``False`` if it must be refused."""
        self.metrics.connections_accepted += 1
        if self.stopping or len(self._connections) >= self.settings.max_connections:
            if not self.stopping:
                _log.warning(
                    "connection from %s refused: %d connections open (max_connections)",
                    connection.peer,
                    len(self._connections),
                )
            return False
        self._connections.add(connection)
        self.metrics.connections_open = len(self._connections)
        return True

    def connection_closed(self, connection: _EdgeConnection) -> None:
        """Unregister a connection."""
        self._connections.discard(connection)
        self.metrics.connections_open = len(self._connections)
        self.metrics.connections_closed[connection.close_reason] += 1
        self._check_idle()

    def operation_done(self, generation: _Generation) -> None:
        """Count an operation of ``generation`` as finished."""
        generation.in_flight -= 1
        if generation.retired and generation.in_flight == 0:
            self._collect()
        self._check_idle()

    def _check_idle(self) -> None:
        if self.metrics.pending == 0:
            self._idle.set()
        else:
            self._idle.clear()

    # -- reload ------------------------------------------------------------------------

    def _load(self, old: _Generation) -> tuple[KeySource, Authorizer]:
        """In a thread: the new TLS files, keys and grants, or ConfigurationError.

        The grants are read last, so they are never older than the keys: a revocation
        made before the keys were read is in them.
        """
        if self._tls_files is not None:
            # Into a scratch context first: a bad pair must not touch the live one.
            _load_server_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), self._tls_files)
        keys = old.keys.reload()
        try:
            if keys is not old.keys and not keys.skis() and not self._allow_empty:
                raise ConfigurationError(f"the new key set is empty: {keys.describe()}")
            if self.settings.pool == "process" and not isinstance(keys, ExportableKeySource):
                raise ConfigurationError("pool: the new key source cannot feed worker processes")
            authorizer = old.authorizer.reload()
        except BaseException:
            if keys is not old.keys:
                _close_source(keys)
            raise
        return keys, authorizer

    async def reload(self, *, quiet: bool = False) -> bool:
        """Reload keys, grants and the server certificate together.

        Returns ``True`` if the new configuration is in use, ``False`` if it
        was refused (logged; the old one stays). Requests in flight finish on
        the generation they were admitted on. ``quiet`` (periodic reloads):
        a reload that changes neither the keys served nor the grants' summary
        is logged at debug level, and so is a failure that repeats the last one's.
        """
        async with self._reload_lock:
            if self.stopping:
                return False
            old = self.generation
            before = (frozenset(old.keys.skis()), old.authorizer.describe())
            try:
                keys, authorizer = await self.loop.run_in_executor(None, self._load, old)
            except Exception as exc:
                return self._reload_refused(exc, quiet=quiet)
            try:
                if keys is old.keys:  # same keys: same dispatcher (and worker processes)
                    new = _Generation(old.number + 1, keys, authorizer, old.dispatcher)
                    self._warn_missing(new)
                else:
                    new = await self._new_generation(old.number + 1, keys, authorizer)
            except Exception as exc:
                if keys is not old.keys:
                    _close_source(keys)
                return self._reload_refused(exc, quiet=quiet)
            if self.stopping:  # shutdown began while this reload was loading
                if new.dispatcher is not old.dispatcher:
                    new.dispatcher.close()
                if keys is not old.keys:
                    _close_source(keys)
                return False
            if self._tls_files is not None:
                try:
                    # New connections get the new certificate; open ones keep theirs.
                    _load_server_chain(self._ssl_context, self._tls_files)
                except ConfigurationError as exc:  # the files changed again since _load
                    if new.dispatcher is not old.dispatcher:
                        new.dispatcher.close()
                    if keys is not old.keys:
                        _close_source(keys)
                    return self._reload_refused(exc, quiet=quiet)
            self._generation = new
            self._publish_generation()
            self.metrics.reloads["ok"] += 1
            self._retire(old)
            changed = before != (frozenset(keys.skis()), authorizer.describe())
            recovered, self._reload_failing = self._reload_failing, False
            _log.log(
                logging.INFO if changed or recovered or not quiet else logging.DEBUG,
                "reloaded (generation %d): keys: %s; grants: %s",
                new.number,
                keys.describe(),
                authorizer.describe(),
            )
            return True

    def _reload_refused(self, exc: BaseException, *, quiet: bool = False) -> bool:
        self.metrics.reloads["failed"] += 1
        # Our own errors say what is wrong; a foreign one only by its type.
        reason = str(exc) if isinstance(exc, KeybrokerError) else type(exc).__name__
        repeated, self._reload_failing = self._reload_failing, True
        _log.log(
            logging.DEBUG if quiet and repeated else logging.ERROR,
            "reload refused, keeping generation %d: %s",
            self.generation.number,
            reason,
        )
        return False

    def _retire(self, old: _Generation) -> None:
        old.retired = True
        self._retiring.add(old)
        self._collect()

    def _collect(self) -> None:
        """Forget retired generations with nothing in flight, and close every key source and
        dispatcher that no live generation (the current one, or a retired one with requests
        still in flight) uses any more."""
        finished = [g for g in self._retiring if g.in_flight == 0]
        if not finished:
            return
        self._retiring.difference_update(finished)
        live = [self.generation, *self._retiring]
        dispatchers = {id(g.dispatcher): g.dispatcher for g in finished}
        sources = {id(g.keys): g.keys for g in finished}
        for generation in live:
            dispatchers.pop(id(generation.dispatcher), None)
            sources.pop(id(generation.keys), None)
        for dispatcher in dispatchers.values():
            dispatcher.close()
        for keys in sources.values():
            self._spawn(self.loop.run_in_executor(None, _close_source, keys))

    def _spawn(self, future: asyncio.Future[Any]) -> None:
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    # -- health and metrics ------------------------------------------------------------

    async def start_metrics(
        self, host: str = "127.0.0.1", port: int = DEFAULT_METRICS_PORT
    ) -> tuple[str, int]:
        """Serve ``GET /healthz`` and ``GET /metrics`` over plain HTTP on ``host:port``."""
        try:
            self._metrics_server = await asyncio.start_server(
                self._http, host, port, limit=16384, reuse_address=True
            )
        except OSError as exc:
            raise ConfigurationError(
                f"metrics_port: cannot listen on {host}:{port} ({exc})"
            ) from None
        bound = self._metrics_server.sockets[0].getsockname()
        self.metrics_address = (str(bound[0]), int(bound[1]))
        return self.metrics_address

    def health(self) -> tuple[int, str]:
        """``(status, text)`` of ``/healthz``."""
        if self.healthy:
            generation = self.generation
            return 200, f"ok: {generation.key_count} keys, generation {generation.number}\n"
        if self.stopping:
            return 503, "shutting down\n"
        return 503, "not serving\n"

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, content_type, body = self._route(parts)
            head_only = parts[0] == "HEAD"
            writer.write(
                (
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode("latin-1")
                + (b"" if head_only else body)
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a scraper that went away or sent garbage: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _route(self, parts: list[str]) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "400 Bad Request", text, b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"GET only\n"
        if target == "/healthz":
            code, message = self.health()
            return (
                f"{code} {'OK' if code == 200 else 'Service Unavailable'}",
                text,
                message.encode(),
            )
        if target == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        return "404 Not Found", text, b"not found: try /healthz or /metrics\n"

    # -- shutdown ----------------------------------------------------------------------

    async def aclose(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight operations finish (up to ``grace`` s), close everything."""
        if self.stopping:
            return
        self.stopping = True
        grace = self.settings.shutdown_grace if grace is None else grace
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.stop_reading()
        self._check_idle()
        if self.metrics.pending:
            _log.info("shutting down: waiting for %d key operations", self.metrics.pending)
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=grace)
            except TimeoutError:
                _log.warning(
                    "shutting down: %d key operations unfinished after %.0f s",
                    self.metrics.pending,
                    grace,
                )
        # Let the replies written by the last completions reach the transports.
        await asyncio.sleep(0)
        for connection in list(self._connections):
            connection.close_gracefully()
        deadline = self.loop.time() + 2.0
        while self._connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self._connections):
            connection.abort()
        if self._metrics_server is not None:
            self._metrics_server.close()
        async with self._reload_lock:  # a reload under way finishes (and sees `stopping`)
            if self._generation is not None:
                generations = [self._generation, *self._retiring]
                self._retiring.clear()
                for dispatcher in {id(g.dispatcher): g.dispatcher for g in generations}.values():
                    dispatcher.close()
                for keys in {id(g.keys): g.keys for g in generations}.values():
                    self._spawn(self.loop.run_in_executor(None, _close_source, keys))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=1)
        _log.info("key server stopped")

    async def __aenter__(self) -> KeyServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _close_source(keys: KeySource) -> None:
    close = getattr(keys, "close", None)
    if callable(close):
        try:
            close()
        except Exception as exc:
            _log.warning("closing %s failed (%s)", keys.describe(), type(exc).__name__)


# ---------------------------------------------------------------------------
# Configuration and the CLI's main
# ---------------------------------------------------------------------------

_PATH_KEYS: Final = frozenset(
    {"cert", "key", "client_ca", "keys_dir", "grants", "pkcs11_module", "keyring"}
)
#: What the key server is told in file mode, and may not be told with broker keys.
_FILE_MODE_KEYS: Final = (
    "cert",
    "key",
    "client_ca",
    "grants",
    "keys_dir",
    "pkcs11_module",
    "pkcs11_token",
    "pkcs11_pin_env",
)
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
#: Longest ``refresh``: one day.
_MAX_REFRESH: Final = 86400.0


@dataclass(frozen=True)
class KeyServerConfig:
    """Everything ``keybroker keyserver`` is told, from options and/or a TOML file.

    Keys (TOML, ``snake_case`` or ``kebab-case``; the options are the same
    names with ``--``): ``listen``, ``cert``, ``key``, ``client_ca``,
    ``keys_dir``, ``pkcs11_module``, ``pkcs11_token``, ``pkcs11_pin_env``,
    ``grants``, ``keyring``, ``broker``, ``passphrase_env``, ``refresh``,
    ``grants_max_age``, ``workers``, ``pool``, ``processes``, ``metrics_host``, ``metrics_port``,
    ``log_level``, ``max_connections``, ``max_pending``, ``idle_timeout``, ``shutdown_grace``.

    ``processes`` > 1 runs that many key-server processes behind one listener
    (:mod:`keybroker.flows.keyless.prefork`): each has its own event loop, keys,
    grants and ``workers`` threads, so per-request Python is not serialised by one
    GIL. ``metrics_port`` is then the first process's; process *i* serves on
    ``metrics_port + i`` (each any free port if it is 0).

    Two modes. **Files**: ``cert``, ``key``, ``client_ca``, ``grants`` and one key
    source (``keys_dir`` or ``pkcs11_token``). **Broker keys**: ``keyring`` (an
    enrolled ``service`` principal's keyring, opened with the passphrase in the
    environment variable ``passphrase_env``), optionally ``broker`` (its URL, if not
    the one enrolled with); certificate, key, edges' CA, keys and grants all come
    from the enrolment and the broker, so none of the file-mode settings may be given.
    """

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    grants: Path | None = None
    listen: str = DEFAULT_LISTEN
    keys_dir: Path | None = None
    pkcs11_module: str | None = None
    pkcs11_token: str | None = None
    pkcs11_pin_env: str = DEFAULT_PIN_ENV
    keyring: Path | None = None
    broker: str | None = None
    passphrase_env: str = DEFAULT_PASSPHRASE_ENV
    #: Seconds between reloads (0: only on SIGHUP); ``None``: :data:`DEFAULT_REFRESH` with
    #: broker keys, 0 with files.
    refresh: float | None = None
    #: Broker keys: refuse every operation once the grants last read are older than this
    #: many seconds (the broker unreachable that long); ``None``: keep the last grants.
    grants_max_age: float | None = None
    #: Executor workers per process; ``None``: the cores divided among the processes.
    workers: int | None = None
    #: ``None``: ``inline`` with several processes (one per core signs best on its own
    #: event loop), else :data:`DEFAULT_POOL`.
    pool: str | None = None
    #: Key-server processes sharing the listener (:mod:`.prefork`); 1: this process only.
    processes: int = 1
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    log_level: str = "info"
    max_connections: int = 1024
    max_pending: int = MAX_PENDING
    idle_timeout: float = 300.0
    shutdown_grace: float = 10.0

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, object], *, base: Path | None = None
    ) -> KeyServerConfig:
        """Check and convert ``data``; :class:`ConfigurationError` naming the first bad key.

        Relative paths are resolved against ``base`` (the config file's directory).
        """
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for raw_name, value in data.items():
            name = raw_name.replace("-", "_")
            if name not in known:
                raise ConfigurationError(f"{raw_name}: unknown setting")
            if value is None:
                continue
            values[name] = _convert(name, value, base)
        if "keyring" in values:
            _check_broker_mode(values)
        else:
            _check_file_mode(values)
        config = cls(**values)
        config.listen_address()
        config.settings()
        return config

    @property
    def brokered(self) -> bool:
        """Whether keys, grants and certificate come from the broker (``keyring`` given)."""
        return self.keyring is not None

    @property
    def refresh_interval(self) -> float:
        """Seconds between periodic reloads; 0: none (SIGHUP only)."""
        if self.refresh is not None:
            return self.refresh
        return DEFAULT_REFRESH if self.brokered else 0.0

    def listen_address(self) -> tuple[str, int]:
        """``listen`` as ``(host, port)``."""
        return parse_address(self.listen, "listen")

    def settings(self) -> KeyServerSettings:
        """The :class:`KeyServerSettings` these options ask for."""
        if type(self.processes) is not int or not 1 <= self.processes <= MAX_PROCESSES:
            raise ConfigurationError(f"processes: must be an integer from 1 to {MAX_PROCESSES}")
        workers = self.workers
        if workers is None:
            workers = max(1, default_workers() // self.processes)
        pool = self.pool or ("inline" if self.processes > 1 else DEFAULT_POOL)
        return KeyServerSettings(
            workers=workers,
            pool=cast("Pool", pool),
            max_pending=self.max_pending,
            max_connections=self.max_connections,
            idle_timeout=self.idle_timeout,
            shutdown_grace=self.shutdown_grace,
        )

    def tls_files(self) -> TlsFiles:
        """The certificate, key and client-CA files (file mode only)."""
        if self.cert is None or self.key is None or self.client_ca is None:
            raise ConfigurationError("cert: no certificate files with broker keys (keyring)")
        return TlsFiles(self.cert, self.key, self.client_ca)


def _check_file_mode(values: Mapping[str, Any]) -> None:
    for name in ("broker", "passphrase_env", "grants_max_age"):
        if name in values:
            raise ConfigurationError(f"{name}: only with broker keys (keyring)")
    for required in ("cert", "key", "client_ca", "grants"):
        if required not in values:
            raise ConfigurationError(
                f"{required}: required (option --{required.replace('_', '-')}), "
                "unless the keys come from the broker (--keyring)"
            )
    if ("keys_dir" in values) == ("pkcs11_token" in values):
        raise ConfigurationError("keys_dir: give exactly one key source, keys_dir or pkcs11_token")
    if "pkcs11_module" in values and "pkcs11_token" not in values:
        raise ConfigurationError("pkcs11_module: needs pkcs11_token")


def _check_broker_mode(values: Mapping[str, Any]) -> None:
    for name in _FILE_MODE_KEYS:
        if name in values:
            raise ConfigurationError(
                f"{name}: not with broker keys (keyring): the certificate, its key and the "
                "edges' CA come from the enrolment, keys and grants from the broker"
            )
    if values.get("pool") == "process":
        raise ConfigurationError(
            "pool: 'process' is not available with broker keys (they change at every "
            "refresh and stay in this process); use 'thread'"
        )
    max_age, refresh = values.get("grants_max_age"), values.get("refresh", DEFAULT_REFRESH)
    if max_age is not None and (refresh == 0 or max_age <= refresh):
        raise ConfigurationError(
            f"grants_max_age: must be longer than refresh ({refresh:g} s), which must not be 0"
        )


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``; ConfigurationError naming ``what`` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigurationError(f"{what}: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _convert(name: str, value: object, base: Path | None) -> object:
    if name in _PATH_KEYS:
        if not isinstance(value, str | os.PathLike) or not os.fspath(value):
            raise ConfigurationError(f"{name}: must be a path")
        path = Path(value).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        return str(path) if name == "pkcs11_module" else path
    if name in ("workers", "processes", "max_connections", "max_pending", "metrics_port"):
        if type(value) is not int:
            raise ConfigurationError(f"{name}: must be an integer")
        if name == "metrics_port" and not 0 <= value < 65536:
            raise ConfigurationError("metrics_port: must be a port number (0: any free port)")
        return value
    if name in ("idle_timeout", "shutdown_grace"):
        if type(value) not in (int, float):
            raise ConfigurationError(f"{name}: must be a number of seconds")
        return float(cast("float", value))
    if name == "refresh":
        if type(value) not in (int, float) or not 0 <= cast("float", value) <= _MAX_REFRESH:
            raise ConfigurationError(
                "refresh: must be a number of seconds from 0 (SIGHUP only) to 86400"
            )
        return float(cast("float", value))
    if name == "grants_max_age":
        if type(value) not in (int, float) or not 0 < cast("float", value) < math.inf:
            raise ConfigurationError("grants_max_age: must be a positive number of seconds")
        return float(cast("float", value))
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{name}: must be a non-empty string")
    if name == "pool" and value not in POOLS:
        raise ConfigurationError(f"pool: must be 'thread', 'process' or 'inline', not {value!r}")
    if name == "log_level" and value.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigurationError(f"log_level: must be debug, info, warning or error, not {value!r}")
    if name == "broker" and not value.startswith("https://"):
        raise ConfigurationError(f"broker: must be the broker's https:// URL, not {value!r:.80}")
    if name in ("passphrase_env", "pkcs11_pin_env") and not _ENV_NAME.fullmatch(value):
        raise ConfigurationError(f"{name}: must name an environment variable, not {value!r:.80}")
    return value


def load_config_file(path: str | Path) -> dict[str, object]:
    """The settings in a TOML config file (flat ``key = value``), not yet checked."""
    location = Path(path)
    try:
        text = location.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"config: cannot read {location} ({exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config: {location} is not valid TOML ({exc})") from None
    return dict(data)


def build_key_server(
    config: KeyServerConfig, *, environ: Mapping[str, str] | None = None
) -> KeyServer:
    """The :class:`KeyServer` ``config`` describes (keys loaded, TLS context made, not started).

    With broker keys this opens the keyring and synchronises with the broker once (a
    broker that cannot be reached is a :class:`ConfigurationError` naming ``broker``).
    """
    env = os.environ if environ is None else environ
    settings = config.settings()
    if config.brokered:
        return _build_brokered(config, env, settings)
    assert config.grants is not None
    files = config.tls_files()
    context = server_tls_context(files)
    authorizer = StaticAuthorizer.from_file(config.grants)
    keys: KeySource
    if config.keys_dir is not None:
        keys = PemKeySource(config.keys_dir)
    else:
        assert config.pkcs11_token is not None
        pin = env.get(config.pkcs11_pin_env)
        if not pin:
            raise ConfigurationError(
                f"pkcs11_pin_env: environment variable {config.pkcs11_pin_env} "
                "(the token's user PIN) is not set"
            )
        keys = Pkcs11KeySource(config.pkcs11_module, config.pkcs11_token, pin)
    try:
        return KeyServer(keys, authorizer, context, settings, tls_files=files)
    except BaseException:
        _close_source(keys)
        raise


def _build_brokered(
    config: KeyServerConfig, env: Mapping[str, str], settings: KeyServerSettings
) -> KeyServer:
    """A key server on broker keys: identity, keys and grants of the enrolled ``keyring``."""
    # Imported here: the broker client (httpx, the API's schemas) only when it is used.
    from keybroker.flows.keyless.brokered import (
        BrokerAuthorizer,
        BrokerKeySource,
        KeyServerPrincipal,
        server_tls_credentials,
    )

    assert config.keyring is not None
    passphrase = env.get(config.passphrase_env)
    if not passphrase:
        raise ConfigurationError(
            f"passphrase_env: environment variable {config.passphrase_env} "
            "(the keyring passphrase) is not set"
        )
    try:
        principal = KeyServerPrincipal(config.keyring, passphrase=passphrase, url=config.broker)
        credentials = server_tls_credentials(principal.keyring)
    except KeybrokerError as exc:
        raise ConfigurationError(f"keyring: {config.keyring}: {exc}") from None
    context = identity_tls_context(
        credentials.certificate_pem, credentials.private_key, credentials.ca_pem
    )
    keys = BrokerKeySource(principal)
    authorizer = BrokerAuthorizer(principal, max_age=config.grants_max_age)
    where = config.broker or principal.keyring.broker_url
    try:
        keys.reload()
        authorizer.reload()
    except KeybrokerError as exc:
        raise ConfigurationError(
            f"broker: cannot synchronise {principal.principal} with {where} "
            f"({type(exc).__name__}: {exc})"
        ) from None
    expires = x509.load_pem_x509_certificate(credentials.certificate_pem).not_valid_after_utc
    _log.info(
        "broker keys from %s as %s (certificate valid until %s; refresh every %g s)",
        where,
        principal.principal,
        f"{expires:%Y-%m-%d %H:%M}",
        config.refresh_interval,
    )
    return KeyServer(keys, authorizer, context, settings, allow_empty=True)


async def run_keyserver(
    config: KeyServerConfig,
    *,
    ready: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``); reload on SIGHUP and every
    :attr:`~KeyServerConfig.refresh_interval` seconds. Calls ``ready`` with one line
    (``listening on HOST:PORT``, plus `` metrics on HOST:PORT``) once serving.

    With ``processes`` > 1 this process only supervises: see :mod:`.prefork`."""
    if config.processes > 1:
        from keybroker.flows.keyless.prefork import run_supervisor

        await run_supervisor(config, ready=ready, stop=stop)
        return
    server = build_key_server(config, environ=environ)
    host, port = config.listen_address()

    async def begin() -> str:
        bound = await server.start(host, port)
        line = f"listening on {format_address(bound)}"
        if config.metrics_port is not None:
            metrics = await server.start_metrics(config.metrics_host, config.metrics_port)
            line += f" metrics on {format_address(metrics)}"
        return line

    await serve_until_stopped(server, config, begin, ready=ready, stop=stop)


async def serve_until_stopped(
    server: KeyServer,
    config: KeyServerConfig,
    begin: Callable[[], Awaitable[str]],
    *,
    ready: Callable[[str], None],
    stop: asyncio.Event | None = None,
    stop_signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Start ``server`` with ``begin`` (which returns the ready line), call ``ready``,
    serve until one of ``stop_signals`` (or ``stop``), reloading on SIGHUP and every
    :attr:`~KeyServerConfig.refresh_interval` seconds; then close it gracefully."""
    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    reloads: set[asyncio.Task[Any]] = set()

    def spawn(task: asyncio.Task[Any]) -> None:
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def hangup() -> None:
        _log.info("SIGHUP: reloading keys and grants")
        spawn(loop.create_task(server.reload()))

    async def refresh(interval: float) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            await server.reload(quiet=True)

    handled = (*stop_signals, signal.SIGHUP)
    try:
        line = await begin()
        for sig in stop_signals:
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hangup)
        if config.refresh_interval > 0:
            spawn(loop.create_task(refresh(config.refresh_interval)))
        ready(line)
        await stop.wait()
        _log.info("stopping")
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        stop.set()  # a periodic refresh ends (one under way finishes, then sees `stopping`)
        await server.aclose()
        if reloads:
            await asyncio.gather(*reloads, return_exceptions=True)


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
