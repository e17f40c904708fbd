"""Push login (S7): the machine-side approval round trip, side by side with privacyIDEA.

What one sample is: a terminal asks for a login (``POST /v1/pushauth/logins``, signed), the
server seals the challenge to the phone and publishes it on the notification service, the
phone receives it, opens and checks it, and — the human replaced by an instant approve
with the number the terminal shows — signs, seals and posts its answer; the server
judges it and issues the session token sealed to the terminal, whose long-poll returns;
the terminal opens the token and checks signature, terminal and request binding. The
sample is the wall time from the terminal's first byte to the checked token.

Every part is real: ``keybroker serve`` (one process, HTTPS, SQLite, the embedded
default) with ``--bus`` on a private Mosquitto (``set_tcp_nodelay true``; the machine's
runs without it, which costs ~40 ms a hop to Nagle) or the machine's NATS (JetStream
stores each notice before the publish returns). Phones and terminals are the SDK drivers
(:class:`~keybroker.flows.pushauth.phone.Phone`,
:class:`~keybroker.flows.pushauth.terminal.LoginTerminal`) in this process, each phone
its own principal with its own bus connection, one login per user at a time.

Concurrency ``c``: ``c`` users each with a phone log in at once, ``rounds`` times; with
``c = 1``, ``n`` logins in sequence. Statistics: p50 and p99 of the samples.

The peer: privacyIDEA 3.14 (``bench/pushauth_privacyidea.py``: its own venv, SQLite,
"poll only" push, a script as phone and client), its server-side path timed the same way
at ``c = 1``. Its notifications are signed, not encrypted; ours are encrypted end to end.
Goal: ours at least 30 times faster at p50 (``ratio = privacyIDEA p50 / ours p50``).

Run: ``python bench/pushauth.py [--quick] [--n N] [--concurrency C] [--rounds R]
[--services mqtt,nats] [--no-privacyidea]``. ``--quick``: n = 30, c = 100, 1 round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from benchkit import Broken, Figure, cpu_model, load
from keybroker.api.pushauth_schemas import LoginStarted
from keybroker.broker.home import open_home
from keybroker.broker.service import Broker
from keybroker.client import PrincipalClient
from keybroker.flows.pushauth.messages import APPROVE, Challenge
from keybroker.flows.pushauth.phone import Decision, Phone, enrol_phone
from keybroker.flows.pushauth.protocol import LoginState
from keybroker.flows.pushauth.server import PushAuthServer, ca_fingerprint
from keybroker.flows.pushauth.terminal import LoginTerminal
from keybroker.keys import AES256_GCM, Keyset
from keybroker.pki import certificate_pem

KB = [sys.executable, "-m", "keybroker.cli.main"]
NATS_URL = os.environ.get("KEYBROKER_TEST_NATS_URL", "nats://127.0.0.1:4222")
FLOW = "pushauth"
#: How many logins one terminal principal runs at once (its HTTP pool holds 100).
PER_TERMINAL = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Broken(f"{what} exited with status {proc.returncode} (see its log)")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise Broken(f"{what} did not come up on port {port}")


@contextlib.contextmanager
def stopping(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def mosquitto(workdir: Path) -> Iterator[str]:
    """A private Mosquitto with TCP_NODELAY (the machine's has Nagle on)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        "persistence false\nmax_queued_messages 100000\n"
    )
    # Its log goes to a file: a pipe nobody reads fills up and stalls the server.
    with (workdir / "mosquitto.log").open("wb") as log:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    with stopping(proc):
        wait_port(port, proc, "mosquitto")
        yield f"mqtt://127.0.0.1:{port}"


@dataclass
class Rig:
    url: str
    home: Path
    workdir: Path
    bus_url: str
    terminals: list[LoginTerminal] = field(default_factory=list)
    phones: list[Phone] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    clients: list[PrincipalClient] = field(default_factory=list)


