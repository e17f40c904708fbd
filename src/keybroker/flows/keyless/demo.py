"""The ``keyless TLS`` stage of ``keybroker demo``: S5 on broker keys, with real processes.

Against the demo's running ``keybroker serve``, on loopback:

* ``service/ks1`` (the key server, DNS name ``ks1.demo.test`` on its token) and
  ``node/edge1`` (the edge) enrol over the API;
* the P-256 TLS key of ``shop.demo.test`` is uploaded to the broker, granted to the
  edge and held by the key server (what ``keybroker keyless upload|grant|hold`` do,
  here in-process against the home);
* ``keybroker keyserver --keyring`` runs on broker keys (it fetches, installs and
  acknowledges the key, serves TLS with its enrolment certificate), ``keybroker edge``
  runs with one worker and the edge principal's own certificate, and a small HTTP
  origin runs in this process;
* curl (Python ``ssl`` if curl is missing) fetches the origin's page through the edge,
  verifying the chain; the body is checked and no file of the edge holds the key;
* the key server is stopped: the next handshake must end in a TLS alert, quickly.

Every process is ended when the stage ends, whether it proved its point or not; logs
are in ``<demo workdir>/keyless`` (kept with ``keybroker demo --keep``).
"""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from keybroker.broker.home import open_home
from keybroker.broker.service import Broker
from keybroker.client.operator import OperatorClient
from keybroker.client.principal import PrincipalClient
from keybroker.flows._demo import DemoProcesses
from keybroker.flows.keyless.brokered import client_tls_files
from keybroker.flows.keyless.service_keys import ServiceKeys

__all__ = ["stage_keyless"]

SERVICE: Final = "shop.demo.test"
KEYSERVER: Final = "service/ks1"
KEYSERVER_NAME: Final = "ks1.demo.test"
EDGE: Final = "node/edge1"
PASSPHRASE: Final = "demo keyless keyring passphrase"  # noqa: S105 - a throwaway demo keyring
PASSPHRASE_ENV: Final = "KEYBROKER_KEYRING_PASSPHRASE"  # noqa: S105 - a variable name
BODY: Final = "hello from the shop's origin, through a keyless edge"
#: Seconds a client may take before the stage calls it a hang.
CLIENT_TIMEOUT: Final = 15.0
_TOKEN_FILE: Final = "admin.token"  # noqa: S105 - a file name (as `keybroker init` writes it)


class DemoContext(Protocol):
    """What the stage needs of ``keybroker.cli.demo.DemoState`` (flows do not import cli)."""

    workdir: Path  # the demo's throwaway directory; the broker home is ``workdir/home``
    url: str  # the running ``keybroker serve``
    console: Console | None


@dataclass(frozen=True)
class _Service:
    """The service's certificate chain and the CA TLS clients trust; the key goes to the broker."""

    key: ec.EllipticCurvePrivateKey
    chain_pem: bytes
    ca_pem: bytes


