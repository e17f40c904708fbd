"""Keyless benchmark (S5): full TLS 1.3 handshakes/s through the edge with the key on the
key server, and the key server's own operations/s against raw ``cryptography``.

What is measured is the real :class:`~keybroker.flows.keyless.edge.Edge`: ``--workers``
(2) worker processes forked from this one, accepting on one shared listening socket, each
with its own key operator, the shared ticket-key ring and counters in shared memory,
exactly as ``keybroker edge`` runs them (:func:`run_edge` differs only in that its
operator is always a :class:`KeyClient`). One service per key type (ECDSA P-256 and
RSA-2048, certificates from a test CA), chosen as the ``default_service`` because
``openssl s_time`` sends no SNI.

Two ways of holding the key, with everything else identical:

* **remote**: each worker's operator is a real
  :class:`~keybroker.flows.keyless.keyclient.KeyClient` (one pipelined mutual-TLS
  connection) to a key server in its own process. ``--keyserver keybroker`` (the default)
  is the real one, ``keybroker keyserver --workers 2`` (a PEM key directory, a static
  grants table giving both keys to the edge's principal ``node/edge1``, the test CA);
  ``--keyserver test`` is the test kit's (``tests/flows/keyless/edge_kit.TestKeyServer``:
  asyncio, ``protocol.ServerConnection``, ``operations.LocalKeyStore``, signing on its
  event loop). Each is an entry of :data:`KEYSERVERS`: a function that starts it in a
  subprocess for the given keys and mutual-TLS files and returns a :class:`KeyServer`
  (address and pid). The mutual-TLS files are ``tests/flows/keyless/pki_kit``'s: the
  edge's client certificate names ``keybroker://node/edge1``, which the real key server
  requires;
* **local**: the operator performs with ``LocalKeyStore`` in the worker process, so a
  handshake has no key-server round trip (and no key-client work).

And two ways of running tlslite: **fast** (``[edge] fast_crypto = true``, the default:
:mod:`keybroker.flows.keyless.fasttls`) and **stock** (``fast_crypto = false``).

Load: ``--clients`` (16) concurrent ``openssl s_time -new -tls1_3`` processes (OpenSSL's
defaults: X25519 and TLS_AES_256_GCM_SHA384; no certificate verification, no HTTP request;
``s_time`` closes as soon as its handshake is done). Handshakes are counted by the edge's
own counters (``full_handshakes``, ``resumed_handshakes``) over a timed window that starts
after a warm-up, so the load generator's start and stop do not count.

Everything runs on this 2-CPU machine, shared with other users, in one of two layouts:

* **shared**: nothing pinned; the edge's 2 workers, the key server and the load generator
  share both CPUs. What "on this machine" means; the key server's CPU comes off the edge's.
* **pinned**: both edge workers on CPU 0; the key server and the load generator on CPU 1.
  The edge's own capacity on one core, and what a remote key costs *the edge*, with the
  key server and the load generator kept off its CPU (as they would be on other hosts).

Over every window the CPU time of each party (``/proc/<pid>/stat``) is reported as a share
of the machine's CPU time, next to the machine's total busy share (other users included),
and the edge's CPU milliseconds per handshake, the figure that does not depend on who else
ran: the number of CPUs divided by it is what the edge would do with the CPUs to itself.

Figures (``docs/benchmarks.md``, ``## keyless``):

* ``edge_tls13_full_per_s``: fast, remote, P-256, shared layout: median over the slices.
  Goal >= 300.
* ``edge_remote_over_local_ratio``: remote over local, fast, P-256, pinned layout; remote
  and local run in alternating slices (remote, local, local, remote, ...), each remote slice
  divided by the local slice next to it, and the median of those ratios reported.
  Goal >= 0.9. ``edge_remote_over_local_ratio_shared``: the same in the shared layout.
* for information: the local rate; the pinned rate; the same with RSA-2048; stock tlslite
  (``fast_crypto = false``), remote and local, P-256, and fast over stock; the edge's CPU
  ms per full handshake, fast and stock; the load generator's CPU share;
  ``edge_added_latency_ms``: median handshake time seen by one sequential client (Python
  ``ssl``, X25519) remote minus local, alternating handshake by handshake, one worker each;
  ``edge_tls13_resumed_per_s``: resumed handshakes/s, remote, fast, P-256, load from
  ``--clients`` Python ``ssl`` client processes that each reuse a session ticket
  (``s_time -reuse`` does not read TLS 1.3 tickets, so it never resumes); the nginx ceiling.
* **nginx ceiling**: if ``nginx`` is installed, nginx with the P-256 key in a local file,
  ``worker_processes`` = ``--workers``, TLS 1.3, the same ``s_time`` load, shared layout.
  nginx has no handshake counter, so its rate is ``s_time``'s own count over the whole run
  (the sum of the clients' "N connections", divided by the wall time of the run). If nginx
  is not installed the figures are skipped with the reason; ``--install-nginx`` (full mode
  only) installs ``nginx-light`` with ``apt-get`` first.

**The key server alone** (``keyserver_*`` figures): the real ``keybroker keyserver
--processes 2`` (two pre-forked processes, each signing on its own event loop: ``pool =
"inline"``, the default with ``--processes``; the recommended deployment, one process per
core), loaded by one process per key-server process, each with one mutual-TLS connection
and ``--depth`` (64) requests in flight; and, for information (``keyserver_single_*``),
the same server as one process (``--workers 2 --pool thread``, ``--keyserver-pool``),
loaded over one connection. Each load process uses a blocking ``ssl`` socket, one ``recv``
for whatever answers have arrived, one ``sendall`` of as many new requests, framed by
``protocol.ClientConnection`` as the edge frames them (SKI, SNI, a SHA-256 digest, padded
to 1,024 bytes) once per digest and sent with the request id patched in; answers checked
by header, id and opcode, the first 64 decoded in full (the generator is kept lean because
it shares the CPUs with the key server: about 4 µs per request, against 14 to 16 µs with
the full client codec before 2026-11-29's run). ECDSA P-256 (``ECDSA_SIGN_SHA256``) and
RSA-2048 (``RSA_PSS_SIGN_SHA256``, what a TLS 1.3 edge asks for). The floor: the same
digests signed with raw ``cryptography`` (the algorithm objects made once) in 2 processes,
as many as the key server's workers. Key server and raw alternate in slices (key server,
raw, raw, key server, ...; 3 pairs of 5 s per key kind, 1 pair of 1 s in quick mode, after
a warm-up); the answers are counted over the timed window by the load generator, the raw
signatures by each signing process; ``keyserver_<kind>_ratio`` is the median of the
per-pair ratios (goal >= 0.8). The key server and its load generator share the 2 CPUs
while raw signing has them to itself, so the ratio includes the load generator's CPU; the
CPU of each party is read from ``/proc`` (the key server's event-loop thread, its other
threads, its worker processes; the load generator; the raw processes) and printed per
slice as a share of the machine and in µs per operation. ``keyserver_<kind>_cpu_ratio``
(raw CPU per op over the key server's) is the ratio with the CPUs to the key server alone.
Cross-checks: no request may be answered with an error, and the first 64 answers of each
slice, and the first raw signature of each process, must verify with the public key.

Cross-checks before timing (a failure exits 1): for each edge started, a verified Python
``ssl`` TLS 1.3 handshake against the test CA (so the signature from the key server
verifies, and the right certificate is served), one with P-256 key exchange, and one
resumption that makes no key operation; nginx must serve a verified handshake. No key
operation may fail during a slice.

``--profile`` instead runs one worker (stock, then fast; remote key, P-256) under
``cProfile`` with a per-thread CPU clock (``time.thread_time``), serving one sequential
``s_time`` client, prints where the handshake threads' CPU time goes, grouped (a built-in
such as ``len`` counts for its caller), the calls per handshake into ``fasttls`` and
``cryptography``, and the top functions; then the cost per call of each replaced
primitive, tlslite's against fasttls's.

``--profile-keyserver`` instead runs the real key server under ``cProfile`` with a
per-thread CPU clock (its main thread, the event loop; started once its modules are
imported) under the key-server load, P-256 then RSA-2048, and prints the loop's CPU by
group and the top functions; the executor threads' CPU per operation comes from ``/proc``.

Run: ``python bench/keyless.py [--quick] [--slice S] [--pairs N] [--clients C] [--workers W]
[--keyserver keybroker|test] [--depth D] [--keyserver-pool thread|process] [--ks-slice S]
[--ks-pairs N] [--install-nginx] [--profile] [--profile-keyserver]``. ``--quick`` (under a
minute): 2-s slices, 2 pairs for P-256 shared, 1 for the rest, key server 1 pair of 1 s
per kind; full: 5-s slices, 5 pairs, 3 for the rest, key server 3 pairs of 5 s per kind.
Exits non-zero only if something is broken, never because a goal is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import multiprocessing
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cryptography
import tlslite  # type: ignore[import-untyped,unused-ignore]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "flows" / "keyless"))

from edge_kit import KEYSERVER_NAME, Mtls, Site, TestKeyServer, write_config
from pki_kit import make_pki
from tlskit import Authority, Leaf, PrivateKey, new_key

from benchkit import Broken, Figure, cpu_model, load
from keybroker.errors import KeybrokerError
from keybroker.flows.keyless.codes import Op
from keybroker.flows.keyless.edge import (
    Edge,
    EdgeConfig,
    EdgeStats,
    TicketKeyRing,
    WorkerCounters,
    key_client,
    load_config,
)
from keybroker.flows.keyless.keyclient import client_context
from keybroker.flows.keyless.operations import KeyOperationError, LocalKeyStore, ski_of
from keybroker.flows.keyless.protocol import HEADER, ClientConnection, decode_response
from keybroker.flows.keyless.tlskeys import KeyOperationFailed, KeyOperator
from keybroker.pki.validation import principal_of

FLOW = "keyless"
KINDS = {"p256": "ecdsa", "rsa2048": "rsa"}
FULL_GOAL = 300.0
RATIO_GOAL = 0.9
#: The key server's executor workers, and the raw floor's signing processes.
KEYSERVER_WORKERS = 2
#: Key-server ops/s over raw ``cryptography`` signing with as many processes.
KEYSERVER_RATIO_GOAL = 0.8
#: The opcode each key kind is measured with: what a TLS 1.3 edge asks for.
KEYSERVER_OPS = {"p256": Op.ECDSA_SIGN_SHA256, "rsa2048": Op.RSA_PSS_SIGN_SHA256}
CLK_TCK = os.sysconf("SC_CLK_TCK")
FORK = multiprocessing.get_context("fork")
X25519_BASE = (9).to_bytes(32, "little")


# --- key servers ----------------------------------------------------------------------------------


@dataclasses.dataclass
class KeyServer:
    """A key server running in its own process: where the edge reaches it, and its pid."""

    address: str
    pid: int
    process: subprocess.Popen[str]
    #: Key-server processes behind the listener (``--processes``): the load opens as many
    #: connections, one each (the supervisor hands connections out in turn).
    processes: int = 1

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def write_pem_keys(directory: Path, keys: list[PrivateKey]) -> list[Path]:
    """``keys`` as unencrypted PKCS#8 PEM files (mode 0600) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, key in enumerate(keys):
        path = directory / f"key{index}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
        paths.append(path)
    return paths