@contextlib.contextmanager
def broker(workdir: Path, bus_url: str) -> Iterator[tuple[str, Path, int]]:
    home = workdir / "home"
    env = {**os.environ, "KEYBROKER_HOME": str(home)}
    subprocess.run([*KB, "init"], env=env, check=True, capture_output=True)
    port = free_port()
    with (workdir / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                *KB,
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--bus",
                bus_url,
                "--wake-topic",
                f"kb.bench-{port}",
                "--push-rate-limit",
                "1000000",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    with stopping(proc):
        wait_port(port, proc, "keybroker serve")
        yield f"https://127.0.0.1:{port}", home, proc.pid


async def populate(rig: Rig, users: int) -> None:
    """Register and enrol ``users`` phones and enough terminals (through the real API)."""
    kek = Keyset.generate("bench-kek", AES256_GCM).aead()
    with open_home(rig.home) as home:
        b = Broker.from_home(home)
        server = PushAuthServer(b)
        ca_pem = certificate_pem(b.ca_certificate)
        fp = ca_fingerprint(b)
        have = len(rig.users)
        regs = [
            server.register_phone(f"user{i:04d}", timedelta(hours=1)) for i in range(have, users)
        ]
        need_terminals = -(-users // PER_TERMINAL) - len(rig.terminals)
        start = len(rig.terminals)
        tokens = [
            (
                f"service/bench-term{start + i}",
                b.create_enrolment_token(
                    f"service/bench-term{start + i}", timedelta(hours=1)
                ).secret,
            )
            for i in range(max(0, need_terminals))
        ]
    gate = asyncio.Semaphore(16)

    async def phone(reg: object) -> None:
        async with gate:
            client = await enrol_phone(
                reg.uri(rig.url, fp),  # type: ignore[attr-defined]
                rig.workdir / f"{reg.user}.keyring",  # type: ignore[attr-defined]
                kek=kek,
            )
        rig.clients.append(client)
        rig.phones.append(Phone(client, bus_url=rig.bus_url, wait=30))
        rig.users.append(reg.user)  # type: ignore[attr-defined]

    async def terminal(name: str, token: str) -> None:
        async with gate:
            client = await PrincipalClient.enrol(
                rig.url, ca_pem, name, token, rig.workdir / f"{name.split('/')[1]}.keyring", kek=kek
            )
        rig.clients.append(client)
        rig.terminals.append(LoginTerminal(client))

    await asyncio.gather(*(phone(r) for r in regs), *(terminal(n, t) for n, t in tokens))


class Harness:
    """Phones that approve at once with the number their terminal was shown."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.numbers: dict[str, asyncio.Future[str]] = {}
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def _slot(self, session_id: str) -> asyncio.Future[str]:
        if session_id not in self.numbers:
            self.numbers[session_id] = asyncio.get_running_loop().create_future()
        return self.numbers[session_id]

    async def approve(self, challenge: Challenge) -> Decision:
        # The notice may overtake the terminal's own answer: wait for the number.
        number = await asyncio.wait_for(self._slot(challenge.session_id), 30)
        return (APPROVE, number)

    def started(self, started: LoginStarted) -> None:
        self._slot(started.session_id).set_result(started.number)

    async def start(self) -> None:
        for phone in self.rig.phones:
            ready = asyncio.Event()
            self.tasks.append(asyncio.create_task(phone.run(self.approve, self.stop, ready=ready)))
            await asyncio.wait_for(ready.wait(), 30)

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def login(self, terminal: LoginTerminal, user: str) -> float:
        t0 = time.perf_counter()
        result = await terminal.login(user, on_start=self.started, poll=30)
        elapsed = (time.perf_counter() - t0) * 1000
        if result.state is not LoginState.APPROVED or result.claims is None:
            raise Broken(f"login for {user} ended {result.state}: {result.reason}")
        self.numbers.pop(result.session_id, None)
        return elapsed


async def measure(harness: Harness, concurrency: int, n: int, rounds: int) -> list[float]:
    rig = harness.rig
    samples: list[float] = []
    if concurrency == 1:
        for i in range(n):
            samples.append(await harness.login(rig.terminals[0], rig.users[i % len(rig.users)]))
        return samples
    for _ in range(rounds):
        batch = await asyncio.gather(
            *(
                harness.login(rig.terminals[i // PER_TERMINAL], rig.users[i])
                for i in range(concurrency)
            )
        )
        samples.extend(batch)
    return samples


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_service(service: str, args: argparse.Namespace) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kb-bench-push-") as tmp:
        workdir = Path(tmp)
        with contextlib.ExitStack() as stack:
            bus_url = stack.enter_context(mosquitto(workdir)) if service == "mqtt" else NATS_URL
            url, home, pid = stack.enter_context(broker(workdir, bus_url))
            rig = Rig(url, home, workdir, bus_url)
            t0 = time.perf_counter()
            await populate(rig, max(1, args.concurrency))
            print(
                f"  {service}: {len(rig.phones)} phones, {len(rig.terminals)} terminals enrolled "
                f"in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            harness = Harness(rig)
            await harness.start()
            try:
                await measure(harness, 1, 5, 1)  # warm-up: connections, caches
                cpu0 = cpu_seconds(pid)
                out["c1"] = await measure(harness, 1, args.n, 1)
                out["cpu"] = [(cpu_seconds(pid) - cpu0) * 1000 / args.n]
                print(f"  {service} c=1: p50 {pct(out['c1'], 0.5):.2f} ms", flush=True)
                if args.concurrency > 1:
                    samples = await measure(harness, args.concurrency, 0, args.rounds)
                    out[f"c{args.concurrency}"] = samples
                    print(
                        f"  {service} c={args.concurrency}: p50 {pct(samples, 0.5):.1f} ms",
                        flush=True,
                    )
            finally:
                await harness.close()
                for client in rig.clients:
                    await client.aclose()
    return out


def privacyidea(args: argparse.Namespace) -> list[float] | None:
    if args.no_privacyidea:
        return None
    from pushauth_privacyidea import PrivacyIdeaBaseline

    with PrivacyIdeaBaseline() as baseline:
        result = baseline.run(logins=args.pi_n, concurrency=1)
    return list(result.samples_ms)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n=30, c=100, 1 round")
    parser.add_argument("--n", type=int, default=300, help="sequential logins at c=1")
    parser.add_argument("--concurrency", type=int, default=500, help="concurrent logins")
    parser.add_argument("--rounds", type=int, default=3, help="rounds at that concurrency")
    parser.add_argument("--services", default="mqtt,nats", help="mqtt, nats or both")
    parser.add_argument("--pi-n", type=int, default=40, help="privacyIDEA logins (c=1)")
    parser.add_argument("--no-privacyidea", action="store_true", help="skip the peer")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.concurrency, args.rounds, args.pi_n = 30, 100, 1, 20
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load {load()}", flush=True)
    figures: list[Figure] = []
    results: dict[str, dict[str, list[float]]] = {}
    for service in args.services.split(","):
        results[service] = asyncio.run(run_service(service, args))
    pi = privacyidea(args)
    c = f"c{args.concurrency}"
    for service, got in results.items():
        figures.append(
            Figure(
                f"{service}_server_cpu_ms_per_login",
                got.pop("cpu")[0],
                "ms",
                2,
                None,
                "keybroker serve's CPU time per login at c=1",
            )
        )
        for key, samples in got.items():
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                figures.append(
                    Figure(
                        f"{service}_{name}_{key}",
                        pct(samples, q),
                        "ms",
                        2,
                        None,
                        f"{len(samples)} logins",
                    )
                )
    if pi is not None:
        pi50 = statistics.median(pi)
        figures.append(Figure("privacyidea_p50_c1", pi50, "ms", 1, None, f"{len(pi)} logins"))
        figures.append(
            Figure("privacyidea_p99_c1", pct(pi, 0.99), "ms", 1, None, f"{len(pi)} logins")
        )
        for service, got in results.items():
            ratio = pi50 / pct(got["c1"], 0.5)
            figures.append(
                Figure(
                    f"{service}_vs_privacyidea_p50_c1",
                    ratio,
                    "ratio",
                    1,
                    (">=", 30),
                    "privacyIDEA p50 / ours p50, c=1",
                )
            )
    print(f"\nload after: {load()}  (concurrency {c}, rounds {args.rounds})")
    width = max(len(f.metric) for f in figures)
    for f in figures:
        met = "" if f.met is None else ("  met" if f.met else "  NOT met")
        row = f"  {f.metric:<{width}}  {f.shown:>10} {f.unit:<6} goal {f.goal_text:<6}"
        print(f"{row}{met}  ({f.how})")
    for f in figures:
        print(f.bench_line(FLOW))


if __name__ == "__main__":
    main()
