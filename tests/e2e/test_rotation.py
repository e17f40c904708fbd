"""S10 end to end with real processes: a broker, one upstream site with two node agents, six
downstream site agents, and traffic on every link, through `keybroker rotation …`.

* One downstream agent is stopped before the rollout: five links rotate make-before-break,
  the sixth ends FAILED_KEEP_OLD and keeps carrying traffic under its original key; no
  message is lost on any link. The agent comes back and `rotation retry` completes it.
* The broker is killed with SIGKILL mid-rollout and restarted: the rollout completes, and
  the transparency log shows every link's steps exactly once, in order.

Both run on SQLite with long-polls and on PostgreSQL with NATS JetStream as the bus.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from keybroker.broker.home import open_home
from keybroker.cli.credentials import read_admin_token
from keybroker.client.operator import OperatorClient
from keybroker.errors import DecodeError
from keybroker.flows.rotation.messages import LinkStepped, RolloutChanged, decode_rotation_event
from keybroker.flows.rotation.traffic import zero_loss

from .conftest import database_for
from .processes import KB, Env, Procs, free_port, read, until

NATS_URL = os.environ.get("KEYBROKER_TEST_NATS_URL", "nats://127.0.0.1:4222")
NODES = ("n1", "n2")
SITES = ("s1", "s2", "s3", "s4", "s5", "s6")
#: Site i is linked to node i mod 2.
LINKS = tuple((NODES[i % 2], site) for i, site in enumerate(SITES))
HAPPY_PATH = [
    "PENDING",
    "DELIVERED_DOWNSTREAM",
    "ACKED_DOWNSTREAM",
    "DELIVERED_UPSTREAM",
    "ACTIVE",
    "RETIRED_OLD",
]


def keyset(node: str, site: str) -> str:
    return f"rotation/e2e/{node}/{site}"


def topology_toml(links: tuple[tuple[str, str], ...]) -> str:
    nodes = sorted({n for n, _ in links})
    sites = [s for _, s in links]
    lines = [
        'name = "e2e"',
        "[upstream]",
        'site = "up1"',
        f"nodes = {json.dumps(nodes)}",
        "[downstream]",
        f"sites = {json.dumps(sites)}",
    ]
    for node, site in links:
        lines += ["[[links]]", f'node = "{node}"', f'site = "{site}"']
    return "\n".join(lines) + "\n"


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=2):
            return True
    except OSError:
        return False


class Rig:
    """The broker, its agents and link traffic, as real processes."""

    def __init__(self, procs: Procs, backend: str, request: pytest.FixtureRequest) -> None:
        self.procs = procs
        self.env: Env = procs.env
        self.dir = self.env.workdir
        self.backend = backend
        self.db = database_for(request, procs.close) if backend == "postgresql" else None
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.env.env["KEYBROKER_URL"] = self.url
        topic = f"kb.wake{secrets.token_hex(4)}"
        self.bus = ["--bus", NATS_URL, "--wake-topic", topic] if backend == "postgresql" else []

    def init(self) -> None:
        self.env.run("init", *(["--db", self.db] if self.db else []))

    def serve(self) -> None:
        self.procs.running["serve"] = self.env.serve(
            self.port, "--rotation-interval", "0.2", *self.bus
        )

    def enrol(self, principals: list[str]) -> None:
        """Enrol every principal through the CLI, in parallel (each run derives a scrypt KEK)."""
        tokens = {p: self.env.run("principal", "token", p).stdout.split()[-1] for p in principals}
        running = [
            subprocess.Popen(
                [
                    *KB,
                    "enroll",
                    p,
                    "--url",
                    self.url,
                    "--ca",
                    str(self.env.home / "ca.pem"),
                    "--token",
                    tokens[p],
                    "--keyring",
                    f"{p.split('/')[1]}.keyring",
                ],
                cwd=self.dir,
                env=self.env.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for p in principals
        ]
        for proc in running:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out.decode(errors="replace")

    def agent(self, short: str) -> None:
        self.procs.start(
            f"agent-{short}", "agent", "--keyring", f"{short}.keyring", "--sync-interval", "0.5",
            "--wait", "5", "--status-file", f"{short}.status.json", *self.bus,
        )  # fmt: skip

    def status(self, short: str) -> dict[str, Any]:
        return read(self.dir / f"{short}.status.json")

    def transmits(self, short: str, name: str) -> int | None:
        """The version the agent's keyring has as primary for ``name`` (its transmit key)."""
        for v in self.status(short).get("versions", {}).get(name, []):
            if v["state"] == "primary":
                return int(v["version"])
        return None

    def traffic(self, node: str, site: str) -> None:
        port = free_port()
        name = keyset(node, site)
        self.procs.start(
            f"receive-{site}", "rotation", "traffic", "receive", "--keyring", f"{site}.keyring",
            "--keyset", name, "--listen", f"127.0.0.1:{port}", "--stats", f"receive-{site}.json",
        )  # fmt: skip
        self.procs.start(
            f"send-{site}", "rotation", "traffic", "send", "--keyring", f"{node}.keyring",
            "--keyset", name, "--connect", f"127.0.0.1:{port}", "--rate", "25",
            "--stats", f"send-{site}.json",
        )  # fmt: skip

    def received(self, site: str) -> dict[str, Any]:
        return read(self.dir / f"receive-{site}.json")

    def sent(self, site: str) -> dict[str, Any]:
        return read(self.dir / f"send-{site}.json")

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        return self.env.run("rotation", *args, ok=ok)

    async def operator(self) -> OperatorClient:
        return OperatorClient(
            self.url, read_admin_token(self.env.home), (self.env.home / "ca.pem").read_bytes()
        )


