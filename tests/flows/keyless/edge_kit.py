"""Test kit for the keyless edge: mutual-TLS material, a small asyncio key server, an HTTP
origin, edge configuration files, and clients.

The key server here is the test's own (about 80 lines over ``protocol.ServerConnection`` and
``operations.LocalKeyStore``), not keybroker's ``keyserver`` module: the edge is tested
against the protocol, not against one implementation of its other end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import http.server
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tlskit import Authority, Leaf, PrivateKey

from keybroker.flows.keyless.codes import ErrorCode, Op
from keybroker.flows.keyless.operations import KeyOperationError, LocalKeyStore
from keybroker.flows.keyless.protocol import (
    BadRequest,
    ConnectionBroken,
    RequestReceived,
    Response,
    ServerConnection,
)

KEYSERVER_NAME = "keyserver.test"
#: A client that has not finished within this long is taken to hang.
CLIENT_TIMEOUT = 15.0


# --- mutual-TLS material ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mtls:
    """A CA for the edge <-> key server link, and the two ends' certificates and keys (PEM)."""

    ca: Path
    server_cert: Path
    server_key: Path
    edge_cert: Path
    edge_key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        context.load_cert_chain(str(self.server_cert), str(self.server_key))
        context.verify_mode = ssl.CERT_REQUIRED
        return context


