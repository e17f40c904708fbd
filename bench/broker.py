"""Broker benchmark: deliveries sealed and acked per second through the HTTPS API, against the
same operations called in-process on ``Broker``, with N concurrent principals.

One operation (one delivery) is the whole round trip of a key version:

* the operator delivers a keyset version to a principal: the broker HPKE-seals it to the
  principal's key, signs the envelope with the CA key and logs it
  (``POST /v1/deliveries``; in-process ``Broker.deliver``);
* the principal fetches its deliveries (``GET /v1/deliveries``; ``Broker.fetch_deliveries``),
  checks the CA signature (``DeliveryEnvelope.verify``), HPKE-opens the version into a local
  keyset (``Keyset.install_sealed_version``) and acks with the proof of possession
  (``make_ack_proof``; ``POST /v1/deliveries/{id}/ack``; ``Broker.ack``), which the broker
  checks against its own copy and logs.

API side: ``keybroker init`` and ``keybroker serve`` run as subprocesses on a fresh home (a
free port, TLS pinned to the home's CA), principals enrol with ``PrincipalClient.enrol``
(passphrase keyrings) and are driven with the SDK (``OperatorClient``, ``PrincipalClient``)
from one asyncio loop, one coroutine per principal. The principal opens each delivery in
memory, exactly as the in-process side does, instead of ``PrincipalClient.open_delivery``,
which also re-encrypts the keyring file under a fresh scrypt key on every call (about 0.1 s);
that cost is reported on its own (``sdk_open_delivery_ms``). In-process side: ``open_home`` +
``Broker.from_home`` on a second fresh home, one thread per principal. Both homes are on the
same database kind: SQLite (a file per home) or PostgreSQL (a fresh schema per home, dropped
at the end). Every delivery is a distinct (principal, keyset, version 1): keysets and hold
grants are made between slices, never while timed, so the pool never runs dry.

Method. For each database and each N, the API side and the in-process side run in
alternating slices, ABBA order, ``--pairs`` of each after a half-length warm-up slice each.
A slice is ``--slice`` seconds, longer in proportion above N = 8 (N = 16: twice as long) so
that each principal still finishes a few operations in it. A slice runs N workers in a closed
loop until its deadline; its rate is the work done inside the window divided by its length
(an operation still running at the deadline counts for the fraction of it inside the
window), so a slice is not biased by the operations in flight at its end, which matters
with 16 principals and slices a few operations long. The ratio is the median over adjacent
(API, in-process) slice pairs of API rate / in-process rate, the pair having run under
nearly the same background load; the rates shown are each side's median slice. The table
also gives the CPU time per delivery of this process and, on the API side, of the server
process. The API side spreads over two processes (SDK client and server) where the
in-process side is one process under one GIL; on this 2-core machine that is part of what
the ratio measures. The garbage collector is off in timed code. Before timing, each side
delivers, opens and acks one version, and the key the principal opened must equal the
broker's own copy; afterwards every delivery made on each home must be ``acked`` (as many
as the script counted) and both logs must verify in full.

Figures, per database (``sqlite``, ``postgres``) and N: ``api_ops_<db>_n<N>`` and
``inproc_ops_<db>_n<N>`` (deliveries/s) and ``api_ratio_<db>_n<N>``, all for information
(``goal=>=0``; docs/benchmarks.md, ``## broker``, says why), and ``sdk_open_delivery_ms``.

Run: ``python bench/broker.py [--quick] [--pairs P] [--slice S] [--n 1,4,16]
[--pg-url URL | --no-pg]``. Exits non-zero only if something is broken, never because a
goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import platform
import resource
import secrets
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import cryptography
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from benchkit import Broken, Figure, cpu_model, load, pg_admin, pg_unreachable
from keybroker.broker import (
    Broker,
    DeliveryEnvelope,
    HpkeKeyBinding,
    make_ack_proof,
    sign_with_identity,
)
from keybroker.broker.home import Home, open_home
from keybroker.cli.credentials import read_admin_token
from keybroker.client.keyring import KekSource, Keyring
from keybroker.client.operator import OperatorClient
from keybroker.client.principal import PrincipalClient
from keybroker.keys import SECRET_ACCESS, X25519_HPKE, HpkeHandle, Keyset
from keybroker.pki import PrincipalId, load_certificate
from keybroker.store.schema import deliveries

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
KB = [sys.executable, "-m", "keybroker.cli.main"]
TEMPLATE = "AES256_GCM"
DELIVERY_TTL = timedelta(hours=1)
PASSPHRASE = "keybroker bench keyring passphrase"  # throwaway keyrings
#: First guesses of each side's rate (deliveries/s), only to size the first pool top-up.
FIRST_GUESS = {"api": 80.0, "inproc": 300.0}
SDK_OPEN_CALLS = {"quick": 3, "full": 10}
#: Above this many principals a slice gets longer in proportion (see Settings.slice_for).
SLICE_DOUBLES_AT = 8.0

console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


@contextmanager
def no_gc() -> Iterator[None]:
    """The collector off while timed. What is alive before is frozen (moved out of the
    collector's sight), so the next slice's collect scans only what is new: a full
    collect over the homes, pools and clients took about 75 ms a slice here."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


Interval = tuple[float, float]


def window_rate(intervals: list[Interval], start: float, end: float) -> float:
    """Operations per second inside [start, end], counting the part of each op inside it."""
    work = 0.0
    for a, b in intervals:
        if b > a:
            work += max(0.0, min(b, end) - max(a, start)) / (b - a)
    return work / (end - start)


@dataclass(frozen=True)
class SliceResult:
    rate: float
    ops: int
    #: A worker ran out of prepared deliveries before the deadline: the slice is not valid.
    short: bool
    #: CPU seconds used meanwhile by this process and by the server process (API side).
    cpu_self: float
    cpu_server: float


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) used so far by process ``pid``."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Comparison:
    """Alternated slices of both sides for one database and one N."""

    api: list[SliceResult] = field(default_factory=list)
    inproc: list[SliceResult] = field(default_factory=list)

    @property
    def api_rate(self) -> float:
        return statistics.median(s.rate for s in self.api)

    @property
    def inproc_rate(self) -> float:
        return statistics.median(s.rate for s in self.inproc)

    @property
    def ratio(self) -> float:
        return statistics.median(
            a.rate / b.rate for a, b in zip(self.api, self.inproc, strict=True)
        )

    @staticmethod
    def cpu_per_op(slices: list[SliceResult]) -> tuple[float, float]:
        """Milliseconds of CPU per delivery: (this process, server process)."""
        ops = sum(s.ops for s in slices) or 1
        return (
            sum(s.cpu_self for s in slices) / ops * 1e3,
            sum(s.cpu_server for s in slices) / ops * 1e3,
        )


