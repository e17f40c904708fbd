"""S5 keyless TLS on broker keys, end to end with real processes.

A broker (``keybroker serve``, SQLite), a key server enrolled as ``service/ks1`` running on
broker keys (``keybroker keyserver --keyring``: keys, grants, its TLS certificate and the edges'
CA all from its enrolment and the broker), an edge enrolled as ``node/edge1`` (its client
certificate from ``keybroker keyless tls-files``), and a plain HTTP origin. The operator uploads
one ECDSA P-256 and one RSA-2048 service key, grants both to the edge and lets the key server
hold them, all with ``keybroker keyless …``. Then, with unmodified clients:

* curl and ``openssl s_client -tls1_3`` (chain and host name verified) fetch the origin's page
  through the edge for both services;
* a new key version uploaded for a service is served by the key server after a refresh, with
  no restart;
* ``keybroker keyless revoke SERVICE --edge node/edge1``: within a refresh the next handshake
  for that service fails with a TLS alert (not a hang) while the other service still works;
* no file the edge has holds a private key of either service.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tests.conftest import missing

from keybroker.flows.keyless.codes import ErrorCode, Op
from keybroker.flows.keyless.keyclient import KeyClient
from keybroker.flows.keyless.tlskeys import KeyOperationFailed

from .processes import KB, Procs, free_port

#: The key server's host name: on its token, so in its enrolment certificate.
KEYSERVER_NAME = "ks1.keyless.test"
SHOP, API = "shop.e2e.test", "api.e2e.test"
#: Seconds between the key server's synchronisations with the broker.
REFRESH = 1.0
#: Seconds a client may take before the test calls it a hang (not a speed test).
CLIENT_TIMEOUT = 20.0
#: How long a revocation may take to show: one refresh, plus slack for a loaded machine.
REVOCATION_DEADLINE = REFRESH + 14.0
LISTENING = re.compile(
    r"^listening on 127\.0\.0\.1:(\d+)(?: metrics on 127\.0\.0\.1:(\d+))?$", re.M
)
ServiceKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def tool(name: str) -> str:
    """The path of command ``name``; missing: a skip, or a failure under ``CI=true``."""
    path = shutil.which(name)
    if path is None:
        missing(f"the {name} command")
        raise AssertionError("unreachable")
    return path


# -- service keys and certificates (the operator's, never the edge's) ---------------------------


@dataclass(frozen=True)
class Service:
    name: str
    key: ServiceKey
    chain_pem: bytes  # leaf, then the test CA

    @property
    def ski(self) -> bytes:
        return x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()).digest


class ServiceCA:
    """The public CA the services' certificates chain to (what TLS clients trust)."""

    def __init__(self, path: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyless e2e service CA")])
        now = datetime.now(UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = path
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def service(self, name: str, key: ServiceKey) -> Service:
        now = datetime.now(UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(self.key, hashes.SHA256())
        )
        chain = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (leaf, self.certificate)
        )
        return Service(name, key, chain)


def pkcs8(key: ServiceKey, encoding: serialization.Encoding) -> bytes:
    return key.private_bytes(
        encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def secret_forms(key: ServiceKey) -> Iterator[bytes]:
    """Ways the private half of ``key`` could sit in a file: PKCS#8 DER, a line of its PEM, the
    private numbers as bytes, each also in hex and base64."""
    numbers: list[int]
    if isinstance(key, rsa.RSAPrivateKey):
        private = key.private_numbers()
        numbers = [private.d, private.p, private.q]
    else:
        numbers = [key.private_numbers().private_value]
    raw = [pkcs8(key, serialization.Encoding.DER)]
    raw += [n.to_bytes((n.bit_length() + 7) // 8, "big") for n in numbers]
    for secret in raw:
        yield secret
        yield secret.hex().encode()
        yield base64.b64encode(secret)
    yield pkcs8(key, serialization.Encoding.PEM).splitlines()[1]


# -- the rig -------------------------------------------------------------------------------------


def wait_listening(procs: Procs, name: str, timeout: float = 60) -> tuple[int, int | None]:
    """The ``listening on`` line of process ``name`` (its log holds stdout and stderr)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = LISTENING.search(procs.log(name))
        if found:
            return int(found.group(1)), int(found.group(2)) if found.group(2) else None
        if procs.running[name].poll() is not None:
            raise AssertionError(f"{name} exited:\n{procs.log(name)}")
        time.sleep(0.05)
    raise AssertionError(f"{name} did not say it was listening:\n{procs.log(name)}")


def until(check: Callable[[], bool], what: str, procs: Procs, timeout: float) -> float:
    """Poll ``check`` until true; the seconds it took."""
    started = time.monotonic()
    while not check():
        for name, proc in procs.running.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited waiting for {what}:\n{procs.log(name)}")
        if time.monotonic() - started > timeout:
            logs = "\n".join(f"--- {n}\n{procs.log(n)}" for n in procs.running)
            raise AssertionError(f"not within {timeout:.0f} s: {what}\n{logs}")
        time.sleep(0.1)
    return time.monotonic() - started


@dataclass
class Fetch:
    ok: bool
    output: str
    seconds: float


class Clients:
    """curl and openssl s_client against the edge, verifying against the service CA."""

    def __init__(self, ca: Path, port: int) -> None:
        self.ca = ca
        self.port = port
        self.curl_path = tool("curl")
        self.openssl_path = tool("openssl")

    def _run(self, argv: list[str], stdin: bytes = b"") -> tuple[int, str, float]:
        started = time.monotonic()
        try:
            done = subprocess.run(
                argv, input=stdin, capture_output=True, timeout=CLIENT_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{argv[0]} hung for {CLIENT_TIMEOUT:.0f} s") from None
        output = (done.stdout + done.stderr).decode(errors="replace")
        return done.returncode, output, time.monotonic() - started

    def curl(self, host: str) -> Fetch:
        code, output, seconds = self._run(
            [self.curl_path, "--silent", "--show-error", "--tlsv1.2",
             "--max-time", str(CLIENT_TIMEOUT), "--cacert", str(self.ca),
             "--resolve", f"{host}:{self.port}:127.0.0.1", f"https://{host}:{self.port}/"]
        )  # fmt: skip
        return Fetch(code == 0, output, seconds)

    def s_client(self, host: str) -> Fetch:
        request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        code, output, seconds = self._run(
            [self.openssl_path, "s_client", "-tls1_3", "-connect", f"127.0.0.1:{self.port}",
             "-servername", host, "-CAfile", str(self.ca), "-verify_return_error",
             "-verify_hostname", host, "-ign_eof"],
            request,
        )  # fmt: skip
        return Fetch(code == 0 and "Verify return code: 0 (ok)" in output, output, seconds)


BODY = "keyless origin page 7f3a"


def test_keyless_tls_on_broker_keys(procs: Procs, tmp_path: Path) -> None:
    env = procs.env
    operator, edge_dir = tmp_path / "operator", tmp_path / "edge"
    operator.mkdir()
    edge_dir.mkdir()
    origin_dir = tmp_path / "origin"
    origin_dir.mkdir()
    (origin_dir / "index.html").write_text(BODY + "\n")

    # The broker, and the two principals enrolled with one-time tokens (passed in the
    # environment: a token is a secret and never goes into argv).
    env.run("init")
    port = free_port()
    env.env["KEYBROKER_URL"] = url = f"https://127.0.0.1:{port}"
    procs.running["serve"] = env.serve(port)
    tokens = {
        "service/ks1": env.run("principal", "token", "service/ks1", "--dns", KEYSERVER_NAME),
        "node/edge1": env.run("principal", "token", "node/edge1"),
    }
    enrolling = []
    for name, done in tokens.items():
        token = done.stdout.strip().splitlines()[-1]
        argv = [*KB, "enroll", name, "--url", url, "--ca", str(env.home / "ca.pem"),
                "--keyring", f"{name.split('/')[1]}.keyring"]  # fmt: skip
        enrolling.append(
            subprocess.Popen(
                argv,
                cwd=tmp_path,
                env={**env.env, "KEYBROKER_ENROL_TOKEN": token},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for proc in enrolling:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode(errors="replace")

    # The operator's service keys: uploaded, granted to the edge, held by the key server.
    ca = ServiceCA(tmp_path / "service-ca.pem")
    services = {
        SHOP: ca.service(SHOP, ec.generate_private_key(ec.SECP256R1())),
        API: ca.service(API, rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    }
    for service in services.values():
        key_file = write_private(
            operator / f"{service.name}.key", pkcs8(service.key, serialization.Encoding.PEM)
        )
        chain = operator / f"{service.name}.pem"
        chain.write_bytes(service.chain_pem)
        uploaded = env.run("keyless", "upload", service.name, "--key", str(key_file),
                           "--chain", str(chain)).stdout  # fmt: skip
        assert service.ski.hex() in uploaded
        env.run("keyless", "grant", service.name, "--edge", "node/edge1")
        env.run("keyless", "hold", service.name, "--keyserver", "service/ks1")

    # The edge's client identity: its own enrolment, exported for `keybroker edge`.
    exported = env.run("keyless", "tls-files", "--keyring", "edge1.keyring", "--out", "edge/tls")
    assert "node/edge1" in exported.stdout
    assert (edge_dir / "tls" / "node-edge1.key").stat().st_mode & 0o777 == 0o600
    for service in services.values():
        (edge_dir / f"{service.name}.pem").write_bytes(service.chain_pem)
    origin_port, edge_port = free_port(), free_port()
    (edge_dir / "edge.toml").write_text(
        f'[edge]\nlisten = "127.0.0.1:{edge_port}"\nworkers = 1\n\n'
        f'[keyserver]\naddress = "127.0.0.1:{{ks_port}}"\nserver_name = "{KEYSERVER_NAME}"\n'
        'ca = "tls/broker-ca.pem"\ncert = "tls/node-edge1.crt"\nkey = "tls/node-edge1.key"\n'
        + "".join(
            f'\n[[service]]\nhostname = "{name}"\nchain = "{name}.pem"\n'
            f'origin = "http://127.0.0.1:{origin_port}"\n'
            for name in services
        )
    )

    # The key server on broker keys; the origin.
    procs.start(
        "keyserver", "keyserver", "--keyring", "ks1.keyring", "--listen", "127.0.0.1:0",
        "--refresh", str(REFRESH), "--metrics-port", "0", "--workers", "1",
    )  # fmt: skip
    origin = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(origin_port),
         "--directory", str(origin_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    procs.running["origin"] = origin
    ks_port, metrics_port = wait_listening(procs, "keyserver")
    assert metrics_port is not None
    config = edge_dir / "edge.toml"
    config.write_text(config.read_text().replace("{ks_port}", str(ks_port)))
    procs.start("edge", "edge", "--config", str(config), "--workers", "1")
    wait_listening(procs, "edge")
    health = httpx.get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5)
    assert health.status_code == 200 and health.text.startswith("ok: 2 keys"), health.text

    # 1. Unmodified clients, chain and host name verified, through the edge to the origin.
    clients = Clients(ca.path, edge_port)
    for name in services:
        fetched = clients.curl(name)
        assert fetched.ok and BODY in fetched.output, fetched.output
        handshake = clients.s_client(name)
        assert handshake.ok, handshake.output
        assert "TLSv1.3" in handshake.output and BODY in handshake.output, handshake.output
    assert "Peer signature type: ECDSA" in clients.s_client(SHOP).output
    assert "Peer signature type: RSA-PSS" in clients.s_client(API).output

    # 2. A new key version is served after a refresh, without a restart (asked directly, as
    #    the edge would, with the edge's identity).
    newer = ec.generate_private_key(ec.SECP256R1())
    newer_file = write_private(operator / "shop-v2.key", pkcs8(newer, serialization.Encoding.PEM))
    uploaded = env.run("keyless", "upload", SHOP, "--key", str(newer_file)).stdout
    assert "version 2 is primary" in uploaded

    tls = edge_dir / "tls"
    key_client = KeyClient.from_files(
        [f"127.0.0.1:{ks_port}"], ca=tls / "broker-ca.pem", cert=tls / "node-edge1.crt",
        key=tls / "node-edge1.key", server_name=KEYSERVER_NAME,
    )  # fmt: skip
    newer_ski = x509.SubjectKeyIdentifier.from_public_key(newer.public_key()).digest
    digest = hashlib.sha256(b"a TLS 1.3 CertificateVerify").digest()
    signed: list[bytes] = []

    def signs_with_the_new_version() -> bool:
        try:
            signed[:] = [key_client.operate(Op.ECDSA_SIGN_SHA256, newer_ski, digest, sni=SHOP)]
        except KeyOperationFailed:
            return False
        return True

    try:
        until(signs_with_the_new_version, "the new version served", procs, 30)
        newer.public_key().verify(signed[0], digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        health = httpx.get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5)
        assert health.text.startswith("ok: 3 keys"), health.text  # v1 of both, v2 of the shop

        # 3. Revocation: within a refresh the service's handshakes end in an alert; the other
        #    service is untouched.
        revoked = env.run("keyless", "revoke", SHOP, "--edge", "node/edge1").stdout
        assert "node/edge1 may no longer use keyless/shop.e2e.test" in revoked
        last: list[Fetch] = []

        def refused() -> bool:
            last[:] = [clients.curl(SHOP)]
            return not last[0].ok

        took = until(refused, "the revocation to apply", procs, REVOCATION_DEADLINE)
        assert took < REVOCATION_DEADLINE
        failed = last[0]
        assert "alert" in failed.output and BODY not in failed.output, failed.output
        assert failed.seconds < CLIENT_TIMEOUT / 2, failed  # an alert, not a hang
        handshake = clients.s_client(SHOP)
        assert not handshake.ok and "alert internal error" in handshake.output, handshake.output
        assert BODY not in handshake.output
        with pytest.raises(KeyOperationFailed) as caught:
            key_client.operate(Op.ECDSA_SIGN_SHA256, newer_ski, digest, sni=SHOP)
        assert caught.value.code is ErrorCode.NOT_AUTHORIZED
        still = clients.curl(API)
        assert still.ok and BODY in still.output, still.output
        assert clients.s_client(API).ok
    finally:
        key_client.close()

    # 4. The edge's files hold no private key of any service (its own identity key only).
    edge_files = b"".join(p.read_bytes() for p in edge_dir.rglob("*") if p.is_file())
    assert b"PRIVATE KEY" in edge_files  # the search would see a PEM key: the edge's own
    for key in (*(s.key for s in services.values()), newer):
        for form in secret_forms(key):
            assert form not in edge_files, "a service's private key is in the edge's files"

    # The key server logged the revocation and nothing secret; everything stops cleanly.
    log = (tmp_path / "keyserver.log").read_bytes()
    assert b"node/edge1 may no longer use keyless/shop.e2e.test" in log
    assert b"Traceback" not in log and b"PRIVATE KEY" not in log
    assert env.env["KEYBROKER_KEYRING_PASSPHRASE"].encode() not in log
    for key in (*(s.key for s in services.values()), newer):
        for form in secret_forms(key):
            assert form not in log, "a service's private key is in the key server's log"
    for name in ("edge", "keyserver"):
        assert procs.terminate(name) == 0, procs.log(name)