def read_ready_line(process: subprocess.Popen[str], what: str, log: Path | None = None) -> str:
    """The address in the ``listening on HOST:PORT`` line a key server prints once serving."""
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.match(r"listening on (\S+)", line)
    if match is None:
        process.kill()
        process.wait()
        tail = log.read_text(errors="replace")[-600:] if log is not None and log.exists() else ""
        raise Broken(f"{what} did not start: {line!r} {tail}")
    return match.group(1)


def start_test_keyserver(directory: Path, keys: list[PrivateKey], mtls: Mtls) -> KeyServer:
    """The test kit's key server (``edge_kit.TestKeyServer``) in a subprocess of this script."""
    write_pem_keys(directory, keys)
    for name in ("ca", "server_cert", "server_key", "edge_cert", "edge_key"):
        (directory / f"mtls.{name}").write_text(str(getattr(mtls, name)))
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-test-keyserver", str(directory)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    return KeyServer(read_ready_line(process, "the test key server"), process.pid, process)


def keybroker_command() -> list[str]:
    """How to run ``keybroker``: the venv's console script next to this interpreter."""
    script = Path(sys.executable).with_name("keybroker")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "keybroker.cli.main"]


#: ``keybroker`` under cProfile with a per-thread CPU clock, started once the key server's
#: modules are imported; the statistics are written when it exits (SIGTERM: gracefully).
PROFILED_KEYBROKER = """
import cProfile, sys, time
import uvloop
import keybroker.flows.keyless.keyserver
from keybroker.cli.main import main
out = sys.argv.pop(1)
sys.argv[0] = "keybroker"
profile = cProfile.Profile(time.thread_time)
try:
    profile.runcall(main)
except SystemExit:
    pass
finally:
    profile.dump_stats(out)
"""


def start_keybroker_keyserver(
    directory: Path,
    keys: list[PrivateKey],
    mtls: Mtls,
    *,
    workers: int = KEYSERVER_WORKERS,
    pool: str = "thread",
    processes: int = 1,
    profile_to: Path | None = None,
) -> KeyServer:
    """The real ``keybroker keyserver`` in a subprocess: ``keys`` as a PEM key directory,
    a static grants table giving every key to the edge of ``mtls.edge_cert`` (its
    ``keybroker://`` principal), the test CA as the edges' CA, ``--workers`` executor
    workers. ``profile_to``: run it under cProfile (:data:`PROFILED_KEYBROKER`)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_pem_keys(directory / "keys", keys)
    try:
        edge = principal_of(x509.load_pem_x509_certificate(mtls.edge_cert.read_bytes()))
    except KeybrokerError as exc:
        raise Broken(f"the edge certificate names no keybroker principal: {exc}") from exc
    grants = directory / "grants.toml"
    skis = ", ".join(f'"{ski_of(key.public_key()).hex()}"' for key in keys)
    grants.write_text(f'[edges]\n"{edge}" = [{skis}]\n')
    command = keybroker_command()
    if profile_to is not None:
        command = [sys.executable, "-c", PROFILED_KEYBROKER, str(profile_to)]
    log = directory / "keyserver.log"
    with log.open("ab") as sink:
        options = {
            "listen": "127.0.0.1:0",
            "cert": mtls.server_cert,
            "key": mtls.server_key,
            "client-ca": mtls.ca,
            "keys-dir": directory / "keys",
            "grants": grants,
            "workers": workers,
            "pool": pool,
            "processes": processes,
            "log-level": "warning",
        }
        process = subprocess.Popen(
            [*command, "keyserver", *(f"--{name}={value}" for name, value in options.items())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
        )
    address = read_ready_line(process, "keybroker keyserver", log)
    return KeyServer(address, process.pid, process, processes)


def serve_test_keyserver(directory: Path) -> int:
    """Body of the key-server subprocess: serve until SIGTERM."""
    keys: list[Any] = [
        serialization.load_pem_private_key(path.read_bytes(), password=None)
        for path in sorted(directory.glob("key*.pem"))
    ]
    mtls = Mtls(
        *(
            Path((directory / f"mtls.{name}").read_text())
            for name in ("ca", "server_cert", "server_key", "edge_cert", "edge_key")
        )
    )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    with TestKeyServer(keys, mtls) as server:
        print(f"listening on {server.address}", flush=True)
        stopping.wait()
    return 0


#: How to start each kind of key server; ``--keyserver`` picks one (default ``keybroker``,
#: the real one). Each is a function of the key directory, the service keys and the
#: mutual-TLS files that starts the key server in a subprocess and returns its address
#: and pid. The edge checks the name ``edge_kit.KEYSERVER_NAME`` in the server's
#: certificate, and the real key server finds the edge's principal in its client
#: certificate (``pki_kit``'s ``keybroker://node/edge1``).
KEYSERVERS: dict[str, Callable[[Path, list[PrivateKey], Mtls], KeyServer]] = {
    "keybroker": start_keybroker_keyserver,
    "test": start_test_keyserver,
}


# --- the edge -------------------------------------------------------------------------------------


class LocalOperator:
    """The key in the worker's own process: what ``remote`` is compared with."""

    def __init__(self, keys: list[PrivateKey]) -> None:
        self._store = LocalKeyStore(keys)

    def operate(self, op: Op, ski: bytes, payload: bytes, *, sni: str | None) -> bytes:
        try:
            return self._store.perform(ski, op, payload)
        except KeyOperationError as exc:
            raise KeyOperationFailed(str(exc)) from exc


class ProfiledEdge(Edge):
    """An :class:`Edge` that profiles each connection thread with its own CPU clock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.profile_lock = threading.Lock()
        self.profile: pstats.Stats | None = None

    def _connection(self, sock: socket.socket, peer: Any) -> None:
        profile = cProfile.Profile(time.thread_time)
        profile.enable()
        try:
            super()._connection(sock, peer)
        finally:
            profile.disable()
            with self.profile_lock:
                if self.profile is None:
                    self.profile = pstats.Stats(profile)
                else:
                    self.profile.add(profile)


def worker_main(
    config: EdgeConfig,
    listener: socket.socket,
    ring: TicketKeyRing,
    counters: WorkerCounters,
    remote: bool,
    keys: list[PrivateKey],
    profile_to: Path | None,
    cpus: set[int] | None,
) -> None:
    """One edge worker process (forked): ``_worker_main`` of ``edge.py`` with a chosen operator."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # before any thread starts: they all inherit it
    operator: KeyOperator
    client = None
    if remote:
        client = key_client(config.keyserver)
        operator = client
    else:
        operator = LocalOperator(keys)
    kind = ProfiledEdge if profile_to is not None else Edge
    edge = kind(config, operator, listener=listener, tickets=ring, counters=counters)
    signal.signal(signal.SIGTERM, lambda *_: edge.stop())
    try:
        edge.serve_forever()
        edge.shutdown(grace=2.0)
    finally:
        if client is not None:
            client.close()
    if isinstance(edge, ProfiledEdge) and edge.profile is not None and profile_to is not None:
        edge.profile.dump_stats(str(profile_to))


