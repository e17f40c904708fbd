"""The edge's client to the key server: a thread-safe, pipelined :class:`KeyOperator`.

:class:`KeyClient` keeps one persistent mutual-TLS connection to a key server per process.
Any number of handshake threads call :meth:`KeyClient.operate` at once: each writes its
request (framed by :class:`~keybroker.flows.keyless.protocol.ClientConnection`, which gives
it an id) and waits; one reader thread per connection reads the replies, in whatever order
the key server sends them, and wakes the thread whose id each one answers. So a slow RSA
signature does not hold up the ECDSA ones behind it, and a handful of threads keep the key
server busy over one connection.

TLS runs over :class:`ssl.MemoryBIO` (``SSLContext.wrap_bio``) under one lock, and the raw
socket is plain TCP with ``TCP_NODELAY``: OpenSSL does not allow one ``SSL`` object to be
read in one thread and written in another at the same time, which a blocking
``SSLSocket`` shared by a reader and writers would do.

**Failing fast.** Every call ends within ``timeout`` seconds (2 by default), with the result
or :class:`~keybroker.flows.keyless.tlskeys.KeyOperationFailed`, never later:

* the key server refuses (an ``ERROR`` reply): raised at once, with its
  :class:`~keybroker.flows.keyless.codes.ErrorCode` as ``code``;
* no key server can be reached (refused, reset, TLS handshake failed): raised as soon as
  the connection attempts fail; after a failed attempt a server is not tried again for a
  backoff delay (0.05 s doubling to 5 s, with jitter), and calls made meanwhile fail at once
  instead of each waiting for a connect;
* the connection drops with requests in flight: they fail at once, and a call whose
  connection dropped before it got an answer is retried once on a fresh connection if
  time remains (a key server restart costs no handshake);
* no answer within ``timeout``: the call fails; if nothing at all arrived on the connection
  meanwhile, the connection is taken to be dead and dropped.

**Failover.** With several servers, they are tried in the order given: the first one that
accepts the connection serves every request until its connection drops; then the list is
walked again from the top (skipping those in backoff).

Nothing here logs or shows a payload, a result or key material: ``repr`` and the log lines
name servers, opcodes, SKIs and error codes only.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from keybroker.errors import ConfigurationError, LocalProtocolError, RemoteProtocolError
from keybroker.flows.keyless.codes import MAX_PENDING, ErrorCode, Op
from keybroker.flows.keyless.protocol import ClientConnection, Response
from keybroker.flows.keyless.tlskeys import KeyOperationFailed

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "KeyClient",
    "KeyClientStats",
    "KeyServerAddress",
    "client_context",
    "parse_address",
]

_log = logging.getLogger("keybroker.keyless.keyclient")

#: Seconds one key operation may take, connecting included.
DEFAULT_TIMEOUT: Final = 2.0
#: Seconds one connection attempt (TCP and TLS) may take.
DEFAULT_CONNECT_TIMEOUT: Final = 1.0
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 5.0
_READ_SIZE: Final = 65536


@dataclass(frozen=True)
class KeyServerAddress:
    """A key server's TCP address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> KeyServerAddress:
    """``HOST:PORT`` or ``[IPv6]:PORT`` as an address; :class:`ConfigurationError` if not."""
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"expected HOST:PORT, got {text!r}")
    return KeyServerAddress(host, int(port))


