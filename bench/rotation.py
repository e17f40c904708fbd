"""Rotation benchmark (S10): rotate N links with 5 % of the downstream sites down, end to end.

What is timed is one whole rollout (``Orchestrator.start`` to the rollout's ``COMPLETED``)
over ``star_topology``: 20 upstream nodes and N downstream sites, one link (its own
AES-256-GCM keyset) per site, so N links are N site principals plus 20 node principals,
each a :class:`~keybroker.flows.rotation.simulation.SimulatedAgent` with its own identity
and HPKE keys, enrolled with the broker like a real agent. Every link goes

    PENDING -> DELIVERED_DOWNSTREAM -> ACKED_DOWNSTREAM -> DELIVERED_UPSTREAM -> ACTIVE
    -> RETIRED_OLD

through the real broker code path: the orchestrator steps links in batches (one
transaction per batch, a savepoint per link, every step logged), the broker adds the
version, HPKE-seals it to the site, signs the envelope; the site agent fetches its inbox,
checks the CA signature, opens and installs the version, acks with proof of possession;
the broker checks the proof on its own copy; then the same towards the node; then the
version is promoted, both ends switch, and after the grace period the old version is
disabled. 5 % of the sites (every 20th) are down for the whole rollout: each of their
links is delivered ``max_attempts`` = 3 times, each delivery expires, and the link ends
``FAILED_KEEP_OLD`` with its new version disabled; the time to fail them counts.

One round is ``Fleet.pump``: the agents with something waiting fetch and install it (a
bus wake-up), their acks are settled together (``deliveries.ack_many``, one transaction
per 500 acks, what a consumer of acks on the bus does, each checked exactly as
``Broker.ack`` checks it), the orchestrator steps everything that is due, and the agents
mirror the keysets that changed. The clock is a settable one: after each round it moves
1 s, so ack timeouts (10 s), backoff (1-2 s) and grace (2 s) cost no wall-clock time and
what is measured is the CPU and database work of the broker and the agents. A round with
nothing to do still costs its queries (due links, waiting agents, changed keysets,
rollout counts): that is counted too. Provisioning (enrolment, keysets, grants and each
end's first delivery and ack) is not part of the rotation; it is timed and shown apart.

Figures, per database (``sqlite``: a file in a temporary directory; ``postgres``: a
fresh schema per run, dropped afterwards) and N:

* ``links_<N>_<db>_seconds``: wall-clock seconds of the rollout. The goal
  (issue 4) is ``<= 30`` at 10,000 links; other sizes are for information.
* ``links_per_second_<N>_<db>``: N / seconds (information).
* ``scaling_<big>_over_<small>_<db>``: (t_big / (big/small)) / t_small, the cost per
  link at the largest size over the cost per link at the smallest. 1.0 is linear;
  the goal is ``<= 1.5`` (full mode: 10k over 1k).
* ``broker_over_raw_<N>_<db>``: the rollout's wall time over the raw floor for the same
  N (information): what ``cryptography`` alone takes for the cryptography a rotation
  cannot avoid, per link: generate an AES-256 key, HPKE-seal it twice (to the site and
  to the node: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, the broker's
  suite, with a plaintext and ``info`` of the real sizes), ECDSA-P256-SHA256-sign two
  envelopes of the real size, and verify two proofs of possession the way the broker
  does (HKDF-SHA256 to the proof key, then HMAC-SHA256 verify). The floor leaves out
  everything that is not this cryptography: the agents' side, the database, the log.
* ``provision_<N>_<db>_seconds``: enrolment plus setup (information).

Also shown: CPU seconds of this process and, on PostgreSQL, of the backends serving it
(read from /proc for the backend pids of the benchmark's own connections), the rounds,
and the link steps.

Cross-checks (a failure exits 1): before timing, a real envelope is opened and its
proof verified the way the raw floor does it, and the floor's own seal, signature and
proof are checked. After each rollout: it is ``COMPLETED`` with exactly the down sites'
links ``FAILED_KEEP_OLD`` and every other link ``RETIRED_OLD``; for every link both
agents transmit under the version the broker says (the new one, or the old one for a
failed link), no agent still holds a retired old version, no node holds the new version
of a failed link; on a sample of links a message sealed at one end opens at the other;
the sum of the links' step counters equals the steps the orchestrator reported; and the
log's new tree head is consistent with the one before the rollout and its root is
recomputed from every entry.

Garbage collection: what exists before the rollout (the agents, their keys) is frozen
out of the collector's sight (``gc.freeze``); the collector stays on for what the
rollout allocates.

Run: ``python bench/rotation.py [--quick] [--sizes 1000,2000,5000,10000] [--pg-url URL |
--no-pg] [--batch-size 200]``. ``--quick`` runs 300 links on each database (about a
minute here). Exits non-zero only if something is broken, never because a goal is missed.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import resource
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cryptography
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchkit import Broken, Figure, cpu_model, load, pg_admin, pg_unreachable
from keybroker.broker import Broker, DeliveryEnvelope, make_ack_proof
from keybroker.broker.home import init_home
from keybroker.broker.messages import ack_challenge
from keybroker.flows.rotation.protocol import LinkState, RolloutPolicy
from keybroker.flows.rotation.simulation import Faults, Fleet, star_topology
from keybroker.keys import Keyset, KeyState
from keybroker.pki import PrincipalId
from keybroker.store.schema import rotation_links

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
FULL_SIZES = (1_000, 2_000, 5_000, 10_000)
QUICK_SIZES = (300,)
NODES = 20
#: Every FAIL_EVERY-th site is down for the whole rollout: 5 %.
FAIL_EVERY = 20
POLICY = RolloutPolicy(
    ack_timeout_ms=10_000,
    max_attempts=3,
    backoff_base_ms=1_000,
    backoff_cap_ms=2_000,
    grace_ms=2_000,
)
TICK = timedelta(seconds=1)
#: Far more rounds than the policy needs (about 36): a rollout still running then is broken.
MAX_ROUNDS = 400
#: The goal of issue 4: 10,000 links within 30 s.
GOAL_LINKS = 10_000
GOAL_SECONDS = 30.0
SCALING_GOAL = 1.5
#: Links whose two ends exchange a message after the rollout, as a cross-check.
TRAFFIC_SAMPLE = 200
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


# ---------------------------------------------------------------------------
# CPU time
# ---------------------------------------------------------------------------


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pids: set[int]) -> float:
    """CPU seconds (user + system) used so far by the processes ``pids`` (gone ones: 0)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def track_backends(engine: sa.Engine) -> set[int]:
    """PostgreSQL backend pids of every connection ``engine`` opens from now on."""
    pids: set[int] = set()

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        pids.add(int(dbapi_conn.info.backend_pid))  # psycopg 3: no query needed

    engine.dispose()  # connections pooled so far are replaced by tracked ones
    return pids