@dataclasses.dataclass
class EdgeGroup:
    """``workers`` forked edge processes on one listening socket."""

    name: str
    port: int
    listener: socket.socket
    stats: EdgeStats
    ring: TicketKeyRing
    processes: list[Any]

    @property
    def pids(self) -> list[int]:
        return [int(process.pid) for process in self.processes]

    def totals(self) -> dict[str, int]:
        return self.stats.totals()

    def stop(self) -> None:
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        self.listener.close()
        self.ring.close()


def start_edge(
    name: str,
    config: EdgeConfig,
    *,
    workers: int,
    remote: bool,
    keys: list[PrivateKey],
    profile_to: Path | None = None,
    cpus: set[int] | None = None,
) -> EdgeGroup:
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    stats = EdgeStats(workers)
    ring = TicketKeyRing()
    ring.rotate()
    processes = []
    for index in range(workers):
        process = FORK.Process(
            target=worker_main,
            args=(config, listener, ring, stats.slot(index), remote, keys, profile_to, cpus),
            name=f"edge-{name}-{index}",
            daemon=True,
        )
        process.start()
        processes.append(process)
    return EdgeGroup(name, listener.getsockname()[1], listener, stats, ring, processes)


# --- CPU accounting -------------------------------------------------------------------------------


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


@dataclasses.dataclass
class Window:
    """One timed window: handshakes counted by the edge, and who used the CPU."""

    seconds: float
    full: int
    resumed: int
    edge_cpu: float
    keyserver_cpu: float
    load_cpu: float
    machine_busy: float
    machine_total: float

    @property
    def full_rate(self) -> float:
        return self.full / self.seconds

    @property
    def resumed_rate(self) -> float:
        return self.resumed / self.seconds

    def share(self, cpu: float) -> float:
        return cpu / self.machine_total if self.machine_total else 0.0

    @property
    def edge_ms_per_handshake(self) -> float:
        count = self.full + self.resumed
        return 1000 * self.edge_cpu / count if count else float("nan")

    def describe(self) -> str:
        return (
            f"{self.full_rate:7.1f} full/s {self.resumed_rate:7.1f} resumed/s | CPU share: "
            f"edge {self.share(self.edge_cpu):4.0%}, key server "
            f"{self.share(self.keyserver_cpu):4.0%}, load {self.share(self.load_cpu):4.0%}, "
            f"machine busy {self.share(self.machine_busy):4.0%} | edge "
            f"{self.edge_ms_per_handshake:.2f} ms CPU/handshake"
        )


def timed_window(
    counted: Callable[[], tuple[int, int]],
    server_pids: list[int],
    keyserver_pid: int | None,
    load_pids: Callable[[], list[int]],
    seconds: float,
) -> Window:
    def sample() -> tuple[float, tuple[int, int], float, float, float, tuple[float, float]]:
        return (
            time.monotonic(),
            counted(),
            sum(cpu_of(pid) for pid in server_pids),
            cpu_of(keyserver_pid) if keyserver_pid else 0.0,
            sum(cpu_of(pid) for pid in load_pids()),
            machine_busy(),
        )

    t0, (full0, res0), edge0, ks0, load0, (busy0, total0) = sample()
    time.sleep(seconds)
    t1, (full1, res1), edge1, ks1, load1, (busy1, total1) = sample()
    return Window(
        t1 - t0,
        full1 - full0,
        res1 - res0,
        edge1 - edge0,
        ks1 - ks0,
        load1 - load0,
        busy1 - busy0,
        total1 - total0,
    )


# --- load generators ------------------------------------------------------------------------------


@contextlib.contextmanager
def s_time_load(
    port: int, clients: int, seconds: int, *, reuse: bool = False, cpus: set[int] | None = None
) -> Iterator[Any]:
    """``clients`` concurrent ``openssl s_time -new -tls1_3`` processes (killed on exit)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise Broken("openssl is needed for the load (apt-get install openssl)")
    command = [
        openssl,
        "s_time",
        "-connect",
        f"127.0.0.1:{port}",
        "-reuse" if reuse else "-new",
        "-tls1_3",
        "-time",
        str(seconds),
    ]
    processes = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(clients)
    ]
    if cpus is not None:  # s_time is single-threaded; its first milliseconds run anywhere
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(process.pid, cpus)
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait()


def _resuming_client(port: int, deadline: float) -> None:
    """One Python ``ssl`` client process: a full handshake for a ticket, then resume it."""
    context = insecure_context()
    session = None
    while session is None or not session.has_ticket:
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            context.wrap_socket(raw) as tls,
        ):
            session = ticket_session(tls)
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, session=session) as tls:
                if not tls.session_reused:
                    session = tls.session


@contextlib.contextmanager
def resuming_load(port: int, clients: int, seconds: float) -> Iterator[Any]:
    deadline = time.monotonic() + seconds
    processes = [
        FORK.Process(target=_resuming_client, args=(port, deadline), daemon=True)
        for _ in range(clients)
    ]
    for process in processes:
        process.start()
    try:
        yield processes
    finally:
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
            if process.is_alive():
                process.kill()
                process.join()


def ticket_session(tls: ssl.SSLSocket) -> ssl.SSLSession | None:
    """The session, once the TLS 1.3 tickets that follow the handshake have been read.

    The edge sends them after the client's Finished and then waits for a request, so a
    short read that times out is what lets OpenSSL take them in.
    """
    tls.settimeout(0.3)
    with contextlib.suppress(TimeoutError, ssl.SSLError, OSError):
        tls.recv(1)
    return tls.session


def insecure_context() -> ssl.SSLContext:
    """A TLS 1.3 client context that skips verification: the load, not the checks."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    return context


def handshake_seconds(port: int, context: ssl.SSLContext, name: str | None = None) -> float:
    """Wall time of one TLS handshake (TCP connect included) from this process."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=name):
            done = time.perf_counter()
    return done - started


# --- CPU layouts -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the processes may run: ``None`` is every CPU (the scheduler decides)."""

    name: str
    edge: set[int] | None
    rest: set[int] | None  # the key server and the load generator

    def describe(self) -> str:
        if self.edge is None:
            return "shared: nothing pinned, every process on every CPU"
        return f"pinned: edge workers on CPU {sorted(self.edge)}, key server and load on " + (
            f"CPU {sorted(self.rest or set())}"
        )


SHARED = Layout("shared", None, None)
PINNED = Layout("pinned", {0}, {1})


