"""Test kit for the keyless acceptance e2e (``test_keyless.py``): real processes, real clients.

* :class:`TestCA` issues, with ``cryptography``, the service leaves (RSA-2048, ECDSA P-256,
  Ed25519), the key server's TLS certificate and the edge's client certificate
  (``keybroker://node/edge1``).
* :func:`launch` starts any command as one of the :class:`~tests.e2e.processes.Procs`,
  :func:`wait_listening` waits for its ``listening on`` line, and :func:`shutdown` stops them
  all (SIGTERM first where asked) and makes sure no descendant outlives them.
* :func:`s_client`, :func:`curl` and :func:`https_get` are the unmodified clients, each
  verifying the chain against the test CA.
* :func:`process_tree`, :func:`open_files` and :func:`memory_holds` look at what a running
  process has open and in memory (Linux ``/proc``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import missing

from .processes import Procs

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

#: Seconds a client may take before the test calls it a hang (a hang detector, not a speed test).
CLIENT_TIMEOUT = 20.0
LISTENING = re.compile(
    r"^listening on 127\.0\.0\.1:(\d+)(?: metrics on 127\.0\.0\.1:(\d+))?$", re.MULTILINE
)
PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.DOTALL
)


def tool(name: str) -> str:
    """The path of command ``name``; missing: a skip, or a failure under ``CI=true``."""
    path = shutil.which(name)
    if path is None:
        missing(f"the {name} command")
        raise AssertionError("unreachable")
    return path


# --- certificates and keys ------------------------------------------------------------------


def new_key(kind: str) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def pkcs8_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, key: PrivateKey) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pkcs8_pem(key))
    path.chmod(0o600)
    return path


def spki(public_key: PublicKey) -> bytes:
    """The DER SubjectPublicKeyInfo: what two keys have in common when they are one key."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ski_of(key: PrivateKey) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A service's certificate; ``key`` stays with the test and the key server."""

    name: str
    key: PrivateKey
    certificate: x509.Certificate
    chain_pem: bytes  # leaf, then the CA

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def ski(self) -> bytes:
        return ski_of(self.key)


@dataclasses.dataclass(frozen=True)
class Identity:
    certificate: x509.Certificate
    cert: Path
    key: Path