def _service_certificate() -> _Service:
    """A throwaway public CA and the service's P-256 key and certificate."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keybroker demo web CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVICE)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVICE)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return _Service(key, leaf.public_bytes(pem) + ca.public_bytes(pem), ca.public_bytes(pem))


class _Origin(http.server.BaseHTTPRequestHandler):
    """The service's origin: one page, plain HTTP (the edge terminates TLS in front of it)."""

    def do_GET(self) -> None:
        body = (BODY + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the demo's console is for its progress."""


class _Run:
    """One run of the stage: its directory, its processes and its origin; :meth:`close`
    ends every one of them."""

    def __init__(self, s: DemoContext, progress: Progress) -> None:
        self.home = s.workdir / "home"
        self.url = s.url
        self.dir = s.workdir / "keyless"
        self.dir.mkdir(exist_ok=True)
        self.progress = progress
        self.task = progress.add_task("keyless", total=None)
        self.env = {**os.environ, PASSPHRASE_ENV: PASSPHRASE}
        self.procs = DemoProcesses(self.dir, self.env)
        self.origin: http.server.ThreadingHTTPServer | None = None

    def step(self, what: str) -> None:
        self.progress.update(self.task, description=what)

    def close(self) -> None:
        """End everything still running, and the origin."""
        self.procs.close()
        if self.origin is not None:
            self.origin.shutdown()
            self.origin.server_close()
            self.origin = None

    # -- the steps ------------------------------------------------------------------------------

    async def enrol(self) -> None:
        ca_pem = (self.home / "ca.pem").read_bytes()
        token = (self.home / _TOKEN_FILE).read_text().strip()
        async with OperatorClient(self.url, token, ca_pem) as op:
            for name, dns in ((KEYSERVER, (KEYSERVER_NAME,)), (EDGE, ())):
                issued = await op.create_enrolment_token(name, timedelta(minutes=10), dns_names=dns)
                client = await PrincipalClient.enrol(
                    self.url, ca_pem, name, issued.token, self.keyring(name), passphrase=PASSPHRASE
                )
                await client.aclose()

    def keyring(self, principal: str) -> Path:
        return self.dir / f"{principal.replace('/', '-')}.keyring"

    def upload_grant_hold(self, service: _Service) -> str:
        """The operator's part; the SKI of the key uploaded."""
        with open_home(self.home) as opened:
            keyless = ServiceKeys(Broker.from_home(opened))
            uploaded = keyless.upload(SERVICE, service.key, chain=service.chain_pem)
            keyless.grant_edge(SERVICE, EDGE)
            keyless.hold(SERVICE, KEYSERVER)
        return (uploaded.version.ski or b"").hex()

    def acked(self) -> bool:
        with open_home(self.home) as opened:
            deliveries = Broker.from_home(opened).list_deliveries(principal=KEYSERVER)
        return bool(deliveries) and all(d.state == "acked" for d in deliveries)

    def start_origin(self) -> int:
        self.origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
        threading.Thread(target=self.origin.serve_forever, name="demo-origin", daemon=True).start()
        return int(self.origin.server_address[1])

    def edge_config(self, service: _Service, ks_port: int, origin_port: int) -> Path:
        edge_dir = self.dir / "edge"
        files = client_tls_files(self.keyring(EDGE), PASSPHRASE, directory=edge_dir / "tls")
        (edge_dir / f"{SERVICE}.pem").write_bytes(service.chain_pem)
        config = edge_dir / "edge.toml"
        config.write_text(
            '[edge]\nlisten = "127.0.0.1:0"\nworkers = 1\n\n'
            f'[keyserver]\naddress = "127.0.0.1:{ks_port}"\nserver_name = "{KEYSERVER_NAME}"\n'
            f'ca = "{files.ca}"\ncert = "{files.cert}"\nkey = "{files.key}"\n\n'
            f'[[service]]\nhostname = "{SERVICE}"\nchain = "{SERVICE}.pem"\n'
            f'origin = "http://127.0.0.1:{origin_port}"\n',
            encoding="utf-8",
        )
        return config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class _Fetched:
    ok: bool
    detail: str  # the body, or what went wrong
    alert: bool  # the failure was a TLS alert from the edge
    seconds: float


def _curl(curl: str, ca: Path, port: int) -> _Fetched:
    started = time.monotonic()
    done = subprocess.run(  # noqa: S603 - curl, with our arguments
        [curl, "--silent", "--show-error", "--max-time", str(CLIENT_TIMEOUT), "--cacert",
         str(ca), "--resolve", f"{SERVICE}:{port}:127.0.0.1", f"https://{SERVICE}:{port}/"],
        capture_output=True,
        timeout=CLIENT_TIMEOUT + 5,
        check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    if done.returncode == 0:
        return _Fetched(True, done.stdout.decode(errors="replace"), False, seconds)
    error = done.stderr.decode(errors="replace").strip()
    return _Fetched(False, error, "alert" in error.lower(), seconds)


def _python_ssl(ca: Path, port: int) -> _Fetched:
    """The same request with Python's ``ssl`` (for a machine without curl)."""
    started = time.monotonic()
    context = ssl.create_default_context(cafile=str(ca))
    request = f"GET / HTTP/1.1\r\nHost: {SERVICE}\r\nConnection: close\r\n\r\n".encode()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=SERVICE) as tls,
        ):
            tls.sendall(request)
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
    except ssl.SSLError as exc:
        detail = f"{exc.reason or exc}"
        return _Fetched(False, detail, "ALERT" in detail.upper(), time.monotonic() - started)
    except OSError as exc:
        return _Fetched(False, str(exc), False, time.monotonic() - started)
    response = b"".join(chunks).decode(errors="replace")
    head, _, body = response.partition("\r\n\r\n")
    ok = head.startswith("HTTP/1.1 200")
    return _Fetched(ok, body if ok else head[:80], False, time.monotonic() - started)


