"""Core benchmark: keyset handles against raw ``cryptography``, and the transparency log.

Four figures, each printed next to its goal (docs/benchmarks.md, ``## core``):

1. AEAD seal+open of 64 KiB messages through an ``AES256_GCM`` keyset handle,
   as a ratio of raw ``AESGCM`` doing the same work (AES-256, random 12-byte
   nonce per message, same associated data). Goal >= 0.9.
2. HPKE seals/s through ``PublicKeyset.seal`` as a ratio of ``Suite.encrypt``
   with the same suite (``X25519_HPKE``: DHKEM(X25519, HKDF-SHA256),
   HKDF-SHA256, AES-128-GCM), key and ``info``. Goal >= 0.9. Opens/s too, for
   information.
3. Transparency-log appends/s in batches of 1,000 entries of 100 bytes, on
   SQLite (a file in a temporary directory) and PostgreSQL. Goal >= 20,000/s.
4. Inclusion-proof generation at 1,000,000 leaves (``--quick``: 100,000, and
   the metric name says so), median and p95 over random indices; the goal
   (<= 1 ms) applies to the median.

Method. ``--seconds`` is the timed time per side of each figure. For a
ratio, the keyset side and the raw side run in alternating 50 ms slices in
ABBA order (keyset, raw, raw, keyset, ...) after a warm-up. Each keyset slice
is divided by the raw slice next to it, which ran under nearly the same
background load, and the ratio is the *median* of those paired ratios. The
rates shown are the median slice of each side. (Best against best slice and
median against median are shown too; on this shared machine each swung by
0.05 to 0.3 between runs for one of the three ratios, the paired median by
under 0.05.) Appends/s have a goal but no reference: they are the *median* of
``--rounds`` runs, the conservative choice on a shared machine, alternated
between SQLite and PostgreSQL. Proof latencies are the median and p95 of
every timed call, from runs alternated the same way. The garbage collector is
off inside timed code. Before timing, each pair is cross-checked (raw
``cryptography`` opens what the keyset sealed and the other way round; proofs
verify against the signed tree head), so a fast wrong answer cannot pass.

Output: a Rich table, then one ``BENCH core.<metric> value=<n> unit=<u>
goal=<op><n>`` line per figure. Informational figures (the raw MB/s and ops/s
behind a ratio, the open ratio, p95 latencies, proofs inside one transaction)
carry ``goal=>=0``.

Run: ``python bench/core.py [--quick] [--seconds S] [--pg-url URL | --no-pg]``.
Exits non-zero only if something is broken (an error or a failed cross-check),
never because a goal is missed.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import secrets
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import cryptography
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchkit import Broken, cpu_model, load, pg_admin, pg_unreachable
from keybroker.keys import AES256_GCM, SECRET_ACCESS, X25519_HPKE, Keyset
from keybroker.log import merkle
from keybroker.log.sth import Ed25519TreeHeadSigner
from keybroker.log.store_log import TransparencyLog
from keybroker.store.engine import Store, open_store

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
#: Length of one alternated slice in the keyset-vs-raw comparisons.
SLICE_SECONDS = 0.05

AEAD_MESSAGE = 64 * 1024
AEAD_AAD = b"keybroker/bench/core/aead-aad"
# About the size of a sealed key-version record (a 32-byte key plus its metadata).
HPKE_MESSAGE = 128
HPKE_INFO = b"keybroker/bench/core recipient=device/bench keyset=bench version=1 delivery=1"
ENTRY_SIZE = 100
APPEND_BATCH = 1_000
BUILD_BATCH = 10_000

T = TypeVar("T")

SECTIONS = ("AEAD 64 KiB", "HPKE seal", "HPKE open", "log append", "inclusion proof")

# Wide enough for the table when the output goes to a file or a pipe.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


# ---------------------------------------------------------------------------
# Figures and their BENCH lines
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    metric: str
    value: float
    unit: str
    decimals: int
    #: (op, number) or None for an informational figure (printed as goal=>=0).
    goal: tuple[str, float] | None
    section: str
    how: str

    @property
    def shown(self) -> str:
        return f"{self.value:,.{self.decimals}f}"

    @property
    def goal_text(self) -> str:
        if self.goal is None:
            return ">=0"
        op, number = self.goal
        return f"{op}{number:g}"

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        op, number = self.goal
        return self.value >= number if op == ">=" else self.value <= number

    def bench_line(self) -> str:
        return (
            f"BENCH core.{self.metric} value={self.value:.{self.decimals}f} "
            f"unit={self.unit} goal={self.goal_text}"
        )


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


@contextmanager
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed_rate(run: Callable[[int], None], seconds: float, chunk: int) -> float:
    """Operations per second over ``seconds`` of calls to ``run(chunk)`` (``chunk`` ops each)."""
    done = 0
    with no_gc():
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            run(chunk)
            done += chunk
            now = time.perf_counter()
            if now >= deadline:
                break
    return done / (now - start)


def alternate(sides: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Run each side ``rounds`` times in ABBA order; each call returns one measurement."""
    names = list(sides)
    results: dict[str, list[T]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            results[name].append(sides[name]())
    return results


@dataclass(frozen=True)
class Comparison:
    """Rates (ops/s) of the keyset side and the reference over alternated slices."""

    ours: list[float]
    ref: list[float]

    @property
    def ours_rate(self) -> float:
        return statistics.median(self.ours)

    @property
    def ref_rate(self) -> float:
        return statistics.median(self.ref)

    @property
    def ratio(self) -> float:
        """Median over adjacent (keyset, raw) slice pairs of keyset rate / raw rate."""
        return statistics.median(o / r for o, r in zip(self.ours, self.ref, strict=True))

    def how(self) -> str:
        return (
            f"median of {len(self.ours)} paired ratios of alternated "
            f"{SLICE_SECONDS * 1e3:g} ms slices; median/median "
            f"{self.ours_rate / self.ref_rate:.3f}, best/best {max(self.ours) / max(self.ref):.3f}"
        )


def compare(
    ours: Callable[[int], None], ref: Callable[[int], None], seconds: float, chunk: int
) -> Comparison:
    """Rates of ``ours`` and ``ref``, alternated in short slices after a warm-up.

    Short slices in ABBA order put the two slices of each pair under nearly the
    same background load.
    """
    warm = min(0.2, seconds / 4)
    timed_rate(ours, warm, chunk)
    timed_rate(ref, warm, chunk)
    slices = max(2, round(seconds / SLICE_SECONDS))
    runs = alternate(
        {
            "ours": lambda: timed_rate(ours, SLICE_SECONDS, chunk),
            "ref": lambda: timed_rate(ref, SLICE_SECONDS, chunk),
        },
        slices,
    )
    return Comparison(runs["ours"], runs["ref"])


def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


# ---------------------------------------------------------------------------
# 1. AEAD
# ---------------------------------------------------------------------------


def bench_aead(seconds: float) -> list[Figure]:
    keyset = Keyset.generate("bench/core/aead", AES256_GCM)
    handle = keyset.aead()
    # The same key on both sides; exported only to build the reference and cross-check.
    key = keyset.export_secret_material(1, SECRET_ACCESS)
    if len(key) != 32:
        raise Broken("AES256_GCM key is not 256 bits")
    raw = AESGCM(key)
    plaintext = os.urandom(AEAD_MESSAGE)
    aad = AEAD_AAD

    # Cross-check: the handle's output is prefix(5) || nonce(12) || AES-GCM(key, aad).
    sealed = handle.encrypt(plaintext, aad)
    if raw.decrypt(sealed[5:17], sealed[17:], aad) != plaintext:
        raise Broken("raw AESGCM cannot open what the keyset handle sealed")
    nonce = os.urandom(12)
    if handle.decrypt(sealed[:5] + nonce + raw.encrypt(nonce, plaintext, aad), aad) != plaintext:
        raise Broken("the keyset handle cannot open what raw AESGCM sealed")

    def keyset_side(n: int) -> None:
        for _ in range(n):
            handle.decrypt(handle.encrypt(plaintext, aad), aad)

    def raw_side(n: int) -> None:
        for _ in range(n):
            nonce = os.urandom(12)
            raw.decrypt(nonce, raw.encrypt(nonce, plaintext, aad), aad)

    def framed_side(n: int) -> None:
        # What a raw AESGCM user must send: the nonce travels with the ciphertext.
        for _ in range(n):
            nonce = os.urandom(12)
            message = nonce + raw.encrypt(nonce, plaintext, aad)
            raw.decrypt(message[:12], memoryview(message)[12:], aad)

    result = compare(keyset_side, raw_side, seconds, chunk=4)
    framed = compare(keyset_side, framed_side, seconds, chunk=4)
    mb = AEAD_MESSAGE / 1e6
    return [
        Figure("aead_64k_ratio", result.ratio, "ratio", 3, (">=", 0.9), "AEAD 64 KiB",
               result.how()),
        Figure("aead_64k_keyset", result.ours_rate * mb, "MB/s", 0, None, "AEAD 64 KiB",
               "keyset handle encrypt+decrypt; MB = 10^6 B of plaintext"),
        Figure("aead_64k_raw", result.ref_rate * mb, "MB/s", 0, None, "AEAD 64 KiB",
               "raw AESGCM encrypt+decrypt, same key, AAD, fresh nonce"),
        Figure("aead_64k_ratio_vs_framed", framed.ratio, "ratio", 3, None, "AEAD 64 KiB",
               "against raw AESGCM that sends nonce||ciphertext as one message; "
               + framed.how()),
    ]  # fmt: skip


# ---------------------------------------------------------------------------
# 2. HPKE
# ---------------------------------------------------------------------------


def bench_hpke(seconds: float) -> list[Figure]:
    keyset = Keyset.generate("bench/core/hpke", X25519_HPKE)
    opener = keyset.hpke()
    recipient = keyset.public_keyset()
    # The reference is built independently of the template; the cross-check below
    # proves it is the same suite, key and info handling.
    suite = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_128_GCM)
    private_key = x25519.X25519PrivateKey.from_private_bytes(
        keyset.export_secret_material(1, SECRET_ACCESS)
    )
    public_key = private_key.public_key()
    plaintext = os.urandom(HPKE_MESSAGE)
    info = HPKE_INFO

    sealed = recipient.seal(plaintext, info)
    if suite.decrypt(sealed[5:], private_key, info=info) != plaintext:
        raise Broken("raw HPKE cannot open what PublicKeyset.seal sealed (suite differs?)")
    if opener.open(sealed[:5] + suite.encrypt(plaintext, public_key, info=info), info) != plaintext:
        raise Broken("the HPKE handle cannot open what raw HPKE sealed")
    raw_sealed = suite.encrypt(plaintext, public_key, info=info)

    def keyset_seal(n: int) -> None:
        for _ in range(n):
            recipient.seal(plaintext, info)

    def raw_seal(n: int) -> None:
        for _ in range(n):
            suite.encrypt(plaintext, public_key, info=info)

    def keyset_open(n: int) -> None:
        for _ in range(n):
            opener.open(sealed, info)

    def raw_open(n: int) -> None:
        for _ in range(n):
            suite.decrypt(raw_sealed, private_key, info=info)

    seal = compare(keyset_seal, raw_seal, seconds, chunk=8)
    opens = compare(keyset_open, raw_open, seconds, chunk=8)
    return [
        Figure("hpke_seal_ratio", seal.ratio, "ratio", 3, (">=", 0.9), "HPKE seal", seal.how()),
        Figure("hpke_seal_keyset", seal.ours_rate, "seals/s", 0, None, "HPKE seal",
               f"PublicKeyset.seal, {HPKE_MESSAGE}-byte plaintext"),
        Figure("hpke_seal_raw", seal.ref_rate, "seals/s", 0, None, "HPKE seal",
               "Suite.encrypt, same suite, key and info"),
        Figure("hpke_open_ratio", opens.ratio, "ratio", 3, None, "HPKE open",
               opens.how() + " (information)"),
        Figure("hpke_open_keyset", opens.ours_rate, "opens/s", 0, None, "HPKE open",
               "HpkeHandle.open"),
        Figure("hpke_open_raw", opens.ref_rate, "opens/s", 0, None, "HPKE open", "Suite.decrypt"),
    ]  # fmt: skip