def pin_process(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of ``pid`` (affinity is per thread) to ``cpus`` (None: all CPUs)."""
    target = cpus if cpus is not None else set(range(os.cpu_count() or 1))
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), target)


# --- set-up -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    workdir: Path
    ca: Authority
    leaves: dict[str, Leaf]
    mtls: Mtls
    keyserver: KeyServer
    args: argparse.Namespace
    layout: Layout = SHARED

    def use(self, layout: Layout) -> None:
        """Put the key server where ``layout`` says; edges and load are started there."""
        pin_process(self.keyserver.pid, layout.rest)
        self.layout = layout

    def config(self, kind: str, *, fast: bool) -> EdgeConfig:
        leaf = self.leaves[kind]
        sites = [Site(self.leaves[other], "http://127.0.0.1:9") for other in KINDS]
        path = write_config(
            self.workdir / f"conf-{kind}-{'fast' if fast else 'stock'}",
            sites,
            self.keyserver.address,
            self.mtls,
            default_service=leaf.name,
            fast_crypto=fast,
            workers=self.args.workers,
        )
        return load_config(path)

    def keys(self) -> list[PrivateKey]:
        return [leaf.key for leaf in self.leaves.values()]

    def edge(self, kind: str, *, fast: bool, remote: bool, **extra: Any) -> EdgeGroup:
        name = f"{kind}-{'fast' if fast else 'stock'}-{'remote' if remote else 'local'}"
        return start_edge(
            name,
            self.config(kind, fast=fast),
            workers=extra.pop("workers", self.args.workers),
            remote=remote,
            keys=self.keys(),
            cpus=self.layout.edge,
            **extra,
        )


def make_setup(args: argparse.Namespace) -> Setup:
    workdir = Path(tempfile.mkdtemp(prefix="keybroker-bench-keyless-"))
    ca = Authority.create(workdir)
    leaves = {kind: ca.issue(f"{kind}.bench.test", new_key(key)) for kind, key in KINDS.items()}
    pki = make_pki(workdir / "mtls")  # the edge's certificate names keybroker://node/edge1
    mtls = Mtls(pki.ca.path, pki.server.cert, pki.server.key, pki.edge1.cert, pki.edge1.key)
    keyserver = KEYSERVERS[args.keyserver](
        workdir / "keyserver", [leaf.key for leaf in leaves.values()], mtls
    )
    return Setup(workdir, ca, leaves, mtls, keyserver, args)


def cross_check(setup: Setup, group: EdgeGroup, kind: str) -> None:
    """A verified handshake with the edge (the key server's signature verifies), one with
    P-256 key exchange, and a resumption without a key operation."""
    leaf = setup.leaves[kind]
    context = ssl.create_default_context(cafile=str(setup.ca.path))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with (
            socket.create_connection(("127.0.0.1", group.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=leaf.name) as tls,
        ):
            served = tls.getpeercert(binary_form=True)
            session = ticket_session(tls)
        context.set_ecdh_curve("prime256v1")
        with (
            socket.create_connection(("127.0.0.1", group.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=leaf.name),
        ):
            pass
        before = group.totals()
        with (
            socket.create_connection(("127.0.0.1", group.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=leaf.name, session=session) as tls,
        ):
            reused = tls.session_reused
    except (OSError, ssl.SSLError) as exc:
        raise Broken(f"{group.name}: a verified TLS 1.3 handshake failed: {exc}") from exc
    if served != leaf.certificate.public_bytes(serialization.Encoding.DER):
        raise Broken(f"{group.name}: served the wrong certificate")
    time.sleep(0.1)
    after = group.totals()
    if not reused or after["resumed_handshakes"] != before["resumed_handshakes"] + 1:
        raise Broken(f"{group.name}: the ticket did not resume")
    if after["key_failures"]:
        raise Broken(f"{group.name}: key operations failed")


# --- measurements -------------------------------------------------------------------------------


@dataclasses.dataclass
class Pair:
    """Alternating slices of two edges (A, B, B, A, ...)."""

    a: list[Window] = dataclasses.field(default_factory=list)
    b: list[Window] = dataclasses.field(default_factory=list)

    def ratios(self) -> list[float]:
        return [x.full_rate / y.full_rate for x, y in zip(self.a, self.b, strict=True) if y.full]

    @staticmethod
    def median_rate(windows: list[Window]) -> float:
        return statistics.median(w.full_rate for w in windows) if windows else 0.0


def full_slice(setup: Setup, group: EdgeGroup) -> Window:
    args = setup.args
    warm = 0.7
    with s_time_load(
        group.port, args.clients, int(warm + args.slice + 2), cpus=setup.layout.rest
    ) as load_procs:
        time.sleep(warm)
        window = timed_window(
            lambda: (group.totals()["full_handshakes"], group.totals()["resumed_handshakes"]),
            group.pids,
            setup.keyserver.pid,
            lambda: [p.pid for p in load_procs],
            args.slice,
        )
    if group.totals()["key_failures"]:
        raise Broken(f"{group.name}: key operations failed under load")
    return window


def compare(setup: Setup, kind: str, *, fast: bool, pairs: int, layout: Layout = SHARED) -> Pair:
    """Remote against local, same kind and mode, in alternating slices (ABBA)."""
    setup.use(layout)
    remote = setup.edge(kind, fast=fast, remote=True)
    local = setup.edge(kind, fast=fast, remote=False)
    result = Pair()
    try:
        cross_check(setup, remote, kind)
        cross_check(setup, local, kind)
        for index in range(pairs):
            order = [(remote, result.a), (local, result.b)]
            if index % 2:
                order.reverse()
            for group, into in order:
                window = full_slice(setup, group)
                into.append(window)
                print(f"  {group.name:22} {window.describe()}", flush=True)
    finally:
        remote.stop()
        local.stop()
        setup.use(SHARED)
    return result


def resumed_rate(setup: Setup) -> Window:
    group = setup.edge("p256", fast=True, remote=True)
    try:
        cross_check(setup, group, "p256")
        warm = 1.0
        with resuming_load(group.port, setup.args.clients, warm + setup.args.slice + 0.5) as procs:
            time.sleep(warm)
            window = timed_window(
                lambda: (group.totals()["full_handshakes"], group.totals()["resumed_handshakes"]),
                group.pids,
                setup.keyserver.pid,
                lambda: [int(p.pid) for p in procs],
                setup.args.slice,
            )
        print(f"  {group.name + ' resumed':22} {window.describe()}", flush=True)
        return window
    finally:
        group.stop()


def added_latency(setup: Setup, count: int) -> tuple[float, float]:
    """Median handshake wall time (ms), remote and local, one sequential client."""
    remote = setup.edge("p256", fast=True, remote=True, workers=1)
    local = setup.edge("p256", fast=True, remote=False, workers=1)
    context = insecure_context()
    times: dict[str, list[float]] = {"remote": [], "local": []}
    try:
        for _ in range(20):  # warm-up: imports, the key client's connection
            handshake_seconds(remote.port, context)
            handshake_seconds(local.port, context)
        for index in range(count):
            order = [("remote", remote), ("local", local)]
            if index % 2:
                order.reverse()
            for label, group in order:
                times[label].append(handshake_seconds(group.port, context))
    finally:
        remote.stop()
        local.stop()
    return (
        1000 * statistics.median(times["remote"]),
        1000 * statistics.median(times["local"]),
    )


# --- the key server alone -----------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid``'s descendants (a process pool's forkserver and its workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(
                    int(entry.name)
                )
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of ``pid``'s main thread (the key server's event loop) and of its other
    threads (the executor's) so far."""
    main = rest = 0.0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
                if int(task.name) == pid:
                    main += seconds
                else:
                    rest += seconds
    return main, rest


@dataclasses.dataclass
class OpsWindow:
    """One timed window of key operations: how many were answered, and who used the CPU."""

    seconds: float
    ops: int
    #: CPU seconds by party: ``loop``, ``threads``, ``workers`` (the key server's event-loop
    #: thread, its other threads, its worker processes), ``load``, ``raw``.
    cpu: dict[str, float]
    machine_busy: float
    machine_total: float

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    def share(self, party: str) -> float:
        return self.cpu.get(party, 0.0) / self.machine_total if self.machine_total else 0.0

    def us_per_op(self, *parties: str) -> float:
        spent = sum(self.cpu.get(party, 0.0) for party in parties)
        return 1e6 * spent / self.ops if self.ops else float("nan")

    def describe(self) -> str:
        parts = [f"{name} {self.share(name):4.0%}" for name in self.cpu if self.cpu[name] > 0]
        per_op = ", ".join(
            f"{name} {self.us_per_op(name):.1f}" for name in self.cpu if self.cpu[name] > 0
        )
        return (
            f"{self.rate:9,.0f} ops/s | CPU share: {', '.join(parts)}, machine busy "
            f"{self.machine_busy / self.machine_total if self.machine_total else 0:4.0%} | "
            f"CPU µs/op: {per_op}"
        )


def cpu_window(
    parties: dict[str, Callable[[], float]], begin: float, end: float
) -> tuple[float, dict[str, float], float, float]:
    """(seconds, CPU seconds by party, machine busy, machine total) from ``begin`` to ``end``
    (``time.monotonic`` instants, the clock the child processes count with)."""

    def sample() -> tuple[float, dict[str, float], tuple[float, float]]:
        return time.monotonic(), {name: read() for name, read in parties.items()}, machine_busy()

    time.sleep(max(0.0, begin - time.monotonic()))
    t0, cpu0, (busy0, total0) = sample()
    time.sleep(max(0.0, end - time.monotonic()))
    t1, cpu1, (busy1, total1) = sample()
    spent = {name: cpu1[name] - cpu0[name] for name in parties}
    return t1 - t0, spent, busy1 - busy0, total1 - total0


def _signer(key: Any, kind: str) -> Callable[[bytes], bytes]:
    """Raw ``cryptography``: what the key server's opcode does, its objects made once."""
    prehashed = utils.Prehashed(hashes.SHA256())
    if kind == "p256":
        algorithm = ec.ECDSA(prehashed)
        return lambda digest: bytes(key.sign(digest, algorithm))
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    return lambda digest: bytes(key.sign(digest, pss, prehashed))


def verify_signature(public: Any, kind: str, digest: bytes, signature: bytes) -> None:
    """Raise ``InvalidSignature`` unless ``signature`` is the opcode's signature of ``digest``."""
    prehashed = utils.Prehashed(hashes.SHA256())
    if kind == "p256":
        public.verify(signature, digest, ec.ECDSA(prehashed))
    else:
        public.verify(
            signature, digest, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            prehashed,
        )  # fmt: skip


def _raw_signer(der: bytes, kind: str, digests: list[bytes], begin: float, end: float,
                out: Any) -> None:  # fmt: skip
    """One raw signing process: sign the digests in turn until ``end``; send back how many
    signatures were finished between ``begin`` and ``end``, and the first signature."""
    sign = _signer(serialization.load_der_private_key(der, password=None), kind)
    first = sign(digests[0])
    count = index = 0
    while True:
        sign(digests[index % len(digests)])
        index += 1
        now = time.monotonic()
        if now >= end:
            break
        if now >= begin:
            count += 1
    out.send((count, first))


def _keyserver_load(address: str, mtls: Mtls, op: Op, ski: bytes, sni: str,
                    digests: list[bytes], depth: int, begin: float, end: float,
                    out: Any) -> None:  # fmt: skip
    """The load generator (its own process): one mutual-TLS connection with ``depth``
    requests in flight, a new request sent for each answer, on a blocking ``ssl`` socket
    (one ``recv`` takes every answer that has arrived; one ``sendall`` sends as many
    requests). Sends back the answers counted between ``begin`` and ``end``, the errors,
    and the first ``depth`` results with their digests (for the cross-check). After
    ``end`` it stops sending and reads the answers still owed, so no work is left in the
    key server for the next slice.

    It is lean on purpose, like ``wrk`` against a web server: it shares the 2 CPUs with
    the key server it measures, so every microsecond it spends is taken from the key
    server's figure. Each digest's request is framed once by :class:`ClientConnection`,
    as the edge's key client frames it (SKI, SNI, the digest, padded to 1,024 bytes);
    sending one is patching its request id into a copy. An answer is checked by its
    header and its opcode item: its id must be outstanding (each exactly once), its
    opcode ``RESPONSE`` (anything else counts as an error); the first ``depth`` answers
    are also decoded and their signatures verified by the caller. The full client codec
    cost 14 to 16 µs per request here, this one about 4 (TLS included)."""
    host, port = address.rsplit(":", 1)
    context = client_context(mtls.ca, mtls.edge_cert, mtls.edge_key)
    framer = ClientConnection(max_pending=len(digests))
    templates = [
        bytearray(framer.send_request(op, ski=ski, payload=digest, sni=sni)[1])
        for digest in digests
    ]
    header = HEADER
    head_size = header.size
    response = int(Op.RESPONSE)
    outstanding: set[int] = set()
    digest_of: dict[int, bytes] = {}
    checked: list[tuple[bytes, bytes]] = []
    count = errors = 0
    next_id = 1

    def requests(number: int) -> bytes:
        nonlocal next_id
        frames = []
        for _ in range(number):
            request_id = next_id
            next_id += 1
            template = templates[request_id % len(templates)]
            _REQUEST_ID.pack_into(template, 4, request_id)
            if request_id <= depth:
                digest_of[request_id] = digests[request_id % len(digests)]
            outstanding.add(request_id)
            frames.append(bytes(template))
        return b"".join(frames)

    held = b""
    # ``recv(n)`` would allocate n bytes per call (a fresh mapping at this size): receive
    # into one buffer instead.
    buffer = bytearray(1 << 18)
    view = memoryview(buffer)
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=KEYSERVER_NAME) as tls:
            tls.sendall(requests(depth))
            sending = True
            while outstanding:
                size = tls.recv_into(buffer)
                if not size:
                    raise Broken("the key server closed the connection")
                data = bytes(view[:size])
                held = held + data if held else data
                position = answers = 0
                while len(held) - position >= head_size:
                    _, _, length, request_id = header.unpack_from(held, position)
                    body = position + head_size
                    if len(held) - body < length:
                        break
                    if request_id not in outstanding:
                        raise Broken(f"the key server answered request {request_id} twice "
                                     "or one never sent")  # fmt: skip
                    outstanding.discard(request_id)
                    # The body opens with the opcode item: tag, length (2 bytes), opcode.
                    if length < 4 or held[body + 3] != response:
                        errors += 1
                    elif request_id in digest_of:
                        answer = framer_answer(held[position : body + length])
                        checked.append((digest_of.pop(request_id), answer))
                    position = body + length
                    answers += 1
                held = held[position:]
                now = time.monotonic()
                if begin <= now < end:
                    count += answers
                sending = sending and now < end
                if sending and answers:
                    tls.sendall(requests(answers))
    out.send((count, errors, checked))


_REQUEST_ID = struct.Struct(">I")


def framer_answer(frame: bytes) -> bytes:
    """The payload of one ``RESPONSE`` frame, decoded by the protocol's own strict decoder."""
    answer = decode_response(frame)
    if answer.op is not Op.RESPONSE:
        raise Broken(f"the key server answered with {answer.op.name}")
    return answer.payload


@dataclasses.dataclass
class KeyserverPair:
    """Alternating windows of the key server and of raw signing, one key kind."""

    keyserver: list[OpsWindow] = dataclasses.field(default_factory=list)
    raw: list[OpsWindow] = dataclasses.field(default_factory=list)

    def ratios(self) -> list[float]:
        return [k.rate / r.rate for k, r in zip(self.keyserver, self.raw, strict=True) if r.ops]

    @staticmethod
    def median(windows: list[OpsWindow], value: Callable[[OpsWindow], float]) -> float:
        return statistics.median(value(w) for w in windows) if windows else float("nan")


def _collect(process: Any, out: Any, what: str, timeout: float) -> Any:
    if not out.poll(timeout):
        process.kill()
        process.join()
        raise Broken(f"{what} sent no result (exit code {process.exitcode})")
    result = out.recv()
    process.join(timeout=10)
    return result


def keyserver_window(setup: Setup, server: KeyServer, kind: str, digests: list[bytes]) -> OpsWindow:
    """One window of the key server under ``--depth`` pipelined requests of one kind, on
    one connection per key-server process."""
    args = setup.args
    leaf = setup.leaves[kind]
    begin = time.monotonic() + args.ks_warm
    end = begin + args.ks_slice
    loads = []
    for index in range(server.processes):
        receiver, sender = FORK.Pipe(duplex=False)
        process = FORK.Process(
            target=_keyserver_load,
            args=(server.address, setup.mtls, KEYSERVER_OPS[kind], ski_of(leaf.key.public_key()),
                  leaf.name, digests, args.depth, begin, end, sender),
            name=f"keyserver-load-{kind}-{index}",
            daemon=True,
        )  # fmt: skip
        process.start()
        sender.close()
        loads.append((process, receiver))
    workers: list[int] = []

    def worker_cpu() -> float:
        workers[:] = workers or process_tree(server.pid)
        return sum(cpu_of(pid) for pid in workers)

    seconds, cpu, busy, total = cpu_window(
        {
            "loop": lambda: thread_cpu(server.pid)[0],
            "threads": lambda: thread_cpu(server.pid)[1],
            "workers": worker_cpu,
            "load": lambda: sum(cpu_of(int(process.pid)) for process, _ in loads),
        },
        begin,
        end,
    )
    count = errors = 0
    checked: list[tuple[bytes, bytes]] = []
    for process, receiver in loads:
        done, failed, sample = _collect(process, receiver, "the key-server load", 30)
        count, errors, checked = count + done, errors + failed, checked + sample
    if errors:
        raise Broken(f"the key server answered {errors} {kind} requests with an error")
    if len(checked) < server.processes:
        raise Broken(f"a {kind} connection to the key server got no answer")
    public = leaf.key.public_key()
    try:
        for digest, signature in checked:
            verify_signature(public, kind, digest, signature)
    except Exception as exc:
        raise Broken(f"a {kind} signature from the key server does not verify") from exc
    return OpsWindow(seconds, count, cpu, busy, total)


def raw_window(setup: Setup, kind: str, digests: list[bytes]) -> OpsWindow:
    """One window of raw ``cryptography`` signing in ``KEYSERVER_WORKERS`` processes."""
    args = setup.args
    leaf = setup.leaves[kind]
    der = leaf.key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    begin = time.monotonic() + args.ks_warm
    end = begin + args.ks_slice
    runs = []
    for index in range(KEYSERVER_WORKERS):
        receiver, sender = FORK.Pipe(duplex=False)
        process = FORK.Process(
            target=_raw_signer, args=(der, kind, digests, begin, end, sender),
            name=f"raw-{kind}-{index}", daemon=True,
        )  # fmt: skip
        process.start()
        sender.close()
        runs.append((process, receiver))
    seconds, cpu, busy, total = cpu_window(
        {"raw": lambda: sum(cpu_of(int(process.pid)) for process, _ in runs)}, begin, end
    )
    count = 0
    for process, receiver in runs:
        done, first = _collect(process, receiver, "a raw signing process", 30)
        try:
            verify_signature(leaf.key.public_key(), kind, digests[0], first)
        except Exception as exc:
            raise Broken(f"a raw {kind} signature does not verify") from exc
        count += done
    return OpsWindow(seconds, count, cpu, busy, total)


def keyserver_compare(setup: Setup, server: KeyServer, kind: str, pairs: int) -> KeyserverPair:
    """The key server against raw signing, alternating (key server, raw, raw, key server...)."""
    digests = [os.urandom(32) for _ in range(256)]
    result = KeyserverPair()
    for index in range(pairs):
        order: list[tuple[str, Callable[[], OpsWindow], list[OpsWindow]]] = [
            ("keyserver", lambda: keyserver_window(setup, server, kind, digests), result.keyserver),
            ("raw", lambda: raw_window(setup, kind, digests), result.raw),
        ]
        if index % 2:
            order.reverse()
        for name, measure, into in order:
            window = measure()
            into.append(window)
            print(f"  {name + '-' + kind:18} {window.describe()}", flush=True)
    return result


def keyserver_figures(
    kind: str, pair: KeyserverPair, what: str, *, single: bool = False
) -> list[Figure]:
    """The figures of one key-server configuration (``what`` describes it). The goal
    figures are the pre-forked one's (the recommended deployment); ``single``: the same
    server as one process, for information, under ``keyserver_single_*`` names."""
    label = {"p256": "ECDSA P-256", "rsa2048": "RSA-2048 PSS"}[kind]
    name = f"keyserver_single_{kind}" if single else f"keyserver_{kind}"
    goal = None if single else (">=", KEYSERVER_RATIO_GOAL)
    rate = pair.median(pair.keyserver, lambda w: w.rate)
    raw = pair.median(pair.raw, lambda w: w.rate)
    server_us = pair.median(pair.keyserver, lambda w: w.us_per_op("loop", "threads", "workers"))
    raw_us = pair.median(pair.raw, lambda w: w.us_per_op("raw"))
    return [
        Figure(
            f"{name}_ratio", median(pair.ratios()), "ratio", 3, goal,
            f"{label}: key server ops/s over raw signing with {KEYSERVER_WORKERS} processes, "
            f"median of {len(pair.ratios())} paired slices ({what})",
        ),
        Figure(f"{name}_ops_per_s", rate, "ops/s", 0, None, f"{label}: {what}"),
        Figure(
            f"{name}_raw_ops_per_s", raw, "ops/s", 0, None,
            f"{label}: raw cryptography signing, {KEYSERVER_WORKERS} processes",
        ),
        Figure(
            f"{name}_cpu_us_per_op", server_us, "us", 1, None,
            f"{label}: key server CPU per operation (all threads and processes)",
        ),
        Figure(
            f"{name}_raw_cpu_us_per_op", raw_us, "us", 1, None,
            f"{label}: raw signing CPU per operation",
        ),
        Figure(
            f"{name}_cpu_ratio", raw_us / server_us if server_us else 0.0, "ratio", 3,
            None, f"{label}: raw CPU per op over the key server's: the ratio with the CPUs "
            "to the key server alone",
        ),
        Figure(
            f"{name}_loadgen_cpu_share",
            100 * pair.median(pair.keyserver, lambda w: w.share("load")), "%", 1, None,
            f"{label}: the load generator's share of the machine's CPU in the key-server slices",
        ),
    ]  # fmt: skip


KEYSERVER_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("TLS and socket I/O (uvloop, ssl)", ("uvloop", "sslproto", "ssl.py", "_ssl", "SSLObject",
                                          "selector", "transports", "socket")),
    ("protocol.py: framing, Request/Response objects", ("protocol.py",)),
    ("keyserver.py: admission, dispatch, replies, metrics", ("keyserver.py", "bisect")),
    ("authorizer, check_op", ("authz.py", "operations.py", "codes.py")),
    ("executor hand-off (concurrent.futures, threading)", ("concurrent/futures", "threading.py",
                                                           "queue.py", "_queue", "lock")),
    ("asyncio event loop", ("asyncio", "events.py", "base_events.py", "call_soon", "run_forever")),
    ("enum, dataclasses, functools", ("enum.py", "dataclasses.py", "functools", "<string>")),
]  # fmt: skip