# ---------------------------------------------------------------------------
# What a principal does with an envelope (the same on both sides)
# ---------------------------------------------------------------------------


def open_envelope(
    envelope: DeliveryEnvelope,
    purpose: str,
    ca: x509.Certificate,
    principal: PrincipalId,
    opener: HpkeHandle,
) -> Keyset:
    """Check the CA's signature and HPKE-open the version into a fresh local keyset."""
    envelope.verify(ca, recipient=principal)
    local = Keyset(envelope.keyset, purpose)
    local.install_sealed_version(envelope.sealed, opener, info=envelope.info)
    return local


# ---------------------------------------------------------------------------
# Keysets and grants waiting to be delivered
# ---------------------------------------------------------------------------


class Pool:
    """Per principal, keysets it holds a grant on and has not been sent yet.

    Keysets are shared: principal i walks the list ``names`` in order, so (principal,
    keyset, version 1) is never repeated. Topped up between slices, never while timed.
    """

    def __init__(self, broker: Broker, principals: list[PrincipalId]) -> None:
        self._broker = broker
        self._principals = principals
        self.names: list[str] = []
        self.granted = [0] * len(principals)
        self.used = [0] * len(principals)

    def left(self, i: int) -> int:
        return self.granted[i] - self.used[i]

    def take(self, i: int) -> str | None:
        """The next keyset for principal ``i`` (each worker only takes its own)."""
        j = self.used[i]
        if j >= self.granted[i]:
            return None
        self.used[i] = j + 1
        return self.names[j]

    def missing(self, needs: dict[int, int]) -> int:
        return sum(max(0, need - self.left(i)) for i, need in needs.items())

    def top_up(self, needs: dict[int, int], advance: Callable[[], None]) -> None:
        for i, need in needs.items():
            while self.left(i) < need:
                j = self.granted[i]
                if j == len(self.names):
                    name = f"bench/k{j:06d}"
                    self._broker.create_keyset(name, TEMPLATE)
                    self.names.append(name)
                self._broker.grant(self._principals[i], self.names[j], "hold")
                self.granted[i] = j + 1
                advance()