# ---------------------------------------------------------------------------
# The raw floor
# ---------------------------------------------------------------------------

SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_128_GCM)
POP_INFO = b"keybroker/keys/proof-of-possession/v1"


@dataclass(frozen=True)
class Sizes:
    """Sizes taken from a real delivery: what the floor seals, signs and proves."""

    record: int  # the sealed version record (plaintext)
    info: int  # HPKE info
    signed: int  # the envelope's signed bytes
    challenge: int  # the message a proof of possession MACs


def pop_tag(key: bytes, message: bytes) -> bytes:
    pop = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=POP_INFO).derive(key)
    mac = crypto_hmac.HMAC(pop, hashes.SHA256())
    mac.update(message)
    return mac.finalize()


def pop_verify(key: bytes, message: bytes, tag: bytes) -> None:
    pop = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=POP_INFO).derive(key)
    mac = crypto_hmac.HMAC(pop, hashes.SHA256())
    mac.update(message)
    mac.verify(tag)


def raw_floor(links: int, sizes: Sizes) -> float:
    """Seconds ``cryptography`` takes for ``links`` links' unavoidable cryptography.

    Key generation and the broker's work (2 seals, 2 signatures, 2 proof checks per link)
    are timed; the agents' proofs, which the broker only checks, are made untimed.
    """
    recipients = [x25519.X25519PrivateKey.generate().public_key() for _ in range(NODES + 1)]
    ca = ec.generate_private_key(ec.SECP256R1())
    info = secrets.token_bytes(sizes.info)
    signed = [secrets.token_bytes(sizes.signed) for _ in range(64)]
    challenge = secrets.token_bytes(sizes.challenge)
    pad = secrets.token_bytes(max(0, sizes.record - 32))
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        keys = [AESGCM.generate_key(bit_length=256) for _ in range(links)]
        keygen = time.perf_counter() - start
        tags = [(pop_tag(k, challenge), pop_tag(k, challenge[::-1])) for k in keys]
        start = time.perf_counter()
        for i, key in enumerate(keys):
            record = pad + key
            SUITE.encrypt(record, recipients[-1], info=info)  # to the site
            SUITE.encrypt(record, recipients[i % NODES], info=info)  # to its node
            ca.sign(signed[i % 64], ec.ECDSA(hashes.SHA256()))
            ca.sign(signed[(i + 1) % 64], ec.ECDSA(hashes.SHA256()))
            site_tag, node_tag = tags[i]
            pop_verify(key, challenge, site_tag)
            pop_verify(key, challenge[::-1], node_tag)
        work = time.perf_counter() - start
    finally:
        gc.enable()
    return keygen + work