def profile_keyserver(setup: Setup, kind: str, seconds: float) -> None:
    """cProfile of ``keybroker keyserver``'s main thread (the event loop) under the load of
    the key-server figures; the executor threads' CPU is read from /proc."""
    out = setup.workdir / f"keyserver-{kind}.prof"
    server = start_keybroker_keyserver(
        setup.workdir / f"keyserver-profiled-{kind}", setup.keys(), setup.mtls,
        pool=setup.args.keyserver_pool, profile_to=out,
    )  # fmt: skip
    digests = [os.urandom(32) for _ in range(256)]
    try:
        setup.args.ks_slice = seconds
        window = keyserver_window(setup, server, kind, digests)
    finally:
        server.stop()
    print(f"\nkey server under cProfile, {kind}, depth {setup.args.depth}: {window.describe()}")
    stats = pstats.Stats(str(out))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values())
    ops = max(1, window.ops)
    shares: dict[str, float] = {}

    def group(path: str, name: str) -> str:
        where = f"{path}:{name}"
        return next(
            (label for label, needles in KEYSERVER_GROUPS if any(n in where for n in needles)),
            "other",
        )

    for (path, _line, name), entry in raw.items():
        own = group(path, name)
        parts = [(own, entry[2])]
        if path == "~" and own == "other" and entry[4]:  # a built-in counts for its caller
            parts = [(group(caller[0], caller[2]), edge[2]) for caller, edge in entry[4].items()]
        for label, spent in parts:
            shares[label] = shares.get(label, 0.0) + spent
    print(
        f"main thread (event loop) under the profiler: {1e6 * total / ops:.1f} µs of CPU per "
        "operation (the whole run over the window's operations; the profiler's own cost per "
        "call inflates Python-heavy code)"
    )
    for label, value in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"  {100 * value / total:5.1f} %  {label}")
    print("\ntop functions by own time (main thread):")
    stats.sort_stats("tottime").print_stats(25)