# ---------------------------------------------------------------------------
# The in-process side
# ---------------------------------------------------------------------------


@dataclass
class LocalPrincipal:
    """A principal's own keys on the in-process side (what the SDK keeps in its keyring)."""

    pid: PrincipalId
    identity: ed25519.Ed25519PrivateKey
    hpke: Keyset
    opener: HpkeHandle

    @classmethod
    def make(cls, name: str) -> LocalPrincipal:
        hpke = Keyset.generate(f"{name}/hpke", X25519_HPKE)
        return cls(PrincipalId.parse(name), ed25519.Ed25519PrivateKey.generate(), hpke, hpke.hpke())

    def enrol(self, broker: Broker) -> None:
        token = broker.create_enrolment_token(self.pid, timedelta(hours=1))
        binding = HpkeKeyBinding.from_public_keyset(self.pid, self.hpke.public_keyset())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(self.identity, None)
            .public_bytes(serialization.Encoding.PEM)
        )
        broker.enrol(
            self.pid,
            token.secret,
            csr,
            hpke_public_key=binding.public_key,
            hpke_key_signature=sign_with_identity(self.identity, binding.encode()),
            hpke_key_id=binding.key_id,
            hpke_template=binding.template,
        )


class InprocSide:
    name = "inproc"

    def __init__(self, home: Home, names: list[str]) -> None:
        self.home = home
        self.broker = Broker.from_home(home)
        self.ca = self.broker.ca_certificate
        self.principals = [LocalPrincipal.make(n) for n in names]
        self.pool = Pool(self.broker, [p.pid for p in self.principals])
        self.purpose = ""
        self.completed = 0

    def operate(self, i: int, keyset: str) -> Keyset:
        p, broker = self.principals[i], self.broker
        broker.deliver(keyset, 1, p.pid, DELIVERY_TTL)
        inbox = broker.fetch_deliveries(p.pid)
        if len(inbox) != 1 or inbox[0].keyset != keyset:
            raise Broken(f"in-process: {p.pid} fetched {len(inbox)} deliveries, not its one")
        envelope = inbox[0]
        local = open_envelope(envelope, self.purpose, self.ca, p.pid, p.opener)
        proof = make_ack_proof(local, envelope.version, envelope.challenge, envelope.delivery_id)
        if broker.ack(envelope.delivery_id, p.pid, proof).state != "acked":
            raise Broken("in-process: an ack with a good proof was not recorded as acked")
        return local

    def run_slice(self, n: int, seconds: float) -> SliceResult:
        """N threads, one per principal, in a closed loop until the deadline."""
        intervals: list[list[Interval]] = [[] for _ in range(n)]
        errors: list[BaseException] = []
        short = threading.Event()
        started = [0.0]
        barrier = threading.Barrier(
            n + 1, action=lambda: started.__setitem__(0, time.perf_counter())
        )

        def worker(i: int) -> None:
            try:
                barrier.wait()
                deadline = started[0] + seconds
                mine = intervals[i]
                while True:
                    t0 = time.perf_counter()
                    if t0 >= deadline:
                        return
                    keyset = self.pool.take(i)
                    if keyset is None:
                        short.set()
                        return
                    self.operate(i, keyset)
                    mine.append((t0, time.perf_counter()))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        with no_gc():
            cpu0 = cpu_self()
            barrier.wait()
            for t in threads:
                t.join()
            cpu1 = cpu_self()
        if errors:
            raise errors[0]
        done = [iv for mine in intervals for iv in mine]
        self.completed += len(done)
        return SliceResult(
            window_rate(done, started[0], started[0] + seconds),
            len(done),
            short.is_set(),
            cpu1 - cpu0,
            0.0,
        )