async def _bring_up(rig: Rig, links: tuple[tuple[str, str], ...]) -> Path:
    rig.init()
    rig.serve()
    nodes = sorted({n for n, _ in links})
    sites = [s for _, s in links]
    rig.enrol([f"node/{n}" for n in nodes] + [f"site/{s}" for s in sites])
    topology = rig.dir / "topology.toml"
    topology.write_text(topology_toml(links))
    rig.cli("setup", str(topology))
    for short in (*nodes, *sites):
        rig.agent(short)
    for node, site in links:
        await until(
            lambda n=node, s=site: (
                rig.transmits(n, keyset(n, s)) == 1 and rig.transmits(s, keyset(n, s)) == 1
            ),
            f"v1 installed and primary on {node}/{site}",
            rig.procs,
        )
    return topology


def _steps(home: Path, rollout_id: str) -> dict[str, list[LinkStepped]]:
    """Every LinkStepped entry of the rollout, per link, in log order."""
    opened = open_home(home)
    try:
        entries = opened.log.entries(0, opened.log.size())
    finally:
        opened.close()
    steps: dict[str, list[LinkStepped]] = {}
    for entry in entries:
        try:
            event = decode_rotation_event(entry)
        except DecodeError:
            continue  # a broker event
        if isinstance(event, LinkStepped) and event.rollout_id == rollout_id:
            steps.setdefault(event.link, []).append(event)
    return steps


def _assert_replays(steps: list[LinkStepped]) -> None:
    assert [e.seq for e in steps] == list(range(1, len(steps) + 1)), [e.seq for e in steps]
    for before, after in itertools.pairwise(steps):
        assert after.from_state == before.to_state, (before, after)


