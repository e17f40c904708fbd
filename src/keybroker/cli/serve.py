"""``keybroker serve``: the broker's HTTPS API under uvicorn.

The TLS server certificate is issued by the broker CA at every start (for the
names and addresses the server is reached by), with a fresh P-256 key that
exists only for this process. uvicorn (Python's ``ssl``) loads keys only from
files, so the key is written encrypted (PKCS#8 with a random passphrase held
in memory) to a 0600 file in a private directory, and deleted on exit: the key
never lies on disk in clear.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker.pki import CertificateAuthority, PrincipalId, certificate_pem

SERVER_PRINCIPAL = PrincipalId.parse("service/keybroker")
SERVER_CERT_VALIDITY = timedelta(days=30)


@dataclass(frozen=True)
class TlsFiles:
    certfile: Path
    keyfile: Path
    password: str

    def __repr__(self) -> str:
        return f"TlsFiles({self.certfile}, {self.keyfile})"


if TYPE_CHECKING:
    from keybroker.flows.pushauth.protocol import PushPolicy


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@contextmanager
def server_tls_files(
    ca: CertificateAuthority, names: list[str], now: datetime
) -> Iterator[TlsFiles]:
    """A CA-issued server certificate for ``names`` and its encrypted key, removed afterwards."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_identity(
        SERVER_PRINCIPAL,
        key.public_key(),
        now,
        SERVER_CERT_VALIDITY,
        serial_number="keybroker-server",
        server_auth=True,
        extra_sans=[_san(n) for n in dict.fromkeys(names)],
    )
    password = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="keybroker-tls-") as tmp:
        os.chmod(tmp, 0o700)
        certfile = Path(tmp) / "server.pem"
        keyfile = Path(tmp) / "server.key"
        certfile.write_bytes(certificate_pem(cert) + certificate_pem(ca.certificate))
        fd = os.open(keyfile, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(password.encode()),
                )
            )
        yield TlsFiles(certfile, keyfile, password)


def serve(
    home: Path,
    *,
    host: str,
    port: int,
    names: list[str],
    log_level: str = "info",
    bus_url: str | None = None,
    wake_topic: str = "kb.wake",
    poll_interval: float = 1.0,
    rotation_interval: float = 1.0,
    push_policy: PushPolicy | None = None,
) -> None:
    """Run the API over HTTPS until interrupted (SIGINT/SIGTERM stop it gracefully).

    ``rotation_interval``: seconds between steps of the rollout driver this process
    runs (``0``: none; every replica may run one).
    """
    import sys

    import uvicorn

    # Route handlers hand database work to a thread pool; the event loop thread then
    # waits for the GIL up to the switch interval (5 ms by default) on every hand-back.
    # 1 ms bounds that wait for the request's latency; throughput barely moves.
    sys.setswitchinterval(0.001)

    from keybroker.api.app import create_app
    from keybroker.api.settings import ApiSettings
    from keybroker.broker.home import open_home
    from keybroker.broker.service import Broker

    with open_home(home) as opened:
        broker = Broker.from_home(opened)
        settings = ApiSettings(
            clock=opened.clock,
            bus_url=bus_url,
            wake_topic=wake_topic,
            poll_interval_seconds=poll_interval,
            rotation_interval=rotation_interval,
            push_policy=push_policy,
        )
        app = create_app(broker, settings)
        with server_tls_files(opened.ca, [host, *names], opened.clock()) as tls:
            config = uvicorn.Config(
                app,
                host=host,
                port=port,
                ssl_certfile=str(tls.certfile),
                ssl_keyfile=str(tls.keyfile),
                ssl_keyfile_password=tls.password,
                log_level=log_level,
                server_header=False,
                proxy_headers=False,
                timeout_graceful_shutdown=5,
                # Longer than any client's keep-alive expiry (httpx: 5 s), so a client
                # never reuses a connection the server is closing at the same moment.
                timeout_keep_alive=75,
            )
            uvicorn.Server(config).run()