# ---------------------------------------------------------------------------
# 3 and 4. The transparency log
# ---------------------------------------------------------------------------


class Backend:
    """One database holding one benchmark log; ``close()`` removes what it created."""

    def __init__(self, name: str, store: Store, cleanup: Callable[[], None]) -> None:
        self.name = name
        self.store = store
        self._cleanup = cleanup
        self.signer = Ed25519TreeHeadSigner(ed25519.Ed25519PrivateKey.generate())
        self.log = TransparencyLog(store, self.signer, lambda: time.time_ns() // 1_000_000)

    def close(self) -> None:
        self.store.dispose()
        self._cleanup()


def sqlite_backend(tmp: Path) -> Backend:
    path = tmp / "core-bench.db"

    def cleanup() -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

    return Backend("sqlite", open_store(f"sqlite:///{path}"), cleanup)


def pg_backend(pg_url: str) -> Backend:
    """A fresh schema on ``pg_url``, dropped again by ``close()``."""
    schema = "kbbench_" + secrets.token_hex(6)
    admin = pg_admin(pg_url)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))

    def cleanup() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    sep = "&" if "?" in pg_url else "?"
    try:
        store = open_store(f"{pg_url}{sep}options=-csearch_path%3D{schema}")
    except Exception:
        cleanup()
        raise
    return Backend("postgres", store, cleanup)