def _assert_healthy(steps: list[LinkStepped]) -> None:
    """A healthy link's steps: the happy path, except that the short ack timeout this test
    uses (3 s, so the down site fails quickly) may run out for a node agent on a loaded
    machine; that is a legitimate retry (DELIVERED_UPSTREAM -> ACKED_DOWNSTREAM -> deliver
    again), never a step skipped, repeated out of order or a change of version."""
    _assert_replays(steps)
    states = [s.to_state for s in steps]
    retries = max(0, (len(states) - len(HAPPY_PATH[1:])) // 2)
    retried = ["ACKED_DOWNSTREAM", "DELIVERED_UPSTREAM"] * retries
    assert states == HAPPY_PATH[1:4] + retried + HAPPY_PATH[4:], states
    assert {s.new_version for s in steps} == {2}, [s.new_version for s in steps]


BACKENDS = ["sqlite", "postgresql"]


def _require_services(backend: str, require: Callable[[str], None]) -> None:
    if backend == "postgresql" and not _reachable(NATS_URL):
        require(f"NATS at {NATS_URL}")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_one_site_down_keeps_its_old_key_and_nothing_is_lost(
    procs: Procs, backend: str, request: pytest.FixtureRequest, require: Callable[[str], None]
) -> None:
    _require_services(backend, require)
    rig = Rig(procs, backend, request)
    topology = await _bring_up(rig, LINKS)
    for node, site in LINKS:
        rig.traffic(node, site)
    for _, site in LINKS:
        await until(
            lambda s=site: rig.received(s).get("decrypted", 0) >= 10, f"traffic to {site}", procs
        )

    down_node, down_site = LINKS[-1]
    assert procs.terminate(f"agent-{down_site}") == 0  # stopped before the rotation
    rollout_id = rig.cli(
        "start", str(topology), "--ack-timeout", "3s", "--attempts", "2", "--backoff", "1s",
        "--backoff-cap", "1s", "--grace", "3s",
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    watched = rig.cli("watch", rollout_id, "--interval", "0.5", ok=False)
    assert watched.returncode == 3, watched.stdout + watched.stderr
    assert f"{down_node}/{down_site}" in watched.stdout and "v1" in watched.stdout

    document = json.loads(rig.cli("status", rollout_id, "--json").stdout)
    states = {link["name"]: link for link in document["links"]}
    for node, site in LINKS[:-1]:
        link = states[f"{node}/{site}"]
        assert (link["state"], link["new_version"], link["version_in_use"]) == ("RETIRED_OLD", 2, 2)
    failed = states[f"{down_node}/{down_site}"]
    assert failed["state"] == "FAILED_KEEP_OLD" and failed["version_in_use"] == 1, failed
    # The node of the failed link was never given its new key, and still sends under v1.
    assert 2 not in rig.status(down_node)["installed"][keyset(down_node, down_site)]
    for node, site in LINKS[:-1]:
        await until(
            lambda n=node, s=site: (
                rig.sent(s).get("current_version") == 2
                and rig.status(s)["installed"][keyset(n, s)] == [2]
            ),
            f"{node}/{site} on v2 alone",
            procs,
        )
    before = rig.received(down_site)["decrypted"]
    await until(
        lambda: rig.received(down_site)["decrypted"] >= before + 25,
        "traffic on the failed link, still under v1",
        procs,
    )
    assert rig.sent(down_site)["current_version"] == 1

    # The site comes back; retry completes its link with a fresh version.
    rig.agent(down_site)
    rig.cli("retry", rollout_id, "--link", f"{down_node}/{down_site}")
    assert rig.cli("watch", rollout_id, "--interval", "0.5").returncode == 0
    retried = {
        link["name"]: link
        for link in json.loads(rig.cli("status", rollout_id, "--json").stdout)["links"]
    }[f"{down_node}/{down_site}"]
    assert retried["state"] == "RETIRED_OLD" and retried["new_version"] == 3, retried
    await until(
        lambda: rig.sent(down_site).get("current_version") == 3,
        "the retried link's sender on v3",
        procs,
    )
    await asyncio.sleep(1.0)

    for _, site in LINKS:
        assert procs.terminate(f"send-{site}") == 0
    for _, site in LINKS:
        sent = rig.sent(site)
        await until(
            lambda s=site, n=sent["sent"]: rig.received(s).get("received", 0) >= n,
            f"the last messages to {site}",
            procs,
        )
        assert procs.terminate(f"receive-{site}") == 0
        got = rig.received(site)
        assert zero_loss(sent, got), (site, sent, got)
        assert got["failed"] == 0 and got["by_version"] == sent["sent_by_version"]
    for _, site in LINKS[:-1]:
        assert set(rig.received(site)["by_version"]) == {"1", "2"}
    assert set(rig.received(down_site)["by_version"]) == {"1", "3"}
    rig.env.run("log", "verify", "--full")

    steps = _steps(rig.env.home, rollout_id)
    for node, site in LINKS[:-1]:
        _assert_healthy(steps[f"{node}/{site}"])
    _assert_replays(steps[f"{down_node}/{down_site}"])


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_broker_killed_mid_rollout_resumes_without_repeating_a_step(
    procs: Procs, backend: str, request: pytest.FixtureRequest, require: Callable[[str], None]
) -> None:
    _require_services(backend, require)
    rig = Rig(procs, backend, request)
    links = LINKS[:4]
    topology = await _bring_up(rig, links)
    rollout_id = (
        rig.cli(
            "start", str(topology), "--ack-timeout", "20s", "--grace", "3s", "--max-parallel", "2"
        )
        .stdout.strip()
        .splitlines()[-1]
    )

    async with await rig.operator() as op:

        async def mid_way() -> bool:
            counts = (await op.show_rollout(rollout_id, limit=0)).counts
            switched = counts["ACTIVE"] + counts["RETIRED_OLD"]
            return switched >= 1 and counts["RETIRED_OLD"] < len(links)

        await until(mid_way, "a rollout half-way", procs, timeout=60)
    procs.kill("serve")
    half = _steps(rig.env.home, rollout_id)
    assert half and any(s[-1].to_state != "RETIRED_OLD" for s in half.values()), half
    rig.serve()
    assert rig.cli("watch", rollout_id, "--interval", "0.5").returncode == 0

    steps = _steps(rig.env.home, rollout_id)
    assert set(steps) == {f"{n}/{s}" for n, s in links}
    for name, link_steps in steps.items():
        _assert_replays(link_steps)
        assert [s.to_state for s in link_steps] == HAPPY_PATH[1:], (name, link_steps)
    # No step repeated: one delivery of v2 to each end of each link.
    async with await rig.operator() as op:
        for node, site in links:
            for end in (f"node/{node}", f"site/{site}"):
                made = [
                    d
                    for d in await op.list_deliveries(principal=end, keyset=keyset(node, site))
                    if d.version == 2
                ]
                assert len(made) == 1 and made[0].state == "acked", (end, made)
    rig.env.run("log", "verify", "--full")
    finished = [e for e in _rollout_changes(rig.env.home, rollout_id) if e.state == "COMPLETED"]
    assert len(finished) == 1


def _rollout_changes(home: Path, rollout_id: str) -> list[RolloutChanged]:
    opened = open_home(home)
    try:
        entries = opened.log.entries(0, opened.log.size())
    finally:
        opened.close()
    found = []
    for entry in entries:
        try:
            event = decode_rotation_event(entry)
        except DecodeError:
            continue
        if isinstance(event, RolloutChanged) and event.rollout_id == rollout_id:
            found.append(event)
    return found