def _issue(authority: Authority, name: str, usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(name)]
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def make_mtls(directory: Path) -> Mtls:
    directory.mkdir(parents=True, exist_ok=True)
    authority = Authority.create(directory)
    files = {}
    for role, name, usage in (
        ("server", KEYSERVER_NAME, ExtendedKeyUsageOID.SERVER_AUTH),
        ("edge", "edge.test", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        cert, key = _issue(authority, name, usage)
        (directory / f"{role}.pem").write_bytes(cert)
        (directory / f"{role}.key").write_bytes(key)
        (directory / f"{role}.key").chmod(0o600)
        files[role] = (directory / f"{role}.pem", directory / f"{role}.key")
    return Mtls(authority.path, *files["server"], *files["edge"])


# --- the key server ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyCall:
    op: Op
    ski: bytes | None
    sni: str | None


class TestKeyServer:
    """A mutual-TLS key server on 127.0.0.1 in a background asyncio loop.

    ``mode``: ``"ok"`` performs; ``"refuse"`` answers every key operation ``NOT_AUTHORIZED``;
    ``"hang"`` never answers key operations (PING is always answered). :meth:`stop` closes the
    listener and every connection; :meth:`start` again listens on the same port.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        keys: list[PrivateKey],
        mtls: Mtls,
        *,
        mode: str = "ok",
        delays: dict[Op, float] | None = None,
    ) -> None:
        self.store = LocalKeyStore(keys)
        self.mode = mode
        #: Seconds to hold back the answer to each opcode (to reorder replies).
        self.delays = dict(delays or {})
        self.port = 0
        self._context = mtls.server_context()
        self._lock = threading.Lock()
        self._calls: list[KeyCall] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def calls(self) -> list[KeyCall]:
        with self._lock:
            return list(self._calls)

    def key_calls(self) -> list[KeyCall]:
        return [call for call in self.calls if call.op is not Op.PING]

    def start(self) -> TestKeyServer:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="keyserver", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), loop).result(timeout=10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, ssl=self._context, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop
        asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=10)
        loop.close()
        self._loop = None

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    def __enter__(self) -> TestKeyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        conn = ServerConnection()
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, RequestReceived):
                        answer = self._answer(event)
                        if answer is not None:
                            frame = conn.send_response(answer)
                            delay = self.delays.get(event.request.op, 0.0)
                            if delay:
                                asyncio.get_running_loop().call_later(delay, writer.write, frame)
                            else:
                                writer.write(frame)
                    elif isinstance(event, BadRequest | ConnectionBroken):
                        writer.write(conn.send_response(event.reply()))
                        if isinstance(event, ConnectionBroken):
                            return
                await writer.drain()
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    def _answer(self, event: RequestReceived) -> Response | None:
        request = event.request
        with self._lock:
            self._calls.append(KeyCall(request.op, request.ski, request.sni))
        if request.op is Op.PING:
            return Response.pong(request.id, request.payload)
        if self.mode == "hang":
            return None
        if self.mode == "refuse":
            return Response.error(request.id, ErrorCode.NOT_AUTHORIZED)
        try:
            assert request.ski is not None
            return Response.ok(
                request.id, self.store.perform(request.ski, request.op, request.payload)
            )
        except KeyOperationError as exc:
            return Response.error(request.id, exc.code)


# --- the origin -------------------------------------------------------------------------------


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _describe(self, body: bytes) -> bytes:
        return (
            json.dumps(
                {
                    "method": self.command,
                    "path": self.path,
                    "host": self.headers.get("Host"),
                    "xff": self.headers.get_all("X-Forwarded-For"),
                    "proto": self.headers.get("X-Forwarded-Proto"),
                    "connection": self.headers.get("Connection"),
                    "secret": self.headers.get("X-Secret"),
                    "body": body.decode("latin-1"),
                }
            ).encode()
            + b"\n"
        )

    def _send(self, body: bytes, *, mode: str = "length") -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (body[:5], body[5:]):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif mode == "eof":
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/chunked"):
            self._send(self._describe(b""), mode="chunked")
        elif self.path.startswith("/eof"):
            self._send(self._describe(b""), mode="eof")
        else:
            self._send(self._describe(b""))

    do_HEAD = do_GET

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self._send(self._describe(self.rfile.read(length)))


class TestOrigin:
    """A plain-HTTP origin in a thread: answers with JSON describing what it received."""

    __test__ = False

    def __init__(self, name: str = "origin") -> None:
        self.name = name
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OriginHandler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TestOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- configuration ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
    leaf: Leaf
    origin: str
    key_id: bytes | None = None


def write_config(
    directory: Path,
    sites: list[Site],
    keyserver: str | list[str],
    mtls: Mtls,
    **edge: object,
) -> Path:
    """An edge TOML in ``directory`` (chains written next to it); ``edge`` goes to ``[edge]``."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["[edge]", 'listen = "127.0.0.1:0"']
    for name, value in edge.items():
        lines.append(f"{name} = {json.dumps(value)}")
    lines += ["", "[keyserver]"]
    if isinstance(keyserver, list):
        lines.append(f"addresses = {json.dumps(keyserver)}")
    else:
        lines.append(f'address = "{keyserver}"')
    lines += [
        f'server_name = "{KEYSERVER_NAME}"',
        f'ca = "{mtls.ca}"',
        f'cert = "{mtls.edge_cert}"',
        f'key = "{mtls.edge_key}"',
    ]
    for site in sites:
        chain = directory / f"{site.leaf.name}.chain.pem"
        chain.write_bytes(site.leaf.chain_pem)
        lines += [
            "",
            "[[service]]",
            f'hostname = "{site.leaf.name}"',
            f'chain = "{chain.name}"',
            f'origin = "{site.origin}"',
        ]
        if site.key_id is not None:
            lines.append(f'key_id = "{site.key_id.hex()}"')
    path = directory / "edge.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- clients ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Fetched:
    version: str | None
    status: int
    headers: dict[str, str]
    body: bytes
    reused: bool
    session: ssl.SSLSession | None


def fetch(
    port: int,
    name: str | None,
    context: ssl.SSLContext,
    *,
    path: str = "/",
    session: ssl.SSLSession | None = None,
    request: bytes | None = None,
) -> Fetched:
    """One verified HTTPS request with Python's ``ssl`` (``Connection: close``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=name, session=session) as tls:
            tls.sendall(
                request
                or f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return Fetched(tls.version(), *parse_response(data), tls.session_reused, tls.session)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def client_context(ca: Path, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


# --- no private key ---------------------------------------------------------------------------


def private_values(key: PrivateKey) -> tuple[set[int], set[bytes]]:
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        return {n.d, n.p, n.q, n.dmp1, n.dmq1, n.iqmp}, set()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {key.private_numbers().private_value}, set()
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return set(), {key.private_bytes_raw()}


def reachable(obj: object, depth: int = 6) -> tuple[set[int], list[bytes]]:
    """Every int and byte string reachable from ``obj``'s attributes, a few levels deep."""
    ints: set[int] = set()
    raws: list[bytes] = []
    seen: set[int] = set()

    def walk(value: object, level: int) -> None:
        if id(value) in seen or level > depth:
            return
        seen.add(id(value))
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            ints.add(value)
        elif type(value).__name__ == "mpz":
            ints.add(int(value))
        elif isinstance(value, bytes | bytearray):
            raws.append(bytes(value))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item, level + 1)
        elif isinstance(value, list | tuple | set | frozenset):
            for item in value:
                walk(item, level + 1)
        elif isinstance(value, type | threading.Thread) or callable(value):
            return
        else:
            for name in getattr(type(value), "__slots__", ()):
                walk(getattr(value, name, None), level + 1)
            for item in getattr(value, "__dict__", {}).values():
                walk(item, level + 1)

    walk(obj, 0)
    return ints, raws


@contextlib.contextmanager
def stopped(server: TestKeyServer) -> Iterator[None]:
    server.stop()
    try:
        yield
    finally:
        server.start()