def entry_batches(count: int, size: int) -> list[list[bytes]]:
    return [[os.urandom(ENTRY_SIZE) for _ in range(size)] for _ in range(count)]


def bench_appends(backends: list[Backend], seconds: float, rounds: int) -> list[Figure]:
    batches = entry_batches(4, APPEND_BATCH)
    sizes = {b.name: b.log.size() for b in backends}
    run_seconds = seconds / rounds

    def append_run(backend: Backend) -> float:
        def run(n: int) -> None:
            for i in range(n):
                backend.log.append_batch(batches[i % len(batches)])

        return timed_rate(run, run_seconds, 1) * APPEND_BATCH

    for backend in backends:
        append_run(backend)  # warm-up
    runs = alternate({b.name: partial(append_run, b) for b in backends}, rounds)
    figures = []
    for backend in backends:
        rates, size = runs[backend.name], sizes[backend.name]
        figures.append(
            Figure(
                f"log_append_{backend.name}",
                statistics.median(rates),
                "entries/s",
                0,
                (">=", 20_000),
                "log append",
                f"median of {rounds} alternated runs of {run_seconds:.2g} s "
                f"(best {max(rates):,.0f}) on a {size:,}-entry log; "
                f"batches of {APPEND_BATCH:,} x {ENTRY_SIZE} B, one signed head per batch",
            )
        )
    return figures


