"""Test kit for keyless TLS: a test CA and leaf certificates, an in-process key operator that
counts its calls, and a tiny threaded tlslite-ng server that peeks the SNI and terminates TLS
with remote keys.

The operator performs each opcode with a ``cryptography`` private key held by the *test*, so the
server side only ever sees certificates and :func:`remote_key` objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tlslite.handshakesettings import HandshakeSettings
from tlslite.tlsconnection import TLSConnection

from keybroker.flows.keyless.codes import ECDSA_OPS, RSA_PKCS1_OPS, RSA_PSS_OPS, SIGN_HASH, Op
from keybroker.flows.keyless.sni import peek_socket_server_name
from keybroker.flows.keyless.tlskeys import (
    KeyOperationFailed,
    RemoteKey,
    certificate_chain,
    remote_key,
)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

HTTP_BODY = b"keyless says hello\n"
HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
    + str(len(HTTP_BODY)).encode()
    + b"\r\nConnection: close\r\n\r\n"
    + HTTP_BODY
)


# --- certificates ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leaf:
    name: str  # the DNS name in the certificate
    key: PrivateKey  # held by the test (the "key server"), never by the server object
    certificate: x509.Certificate
    chain_pem: bytes  # leaf then CA

    @property
    def ski(self) -> bytes:
        return x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()).digest


@dataclasses.dataclass(frozen=True)
class Authority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    path: Path  # the CA certificate as a PEM file, for -CAfile / --cacert / cafile=

    @classmethod
    def create(cls, directory: Path) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyless test CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        path = directory / "ca.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, path)

    def issue(self, name: str, key: PrivateKey) -> Leaf:
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(key, rsa.RSAPrivateKey),  # static RSA
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + self.certificate.public_bytes(
            serialization.Encoding.PEM
        )
        return Leaf(name, key, cert, pem)


def new_key(kind: str) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


# --- the key operator -------------------------------------------------------------------------

_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(),
    "sha224": hashes.SHA224(),
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


def perform(key: PrivateKey, op: Op, payload: bytes) -> bytes:
    """What a key server does for ``op`` (the test's own ~30 lines, not keybroker's)."""
    if op is Op.ED25519_SIGN and isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(payload)
    if op in ECDSA_OPS and isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(payload, ec.ECDSA(Prehashed(_HASHES[SIGN_HASH[op]])))
    if isinstance(key, rsa.RSAPrivateKey):
        if op in RSA_PSS_OPS:
            algorithm = _HASHES[SIGN_HASH[op]]
            pss = padding.PSS(padding.MGF1(algorithm), padding.PSS.DIGEST_LENGTH)
            return key.sign(payload, pss, Prehashed(algorithm))
        if op in RSA_PKCS1_OPS and SIGN_HASH[op] in _HASHES:
            return key.sign(payload, padding.PKCS1v15(), Prehashed(_HASHES[SIGN_HASH[op]]))
        if op is Op.RSA_DECRYPT:
            try:
                return key.decrypt(payload, padding.PKCS1v15())
            except ValueError:  # implicit rejection, test-grade: a random "message"
                return os.urandom(48)
    raise KeyOperationFailed(f"the test key server cannot do {op.name} with {type(key).__name__}")


@dataclasses.dataclass(frozen=True)
class Call:
    op: Op
    ski: bytes
    sni: str | None
    payload_length: int


class CountingOperator:
    """A :class:`~keybroker.flows.keyless.tlskeys.KeyOperator` over in-process keys.

    ``mode``: ``"ok"``; ``"fail"`` (raise :class:`KeyOperationFailed`, as a key server that is
    down would); ``"garbage"`` (answer with a corrupted result).
    """

    def __init__(self, *keys: PrivateKey, mode: str = "ok") -> None:
        self._keys = {
            x509.SubjectKeyIdentifier.from_public_key(k.public_key()).digest: k for k in keys
        }
        self.mode = mode
        self._lock = threading.Lock()
        self._calls: list[Call] = []

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def ops(self) -> set[Op]:
        return {call.op for call in self.calls}

    def operate(self, op: Op, ski: bytes, payload: bytes, *, sni: str | None) -> bytes:
        assert isinstance(payload, bytes)
        with self._lock:
            self._calls.append(Call(op, ski, sni, len(payload)))
        if self.mode == "fail":
            raise KeyOperationFailed("the test key server is down")
        key = self._keys.get(ski)
        if key is None:
            raise KeyOperationFailed("no such key")
        result = perform(key, op, payload)
        if self.mode == "garbage":
            return bytes([result[0] ^ 0x01]) + result[1:-1] + bytes([result[-1] ^ 0x80])
        return result


# --- the server -------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What happened to one connection on the server side."""

    sni: str | None = None
    key: RemoteKey | None = None
    version: tuple[int, int] | None = None
    cipher: str | None = None
    request: bytes = b""
    error: BaseException | None = None