# ---------------------------------------------------------------------------
# The API side
# ---------------------------------------------------------------------------


class ApiSide:
    name = "api"

    def __init__(self, home_dir: Path, setup_home: Home, names: list[str]) -> None:
        self.home_dir = home_dir
        self.ca_pem = (home_dir / "ca.pem").read_bytes()
        self.ca = load_certificate(self.ca_pem)
        self.admin = read_admin_token(home_dir)
        # Tokens, keysets and grants are made in-process on the served home (what the
        # operator CLI does next to a running server): setup, never timed.
        self.setup_home = setup_home
        self.setup = Broker.from_home(setup_home)
        self.pids = [PrincipalId.parse(n) for n in names]
        self.pool = Pool(self.setup, self.pids)
        self.server: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.keyrings: list[Keyring] = []
        self.operator: OperatorClient | None = None
        self.clients: list[PrincipalClient] = []
        self.openers: list[HpkeHandle] = []
        self.completed = 0

    @property
    def server_pid(self) -> int | None:
        return self.server.pid if self.server is not None else None

    def enrol(self, i: int, workdir: Path) -> Keyring:
        """Enrol principal ``i`` through the API (own event loop: run from a worker thread)."""
        token = self.setup.create_enrolment_token(self.pids[i], timedelta(hours=1)).secret

        async def go() -> Keyring:
            client = await PrincipalClient.enrol(
                self.url, self.ca_pem, self.pids[i], token, workdir / f"p{i}.keyring",
                passphrase=PASSPHRASE,
            )  # fmt: skip
            await client.aclose()
            return client.keyring

        return asyncio.run(go())

    async def connect(self, workdir: Path) -> None:
        """Clients in the running loop, over the keyrings made at enrolment."""
        self.operator = OperatorClient(self.url, self.admin, self.ca_pem)
        source = KekSource(passphrase=PASSPHRASE)
        for i, keyring in enumerate(self.keyrings):
            path = workdir / f"p{i}.keyring"
            self.clients.append(PrincipalClient(keyring, path, source, url=self.url))
            self.openers.append(keyring.hpke.hpke())

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
        if self.operator is not None:
            await self.operator.aclose()

    async def operate(self, i: int, keyset: str) -> Keyset:
        assert self.operator is not None
        client = self.clients[i]
        sent = await self.operator.deliver(keyset, 1, client.principal, DELIVERY_TTL)
        if sent.state != "sent":
            raise Broken(f"API: a new delivery is {sent.state}, not sent")
        inbox = await client.fetch_deliveries(wait=0)
        if len(inbox) != 1 or inbox[0].keyset != keyset:
            raise Broken(f"API: {client.principal} fetched {len(inbox)} deliveries, not its one")
        delivery = inbox[0]
        local = open_envelope(
            delivery.envelope, delivery.purpose, self.ca, client.principal, self.openers[i]
        )
        # What open_delivery does, minus re-encrypting the keyring file (see the docstring).
        received = client.keyring.received
        received[delivery.keyset] = local
        try:
            out = await client.ack(delivery)
        finally:
            del received[delivery.keyset]
        if out.state != "acked":
            raise Broken("API: an ack with a good proof was not recorded as acked")
        return local

    async def run_slice(self, n: int, seconds: float) -> SliceResult:
        """N coroutines, one per principal, in a closed loop until the deadline."""
        intervals: list[list[Interval]] = [[] for _ in range(n)]
        short = False

        async def worker(i: int) -> None:
            nonlocal short
            mine = intervals[i]
            while True:
                t0 = time.perf_counter()
                if t0 >= deadline:
                    return
                keyset = self.pool.take(i)
                if keyset is None:
                    short = True
                    return
                await self.operate(i, keyset)
                mine.append((t0, time.perf_counter()))

        with no_gc():
            cpu0, server0 = cpu_self(), cpu_of(self.server_pid)
            start = time.perf_counter()
            deadline = start + seconds
            await asyncio.gather(*(worker(i) for i in range(n)))
            cpu1, server1 = cpu_self(), cpu_of(self.server_pid)
        done = [iv for mine in intervals for iv in mine]
        self.completed += len(done)
        return SliceResult(
            window_rate(done, start, deadline), len(done), short, cpu1 - cpu0, server1 - server0
        )

    async def sdk_open_delivery(self, calls: int) -> list[float]:
        """Milliseconds per ``PrincipalClient.open_delivery`` (keyring saved under scrypt)."""
        assert self.operator is not None
        client, samples = self.clients[0], []
        for _ in range(calls):
            keyset = self.pool.take(0)
            if keyset is None:
                raise Broken("no keyset left for the open_delivery figure")
            await self.operator.deliver(keyset, 1, client.principal, DELIVERY_TTL)
            (delivery,) = await client.fetch_deliveries(wait=0)
            t0 = time.perf_counter()
            client.open_delivery(delivery)
            samples.append((time.perf_counter() - t0) * 1e3)
            if (await client.ack(delivery)).state != "acked":
                raise Broken("API: an ack after open_delivery was not recorded as acked")
            del client.keyring.received[delivery.keyset]
            self.completed += 1
        return samples