def client_context(ca: Path | str, cert: Path | str, key: Path | str) -> ssl.SSLContext:
    """The edge's mutual-TLS context: trusts only ``ca``, presents ``cert`` (with ``key``).

    TLS 1.2 or later, host name checked. The key file is read by OpenSSL, never by Python.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the key-server TLS files: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass
class KeyClientStats:
    """Counters of one :class:`KeyClient` (this process only)."""

    requests: int = 0
    succeeded: int = 0
    refused: int = 0
    failed: int = 0
    timeouts: int = 0
    connects: int = 0
    connect_failures: int = 0


class _Waiter:
    __slots__ = ("error", "event", "response")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.response: Response | None = None
        self.error: str | None = None


class _LinkLost(Exception):
    """The connection a request went out on broke before its answer came."""


class _Server:
    """One configured key server and its backoff state."""

    __slots__ = ("address", "failures", "retry_at")

    def __init__(self, address: KeyServerAddress) -> None:
        self.address = address
        self.failures = 0
        self.retry_at = 0.0

    def failed(self, now: float) -> None:
        self.failures += 1
        delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (self.failures - 1))
        self.retry_at = now + delay * random.uniform(0.75, 1.25)  # noqa: S311 - jitter

    def succeeded(self) -> None:
        self.failures = 0
        self.retry_at = 0.0


class _Link:
    """One established mutual-TLS connection, its sans-IO state and its reader thread."""

    def __init__(
        self,
        server: _Server,
        sock: socket.socket,
        tls: ssl.SSLObject,
        *,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        max_pending: int,
        on_lost: Callable[[_Link, str], None],
    ) -> None:
        self.server = server
        self._sock = sock
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        self._proto = ClientConnection(max_pending, first_id=random.getrandbits(32))
        self._lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._on_lost = on_lost
        self.closed = False
        self.answered = False
        self.last_received = time.monotonic()
        self._reader = threading.Thread(
            target=self._read_loop, name=f"keyclient-{server.address}", daemon=True
        )

    def start(self) -> None:
        self._reader.start()

    def submit(
        self, op: Op, ski: bytes | None, payload: bytes, sni: str | None
    ) -> tuple[int, _Waiter]:
        """Send one request: ``(id, waiter)``; :class:`_LinkLost` or ``KeyOperationFailed``."""
        waiter = _Waiter()
        with self._lock:
            if self.closed:
                raise _LinkLost("the connection is closed")
            try:
                if op is Op.PING:
                    request_id, frame = self._proto.ping(payload)
                else:
                    request_id, frame = self._proto.send_request(
                        op, ski=ski, payload=payload, sni=sni
                    )
            except LocalProtocolError as exc:
                code = ErrorCode.OVERLOADED if exc.code == ErrorCode.OVERLOADED else None
                raise KeyOperationFailed(f"request not sent: {exc}", code=code) from None
            self._waiters[request_id] = waiter
            try:
                self._tls.write(frame)
                self._flush()
            except (OSError, ssl.SSLError) as exc:
                self._waiters.pop(request_id, None)
                reason = f"sending failed: {exc}"
            else:
                return request_id, waiter
        self.lose(reason)
        raise _LinkLost(reason)

    def forget(self, request_id: int) -> None:
        """Stop waiting for ``request_id`` (it timed out); a late answer is dropped."""
        with self._lock:
            self._waiters.pop(request_id, None)

    def _flush(self) -> None:
        # Called with the lock held.
        data = self._outgoing.read()
        if data:
            self._sock.sendall(data)

    def _read_loop(self) -> None:
        reason = "closed by the key server"
        try:
            while not self.closed:
                try:
                    data = self._sock.recv(_READ_SIZE)
                except TimeoutError:
                    continue
                if not data:
                    break
                self.last_received = time.monotonic()
                answers = self._receive(data)
                if answers is None:
                    reason = "closed by the key server"
                    break
                for request_id, response in answers:
                    self._deliver(request_id, response)
        except (OSError, ssl.SSLError) as exc:
            reason = f"connection error: {exc}"
        except RemoteProtocolError as exc:
            reason = f"protocol error from the key server: {exc}"
        finally:
            self.lose(reason)
            with contextlib.suppress(OSError):
                self._sock.close()

    def _receive(self, data: bytes) -> list[tuple[int, Response]] | None:
        """Feed ``data``; the answers it completes, or ``None`` when TLS was closed."""
        plain = bytearray()
        eof = False
        with self._lock:
            self._incoming.write(data)
            while True:
                try:
                    chunk = self._tls.read(_READ_SIZE)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    eof = True
                    break
                if not chunk:
                    eof = True
                    break
                plain += chunk
            self._flush()  # TLS 1.3 may answer a KeyUpdate
            responses = self._proto.receive_data(bytes(plain)) if plain else []
        if responses:
            self.answered = True
        if eof and not responses:
            return None
        return [(response.id, response) for response in responses]

    def _deliver(self, request_id: int, response: Response) -> None:
        with self._lock:
            waiter = self._waiters.pop(request_id, None)
        if waiter is not None:
            waiter.response = response
            waiter.event.set()

    def lose(self, reason: str) -> None:
        """Close the connection and fail every request still waiting on it."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            waiters = list(self._waiters.values())
            self._waiters.clear()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader, which closes the socket
        for waiter in waiters:
            waiter.error = reason
            waiter.event.set()
        self._on_lost(self, reason)