class TlsTestServer:
    """A thread per connection: peek the SNI, pick the leaf, ``handshakeServer`` with a remote
    key, then answer one tiny HTTP request (or none, if the client sends nothing)."""

    def __init__(
        self,
        route: Callable[[str | None], Leaf | None],
        operator: CountingOperator,
        *,
        settings: HandshakeSettings | None = None,
    ) -> None:
        self._route = route
        self.operator = operator
        self._settings = settings
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self.outcomes: list[Outcome] = []
        self._chains: dict[str, Any] = {}

    def __enter__(self) -> TlsTestServer:
        accept = threading.Thread(target=self._accept_loop, name="tls-test-accept", daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=10)
        self._listener.close()

    def wait_outcomes(self, count: int, timeout: float = 10.0) -> list[Outcome]:
        with self._done:
            if not self._done.wait_for(lambda: len(self.outcomes) >= count, timeout):
                raise AssertionError(f"{len(self.outcomes)} of {count} connections finished")
            return list(self.outcomes)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _chain(self, leaf: Leaf) -> Any:
        if leaf.name not in self._chains:
            self._chains[leaf.name] = certificate_chain(leaf.chain_pem)
        return self._chains[leaf.name]

    def _serve(self, sock: socket.socket) -> None:
        outcome = Outcome()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(10)
            outcome.sni = peek_socket_server_name(sock)
            leaf = self._route(outcome.sni)
            if leaf is None:
                raise LookupError(f"no service for SNI {outcome.sni!r}")
            outcome.key = remote_key(leaf.certificate, self.operator, sni=outcome.sni)
            conn = TLSConnection(sock)
            conn.handshakeServer(
                certChain=self._chain(leaf),
                privateKey=outcome.key,
                alpn=[bytearray(b"http/1.1")],
                settings=self._settings,
            )
            outcome.version = conn.version
            outcome.cipher = conn.getCipherName()
            outcome.request = _read_request(conn)
            if outcome.request:
                conn.write(HTTP_RESPONSE)
            with contextlib.suppress(Exception):
                conn.close()
        except BaseException as exc:  # recorded for the test to look at
            outcome.error = exc
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            with self._done:
                self.outcomes.append(outcome)
                self._done.notify_all()


def _read_request(conn: TLSConnection) -> bytes:
    request = b""
    with contextlib.suppress(Exception):  # the client may just close (s_client < /dev/null)
        while b"\r\n\r\n" not in request and len(request) < 8192:
            chunk = bytes(conn.recv(4096))
            if not chunk:
                break
            request += chunk
    return request


@contextlib.contextmanager
def serving(
    route: Callable[[str | None], Leaf | None],
    operator: CountingOperator,
    *,
    settings: HandshakeSettings | None = None,
) -> Iterator[TlsTestServer]:
    with TlsTestServer(route, operator, settings=settings) as server:
        yield server