def check_raw(sizes: Sizes) -> None:
    """The floor's operations do what they stand for (a fast wrong answer must not score)."""
    private = x25519.X25519PrivateKey.generate()
    key = AESGCM.generate_key(bit_length=256)
    info = secrets.token_bytes(sizes.info)
    record = secrets.token_bytes(max(0, sizes.record - 32)) + key
    opened = SUITE.decrypt(
        SUITE.encrypt(record, private.public_key(), info=info), private, info=info
    )
    if opened != record:
        raise Broken("raw floor: HPKE seal does not open")
    ca = ec.generate_private_key(ec.SECP256R1())
    data = secrets.token_bytes(sizes.signed)
    ca.public_key().verify(
        ca.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256())
    )
    message = secrets.token_bytes(sizes.challenge)
    pop_verify(key, message, pop_tag(key, message))
    try:
        pop_verify(key, message, bytes(32))
    except Exception:
        pass
    else:
        raise Broken("raw floor: a wrong proof verified")


def sizes_from(envelope: DeliveryEnvelope, local: Keyset) -> Sizes:
    """The floor's sizes from a real delivery, checking the floor's proof matches the broker's."""
    challenge = ack_challenge(envelope.delivery_id, envelope.challenge)
    message_len = len(challenge) + len(envelope.keyset) + 40  # the PoP message wraps it
    proof = make_ack_proof(local, envelope.version, envelope.challenge, envelope.delivery_id)
    if len(proof) != 32:
        raise Broken("the broker's proof is not an HMAC-SHA256 tag; the floor would be wrong")
    return Sizes(
        record=len(envelope.sealed) - 5 - 32 - 16,  # key-id prefix, X25519 enc, GCM tag
        info=len(envelope.info),
        signed=len(envelope.signed_bytes()),
        challenge=message_len,
    )


# ---------------------------------------------------------------------------
# One rollout
# ---------------------------------------------------------------------------