# --- nginx --------------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_session_tickets on;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def nginx_available(args: argparse.Namespace) -> tuple[str | None, str]:
    """(path to nginx or None, why not / how it came to be there)."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found:
        return found, "installed"
    if args.quick or not args.install_nginx:
        return None, (
            "nginx is not installed (full mode with --install-nginx installs nginx-light "
            "with apt-get)"
        )
    print("installing nginx-light (apt-get) ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "nginx-light"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            return None, f"{' '.join(command)} failed: {done.stderr.strip()[-300:]}"
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    return (found if Path(found).exists() else None), "installed by --install-nginx"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def nginx_ceiling(setup: Setup, nginx: str, slices: int) -> list[Window]:
    directory = setup.workdir / "nginx"
    directory.mkdir()
    leaf = setup.leaves["p256"]
    chain = directory / "chain.pem"
    chain.write_bytes(leaf.chain_pem)
    key = directory / "key.pem"
    key.write_bytes(
        leaf.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            workers=setup.args.workers, dir=directory, port=port, chain=chain, key=key
        )
    )
    process = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(directory), "-e", str(directory / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        context = ssl.create_default_context(cafile=str(setup.ca.path))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        deadline = time.monotonic() + 10
        while True:
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                    context.wrap_socket(raw, server_hostname=leaf.name),
                ):
                    break
            except OSError as exc:
                if process.poll() is not None or time.monotonic() > deadline:
                    err = process.stderr.read() if process.stderr else ""
                    raise Broken(f"nginx did not serve TLS: {exc}; {err}") from exc
                time.sleep(0.1)
        pids = [process.pid, *children(process.pid)]
        windows = []
        args = setup.args
        for _ in range(slices):
            windows.append(s_time_counted(port, pids, args.clients, int(args.slice)))
            print(f"  {'nginx-p256-local':22} {windows[-1].describe()}", flush=True)
        return windows
    finally:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def s_time_counted(port: int, server_pids: list[int], clients: int, seconds: int) -> Window:
    """``clients`` ``s_time -new`` runs of ``seconds`` each, counted by ``s_time`` itself
    (nginx has no handshake counter of its own): the sum over the clients of "N connections
    in T real seconds". The window covers the whole run, connection set-up included."""
    openssl = shutil.which("openssl") or "openssl"
    command = [openssl, "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-tls1_3"]
    busy0, total0 = machine_busy()
    server0 = sum(cpu_of(pid) for pid in server_pids)
    before = os.times()
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [*command, "-time", str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(clients)
    ]
    count = 0
    for process in processes:
        out, _ = process.communicate(timeout=seconds + 30)
        match = re.search(r"(\d+) connections in \d+ real seconds", out)
        if match is None:
            raise Broken(f"s_time printed no count: {out[-300:]!r}")
        count += int(match.group(1))
    elapsed = time.monotonic() - started
    after = os.times()  # the clients are reaped: their CPU is in the children's times
    load_cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    busy1, total1 = machine_busy()
    return Window(
        elapsed,
        count,
        0,
        sum(cpu_of(pid) for pid in server_pids) - server0,
        0.0,
        load_cpu,
        busy1 - busy0,
        total1 - total0,
    )


# --- profile ------------------------------------------------------------------------------------

CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("cryptography (OpenSSL) calls", ("cryptography", "_rust", "AESGCM", "ChaCha20", "X25519")),
    ("hashlib / hmac", ("_hashlib", "hmac.py", "hashlib.py", "openssl_")),
    ("fasttls glue", ("fasttls.py",)),
    ("key operation: tlskeys, key client, protocol", ("tlskeys.py", "keyclient.py",
                                                      "protocol.py", "codes.py")),
    ("edge: SNI peek, routing, counters", ("keyless/edge.py", "sni.py")),
    ("pure-Python crypto left (tlslite, python-ecdsa)", ("python_", "aesgcm.py", "x25519.py",
                                                         "rijndael.py", "chacha", "poly1305",
                                                         "/ecdsa/")),
    ("tlslite messages and extensions: parse, build", ("messages.py", "extensions.py",
                                                       "codec.py", "constants.py",
                                                       "lists.py", "format_output")),
    ("tlslite record layer, socket I/O", ("recordlayer.py", "bufferedsocket.py",
                                          "messagesocket.py", "defragmenter.py", "_socket",
                                          "socket.py", "select")),
    ("tlslite handshake logic, settings, key schedule glue", ("tlsconnection.py",
                                                              "handshakesettings.py",
                                                              "handshakehelpers.py",
                                                              "handshakehashes.py",
                                                              "keyexchange.py", "session",
                                                              "x509", "mathtls.py",
                                                              "cryptomath.py",
                                                              "tlslite/utils")),
]  # fmt: skip


def categorise(path: str, name: str) -> str:
    where = f"{path}:{name}"
    for label, needles in CATEGORIES:
        if any(needle in where for needle in needles):
            return label
    return "other: Python runtime (threading, logging, dataclasses, ...)"


