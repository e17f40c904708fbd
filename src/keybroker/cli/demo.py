"""``keybroker demo``: every built stage end to end in a throwaway home.

Each stage is a function that does real work against the embedded default
(SQLite file, file root key) and returns one line saying what it proved; a
stage that cannot prove its point raises. Later flows append their stages.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from keybroker.broker.home import Home, init_home, open_home
from keybroker.cli.credentials import read_admin_token, write_admin_token
from keybroker.client.operator import OperatorClient
from keybroker.client.principal import PrincipalClient
from keybroker.encoding import encode, message_label
from keybroker.errors import (
    AuthorizationError,
    CertificateRevoked,
    IdentityMismatch,
    KeysetError,
    RootKeyError,
)
from keybroker.flows.keyless.demo import stage_keyless
from keybroker.flows.pairing.demo import stage_pairing
from keybroker.flows.pushauth.demo import stage_pushauth
from keybroker.flows.rotation.demo import stage_rotation
from keybroker.keys import AES256_GCM, ED25519, SECRET_ACCESS, X25519_HPKE, Keyset
from keybroker.log import merkle
from keybroker.pki import PrincipalId, Revocation, verify_principal_certificate
from keybroker.store.engine import DB_FILENAME

DEMO_ENTRY = message_label("keybroker/log/entry/demo", 1)
DEMO_PASSPHRASE = "demo keyring passphrase"  # noqa: S105 - a throwaway demo keyring
_T = TypeVar("_T")


@dataclass
class DemoState:
    workdir: Path
    home: Home | None = None
    server: subprocess.Popen[bytes] | None = None
    url: str = ""
    ciphertexts: list[bytes] = field(default_factory=list)
    secrets: list[bytes] = field(default_factory=list)
    log_indices: list[int] = field(default_factory=list)
    #: The demo's console, for a stage's own progress nested under the demo's.
    console: Console | None = None

    @property
    def opened(self) -> Home:
        assert self.home is not None
        return self.home

    def record(self, what: str, **details: str | int) -> None:
        """Append a demo event to the transparency log and remember its index."""
        entry = encode(DEMO_ENTRY, {"event": what, **details})
        self.log_indices.append(self.opened.log.append(entry))


def _refused(error: type[Exception], attempt: Callable[[], object]) -> bool:
    """True if ``attempt`` raised ``error``; the demo fails any stage where it did not."""
    try:
        attempt()
    except error:
        return True
    return False


def stage_init(s: DemoState) -> str:
    s.home = init_home(s.workdir / "home")
    write_admin_token(s.home)
    key_mode = stat.S_IMODE(os.stat(s.workdir / "home" / "root.key").st_mode)
    if key_mode != 0o600:
        raise RuntimeError(f"root key created with mode {key_mode:o}")
    return f"home created: root key 0600 ({s.opened.root_key.kek_id}), SQLite/WAL, P-256 CA"


def stage_keyset(s: DemoState) -> str:
    home = s.opened
    ks = Keyset.generate("demo/orders", AES256_GCM, now=home.clock())
    stored = home.keysets.create(ks)
    s.record("keyset-created", keyset=ks.name)
    s.ciphertexts.append(ks.aead().encrypt(b"order #1", b"demo"))
    v2 = ks.add(now=home.clock())
    ks.promote(v2.version, now=home.clock())
    stored = home.keysets.save(stored)
    s.record("keyset-rotated", keyset=ks.name, version=v2.version)
    s.ciphertexts.append(ks.aead().encrypt(b"order #2", b"demo"))
    reloaded = home.keysets.load("demo/orders").keyset.aead()
    if [reloaded.decrypt(c, b"demo") for c in s.ciphertexts] != [b"order #1", b"order #2"]:
        raise RuntimeError("a ciphertext did not survive rotation")
    ks.disable(1, now=home.clock())
    home.keysets.save(stored)
    s.record("key-disabled", keyset=ks.name, version=1)
    aead = home.keysets.load("demo/orders").keyset.aead()
    if not _refused(KeysetError, lambda: aead.decrypt(s.ciphertexts[0], b"demo")):
        raise RuntimeError("a disabled version still decrypted")
    s.secrets += [ks.export_secret_material(v.version, SECRET_ACCESS) for v in ks.versions]
    return "rotated v1→v2 with both ciphertexts readable; disabling v1 refused its ciphertext"


def stage_identity(s: DemoState) -> str:
    home = s.opened
    now = home.clock()
    principal = PrincipalId.parse("site/demo1")
    identity = Keyset.generate("principal/site/demo1/identity", ED25519, now=now)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(identity.signer().private_key(SECRET_ACCESS), None)
    )
    cert = home.ca.issue_identity_from_csr(
        csr, principal, now, timedelta(days=30), serial_number="DEMO-0001"
    )
    roots = [home.ca.certificate]
    crl = home.ca.issue_crl([], now, now + timedelta(days=1), crl_number=1)
    verify_principal_certificate(cert, [], roots, principal, now, crls=[crl])
    other = PrincipalId.parse("site/demo2")
    if not _refused(
        IdentityMismatch,
        lambda: verify_principal_certificate(cert, [], roots, other, now, crls=[crl]),
    ):
        raise RuntimeError("a certificate for site/demo1 passed as site/demo2")
    revoked = home.ca.issue_crl(
        [Revocation(cert.serial_number, now)], now, now + timedelta(days=1), crl_number=2
    )
    if not _refused(
        CertificateRevoked,
        lambda: verify_principal_certificate(cert, [], roots, principal, now, crls=[revoked]),
    ):
        raise RuntimeError("a revoked certificate verified")
    fp = cert.fingerprint(hashes.SHA256()).hex()
    s.record("certificate-issued", principal=str(principal), fingerprint=fp)
    return "CSR → identity cert verified; wrong identity and revoked (CRL) both refused"


def stage_sealed(s: DemoState) -> str:
    home = s.opened
    now = home.clock()
    recipient = Keyset.generate("principal/site/demo1/sealing", X25519_HPKE, now=now)
    source = home.keysets.load("demo/orders").keyset
    primary = source.primary
    assert primary is not None
    info = encode(
        message_label("keybroker/demo/delivery-info", 1),
        {"recipient": "site/demo1", "keyset": source.name, "version": primary.version},
    )
    sealed = source.seal_version(primary.version, recipient.public_keyset(), info=info)
    replica = Keyset(source.name, source.purpose)
    replica.install_sealed_version(sealed, recipient.hpke(), info=info, now=now)
    replica.promote(primary.version, now=now)
    if replica.aead().decrypt(s.ciphertexts[1], b"demo") != b"order #2":
        raise RuntimeError("the delivered key did not decrypt")
    s.record("key-sealed", keyset=source.name, version=primary.version, recipient="site/demo1")
    return "primary version HPKE-sealed to a principal, opened there, decrypts the same data"


def stage_log(s: DemoState) -> str:
    log = s.opened.log
    head = log.tree_head()
    public = s.opened.log_public_key
    head.verify(public)
    for index in s.log_indices:
        proof = log.inclusion_proof(index, head.tree_size)
        merkle.verify_inclusion(
            merkle.leaf_hash(log.entry(index)), index, head.tree_size, proof, head.root_hash
        )
    first = log.tree_head(1)
    first.verify(public)
    consistency = log.consistency_proof(1, head.tree_size)
    merkle.verify_consistency(1, head.tree_size, consistency, first.root_hash, head.root_hash)
    return (
        f"signed tree head of {head.tree_size} entries; {len(s.log_indices)} inclusion proofs "
        "and a consistency proof from size 1 verified"
    )


def stage_at_rest(s: DemoState) -> str:
    home_dir = s.workdir / "home"
    s.opened.close()
    s.home = None
    blob = b"".join(p.read_bytes() for p in home_dir.glob(DB_FILENAME + "*"))
    if any(secret in blob for secret in s.secrets):
        raise RuntimeError("key material found in clear in the database file")
    key = home_dir / "root.key"
    key.chmod(0o644)
    if not _refused(RootKeyError, lambda: open_home(home_dir).close()):
        raise RuntimeError("a world-readable root key was accepted")
    key.chmod(0o600)
    s.home = open_home(home_dir)
    return "no key bytes in the database file; a world-readable root key is refused"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stage_serve(s: DemoState) -> str:
    home_dir = s.workdir / "home"
    port = _free_port()
    s.server = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "keybroker.cli.main", "serve", "--port", str(port),
         "--log-level", "warning", "--home", str(home_dir), "--rotation-interval", "0.2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    s.url = f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(home_dir / "ca.pem"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if s.server.poll() is not None:
            raise RuntimeError("keybroker serve exited before it was ready")
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                break
        except OSError:
            time.sleep(0.2)
    else:
        raise RuntimeError("keybroker serve did not come up within 60 s")
    health = asyncio.run(_operator(s, lambda op: op.health()))
    return f"`keybroker serve` answers over HTTPS pinned to the broker CA ({health.status})"


async def _operator(s: DemoState, call: Callable[[OperatorClient], Awaitable[_T]]) -> _T:
    home_dir = s.workdir / "home"
    async with OperatorClient(
        s.url, read_admin_token(home_dir), (home_dir / "ca.pem").read_bytes()
    ) as op:
        return await call(op)


def stage_enrol(s: DemoState) -> str:
    ca_pem = (s.workdir / "home" / "ca.pem").read_bytes()

    async def run() -> bool:
        async with OperatorClient(s.url, read_admin_token(s.workdir / "home"), ca_pem) as op:
            for name in ("site/edge1", "site/edge2"):
                issued = await op.create_enrolment_token(name, timedelta(minutes=10))
                client = await PrincipalClient.enrol(
                    s.url, ca_pem, name, issued.token, s.workdir / f"{name[5:]}.keyring",
                    passphrase=DEMO_PASSPHRASE,
                )  # fmt: skip
                await client.aclose()
                if name == "site/edge1":
                    reused = issued.token
            try:
                await PrincipalClient.enrol(
                    s.url, ca_pem, "site/edge1", reused, s.workdir / "again.keyring",
                    passphrase=DEMO_PASSPHRASE,
                )  # fmt: skip
            except AuthorizationError:
                return True
            return False

    if not asyncio.run(run()):
        raise RuntimeError("a used enrolment token was accepted again")
    return "two principals enrolled over the API (CSR + signed HPKE key); a reused token refused"


def stage_deliver(s: DemoState) -> str:
    async def run() -> tuple[str, int]:
        async def setup(op: OperatorClient) -> None:
            await op.create_keyset("demo/links", "AES256_GCM")
            await op.grant("site/edge1", "demo/links", "hold")
            await op.deliver("demo/links", 1, "site/edge1")
            try:
                await op.deliver("demo/links", 1, "site/edge2")
            except AuthorizationError:
                return
            raise RuntimeError("a principal without a hold grant got a delivery")

        await _operator(s, setup)
        async with PrincipalClient.open(
            s.workdir / "edge1.keyring", passphrase=DEMO_PASSPHRASE
        ) as edge1:
            acked = await edge1.receive(wait=10)
        async with PrincipalClient.open(
            s.workdir / "edge2.keyring", passphrase=DEMO_PASSPHRASE
        ) as edge2:
            other = await edge2.fetch_deliveries()
        return ",".join(d.state for d in acked), len(other)

    states, others = asyncio.run(run())
    if states != "acked" or others:
        raise RuntimeError(f"delivery ended {states!r}; the other principal saw {others}")
    return "key sealed to site/edge1, opened and acked with proof of possession; site/edge2 refused"


def stage_log_api(s: DemoState) -> str:
    async def run(op: OperatorClient) -> tuple[int, int]:
        log = await op.log()
        first = await log.tree_head(1)
        head = await log.check(first)
        await log.verify_inclusion(head.tree_size - 1, head)
        return first.tree_size, head.tree_size

    first, last = asyncio.run(_operator(s, run))
    return f"over the API: tree head {last} verified, consistent with head {first}, inclusion ok"


STAGES: list[tuple[str, Callable[[DemoState], str]]] = [
    ("init", stage_init),
    ("keyset lifecycle", stage_keyset),
    ("identity certificate", stage_identity),
    ("sealed key version", stage_sealed),
    ("transparency log", stage_log),
    ("keys at rest", stage_at_rest),
    ("broker service", stage_serve),
    ("enrolment", stage_enrol),
    ("delivery and ack", stage_deliver),
    ("log over the API", stage_log_api),
    ("staged rotation", stage_rotation),
    ("keyless TLS", stage_keyless),
    ("push login", stage_pushauth),
    ("device pairing", stage_pairing),
]


def run_demo(*, keep: bool = False, console: Console | None = None) -> bool:
    console = console or Console()
    workdir = Path(tempfile.mkdtemp(prefix="keybroker-demo-"))
    state = DemoState(workdir, console=console)
    results: list[tuple[str, bool, str, float]] = []
    try:
        with Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("demo", total=len(STAGES))
            for name, run in STAGES:
                progress.update(task, description=name)
                started = time.perf_counter()
                try:
                    proved = run(state)
                    ok = True
                except Exception as exc:  # the table shows any failure; no traceback
                    proved, ok = f"{type(exc).__name__}: {exc}", False
                results.append((name, ok, proved, time.perf_counter() - started))
                progress.advance(task)
                if not ok:
                    break
    finally:
        if state.server is not None:
            state.server.terminate()
            try:
                state.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                state.server.kill()
        if state.home is not None:
            state.home.close()
        if keep:
            console.print(f"demo home kept in {workdir / 'home'}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    table = Table(title="keybroker demo")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("what it proved")
    table.add_column("time", justify="right")
    for name, ok, proved, seconds in results:
        table.add_row(
            name, "[green]ok[/green]" if ok else "[red]FAILED[/red]", proved, f"{seconds:.2f}s"
        )
    console.print(table)
    return len(results) == len(STAGES) and all(ok for _, ok, _, _ in results)