class Clock:
    """Returns ``now`` until the benchmark moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Run:
    db: str
    links: int
    failing: int
    enrol_s: float = 0.0
    setup_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    db_cpu_s: float | None = None
    rounds: int = 0
    steps: int = 0
    raw_s: float = 0.0
    load_before: str = ""
    load_after: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.links / self.wall_s

    @property
    def provision_s(self) -> float:
        return self.enrol_s + self.setup_s


@contextmanager
def pg_schema(pg_url: str) -> Iterator[str]:
    """A fresh schema on ``pg_url`` as a database URL; dropped afterwards."""
    admin = pg_admin(pg_url)
    name = "kbbench_rot_" + secrets.token_hex(6)
    sep = "&" if "?" in pg_url else "?"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
        yield f"{pg_url}{sep}options=-csearch_path%3D{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        admin.dispose()


def rollout(
    db: str,
    url: str | None,
    links: int,
    workdir: Path,
    batch_size: int,
    progress: Progress,
) -> tuple[Run, Sizes]:
    clock = Clock(T0)
    home = init_home(workdir / f"home-{db}-{links}", db_url=url, clock=clock)
    try:
        broker = Broker.from_home(home)
        topology = star_topology("bench", NODES, links)
        fleet = Fleet(broker, topology, batch_size=batch_size)
        down = {link.downstream for i, link in enumerate(topology.links) if i % FAIL_EVERY == 7}
        run = Run(db, links, failing=len(down))

        task = progress.add_task(f"{db} {size_label(links)}: enrol", total=len(fleet.agents))
        start = time.perf_counter()
        for agent in fleet.agents.values():
            agent.enrol(broker)
            progress.advance(task)
        run.enrol_s = time.perf_counter() - start
        progress.update(task, description=f"{db} {size_label(links)}: setup")
        start = time.perf_counter()
        fleet.orchestrator.setup(topology, delivery_ttl=timedelta(hours=1))
        fleet.receive_all()
        fleet.sync_all()
        run.setup_s = time.perf_counter() - start
        sizes = cross_check_setup(fleet)

        backends = track_backends(home.store.engine) if home.store.dialect == "postgresql" else None
        before = broker.verify_log()
        progress.update(
            task, description=f"{db} {size_label(links)}: rotate", completed=0, total=links
        )
        run.load_before = load()
        gc.collect()
        gc.freeze()
        cpu0, db0, start = cpu_self(), 0.0, time.perf_counter()
        if backends is not None:
            db0 = cpu_of(backends)
        rollout_id = fleet.orchestrator.start(topology, POLICY)
        faults = Faults(down=down)
        finished = False
        while run.rounds < MAX_ROUNDS:
            report = fleet.pump(faults)
            run.rounds += 1
            run.steps += report.steps
            clock.now += TICK
            state = fleet.orchestrator.list_rollouts()[0]
            if state.rollout_id == rollout_id and state.finished:
                finished = True
                break
            progress.update(task, completed=min(links, run.steps // 5))
        run.wall_s = time.perf_counter() - start
        run.cpu_s = cpu_self() - cpu0
        if backends is not None:
            run.db_cpu_s = cpu_of(backends) - db0
        gc.unfreeze()
        run.load_after = load()
        progress.update(task, completed=links)
        if not finished:
            raise Broken(f"{db} {links}: the rollout did not finish in {MAX_ROUNDS} rounds")
        run.counts = cross_check_rollout(fleet, rollout_id, down, run.steps)
        head = broker.verify_log(previous=before, full=True)
        if head.tree_size <= before.tree_size:
            raise Broken("the rollout logged nothing")
        progress.remove_task(task)
        return run, sizes
    finally:
        home.close()


def cross_check_setup(fleet: Fleet) -> Sizes:
    """Every end holds its link's version 1; a real delivery gives the floor its sizes."""
    broker = fleet.broker
    for link in fleet.topology.links:
        node, site = fleet.ends(link)
        if node.transmit_version(link.keyset) != 1 or site.transmit_version(link.keyset) != 1:
            raise Broken(f"after setup, {link.name} is not on version 1 at both ends")
    # A keyset of its own, so the links start the rollout exactly as set up.
    probe, pid = "bench/probe", fleet.topology.links[0].downstream
    broker.create_keyset(probe, "AES256_GCM")
    broker.grant(pid, probe, "hold")
    envelope = broker.deliver(probe, 1, pid, timedelta(minutes=1))
    agent = fleet.agents[pid]
    proof = agent.install(broker, envelope)
    sizes = sizes_from(envelope, agent.keys[probe])
    if broker.ack(envelope.delivery_id, pid, proof).state != "acked":
        raise Broken("a real ack was not accepted")
    return sizes