class KeyClient:
    """A :class:`~keybroker.flows.keyless.tlskeys.KeyOperator` over mutual TLS; see the module.

    ``servers`` are tried in order. ``context`` is the client context
    (:func:`client_context`); ``server_name`` is the name checked against each key
    server's certificate (default: each server's own host). Connects lazily, on the first
    call. Use one per process (it starts threads: create it after ``fork``), and
    :meth:`close` it when done.
    """

    def __init__(
        self,
        servers: Sequence[KeyServerAddress | str],
        context: ssl.SSLContext,
        *,
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_pending: int = MAX_PENDING,
    ) -> None:
        if not servers:
            raise ConfigurationError("at least one key server is needed")
        if timeout <= 0 or connect_timeout <= 0:
            raise ConfigurationError("timeouts must be positive")
        self._servers = [
            _Server(server if isinstance(server, KeyServerAddress) else parse_address(server))
            for server in servers
        ]
        self._context = context
        self._server_name = server_name
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._link: _Link | None = None
        self._closed = False
        self.stats = KeyClientStats()

    @classmethod
    def from_files(
        cls,
        servers: Sequence[KeyServerAddress | str],
        *,
        ca: Path | str,
        cert: Path | str,
        key: Path | str,
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> KeyClient:
        """A client whose context is :func:`client_context` of the three PEM files."""
        return cls(
            servers,
            client_context(ca, cert, key),
            server_name=server_name,
            timeout=timeout,
            connect_timeout=connect_timeout,
        )

    # -- the KeyOperator ------------------------------------------------------------------

    def operate(self, op: Op, ski: bytes, payload: bytes, *, sni: str | None) -> bytes:
        """Perform ``op`` with the key ``ski`` on the key server; see the module for failures."""
        self._count("requests")
        response = self._call(op, ski, payload, sni, self.timeout)
        code = response.error_code
        if code is not None:
            self._count("refused")
            raise KeyOperationFailed(f"the key server refused {op.name}: {code.name}", code=code)
        self._count("succeeded")
        return response.payload

    def ping(self, payload: bytes = b"", *, timeout: float | None = None) -> float:
        """Round-trip time of a PING in seconds; :class:`KeyOperationFailed` if none came back."""
        started = time.monotonic()
        response = self._call(Op.PING, None, payload, None, timeout or self.timeout)
        if response.error_code is not None:
            raise KeyOperationFailed(
                f"the key server answered PING with {response.error_code.name}",
                code=response.error_code,
            )
        return time.monotonic() - started

    def _call(
        self, op: Op, ski: bytes | None, payload: bytes, sni: str | None, timeout: float
    ) -> Response:
        deadline = time.monotonic() + timeout
        try:
            for attempt in range(2):
                link = self._connected(deadline)
                try:
                    return self._exchange(
                        link, op, ski=ski, payload=payload, sni=sni, deadline=deadline
                    )
                except _LinkLost as lost:
                    if attempt or time.monotonic() >= deadline:
                        raise KeyOperationFailed(f"key server connection lost: {lost}") from None
                    _log.info("keyless: retrying %s on a new key-server connection", op.name)
        except KeyOperationFailed:
            self._count("failed")
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _exchange(
        self,
        link: _Link,
        op: Op,
        *,
        ski: bytes | None,
        payload: bytes,
        sni: str | None,
        deadline: float,
    ) -> Response:
        sent_at = time.monotonic()
        request_id, waiter = link.submit(op, ski, payload, sni)
        if not waiter.event.wait(max(0.0, deadline - time.monotonic())):
            link.forget(request_id)
            self._count("timeouts")
            if link.last_received < sent_at:
                link.lose("no answer within the timeout")
            raise KeyOperationFailed(f"no answer to {op.name} within the timeout")
        if waiter.error is not None:
            raise _LinkLost(waiter.error)
        assert waiter.response is not None
        return waiter.response

    # -- connections ----------------------------------------------------------------------

    def _connected(self, deadline: float) -> _Link:
        link = self._link
        if link is not None and not link.closed:
            return link
        if self._closed:
            raise KeyOperationFailed("the key client is closed")
        if not self._connect_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise KeyOperationFailed("timed out waiting for a key-server connection")
        try:
            link = self._link
            if link is not None and not link.closed:
                return link
            return self._connect_any(deadline)
        finally:
            self._connect_lock.release()

    def _connect_any(self, deadline: float) -> _Link:
        problems: list[str] = []
        for server in self._servers:
            now = time.monotonic()
            if now >= deadline:
                problems.append(f"{server.address}: no time left")
                break
            if server.retry_at > now:
                problems.append(f"{server.address}: backing off {server.retry_at - now:.2f} s")
                continue
            try:
                link = self._open(server, min(deadline, now + self.connect_timeout))
            except (OSError, ssl.SSLError) as exc:
                server.failed(time.monotonic())
                self._count("connect_failures")
                problems.append(f"{server.address}: {exc}")
                _log.warning("keyless: cannot reach key server %s: %s", server.address, exc)
                continue
            with self._lock:
                if self._closed:
                    link.lose("the key client is closed")
                    raise KeyOperationFailed("the key client is closed")
                self._link = link
            self._count("connects")
            link.start()
            _log.info("keyless: connected to key server %s", server.address)
            return link
        raise KeyOperationFailed("no key server available: " + "; ".join(problems))

    def _open(self, server: _Server, deadline: float) -> _Link:
        address = server.address
        sock = socket.create_connection(
            (address.host, address.port), timeout=max(0.001, deadline - time.monotonic())
        )
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = self._context.wrap_bio(
                incoming, outgoing, server_side=False, server_hostname=self._name_for(address)
            )
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass  # the handshake needs the key server's next bytes: send ours, read
                if data := outgoing.read():
                    sock.sendall(data)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("TLS handshake with the key server timed out")
                sock.settimeout(remaining)
                received = sock.recv(_READ_SIZE)
                if not received:
                    raise ConnectionError("the key server closed during the TLS handshake")
                incoming.write(received)
            if data := outgoing.read():
                sock.sendall(data)
            # The reader wakes up now and then to notice a close; writers use the same
            # timeout, so a key server that stops reading cannot block them for long.
            sock.settimeout(max(self.timeout, 1.0))
        except BaseException:
            sock.close()
            raise
        return _Link(
            server,
            sock,
            tls,
            incoming=incoming,
            outgoing=outgoing,
            max_pending=self._max_pending,
            on_lost=self._link_lost,
        )

    def _name_for(self, address: KeyServerAddress) -> str:
        return self._server_name or address.host

    def _link_lost(self, link: _Link, reason: str) -> None:
        with self._lock:
            if self._link is link:
                self._link = None
        if not link.answered:
            # Dropped before answering anything (refused our certificate, crashed at once):
            # back off as from a failed connect, so calls fail fast instead of reconnecting.
            link.server.failed(time.monotonic())
        else:
            link.server.succeeded()
        if not self._closed:
            _log.warning("keyless: key server %s connection lost: %s", link.server.address, reason)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a key-server connection is open now."""
        link = self._link
        return link is not None and not link.closed

    def close(self) -> None:
        """Drop the connection (waiting calls fail) and refuse further calls."""
        with self._lock:
            self._closed = True
            link = self._link
            self._link = None
        if link is not None:
            link.lose("the key client is closed")

    def __enter__(self) -> KeyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        servers = ", ".join(str(server.address) for server in self._servers)
        return f"<KeyClient servers=[{servers}] connected={self.connected}>"
