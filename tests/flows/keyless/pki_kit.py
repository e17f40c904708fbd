"""Test kit for the key server: a test PKI, service keys, a grants file, an edge client.

* :func:`make_pki` writes a broker-like CA, a server certificate, edge client
  certificates (``keybroker://node/edge1`` and ``node/edge2``), one edge
  certificate from *another* CA and one without a keybroker URI.
* :func:`make_service_keys` / :func:`write_keys` make the keys the key server
  holds, as PKCS#8 PEM files (mode 0600), and :func:`payload_for` /
  :func:`check_result` build a payload for an opcode and verify the answer
  with the *public* key.
* :class:`EdgeClient` speaks the protocol over asyncio streams with a
  :class:`~keybroker.flows.keyless.protocol.ClientConnection`; :func:`read_raw`
  reads frames without one, for tests that send garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import os
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keybroker.flows.keyless.codes import (
    ECDSA_OPS,
    HEADER_LENGTH,
    RSA_PKCS1_OPS,
    RSA_PSS_OPS,
    SIGN_HASH,
    Op,
)
from keybroker.flows.keyless.operations import PrivateKey, PublicKey, ski_of
from keybroker.flows.keyless.protocol import HEADER, ClientConnection, Response, decode_response

SERVER_NAME = "keyserver.test"
_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(),
    "sha224": hashes.SHA224(),
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


def _write_private(path: Path, key: PrivateKey | ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)


@dataclasses.dataclass(frozen=True)
class Identity:
    certificate: x509.Certificate
    cert: Path
    key: Path


@dataclasses.dataclass(frozen=True)
class CA:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    path: Path

    @classmethod
    def create(cls, directory: Path, name: str) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        path = directory / f"{name.replace(' ', '-')}.pem"
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return cls(key, certificate, path)

    def issue(
        self,
        directory: Path,
        stem: str,
        *,
        common_name: str,
        uri: str | None = None,
        dns: Iterable[str] = (),
        ips: Iterable[str] = (),
        server: bool = False,
    ) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if uri is not None:
            names.append(x509.UniformResourceIdentifier(uri))
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        cert_path = directory / f"{stem}.crt"
        key_path = directory / f"{stem}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_private(key_path, key)
        return Identity(certificate, cert_path, key_path)


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: CA
    other_ca: CA
    server: Identity
    edge1: Identity
    edge2: Identity
    #: ``keybroker://node/edge1``, but issued by another CA.
    foreign_edge1: Identity
    #: Issued by the right CA, with only a DNS name: no keybroker principal.
    no_uri: Identity
    #: ``keybroker://node/edge1`` from the right CA, but for servers only (EKU serverAuth).
    server_usage: Identity

    def client_context(self, identity: Identity | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.path))
        if identity is not None:
            context.load_cert_chain(identity.cert, identity.key)
        return context


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = CA.create(directory, "keybroker test CA")
    other = CA.create(directory, "another CA")
    return Pki(
        ca=ca,
        other_ca=other,
        server=ca.issue(
            directory,
            "server",
            common_name="service/keyserver",
            dns=[SERVER_NAME, "localhost"],
            ips=["127.0.0.1"],
            server=True,
        ),
        edge1=ca.issue(directory, "edge1", common_name="node/edge1", uri="keybroker://node/edge1"),
        edge2=ca.issue(directory, "edge2", common_name="node/edge2", uri="keybroker://node/edge2"),
        foreign_edge1=other.issue(
            directory, "foreign-edge1", common_name="node/edge1", uri="keybroker://node/edge1"
        ),
        no_uri=ca.issue(directory, "no-uri", common_name="edge-legacy", dns=["edge.example"]),
        server_usage=ca.issue(
            directory,
            "server-usage",
            common_name="node/edge1",
            uri="keybroker://node/edge1",
            server=True,
        ),
    )


# --- service keys ---------------------------------------------------------------------------


def make_service_keys() -> dict[str, PrivateKey]:
    """The keys a key server holds in the tests, by name."""
    return {
        "rsa": rsa.generate_private_key(65537, 2048),
        "rsa-nodecrypt": rsa.generate_private_key(65537, 2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


def write_keys(directory: Path, keys: Mapping[str, PrivateKey]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, key in keys.items():
        _write_private(directory / f"{name}.pem", key)


def ski(key: PrivateKey) -> bytes:
    return ski_of(key.public_key())


def grants_toml(
    keys: Mapping[str, PrivateKey],
    edges: Mapping[str, Iterable[str]],
    *,
    allow_decrypt: Iterable[str] = (),
    extra_skis: Mapping[str, Iterable[bytes]] | None = None,
) -> str:
    """A grants table naming ``keys`` by their dictionary names."""
    decrypt = set(allow_decrypt)
    lines = []
    for name, key in keys.items():
        lines.append(f"[keys.{name}]")
        lines.append(f'ski = "{ski(key).hex()}"')
        if name in decrypt:
            lines.append("allow_decrypt = true")
        lines.append("")
    lines.append("[edges]")
    for edge, names in edges.items():
        entries = [f'"{name}"' for name in names]
        entries += [f'"{raw.hex()}"' for raw in (extra_skis or {}).get(edge, ())]
        lines.append(f'"{edge}" = [{", ".join(entries)}]')
    return "\n".join(lines) + "\n"


def kind_of(key: PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ec"
    return "ed25519"


def ops_for(key: PrivateKey) -> list[Op]:
    """Every opcode a key of this kind answers (MD5-SHA1 ones excluded: unsupported)."""
    kind = kind_of(key)
    if kind == "rsa":
        ops = [*RSA_PKCS1_OPS, *RSA_PSS_OPS, Op.RSA_DECRYPT]
    elif kind == "ec":
        ops = list(ECDSA_OPS)
    else:
        ops = [Op.ED25519_SIGN]
    return sorted(op for op in ops if SIGN_HASH.get(op) != "md5sha1")


PREMASTER = bytes(range(48))


def payload_for(op: Op, key: PrivateKey) -> bytes:
    """A payload ``op`` accepts: a digest, a message (Ed25519) or a ciphertext (RSA_DECRYPT)."""
    if op is Op.ED25519_SIGN:
        return b"keyless handshake transcript " + op.name.encode()
    if op is Op.RSA_DECRYPT:
        assert isinstance(key, rsa.RSAPrivateKey)
        return key.public_key().encrypt(PREMASTER, padding.PKCS1v15())
    return hashlib.new(SIGN_HASH[op], b"transcript " + op.name.encode()).digest()


def check_result(op: Op, public_key: PublicKey, payload: bytes, result: bytes) -> None:
    """Raise unless ``result`` is a correct answer to ``op`` on ``payload`` (verified with the
    public key: the test never uses the private key to check the server)."""
    if op is Op.RSA_DECRYPT:
        assert result == PREMASTER
        return
    if op is Op.ED25519_SIGN:
        assert isinstance(public_key, ed25519.Ed25519PublicKey)
        public_key.verify(result, payload)
        return
    algorithm = _HASHES[SIGN_HASH[op]]
    prehashed = utils.Prehashed(algorithm)
    if op in ECDSA_OPS:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        public_key.verify(result, payload, ec.ECDSA(prehashed))
        return
    assert isinstance(public_key, rsa.RSAPublicKey)
    if op in RSA_PSS_OPS:
        pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
        public_key.verify(result, payload, pss, prehashed)
    else:
        public_key.verify(result, payload, padding.PKCS1v15(), prehashed)


# --- the edge side --------------------------------------------------------------------------


class EdgeClient:
    """One edge connection: send pipelined requests, read responses in arrival order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = ClientConnection()

    @classmethod
    async def connect(cls, address: tuple[str, int], context: ssl.SSLContext) -> EdgeClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(*address, ssl=context, server_hostname=SERVER_NAME),
            timeout=10,
        )
        return cls(reader, writer)

    def send(self, op: Op, ski: bytes | None = None, payload: bytes = b"") -> int:
        request_id, frame = self.conn.send_request(op, ski=ski, payload=payload)
        self.writer.write(frame)
        return request_id

    async def receive(self, count: int, timeout: float = 10) -> list[Response]:
        """The next ``count`` responses, in the order they arrive."""
        responses: list[Response] = []

        async def read() -> None:
            while len(responses) < count:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError(f"closed after {len(responses)} of {count} responses")
                responses.extend(self.conn.receive_data(data))

        await self.writer.drain()
        await asyncio.wait_for(read(), timeout)
        return responses

    async def call(self, op: Op, ski: bytes | None = None, payload: bytes = b"") -> Response:
        request_id = self.send(op, ski, payload)
        (response,) = await self.receive(1)
        assert response.id == request_id
        return response

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), timeout=5)


async def read_raw(reader: asyncio.StreamReader, timeout: float = 10) -> Response | None:
    """One response frame read without a ClientConnection; ``None`` at end of stream."""
    try:
        header = await asyncio.wait_for(reader.readexactly(HEADER_LENGTH), timeout)
    except asyncio.IncompleteReadError as exc:
        assert not exc.partial, "the stream ended inside a frame header"
        return None
    _major, _minor, length, _id = HEADER.unpack(header)
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    return decode_response(header + body)


async def at_eof(reader: asyncio.StreamReader, timeout: float = 10) -> bool:
    """Whether the server closes the stream (reading nothing more) within ``timeout``."""
    try:
        data = await asyncio.wait_for(reader.read(65536), timeout)
    except (ConnectionError, ssl.SSLError):
        return True
    return data == b""