async def _run(run: _Run) -> str:
    run.step("making the service's certificate and key")
    service = _service_certificate()
    run.step(f"enrolling {KEYSERVER} and {EDGE}")
    await run.enrol()
    run.step(f"uploading {SERVICE}'s key, granting {EDGE}, {KEYSERVER} holding it")
    ski = run.upload_grant_hold(service)
    ca = run.dir / "web-ca.pem"
    ca.write_bytes(service.ca_pem)

    run.step("starting the key server (broker keys), the edge (1 worker) and the origin")
    ks_port = _free_port()
    run.procs.start(
        "keyserver", "keyserver", "--keyring", str(run.keyring(KEYSERVER)),
        "--listen", f"127.0.0.1:{ks_port}", "--refresh", "1", "--workers", "1",
    )  # fmt: skip
    origin_port = run.start_origin()
    # The edge connects to the key server on its first handshake: both start at once.
    config = run.edge_config(service, ks_port, origin_port)
    run.procs.start("edge", "edge", "--config", str(config), "--workers", "1")
    if run.procs.listening("keyserver") != ks_port:
        raise run.procs.failure("keyserver", "the key server listens on another port")
    if not run.acked():
        raise RuntimeError(f"{KEYSERVER} is listening but has not acknowledged the key")
    edge_port = run.procs.listening("edge")

    curl = shutil.which("curl")
    client = "curl" if curl else "Python ssl (curl not found)"

    def fetch() -> _Fetched:
        if curl is None:
            return _python_ssl(ca, edge_port)
        return _curl(curl, ca, edge_port)

    run.step(f"{client} → edge → origin")
    got = fetch()
    if not got.ok or BODY not in got.detail:
        raise RuntimeError(f"{client} through the edge failed: {got.detail[:200]}")
    edge_files = b"".join(p.read_bytes() for p in (run.dir / "edge").rglob("*") if p.is_file())
    service_der = service.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    scalar = service.key.private_numbers().private_value.to_bytes(32, "big")
    if any(secret in edge_files for secret in (service_der, scalar, scalar.hex().encode())):
        raise RuntimeError("the service's private key is in the edge's files")

    run.step("stopping the key server; a new handshake must fail")
    run.procs.stop("keyserver")
    refused = fetch()
    if refused.ok:
        raise RuntimeError("a handshake succeeded with the key server stopped")
    if not refused.alert or refused.seconds >= CLIENT_TIMEOUT:
        raise RuntimeError(f"not a prompt TLS alert: {refused.detail[:200]}")
    run.procs.stop("edge")
    alert = refused.detail.rsplit(":", 1)[-1].strip() or "alert"
    return (
        f"P-256 key of {SERVICE} (SKI {ski[:8]}…) uploaded, granted to {EDGE}, delivered to "
        f"and acked by {KEYSERVER}; {client} → edge → origin: page ok, no key at the edge; "
        f"key server stopped → next handshake: {alert} in {refused.seconds * 1000:.0f} ms"
    )


def stage_keyless(s: DemoContext) -> str:
    """Registered in ``keybroker demo`` as ``keyless TLS``."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=s.console or Console(),
        transient=True,
    ) as progress:
        run = _Run(s, progress)
        try:
            return asyncio.run(_run(run))
        finally:
            run.close()