def cross_check_rollout(
    fleet: Fleet, rollout_id: str, down: set[PrincipalId], steps: int
) -> dict[str, int]:
    status = fleet.orchestrator.status(rollout_id)
    if status.state != "COMPLETED":
        raise Broken(f"rollout ended {status.state}: {status.reason}")
    for info, link in zip(status.links, fleet.topology.links, strict=True):
        node, site = fleet.ends(link)
        if link.downstream in down:
            if info.state is not LinkState.FAILED_KEEP_OLD:
                raise Broken(f"{link.name}: site down but link {info.state}")
            expected, gone = info.old_version, info.new_version
            if gone is not None and node.holds(link.keyset, gone):
                raise Broken(f"{link.name}: the node holds a version its site never acked")
        else:
            if info.state is not LinkState.RETIRED_OLD:
                raise Broken(f"{link.name}: ended {info.state}")
            expected, gone = info.new_version or 0, info.old_version
            if node.holds(link.keyset, gone) or site.holds(link.keyset, gone):
                raise Broken(f"{link.name}: the retired version {gone} is still held")
        for end in (node, site):
            if end.transmit_version(link.keyset) != expected:
                raise Broken(f"{link.name}: {end.principal} transmits under the wrong version")
    sample = random.Random(7).sample(list(fleet.topology.links), TRAFFIC_SAMPLE)
    for link in sample:
        node, site = fleet.ends(link)
        if site.open(link.keyset, node.seal(link.keyset, b"ping")) != b"ping":
            raise Broken(f"{link.name}: the site cannot open what the node sealed")
        if node.open(link.keyset, site.seal(link.keyset, b"pong")) != b"pong":
            raise Broken(f"{link.name}: the node cannot open what the site sealed")
    with fleet.broker.context.store.snapshot() as conn:
        counted = conn.execute(
            sa.select(sa.func.sum(rotation_links.c.seq)).where(
                rotation_links.c.rollout_id == rollout_id
            )
        ).scalar_one()
    if int(counted) != steps:
        raise Broken(f"the links count {counted} steps, the orchestrator reported {steps}")
    # The broker's side agrees: the version in use is primary, the other one disabled.
    summaries = {k.name: k for k in fleet.broker.list_keysets()}
    for info in status.links:
        states = {v.version: v.state for v in summaries[info.keyset].versions}
        other = info.old_version if info.version_in_use != info.old_version else info.new_version
        if states.get(info.version_in_use) != KeyState.PRIMARY.value or (
            other is not None and states.get(other) != KeyState.DISABLED.value
        ):
            raise Broken(f"{info.name}: the broker's versions are {states}")
    return {k: v for k, v in status.counts.items() if v}


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def figures_for(db: str, runs: list[Run]) -> list[Figure]:
    out: list[Figure] = []
    for run in runs:
        label = size_label(run.links)
        goal = ("<=", GOAL_SECONDS) if run.links == GOAL_LINKS else None
        cpu = f"CPU {run.cpu_s:.1f} s here"
        if run.db_cpu_s is not None:
            cpu += f" + {run.db_cpu_s:.1f} s PostgreSQL"
        out.append(
            Figure(
                f"links_{label}_{db}_seconds",
                run.wall_s,
                "s",
                2,
                goal,
                f"{run.rounds} rounds, {run.steps:,} steps, {run.failing} links failed; {cpu}",
            )
        )
        out.append(
            Figure(
                f"links_per_second_{label}_{db}",
                run.rate,
                "links/s",
                1,
                None,
                f"{run.links:,} / {run.wall_s:.2f} s",
            )
        )
        out.append(
            Figure(
                f"broker_over_raw_{label}_{db}",
                run.wall_s / run.raw_s,
                "ratio",
                1,
                None,
                f"{run.wall_s:.2f} s / raw cryptography {run.raw_s:.3f} s",
            )
        )
        out.append(
            Figure(
                f"provision_{label}_{db}_seconds",
                run.provision_s,
                "s",
                1,
                None,
                f"enrol {run.enrol_s:.1f} s + setup {run.setup_s:.1f} s (not in the rotation)",
            )
        )
    if len(runs) >= 2:
        small, big = runs[0], runs[-1]
        factor = big.links / small.links
        scaling = (big.wall_s / factor) / small.wall_s
        out.append(
            Figure(
                f"scaling_{size_label(big.links)}_over_{size_label(small.links)}_{db}",
                scaling,
                "ratio",
                2,
                ("<=", SCALING_GOAL),
                f"({big.wall_s:.2f} s / {factor:g}) / {small.wall_s:.2f} s; 1.0 = linear",
            )
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 links per database")
    parser.add_argument(
        "--sizes", default=None,
        help="links per rollout, comma-separated (default 1000,2000,5000,10000; quick 300)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=200, help="links per transaction")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help=f"default {DEFAULT_PG_URL}")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    args = parser.parse_args(argv)
    try:
        chosen = (
            [int(x) for x in args.sizes.split(",") if x.strip()]
            if args.sizes
            else list(QUICK_SIZES if args.quick else FULL_SIZES)
        )
    except ValueError:
        parser.error("--sizes takes comma-separated integers")
    if not chosen or min(chosen) < TRAFFIC_SAMPLE:
        parser.error(f"every size must be at least {TRAFFIC_SAMPLE}")
    args.size_list = sorted(set(chosen))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    mode = "quick" if args.quick else "full"
    console.print(
        f"[bold]bench/rotation.py[/] ({mode}): {os.cpu_count()} CPUs, {cpu_model()}, "
        f"Python {platform.python_version()}, cryptography {cryptography.__version__}"
    )
    console.print(
        f"sizes {', '.join(f'{n:,}' for n in args.size_list)} links; {NODES} nodes; "
        f"1 site in {FAIL_EVERY} down; batch {args.batch_size}; load average at start {load()}"
    )
    backends: list[tuple[str, str | None]] = []
    notes: list[str] = []
    if not args.no_sqlite:
        backends.append(("sqlite", None))
    if args.no_pg:
        notes.append("PostgreSQL skipped (--no-pg): no PostgreSQL figures in this run.")
    elif (why := pg_unreachable(args.pg_url)) is not None:
        notes.append(
            f"PostgreSQL is not reachable at {args.pg_url} ({why}); "
            "continuing without it: no PostgreSQL figures in this run."
        )
    else:
        backends.append(("postgres", args.pg_url))
    for note in notes:
        console.print(f"[yellow]{note}[/]")

    runs: dict[str, list[Run]] = {}
    broken: list[str] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        for db, pg_url in backends:
            workdir = Path(tempfile.mkdtemp(prefix=f"keybroker-bench-rotation-{db}-"))
            try:
                for links in args.size_list:
                    run = one(db, pg_url, links, workdir, args.batch_size, progress)
                    runs.setdefault(db, []).append(run)
                    console.print(
                        f"{db} {links:,} links: {run.wall_s:.2f} s ({run.rate:,.0f} links/s), "
                        f"CPU {run.cpu_s:.1f} s"
                        + (f" + {run.db_cpu_s:.1f} s PostgreSQL" if run.db_cpu_s else "")
                        + f", {run.rounds} rounds; raw {run.raw_s:.3f} s; provisioning "
                        f"{run.provision_s:.1f} s; load {run.load_before} -> {run.load_after}"
                    )
            except Exception as exc:
                broken.append(f"{db}: {type(exc).__name__}: {exc}")
                console.print(f"[red]{db} is broken:[/]")
                traceback.print_exc()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)

    figures: list[Figure] = []
    for db, done in runs.items():
        figures += figures_for(db, done)
    table = Table(title=f"keybroker rotation benchmark ({mode})")
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
        print(f.bench_line("rotation"))
    return 1 if broken else 0


def one(
    db: str, pg_url: str | None, links: int, workdir: Path, batch_size: int, progress: Progress
) -> Run:
    """One rollout of ``links`` links on a fresh home, with the raw floor measured around it."""
    if pg_url is None:
        run, sizes = rollout(db, None, links, workdir, batch_size, progress)
    else:
        with pg_schema(pg_url) as url:
            run, sizes = rollout(db, url, links, workdir, batch_size, progress)
    check_raw(sizes)
    run.raw_s = min(raw_floor(links, sizes) for _ in range(2))
    return run


if __name__ == "__main__":
    sys.exit(main())