def profile_run(setup: Setup, seconds: float, *, fast: bool) -> None:
    """cProfile (per-thread CPU clock) of one worker serving one sequential s_time client."""
    mode = "fast" if fast else "stock"
    out = setup.workdir / f"worker-{mode}.prof"
    group = setup.edge("p256", fast=fast, remote=True, workers=1, profile_to=out)
    try:
        cross_check(setup, group, "p256")
        before_cpu = sum(cpu_of(pid) for pid in group.pids)
        before = group.totals()["handshakes"]
        with s_time_load(group.port, 1, int(seconds) + 1):
            time.sleep(seconds)
        time.sleep(0.3)
        handshakes = max(1, group.totals()["handshakes"] - before)
        worker_cpu = sum(cpu_of(pid) for pid in group.pids) - before_cpu
    finally:
        group.stop()
    stats = pstats.Stats(str(out))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values())
    # A built-in (len, hasattr, int.from_bytes ...) counts for whoever called it, unless it is
    # itself a call into cryptography or hashlib.
    shares: dict[str, float] = {}
    tops: dict[str, dict[str, float]] = {}
    for (path, line, name), entry in raw.items():
        own = categorise(path, name)
        parts = [(own, entry[2])]
        if path == "~" and own.startswith("other") and entry[4]:
            parts = [
                (categorise(caller[0], caller[2]), edge[2]) for caller, edge in entry[4].items()
            ]
        where = f"{Path(path).name}:{line}({name})" if line else name
        for label, seconds_spent in parts:
            shares[label] = shares.get(label, 0.0) + seconds_spent
            tops.setdefault(label, {})
            tops[label][where] = tops[label].get(where, 0.0) + seconds_spent
    print(
        f"\nprofile of one worker ({mode}, remote key, P-256, one sequential s_time client): "
        f"{handshakes} handshakes; worker CPU {1000 * worker_cpu / handshakes:.2f} ms per "
        f"handshake under the profiler (all threads), of which the profiled handshake "
        f"threads {1000 * total / handshakes:.2f} ms"
    )
    for label, value in sorted(shares.items(), key=lambda item: -item[1]):
        biggest = sorted(tops[label].items(), key=lambda item: -item[1])[:4]
        print(f"  {100 * value / total:5.1f} %  {label}")
        print("           " + "; ".join(f"{w} {100 * t / total:.1f}%" for w, t in biggest))
    calls: dict[str, float] = {}
    for (path, _, name), entry in raw.items():
        short = None
        if path.endswith("fasttls.py") and not name.startswith("_"):
            short = name
        elif path == "~" and "cryptography" in name:
            found = re.match(r"<method '(\w+)' of '(?:\w+\.)*(\w+)' objects>", name)
            short = f"{found.group(2)}.{found.group(1)}" if found else None
        if short is not None and entry[1] >= handshakes / 2:
            calls[short] = calls.get(short, 0.0) + entry[1] / handshakes
    if calls:
        print("calls per handshake: " + ", ".join(f"{n} {c:.1f}" for n, c in sorted(calls.items())))
    print("\ntop functions by own CPU time:")
    stats.sort_stats("tottime").print_stats(20)


