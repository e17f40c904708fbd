"""Helpers of the broker-side keyless tests: service keys and certificates, a broker behind the
API in-process (tests/unit/api/api_kit.py), enrolled key servers, and every form in which a
service key could leak.

(Not called ``broker_kit``: tests/unit/broker has a module of that name, imported by its bare
name, and the two would shadow each other on ``sys.path``.)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "api"))

from api_kit import URL, Clock, Env, encodings, make_env
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keybroker.broker.home import init_home
from keybroker.client.principal import PrincipalClient
from keybroker.flows.keyless.brokered import BrokerAuthorizer, BrokerKeySource, KeyServerPrincipal
from keybroker.flows.keyless.operations import PrivateKey

__all__ = ["URL", "Clock", "Env", "encodings", "make_env"]

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def new_env(tmp: Path, db_url: str, *, now: datetime = T0) -> Env:
    """A broker on a fresh home behind the API, its clock at ``now``; close with
    ``await env.aclose()`` and ``env.home.close()``."""
    clock = Clock(now)
    home = init_home(tmp / "home", db_url=db_url, clock=clock)
    return make_env(home, clock, tmp)


# -- service keys --------------------------------------------------------------------------


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, bits)


def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def certificate(
    key: PrivateKey, name: str = "www.example.test", *, server_auth: bool = True
) -> x509.Certificate:
    """A self-signed certificate for ``key`` (what a service presents to TLS clients)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server_auth else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - timedelta(days=1))
        .not_valid_after(T0 + timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _int_bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def secret_forms(key: PrivateKey) -> list[bytes]:
    """Every way the private half of ``key`` could be written down: its PKCS#8 DER and PEM,
    and its private numbers, each raw and in hex and base64 (:func:`api_kit.encodings`)."""
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    secrets = [der, pem(key).split(b"\n")[1]]  # a line of the PEM body
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        secrets += [
            _int_bytes(n)
            for n in (numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp)
        ]
        traditional = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        secrets.append(traditional)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        secrets.append(_int_bytes(key.private_numbers().private_value))
    else:
        secrets.append(key.private_bytes_raw())
    return [form for secret in secrets for form in encodings(secret)]


def assert_no_secret(haystack: bytes | str, key: PrivateKey, where: str) -> None:
    data = haystack.encode() if isinstance(haystack, str) else haystack
    for form in secret_forms(key):
        assert form not in data, f"a form of the service key appears in {where}"


# -- key servers ------------------------------------------------------------------------------


@dataclass
class KeyServer:
    """An enrolled ``service`` principal's keyring, with a key source and authorizer on it."""

    name: str
    path: Path
    kek: Any
    principal: KeyServerPrincipal
    source: BrokerKeySource
    authorizer: BrokerAuthorizer

    def reload(self) -> None:
        self.source.reload()
        self.authorizer.reload()


async def enrol(
    env: Env, name: str, *, dns_names: tuple[str, ...] = (), kek: Any = None
) -> tuple[Path, Any]:
    """Enrol ``name`` through the API (with DNS names on its token); its keyring path and KEK."""
    kek = kek or env.kek()
    issued = await env.operator().create_enrolment_token(
        name, timedelta(hours=1), dns_names=dns_names
    )
    path = env.tmp / (name.replace("/", "_") + ".keyring")
    client = await PrincipalClient.enrol(
        URL, env.ca_pem, name, issued.token, path, kek=kek, transport=env.transport, clock=env.clock
    )
    await client.aclose()
    return path, kek


async def key_server(env: Env, name: str = "service/ks1", **options: Any) -> KeyServer:
    path, kek = await enrol(env, name, **options)
    principal = KeyServerPrincipal(path, kek=kek, transport=env.transport, clock=env.clock)
    return KeyServer(
        name, path, kek, principal, BrokerKeySource(principal), BrokerAuthorizer(principal)
    )