def _key_usage(*, signature: bool, encipherment: bool = False, ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        content_commitment=False,
        key_encipherment=encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclasses.dataclass(frozen=True)
class TestCA:
    """One test CA for everything: the clients, the edge and the key server all trust it."""

    __test__ = False  # not a pytest class

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    path: Path  # the CA certificate, PEM: -CAfile, --cacert, cafile=

    @classmethod
    def create(cls, path: Path) -> TestCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyless e2e test CA")])
        now = dt.datetime.now(dt.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(signature=False, ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return cls(key, certificate, path)

    def _builder(
        self, common_name: str, public_key: object, names: list[x509.GeneralName]
    ) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)  # type: ignore[arg-type]
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )

    def leaf(self, name: str, key: PrivateKey) -> Leaf:
        """A TLS server certificate for host ``name`` on ``key``."""
        certificate = (
            self._builder(name, key.public_key(), [x509.DNSName(name)])
            .add_extension(
                _key_usage(signature=True, encipherment=isinstance(key, rsa.RSAPrivateKey)),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(self.key, hashes.SHA256())
        )
        chain = certificate.public_bytes(serialization.Encoding.PEM)
        chain += self.certificate.public_bytes(serialization.Encoding.PEM)
        return Leaf(name, key, certificate, chain)

    def identity(
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
        """A mutual-TLS certificate (server or client) and its key, written to ``directory``."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if uri is not None:
            names.append(x509.UniformResourceIdentifier(uri))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        certificate = (
            self._builder(common_name, key.public_key(), names)
            .add_extension(_key_usage(signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), False)
            .sign(self.key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        cert = directory / f"{stem}.crt"
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return Identity(certificate, cert, write_private(directory / f"{stem}.key", key))


def grants_toml(keys: Mapping[str, PrivateKey], edges: Mapping[str, Iterable[str]]) -> str:
    """The key server's grants table; keys named by their dictionary names."""
    lines = []
    for name, key in keys.items():
        lines += [f'[keys."{name}"]', f'ski = "{ski_of(key).hex()}"', ""]
    lines.append("[edges]")
    for edge, names in edges.items():
        lines.append(f'"{edge}" = {json.dumps(list(names))}')
    return "\n".join(lines) + "\n"


# --- processes ------------------------------------------------------------------------------


def steady_port() -> int:
    """A free loopback port *below* the kernel's ephemeral range, for a server that is stopped
    and started again on the same port: no outgoing connection (the edge's own reconnects
    included, which could even connect to themselves) and no port-0 listener can take it
    in between."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def log_path(procs: Procs, name: str) -> Path:
    return procs.env.workdir / f"{name}.log"


def log_size(procs: Procs, name: str) -> int:
    path = log_path(procs, name)
    return path.stat().st_size if path.exists() else 0


def launch(
    procs: Procs, name: str, argv: list[str], env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as process ``name`` of ``procs`` (stdout and stderr to ``name.log``)."""
    with log_path(procs, name).open("ab") as log:
        process = subprocess.Popen(
            argv,
            cwd=procs.env.workdir,
            env={**procs.env.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    procs.running[name] = process
    return process


def wait_listening(
    procs: Procs,
    name: str,
    offset: int,
    pattern: re.Pattern[str] = LISTENING,
    timeout: float = 60,
) -> re.Match[str]:
    """Wait until ``name``'s log, from byte ``offset`` on, has its ready line."""
    process = procs.running[name]
    deadline = time.monotonic() + timeout
    while True:
        text = log_path(procs, name).read_bytes()[offset:].decode(errors="replace")
        found = pattern.search(text)
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError(f"{name} exited ({process.returncode}):\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} printed no ready line in {timeout} s:\n{text[-3000:]}")
        time.sleep(0.05)


def alive(pid: int, command: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process whose command line holds ``command``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and command.encode() in cmdline


def shutdown(procs: Procs, graceful: Iterable[str]) -> list[str]:
    """Stop ``graceful`` (in that order) with SIGTERM, then kill the rest of ``procs``; then
    kill, by pid, any descendant that outlived them. Returns what went wrong (a status other
    than 0 after SIGTERM, a process left behind)."""
    descendants = {
        pid for process in procs.running.values() for pid in process_tree(process.pid)[1:]
    }
    problems = []
    for name in graceful:
        if name in procs.running:
            try:
                code = procs.terminate(name)
            except AssertionError as exc:
                problems.append(str(exc))
                continue
            if code != 0:
                problems.append(f"{name} exited with status {code} on SIGTERM")
    procs.close()
    procs.running.clear()
    for pid in descendants:
        deadline = time.monotonic() + 5
        while alive(pid, "keybroker") and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid, "keybroker"):
            problems.append(f"process {pid} outlived its parent")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return problems


def _metrics(url: str) -> str:
    """The key server's ``/metrics`` (no proxy, whatever the environment says)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/metrics", timeout=10) as response:
        return str(response.read().decode())


def metric(url: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """One sample of the key server's metrics."""
    for family in text_string_to_metric_families(_metrics(url)):
        for sample in family.samples:
            if sample.name == name and sample.labels == dict(labels or {}):
                return float(sample.value)
    return None


def signatures(url: str) -> float:
    """Key operations the key server has answered ``ok`` (every opcode but PING)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(_metrics(url))
        for sample in family.samples
        if sample.name == "keyless_requests_total"
        and sample.labels.get("result") == "ok"
        and sample.labels.get("op") != "PING"
    )


def wait_until(predicate: object, what: str, timeout: float = 20.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- clients --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    code: int
    output: str
    elapsed: float

    @property
    def served_certificate(self) -> x509.Certificate | None:
        """The first certificate ``openssl s_client`` printed (the leaf it was sent)."""
        found = PEM_CERTIFICATE.search(self.output.encode())
        return x509.load_pem_x509_certificate(found.group(0)) if found else None


def _run(argv: list[str], stdin: str | None = None) -> Outcome:
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
            check=False,
            env={**os.environ, "NO_PROXY": "*", "no_proxy": "*"},
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"hang: {argv[:2]} did not finish in {CLIENT_TIMEOUT} s") from exc
    return Outcome(done.returncode, done.stdout + done.stderr, time.monotonic() - started)


def s_client(port: int, host: str, ca: Path, *args: str) -> Outcome:
    """``openssl s_client`` verifying the chain and ``host``, sending one GET and reading the
    answer until the edge closes (``-ign_eof``); the full (not ``-brief``) report."""
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    return _run(
        [
            tool("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            host,
            "-CAfile",
            str(ca),
            "-verify_return_error",
            "-verify_hostname",
            host,
            "-ign_eof",
            *args,
        ],
        stdin=request,
    )


def curl(port: int, host: str, ca: Path, *args: str, path: str = "/") -> Outcome:
    return _run(
        [
            tool("curl"),
            "--silent",
            "--show-error",
            "--noproxy",
            "*",
            "--max-time",
            str(int(CLIENT_TIMEOUT) - 5),
            "--cacert",
            str(ca),
            "--resolve",
            f"{host}:{port}:127.0.0.1",
            *args,
            f"https://{host}:{port}{path}",
        ]
    )


@dataclasses.dataclass(frozen=True)
class Page:
    version: str | None
    cipher: str | None
    peer: bytes | None  # the leaf, DER
    status: int
    body: bytes


def https_get(port: int, host: str, ca: Path, version: ssl.TLSVersion, path: str = "/") -> Page:
    """One GET with Python's ``ssl`` (``create_default_context``: the chain and host name
    verified), TLS ``version`` only."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = context.maximum_version = version
    with (
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        cipher = tls.cipher()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return Page(
            tls.version(),
            cipher[0] if cipher else None,
            tls.getpeercert(binary_form=True),
            status,
            body,
        )


# --- what a process holds (Linux /proc) -----------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = [pid]
    for parent in tree:
        tree += [child for child, its in parents.items() if its == parent]
    return tree


def children_of(pid: int) -> list[int]:
    return process_tree(pid)[1:]


def open_files(pid: int) -> list[Path]:
    """The regular files (and directories) process ``pid`` has open."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/"):
            found.append(Path(target.removesuffix(" (deleted)")))
    return found


def secrets_of(key: PrivateKey) -> list[bytes]:
    """Byte strings that only a process holding ``key`` (loaded, or as PEM or DER) has in
    memory: its secret numbers big- and little-endian (OpenSSL keeps bignums as little-endian
    words), the raw Ed25519 seed, the whole PKCS#8 DER and PEM. (Not a piece of the DER or
    PEM: an EC key's PKCS#8 holds its public key, which the edge's certificates also hold.)"""
    numbers: list[int] = []
    raw: list[bytes] = []
    if isinstance(key, rsa.RSAPrivateKey):
        private = key.private_numbers()
        numbers = [private.p, private.q, private.d]
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = [key.private_numbers().private_value]
    else:
        raw = [key.private_bytes_raw()]
    for number in numbers:
        length = (number.bit_length() + 7) // 8
        raw += [number.to_bytes(length, "big"), number.to_bytes(length, "little")]
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return [*raw, der, pkcs8_pem(key)]


def memory_holds(pid: int, needles: Iterable[bytes]) -> set[bytes]:
    """Which of ``needles`` are somewhere in the readable memory of process ``pid``.

    Raises PermissionError when the kernel lets this process read no memory of ``pid``.
    """
    wanted = set(needles)
    longest = max(len(needle) for needle in wanted)
    found: set[bytes] = set()
    readable = 0
    with (
        open(f"/proc/{pid}/maps") as maps,
        open(f"/proc/{pid}/mem", "rb", buffering=0) as memory,
    ):
        for line in maps:
            fields = line.split()
            start, end = (int(part, 16) for part in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            if "r" not in fields[1] or name in ("[vvar]", "[vsyscall]", "[vdso]"):
                continue
            if name.startswith("/") and "w" not in fields[1]:
                continue  # a mapped file, read-only: code and constants, not key material
            position = start
            tail = b""
            while position < end:
                size = min(end - position, 1 << 24)
                try:
                    memory.seek(position)
                    chunk = memory.read(size)
                except OSError:
                    break
                readable += 1
                window = tail + chunk
                found |= {needle for needle in wanted - found if needle in window}
                tail = window[-longest:]
                position += size
    if not readable:
        raise PermissionError(f"no memory of process {pid} is readable")
    return found