# ---------------------------------------------------------------------------
# Homes, the server and the databases
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_init(home: Path, db: str | None) -> subprocess.Popen[bytes]:
    """``keybroker init`` on a new home (SQLite in the home, or the database ``db``)."""
    args = [*KB, "init", "--home", str(home), *(["--db", db] if db else [])]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish_init(proc: subprocess.Popen[bytes]) -> None:
    out, _ = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"keybroker init failed: {out.decode()[-2000:]}")


def start_server(home: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``keybroker serve`` on a free port; returns once a TLS handshake pinned to the CA works."""
    port = free_port()
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [*KB, "serve", "--home", str(home), "--port", str(port), "--log-level", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    context = ssl.create_default_context(cafile=str(home / "ca.pem"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"keybroker serve exited: {log.read_text()[-2000:]}")
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                return proc, f"https://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    stop_server(proc)
    raise RuntimeError("keybroker serve did not come up within 60 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def pg_schemas(pg_url: str, count: int) -> Iterator[list[str]]:
    """``count`` fresh schemas on ``pg_url`` as database URLs; dropped afterwards."""
    admin = pg_admin(pg_url)
    base = "kbbench_" + secrets.token_hex(6)
    names = [f"{base}_{i}" for i in range(count)]
    sep = "&" if "?" in pg_url else "?"
    try:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
        yield [f"{pg_url}{sep}options=-csearch_path%3D{name}" for name in names]
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        admin.dispose()


def delivery_states(home: Home) -> dict[str, int]:
    with home.store.snapshot() as conn:
        rows = conn.execute(
            sa.select(deliveries.c.state, sa.func.count()).group_by(deliveries.c.state)
        )
        return {str(state): int(count) for state, count in rows}


# ---------------------------------------------------------------------------
# One database: setup, cross-check, alternated slices for each N
# ---------------------------------------------------------------------------


@dataclass
class Settings:
    mode: str
    pairs: int
    slice: float
    ns: list[int]

    def slice_for(self, n: int) -> float:
        """Longer slices for more principals, so each worker finishes a few operations."""
        return self.slice * max(1.0, n / SLICE_DOUBLES_AT)


@dataclass
class BackendResult:
    figures: list[Figure]
    notes: list[str]


def needs_for(rate: float, n: int, seconds: float) -> dict[int, int]:
    """Deliveries to have ready per principal for a slice at ``rate``, with room to spare:
    threads do not share the GIL and SQLite's lock evenly, so one principal may do 2x its
    share."""
    each = math.ceil(rate * seconds * 3 / n) + 3
    return dict.fromkeys(range(n), each)


class Runner:
    """Alternated slices of both sides on one database, topping the pools up in between."""

    def __init__(self, db: str, api: ApiSide, inproc: InprocSide, progress: Progress) -> None:
        self.db = db
        self.api = api
        self.inproc = inproc
        self.progress = progress
        #: Highest valid slice rate seen per (side, N): sizes the next top-up.
        self.seen: dict[tuple[str, int], float] = {}

    async def one_slice(self, side: str, n: int, seconds: float, task: TaskID) -> SliceResult:
        pool = self.api.pool if side == "api" else self.inproc.pool
        rate = self.seen.get((side, n), FIRST_GUESS[side])
        while True:
            needs = needs_for(rate, n, seconds)
            if pool.missing(needs):
                self.progress.update(task, description=f"{self.db} n={n}: keysets + grants")
                pool.top_up(needs, lambda: None)
            self.progress.update(task, description=f"{self.db} n={n}: timing {side}")
            if side == "api":
                result = await self.api.run_slice(n, seconds)
            else:
                result = self.inproc.run_slice(n, seconds)
            if not result.short:
                self.seen[(side, n)] = max(rate if (side, n) in self.seen else 0, result.rate)
                return result
            # Ran dry: the guess was low. Prepare more and measure this slice again.
            rate = max(rate, result.ops / seconds) * 2

    async def compare(self, n: int, settings: Settings) -> Comparison:
        length = settings.slice_for(n)
        task = self.progress.add_task(f"{self.db} n={n}", total=2 * (settings.pairs + 1))
        # Warm-up (half a slice): connections, TLS sessions, caches, prepared statements.
        for side in ("api", "inproc"):
            await self.one_slice(side, n, length / 2, task)
            self.progress.advance(task)
        result = Comparison()
        for r in range(settings.pairs):
            order = ("api", "inproc") if r % 2 == 0 else ("inproc", "api")
            for side in order:
                sliced = await self.one_slice(side, n, length, task)
                (result.api if side == "api" else result.inproc).append(sliced)
                self.progress.advance(task)
        self.progress.update(task, description=f"{self.db} n={n}: done")
        return result


async def cross_check(api: ApiSide, inproc: InprocSide) -> None:
    """One delivery each way; the key the principal opened must be the broker's own."""
    inproc.pool.top_up({0: 1}, lambda: None)
    api.pool.top_up({0: 1}, lambda: None)
    keyset = inproc.pool.take(0)
    assert keyset is not None
    inproc.purpose = inproc.broker.show_keyset(keyset).purpose
    checks: list[tuple[ApiSide | InprocSide, str, Keyset, Home]] = [
        (inproc, keyset, inproc.operate(0, keyset), inproc.home)
    ]
    keyset = api.pool.take(0)
    assert keyset is not None
    checks.append((api, keyset, await api.operate(0, keyset), api.setup_home))
    for side, name, local, home in checks:
        side.completed += 1
        theirs = home.keysets.load(name).keyset.export_secret_material(1, SECRET_ACCESS)
        if local.export_secret_material(1, SECRET_ACCESS) != theirs:
            raise Broken(f"{side.name}: the principal opened a key that is not the broker's")


def post_check(side: ApiSide | InprocSide, home: Home) -> str:
    """Every delivery made is acked, as many as counted, and the log verifies in full."""
    states = delivery_states(home)
    if set(states) - {"acked"} or states.get("acked", 0) != side.completed:
        raise Broken(f"{side.name}: deliveries by state {states}, but {side.completed} were acked")
    broker = side.setup if isinstance(side, ApiSide) else side.broker
    head = broker.verify_log(full=True)
    return f"{side.name}: {side.completed:,} deliveries acked; log of {head.tree_size:,} verified"


def figures_for(db: str, n: int, c: Comparison) -> list[Figure]:
    api_cpu, server_cpu = Comparison.cpu_per_op(c.api)
    inproc_cpu, _ = Comparison.cpu_per_op(c.inproc)
    pairs = f"{len(c.api)} alternated pairs of slices"
    return [
        Figure(f"api_ops_{db}_n{n}", c.api_rate, "deliveries/s", 1, None,
               f"median slice of {len(c.api)}; CPU per delivery: client "
               f"{api_cpu:.1f} ms + server {server_cpu:.1f} ms"),
        Figure(f"inproc_ops_{db}_n{n}", c.inproc_rate, "deliveries/s", 1, None,
               f"median slice of {len(c.inproc)}; CPU per delivery {inproc_cpu:.1f} ms"),
        Figure(f"api_ratio_{db}_n{n}", c.ratio, "ratio", 3, None,
               f"median of paired API/in-process ratios over {pairs}; "
               f"median/median {c.api_rate / c.inproc_rate:.3f}"),
    ]  # fmt: skip


async def run_backend(
    db: str, urls: tuple[str | None, str | None], workdir: Path, settings: Settings,
    progress: Progress, sdk_calls: int,
) -> BackendResult:  # fmt: skip
    """Both sides on database ``db``: ``urls`` for the API home and the in-process home
    (``None``: SQLite in the home)."""
    n_max = max(settings.ns)
    names = [f"site/bench{i}" for i in range(n_max)]
    api_dir, inproc_dir = workdir / "api-home", workdir / "inproc-home"
    setup = progress.add_task(f"{db}: homes + server", total=3)
    inits = [start_init(api_dir, urls[0]), start_init(inproc_dir, urls[1])]
    server: subprocess.Popen[bytes] | None = None
    homes: list[Home] = []
    try:
        finish_init(inits[0])
        progress.advance(setup)
        # The server starts while the in-process home is still being made.
        server, base_url = start_server(api_dir, workdir / "serve.log")
        finish_init(inits[1])
        progress.advance(setup)
        api_home, inproc_home = open_home(api_dir), open_home(inproc_dir)
        homes += [api_home, inproc_home]
        api = ApiSide(api_dir, api_home, names)
        api.server, api.url = server, base_url
        inproc = InprocSide(inproc_home, names)
        progress.advance(setup)

        enrol = progress.add_task(f"{db}: enrolling principals", total=2 * n_max)
        # API enrolment spends two scrypt derivations per keyring; scrypt releases the GIL.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            futures = [pool.submit(api.enrol, i, workdir) for i in range(n_max)]
            for p in inproc.principals:
                p.enrol(inproc.broker)
                progress.advance(enrol)
            for future in futures:
                api.keyrings.append(future.result())
                progress.advance(enrol)

        first = {i: 4 for i in range(n_max)}
        initial = progress.add_task(
            f"{db}: keysets + grants", total=api.pool.missing(first) + inproc.pool.missing(first)
        )
        for side_pool in (api.pool, inproc.pool):
            side_pool.top_up(first, lambda: progress.advance(initial))

        await api.connect(workdir)
        try:
            await cross_check(api, inproc)
            runner = Runner(db, api, inproc, progress)
            figures: list[Figure] = []
            notes: list[str] = []
            for n in settings.ns:
                figures += figures_for(db, n, await runner.compare(n, settings))
            if sdk_calls:
                api.pool.top_up({0: sdk_calls}, lambda: None)
                samples = await api.sdk_open_delivery(sdk_calls)
                figures.append(
                    Figure("sdk_open_delivery_ms", statistics.median(samples), "ms", 1, None,
                           f"median of {sdk_calls} PrincipalClient.open_delivery calls "
                           f"(verify, open, save the keyring: scrypt N=2^15 + fsync); "
                           f"min {min(samples):.1f}, max {max(samples):.1f}")
                )  # fmt: skip
        finally:
            await api.aclose()
        notes.append(f"{db}: " + post_check(api, api_home))
        notes.append(f"{db}: " + post_check(inproc, inproc_home))
        return BackendResult(figures, notes)
    finally:
        if server is not None:
            stop_server(server)
        for proc in inits:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for home in homes:
            home.close()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs; under a minute")
    parser.add_argument(
        "--pairs", type=int, default=None,
        help="timed (API, in-process) slice pairs per database and N (default 10; quick 3)",
    )  # fmt: skip
    parser.add_argument(
        "--slice", type=float, default=None,
        help=f"seconds per slice, times N/{SLICE_DOUBLES_AT:g} above N={SLICE_DOUBLES_AT:g} "
        "(default 0.5; quick 0.25)",
    )  # fmt: skip
    parser.add_argument(
        "--n", default="1,4,16", help="concurrent principals, comma-separated (default 1,4,16)"
    )
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help=f"default {DEFAULT_PG_URL}")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args(argv)
    args.pairs = args.pairs or (3 if args.quick else 10)
    args.slice = args.slice or (0.25 if args.quick else 0.5)
    try:
        args.ns = sorted({int(x) for x in args.n.split(",") if x.strip()})
    except ValueError:
        parser.error("--n takes comma-separated integers")
    if args.pairs < 1 or args.slice <= 0 or not args.ns or min(args.ns) < 1:
        parser.error("--pairs must be >= 1, --slice > 0, every N >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    mode = "quick" if args.quick else "full"
    settings = Settings(mode, args.pairs, args.slice, args.ns)
    console.print(
        f"[bold]bench/broker.py[/] ({mode}): {os.cpu_count()} CPUs, {cpu_model()}, "
        f"Python {platform.python_version()}, cryptography {cryptography.__version__}"
    )
    console.print(
        f"N = {', '.join(map(str, args.ns))}; {args.pairs} slice pairs of {args.slice:g} s "
        f"(x N/{SLICE_DOUBLES_AT:g} above N={SLICE_DOUBLES_AT:g}); load average at start {load()}"
    )

    figures: list[Figure] = []
    broken: list[str] = []
    notes: list[str] = []
    backends: list[tuple[str, str | None]] = [("sqlite", None)]
    if args.no_pg:
        notes.append("PostgreSQL skipped (--no-pg): no PostgreSQL figures in this run.")
    elif (why := pg_unreachable(args.pg_url)) is not None:
        notes.append(
            f"PostgreSQL is not reachable at {args.pg_url} ({why}); "
            "continuing with SQLite only: no PostgreSQL figures in this run."
        )
    else:
        backends.append(("postgres", args.pg_url))
    for note in notes:
        console.print(f"[yellow]{note}[/]")

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        for i, (db, pg_url) in enumerate(backends):
            workdir = Path(tempfile.mkdtemp(prefix=f"keybroker-bench-{db}-"))
            sdk_calls = SDK_OPEN_CALLS[mode] if i == 0 else 0
            try:
                if pg_url is None:
                    out = asyncio.run(
                        run_backend(db, (None, None), workdir, settings, progress, sdk_calls)
                    )
                else:
                    with pg_schemas(pg_url, 2) as (api_url, inproc_url):
                        out = asyncio.run(
                            run_backend(
                                db, (api_url, inproc_url), workdir, settings, progress, sdk_calls
                            )
                        )
                figures += out.figures
                notes += out.notes
            except Exception as exc:
                broken.append(f"{db}: {type(exc).__name__}: {exc}")
                console.print(f"[red]{db} is broken:[/]")
                traceback.print_exc()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)

    table = Table(title=f"keybroker broker benchmark ({mode})")
    for column in ("figure", "value", "unit", "goal", "met", "how"):
        table.add_column(column, overflow="fold")
    for f in figures:
        met = {True: "[green]yes[/]", False: "[red]NO[/]", None: "[dim]info[/]"}[f.met]
        goal = f.goal_text if f.goal is not None else "-"
        table.add_row(f.metric, f.shown, f.unit, goal, met, f.how)
    console.print(table)
    for note in notes:
        console.print(note)
    console.print(f"load average at end {load()}; took {time.perf_counter() - started:.0f} s")
    for problem in broken:
        console.print(f"[red]BROKEN[/] {problem}")
    sys.stdout.flush()
    for f in figures:
        print(f.bench_line("broker"))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