def primitive_costs() -> None:
    """Microseconds per call of what fasttls replaces: tlslite's own code, then fasttls's.

    Measured in this process, where ``install()`` has not run: the "stock" side calls
    tlslite's classes and functions as they are, the "fast" side fasttls's replacements.
    """
    from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    from tlslite.constants import GroupName  # type: ignore[import-untyped,unused-ignore]
    from tlslite.keyexchange import (  # type: ignore[import-untyped,unused-ignore]
        ECDHKeyExchange,
    )
    from tlslite.utils.python_rsakey import (  # type: ignore[import-untyped,unused-ignore]
        Python_RSAKey,
    )

    from keybroker.flows.keyless import fasttls
    from keybroker.flows.keyless.tlskeys import RemoteRSAKey

    secret = os.urandom(32)
    flight = bytearray(os.urandom(700))
    nonce = bytearray(12)

    def exchange(kex: Any, peer: bytearray) -> Callable[[], Any]:
        def run() -> Any:
            private = kex.get_random_private_key()
            kex.calc_public_value(private)
            return kex.calc_shared_key(private, peer)

        return run

    x_stock, x_fast = (
        ECDHKeyExchange(GroupName.x25519, (3, 4)),
        fasttls.FastECDHKeyExchange(GroupName.x25519, (3, 4)),
    )
    x_peer = bytearray(x_fast.calc_public_value(x_fast.get_random_private_key()))
    p_stock, p_fast = (
        ECDHKeyExchange(GroupName.secp256r1, (3, 4)),
        fasttls.FastECDHKeyExchange(GroupName.secp256r1, (3, 4)),
    )
    p_peer = bytearray(p_fast.calc_public_value(p_fast.get_random_private_key()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    n, e = key.public_key().public_numbers().n, key.public_key().public_numbers().e
    digest = os.urandom(32)
    pss = rsa_padding.PSS(rsa_padding.MGF1(hashes.SHA256()), 32)
    signature = bytearray(key.sign(digest, pss, Prehashed(hashes.SHA256())))
    remote = RemoteRSAKey(n, e, key_type="rsa", operator=LocalOperator([]), ski=b"", sni=None)
    aes, chacha, label = (
        "tlslite.utils.python_aesgcm.new",
        "tlslite.utils.python_chacha20_poly1305.new",
        "tlslite.utils.cryptomath.HKDF_expand_label",
    )
    rows: list[tuple[str, str, Callable[[], Any], Callable[[], Any]]] = [
        (
            "AES-256-GCM: new key",
            "6",
            lambda: fasttls.original(aes)(secret),
            lambda: fasttls.aesgcm_new(secret),
        ),
        (
            "AES-256-GCM: seal 700 B",
            "1 (+ 2 tickets, 1 open)",
            lambda: fasttls.original(aes)(secret).seal(nonce, flight, b"hdr"),
            lambda: fasttls.aesgcm_new(secret).seal(nonce, flight, b"hdr"),
        ),
        (
            "ChaCha20-Poly1305: seal 700 B",
            "(if chosen)",
            lambda: fasttls.original(chacha)(secret).seal(nonce, flight, b"hdr"),
            lambda: fasttls.chacha20_poly1305_new(secret).seal(nonce, flight, b"hdr"),
        ),
        ("X25519: key share + secret", "1", exchange(x_stock, x_peer), exchange(x_fast, x_peer)),
        ("P-256 ECDH: key share + secret", "(if chosen)", exchange(p_stock, p_peer),
         exchange(p_fast, p_peer)),
        (
            "HKDF-Expand-Label",
            "26",
            lambda: fasttls.original(label)(secret, b"key", b"", 32, "sha256"),
            lambda: fasttls.hkdf_expand_label(secret, b"key", b"", 32, "sha256"),
        ),
        (
            "RSA-2048 PSS self-check",
            "1 (RSA keys)",
            lambda: Python_RSAKey(n, e).verify(signature, digest, "pss", "sha256", 32),
            lambda: remote.verify(signature, digest, "pss", "sha256", 32),
        ),
    ]  # fmt: skip
    print("\nper call, µs (process CPU, best of 3): tlslite -> fasttls; calls per handshake")
    for name, per_handshake, stock, fast in rows:
        costs = []
        for function in (stock, fast):
            function()  # warm
            best = float("inf")
            for _ in range(3):
                count = 0
                started = time.process_time()
                while (elapsed := time.process_time() - started) < 0.1 or count < 3:
                    function()
                    count += 1
                best = min(best, elapsed / count)
            costs.append(1e6 * best)
        print(f"  {name:32} {costs[0]:9.1f} -> {costs[1]:7.1f}   x {per_handshake}")


def median(values: list[float]) -> float:
    """The median, or NaN for no values (a figure that could not be measured)."""
    return statistics.median(values) if values else float("nan")


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-s slices, fewer pairs")
    parser.add_argument("--slice", type=float, default=None, help="timed seconds per slice")
    parser.add_argument("--pairs", type=int, default=None, help="remote/local pairs for P-256")
    parser.add_argument("--clients", type=int, default=16, help="concurrent s_time processes")
    parser.add_argument("--workers", type=int, default=2, help="edge worker processes")
    parser.add_argument("--keyserver", choices=sorted(KEYSERVERS), default="keybroker")
    parser.add_argument("--depth", type=int, default=64, help="key-server pipeline depth")
    parser.add_argument(
        "--keyserver-pool", choices=("thread", "process"), default="thread",
        help="executor of the key server measured alone",
    )  # fmt: skip
    parser.add_argument("--ks-slice", type=float, default=None, help="key-server slice seconds")
    parser.add_argument("--ks-pairs", type=int, default=None, help="key-server/raw pairs per kind")
    parser.add_argument(
        "--profile-keyserver", action="store_true", help="profile the key server instead"
    )
    parser.add_argument("--install-nginx", action="store_true", help="apt-get nginx-light")
    parser.add_argument("--profile", action="store_true", help="profile one worker instead")
    parser.add_argument("--serve-test-keyserver", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.slice = args.slice or (2.0 if args.quick else 5.0)
    args.pairs = args.pairs or (2 if args.quick else 5)
    args.other_pairs = 1 if args.quick else 3
    args.pinned_pairs = 1 if args.quick else 3
    args.latency_count = 100 if args.quick else 400
    args.ks_slice = args.ks_slice or (1.0 if args.quick else 5.0)
    args.ks_pairs = args.ks_pairs or (1 if args.quick else 3)
    args.ks_warm = 0.4 if args.quick else 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_test_keyserver is not None:
        return serve_test_keyserver(args.serve_test_keyserver)
    started = time.perf_counter()
    mode = "quick" if args.quick else "full"
    print(
        f"bench/keyless.py ({mode}): {os.cpu_count()} CPUs, {cpu_model()}, Python "
        f"{platform.python_version()}, cryptography {cryptography.__version__}, tlslite-ng "
        f"{tlslite.__version__}, {subprocess.getoutput('openssl version')}; workers "
        f"{args.workers}, {args.clients} s_time clients, {args.slice:g} s slices, key server "
        f"{args.keyserver!r}; load average at start {load()}",
        flush=True,
    )
    setup = make_setup(args)
    figures: list[Figure] = []
    notes: list[str] = []
    broken: list[str] = []
    try:
        if args.profile:
            for fast in (False, True):
                profile_run(setup, 5.0 if args.quick else 15.0, fast=fast)
            primitive_costs()
            return 0
        if args.profile_keyserver:
            for kind in KEYSERVER_OPS:
                profile_keyserver(setup, kind, 5.0 if args.quick else 15.0)
            return 0
        print(f"fast tlslite, ECDSA P-256: remote vs local; {SHARED.describe()}", flush=True)
        p256 = compare(setup, "p256", fast=True, pairs=args.pairs)
        pinned = Pair()
        if (os.cpu_count() or 1) >= 2:
            print(f"the same, {PINNED.describe()}", flush=True)
            pinned = compare(setup, "p256", fast=True, pairs=args.pinned_pairs, layout=PINNED)
        else:
            notes.append("pinned layout skipped: it needs 2 CPUs")
        print("stock tlslite, ECDSA P-256: remote vs local", flush=True)
        stock = compare(setup, "p256", fast=False, pairs=args.other_pairs)
        print("fast tlslite, RSA-2048: remote vs local", flush=True)
        rsa = compare(setup, "rsa2048", fast=True, pairs=args.other_pairs)
        print("resumed TLS 1.3 (fast, remote, P-256), Python ssl clients", flush=True)
        resumed = [resumed_rate(setup) for _ in range(args.other_pairs)]
        print("latency of one sequential handshake (fast, P-256, one worker)", flush=True)
        remote_ms, local_ms = added_latency(setup, args.latency_count)
        print(f"  median remote {remote_ms:.2f} ms, local {local_ms:.2f} ms", flush=True)
        single_what = (
            f"keybroker keyserver --workers {KEYSERVER_WORKERS} --pool {args.keyserver_pool}, "
            f"one process, one mutual-TLS connection, depth {args.depth}"
        )
        prefork_what = (
            f"keybroker keyserver --processes {KEYSERVER_WORKERS} (pool inline), "
            f"{KEYSERVER_WORKERS} mutual-TLS connections, depth {args.depth} each"
        )
        print(f"the key server alone: {single_what}; against raw signing", flush=True)
        alone = setup.keyserver
        if args.keyserver != "keybroker" or args.keyserver_pool != "thread":
            alone = start_keybroker_keyserver(
                setup.workdir / "keyserver-alone", setup.keys(), setup.mtls,
                pool=args.keyserver_pool,
            )  # fmt: skip
        try:
            single_pairs = {
                kind: keyserver_compare(setup, alone, kind, args.ks_pairs) for kind in KEYSERVER_OPS
            }
        finally:
            if alone is not setup.keyserver:
                alone.stop()
        print(f"the key server alone, pre-forked: {prefork_what}; against raw signing", flush=True)
        prefork = start_keybroker_keyserver(
            setup.workdir / "keyserver-prefork", setup.keys(), setup.mtls,
            workers=1, pool="inline", processes=KEYSERVER_WORKERS,
        )  # fmt: skip
        try:
            keyserver_pairs = {
                kind: keyserver_compare(setup, prefork, kind, args.ks_pairs)
                for kind in KEYSERVER_OPS
            }
        finally:
            prefork.stop()
        nginx, why = nginx_available(args)
        ceiling: list[Window] = []
        if nginx is None:
            notes.append(f"nginx ceiling skipped: {why}")
        else:
            print(f"nginx ceiling ({nginx}, {why}; P-256 key in a local file)", flush=True)
            ceiling = nginx_ceiling(setup, nginx, args.other_pairs)

        full = Pair.median_rate(p256.a)
        edge_ms = statistics.median(w.edge_ms_per_handshake for w in p256.a)
        load_share = statistics.median(w.share(w.load_cpu) for w in p256.a)
        stock_full = Pair.median_rate(stock.a)
        figures += [
            Figure(
                "edge_tls13_full_per_s", full, "handshakes/s", 1, (">=", FULL_GOAL),
                f"fast, remote key, P-256, {args.workers} workers: median of {len(p256.a)} slices",
            ),
            Figure(
                "edge_remote_over_local_ratio", median(pinned.ratios()), "ratio", 3,
                (">=", RATIO_GOAL), f"fast, P-256, {PINNED.describe()}: median of paired "
                "remote/local slices",
            ),
            Figure(
                "edge_remote_over_local_ratio_shared", median(p256.ratios()), "ratio", 3, None,
                "the same with nothing pinned: the key server's CPU comes off the edge's",
            ),
            Figure(
                "edge_pinned_tls13_full_per_s", Pair.median_rate(pinned.a), "handshakes/s", 1,
                None, "fast, remote, P-256, both workers on one CPU (load on the other)",
            ),
            Figure(
                "edge_tls13_full_local_per_s", Pair.median_rate(p256.b), "handshakes/s", 1, None,
                "fast, key in the worker process, P-256",
            ),
            Figure(
                "edge_cpu_ms_per_full_handshake", edge_ms, "ms", 2, None,
                "edge workers' CPU per full handshake, fast, remote, P-256",
            ),
            Figure(
                "edge_local_cpu_ms_per_full_handshake",
                median([w.edge_ms_per_handshake for w in p256.b]), "ms", 2, None,
                "edge workers' CPU per full handshake, fast, key in-process, P-256",
            ),
            Figure(
                "edge_cpu_bound_per_s", 1000 * args.workers / edge_ms, "handshakes/s", 0, None,
                f"{args.workers} cores / edge CPU per handshake: with the CPUs to itself",
            ),
            Figure(
                "loadgen_cpu_share", 100 * load_share, "%", 1, None,
                "s_time's share of the machine's CPU during the remote P-256 slices",
            ),
            Figure(
                "edge_rsa2048_tls13_full_per_s", Pair.median_rate(rsa.a), "handshakes/s", 1, None,
                "fast, remote key, RSA-2048",
            ),
            Figure(
                "edge_rsa2048_remote_over_local_ratio", median(rsa.ratios()), "ratio",
                3, None, "median of paired slices, fast, RSA-2048",
            ),
            Figure(
                "edge_stock_tls13_full_per_s", stock_full, "handshakes/s", 1, None,
                "stock tlslite (fast_crypto = false), remote key, P-256",
            ),
            Figure(
                "edge_stock_remote_over_local_ratio", median(stock.ratios()), "ratio",
                3, None, "median of paired slices, stock tlslite, P-256",
            ),
            Figure(
                "edge_fast_over_stock_ratio", full / stock_full if stock_full else 0.0, "ratio",
                2, None, "fast over stock, remote, P-256",
            ),
            Figure(
                "edge_stock_cpu_ms_per_full_handshake",
                statistics.median(w.edge_ms_per_handshake for w in stock.a), "ms", 2, None,
                "edge workers' CPU per full handshake, stock, remote, P-256",
            ),
            Figure(
                "edge_added_latency_ms", remote_ms - local_ms, "ms", 2, None,
                f"median handshake time remote ({remote_ms:.2f}) - local ({local_ms:.2f}), "
                "one sequential client",
            ),
            Figure(
                "edge_tls13_resumed_per_s", statistics.median(w.resumed_rate for w in resumed),
                "handshakes/s", 1, None, "fast, P-256, Python ssl clients reusing a ticket",
            ),
        ]  # fmt: skip
        if ceiling:
            nginx_rate = statistics.median(w.full_rate for w in ceiling)
            figures += [
                Figure(
                    "nginx_tls13_full_per_s", nginx_rate, "handshakes/s", 1, None,
                    f"nginx, local key file, P-256, {args.workers} workers (the ceiling)",
                ),
                Figure(
                    "edge_over_nginx_ratio", full / nginx_rate, "ratio", 3, None,
                    "edge (remote key) over nginx (local key)",
                ),
            ]  # fmt: skip
        for kind, pair in keyserver_pairs.items():
            figures += keyserver_figures(kind, pair, prefork_what)
        for kind, pair in single_pairs.items():
            figures += keyserver_figures(kind, pair, single_what, single=True)
    except Exception as exc:
        broken.append(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        setup.keyserver.stop()
        shutil.rmtree(setup.workdir, ignore_errors=True)

    print()
    width = max((len(f.metric) for f in figures), default=10)
    for f in figures:
        met = {True: "yes", False: "NO", None: "info"}[f.met]
        goal = f.goal_text if f.goal is not None else "-"
        print(f"{f.metric:{width}} {f.shown:>10} {f.unit:13} {goal:6} {met:4}  {f.how}")
    for note in notes:
        print(note)
    print(f"load average at end {load()}; took {time.perf_counter() - started:.0f} s")
    for problem in broken:
        print(f"BROKEN {problem}")
    sys.stdout.flush()
    for f in figures:
        print(f.bench_line(FLOW))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