def grow(backends: list[Backend], leaves: int) -> dict[str, float]:
    """Append until every log holds ``leaves`` entries; return each one's build rate."""
    batches = entry_batches(4, BUILD_BATCH)
    rates = {}
    with Progress(
        TextColumn("building {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        for backend in backends:
            have = backend.log.size()
            task = progress.add_task(f"{backend.name} log", total=leaves, completed=have)
            start, added, i = time.perf_counter(), 0, 0
            while have < leaves:
                batch = batches[i % len(batches)][: leaves - have]
                backend.log.append_batch(batch)
                have += len(batch)
                added += len(batch)
                i += 1
                progress.update(task, completed=have)
            elapsed = time.perf_counter() - start
            rates[backend.name] = added / elapsed if added else 0.0
    return rates


def check_proofs(backend: Backend, size: int, rng: random.Random) -> None:
    head = backend.log.tree_head()
    if head.tree_size != size:
        raise Broken(f"{backend.name}: latest tree head is at {head.tree_size}, not {size}")
    head.verify(backend.signer.public_key())
    for index in [0, size - 1, *(rng.randrange(size) for _ in range(8))]:
        proof = backend.log.inclusion_proof(index, size)
        leaf = merkle.leaf_hash(backend.log.entry(index))
        try:
            merkle.verify_inclusion(leaf, index, size, proof, head.root_hash)
        except Exception as exc:
            raise Broken(f"{backend.name}: inclusion proof for {index} does not verify") from exc


def bench_proofs(
    backends: list[Backend], size: int, label: str, seconds: float, rounds: int
) -> list[Figure]:
    """Latency of ``inclusion_proof`` as a caller uses it, and inside one open transaction.

    The second shows what the per-call connection checkout, pre-ping, BEGIN and
    COMMIT cost on top of the proof itself (information only; half the time).
    """
    rng = random.Random(20_251_129)
    run_seconds = seconds / rounds
    for backend in backends:
        check_proofs(backend, size, rng)

    def timed_proofs(prove: Callable[[int, int], object], length: float) -> list[float]:
        samples = []
        with no_gc():
            deadline = time.perf_counter() + length
            while True:
                index = rng.randrange(size)
                t0 = time.perf_counter()
                prove(index, size)
                t1 = time.perf_counter()
                samples.append((t1 - t0) * 1e3)
                if t1 >= deadline:
                    break
        return samples

    def api_run(backend: Backend) -> list[float]:
        return timed_proofs(backend.log.inclusion_proof, run_seconds)

    def one_txn_run(backend: Backend) -> list[float]:
        with backend.store.snapshot() as conn:
            return timed_proofs(
                lambda i, n: backend.log.inclusion_proof(i, n, conn=conn), run_seconds / 2
            )

    for backend in backends:
        api_run(backend)  # warm-up: caches, prepared statements
    sides: dict[str, Callable[[], list[float]]] = {}
    for b in backends:
        sides[b.name] = partial(api_run, b)
        sides[b.name + "/txn"] = partial(one_txn_run, b)
    runs = alternate(sides, rounds)
    figures = []
    for backend in backends:
        samples = [s for run in runs[backend.name] for s in run]
        in_txn = [s for run in runs[backend.name + "/txn"] for s in run]
        metric = f"inclusion_proof_{label}_{backend.name}"
        how = (
            f"{len(samples):,} calls of log.inclusion_proof at random indices in {rounds} "
            f"alternated runs of {run_seconds:.2g} s; the goal applies to the median"
        )
        figures += [
            Figure(f"{metric}_median", statistics.median(samples), "ms", 3, ("<=", 1),
                   "inclusion proof", how),
            Figure(f"{metric}_p95", percentile(samples, 95), "ms", 3, None,
                   "inclusion proof", f"p95 of the same calls (min {min(samples):.3f} ms)"),
            Figure(f"{metric}_one_txn_median", statistics.median(in_txn), "ms", 3, None,
                   "inclusion proof",
                   f"{len(in_txn):,} proofs inside one open read transaction (conn=): "
                   "no per-call checkout, pre-ping, BEGIN, COMMIT"),
        ]  # fmt: skip
    return figures


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def size_label(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller tree, shorter runs; under a minute"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="timed seconds per side of each figure (default 5; quick 1)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="runs those seconds are split into for log figures (default 5; quick 3)",
    )
    parser.add_argument(
        "--leaves", type=int, default=None, help="tree size for proofs (default 1M; quick 100k)"
    )
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help=f"default {DEFAULT_PG_URL}")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1.0 if args.quick else 5.0)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.leaves = args.leaves or (100_000 if args.quick else 1_000_000)
    if args.seconds <= 0 or args.rounds < 1 or args.leaves < 2:
        parser.error("--seconds must be > 0, --rounds >= 1, --leaves >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    mode = "quick" if args.quick else "full"
    console.print(
        f"[bold]bench/core.py[/] ({mode}): {os.cpu_count()} CPUs, {cpu_model()}, "
        f"Python {platform.python_version()}, cryptography {cryptography.__version__}"
    )
    console.print(f"{args.seconds:g} s per side of each figure; load average at start {load()}")

    figures: list[Figure] = []
    broken: list[str] = []
    notes: list[str] = []

    def section(name: str, fn: Callable[[], list[Figure]]) -> None:
        console.print(f"[dim]measuring {name} ...[/]")
        try:
            figures.extend(fn())
        except Exception as exc:
            broken.append(f"{name}: {type(exc).__name__}: {exc}")
            console.print(f"[red]{name} is broken:[/]")
            traceback.print_exc()

    section("AEAD", lambda: bench_aead(args.seconds))
    section("HPKE", lambda: bench_hpke(args.seconds))

    backends: list[Backend] = []
    with tempfile.TemporaryDirectory(prefix="keybroker-bench-") as tmp:
        try:
            try:
                backends.append(sqlite_backend(Path(tmp)))
            except Exception as exc:
                broken.append(f"SQLite store: {type(exc).__name__}: {exc}")
                traceback.print_exc()
            if args.no_pg:
                notes.append("PostgreSQL skipped (--no-pg): no PostgreSQL figures in this run.")
            elif (why := pg_unreachable(args.pg_url)) is not None:
                notes.append(
                    f"PostgreSQL is not reachable at {args.pg_url} ({why}); "
                    "continuing with SQLite only: no PostgreSQL figures in this run."
                )
            else:
                try:
                    backends.append(pg_backend(args.pg_url))
                except Exception as exc:
                    broken.append(f"PostgreSQL store: {type(exc).__name__}: {exc}")
                    traceback.print_exc()
            for note in notes:
                console.print(f"[yellow]{note}[/]")
            if backends:
                names = ", ".join(b.name for b in backends)
                label = size_label(args.leaves)
                build: dict[str, float] = {}

                def proofs() -> list[Figure]:
                    build.update(grow(backends, args.leaves))
                    return bench_proofs(backends, args.leaves, label, args.seconds, args.rounds)

                # Proofs first, on a log of exactly --leaves entries; then appends go on
                # top of that log, so they are measured on a big tree, not an empty one.
                section(f"inclusion proofs at {args.leaves:,} leaves ({names})", proofs)
                section(
                    f"log appends ({names})",
                    lambda: bench_appends(backends, args.seconds, args.rounds),
                )
                for name, rate in build.items():
                    notes.append(
                        f"{name}: the {args.leaves:,}-leaf log was built at {rate:,.0f} "
                        f"entries/s in batches of {BUILD_BATCH:,}."
                    )
        finally:
            for backend in backends:
                try:
                    backend.close()
                except Exception as exc:
                    broken.append(f"cleanup of {backend.name}: {type(exc).__name__}: {exc}")

    table = Table(title=f"keybroker core benchmark ({mode})")
    for column in ("figure", "value", "unit", "goal", "met", "how"):
        table.add_column(column, overflow="fold")
    figures.sort(key=lambda f: SECTIONS.index(f.section))
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
        print(f.bench_line())
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
