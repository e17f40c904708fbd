"""The ``staged rotation`` stage of ``keybroker demo``: S10 end to end with real processes.

Against the demo's running ``keybroker serve`` (rollout driver every
``--rotation-interval``), on loopback:

* a topology of one upstream site ``up1`` with nodes ``up1-a`` and ``up1-b`` and four
  downstream sites, one link each: ``up1-a/fra1``, ``up1-a/ams1``, ``up1-b/par1``,
  ``up1-b/lon1``;
* six principals enrolled over the API, link setup (keysets, grants, v1 to both ends);
* one ``keybroker agent`` process per principal, one ``keybroker rotation traffic
  receive`` per site and one ``traffic send`` per link, counting every message;
* lon1's agent is stopped (the site that fails), then a rollout with a short policy.

It proves what docs/rotation.md promises: three links move to the new version
make-before-break and retire the old one, lon1's link gives up and keeps talking on
v1 (``FAILED_KEEP_OLD``), and not one message is lost on any link. Every process is
ended when the stage ends, whether it proved its point or not; their logs are in
``<demo workdir>/rotation`` (kept with ``keybroker demo --keep``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from keybroker.api.rotation_schemas import KEPT_OLD_STATES, RolloutOut, RolloutPolicyIn
from keybroker.client.operator import OperatorClient
from keybroker.client.principal import PrincipalClient
from keybroker.flows._demo import DemoProcesses
from keybroker.flows.rotation.agent_cli import PASSPHRASE_ENV
from keybroker.flows.rotation.topology import Link, Topology
from keybroker.flows.rotation.traffic import zero_loss

TOPOLOGY_TOML: Final = """\
name = "demo"

[upstream]
site = "up1"
nodes = ["up1-a", "up1-b"]

[downstream]
sites = ["fra1", "ams1", "par1", "lon1"]

[[links]]
node = "up1-a"
site = "fra1"

[[links]]
node = "up1-a"
site = "ams1"

[[links]]
node = "up1-b"
site = "par1"

[[links]]
node = "up1-b"
site = "lon1"
"""
#: The downstream site whose agent is stopped before the rollout.
FAILING_SITE: Final = "lon1"
#: Short enough for a demo: lon1's link gives up after two 2 s deliveries and a backoff.
POLICY: Final = RolloutPolicyIn(
    ack_timeout_ms=2000, max_attempts=2, backoff_base_ms=500, backoff_cap_ms=1000, grace_ms=2000
)
PASSPHRASE: Final = "demo rotation keyring passphrase"  # noqa: S105 - a throwaway demo keyring
RATE: Final = 20  # messages per second on each link
FIRST_MESSAGES: Final = 10  # each receiver counts this many under v1 before the rollout
ROLLOUT_TIMEOUT: Final = 60.0
WAIT_TIMEOUT: Final = 30.0
_FINISHED: Final = ("RETIRED_OLD", *KEPT_OLD_STATES)
_TOKEN_FILE: Final = "admin.token"  # noqa: S105 - a file name (as `keybroker init` writes it)


class DemoContext(Protocol):
    """What the stage needs of ``keybroker.cli.demo.DemoState`` (flows do not import cli)."""

    workdir: Path  # the demo's throwaway directory; the broker home is ``workdir/home``
    url: str  # the running ``keybroker serve``
    console: Console | None


def _read(path: Path) -> dict[str, Any]:
    """A status or stats file ({} until it exists; they are replaced atomically)."""
    try:
        document: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return document


def _principals(topology: Topology) -> list[str]:
    return [f"node/{n}" for n in topology.nodes] + [f"site/{s}" for s in topology.sites]


def _short(principal: str) -> str:
    return principal.split("/", 1)[1]


def _link_id(link: Link) -> str:
    return f"{link.node}-{link.site}"


class _Run:
    """One run of the stage: its directory, topology, processes and progress line."""

    def __init__(self, s: DemoContext, progress: Progress, task: TaskID) -> None:
        self.home = s.workdir / "home"
        self.url = s.url
        self.dir = s.workdir / "rotation"
        self.dir.mkdir(exist_ok=True)
        self.procs = DemoProcesses(self.dir, {**os.environ, PASSPHRASE_ENV: PASSPHRASE})
        self.progress = progress
        self.task = task
        (self.dir / "demo.toml").write_text(TOPOLOGY_TOML, encoding="utf-8")
        self.topology = Topology.from_file(self.dir / "demo.toml")

    def step(self, description: str, total: int, completed: int = 0) -> None:
        self.progress.update(self.task, description=description, total=total, completed=completed)

    def keyring(self, principal: str) -> Path:
        return self.dir / f"{principal.replace('/', '-')}.keyring"

    def status(self, short: str) -> dict[str, Any]:
        return _read(self.dir / f"agent-{short}.status.json")

    def sent(self, link: Link) -> dict[str, Any]:
        return _read(self.dir / f"send-{_link_id(link)}.stats.json")

    def received(self, link: Link) -> dict[str, Any]:
        return _read(self.dir / f"receive-{link.site}.stats.json")

    async def until(
        self, done: Callable[[], int], total: int, what: str, timeout: float = WAIT_TIMEOUT
    ) -> None:
        """Poll ``done()`` (how many of ``total`` are ready) until all are, showing progress."""
        deadline = time.monotonic() + timeout
        while True:
            ready = done()
            self.progress.update(self.task, completed=ready)
            if ready >= total:
                return
            self.procs.check(what)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{ready}/{total} after {timeout:.0f} s waiting for {what}; "
                    f"logs in {self.dir} (kept with `keybroker demo --keep`)"
                )
            await asyncio.sleep(0.1)

    # -- the steps ---------------------------------------------------------------------------

    async def enrol(self, op: OperatorClient, ca_pem: bytes) -> None:
        principals = _principals(self.topology)
        self.step("enrolling sites and nodes", len(principals))
        for i, name in enumerate(principals, 1):
            issued = await op.create_enrolment_token(name, timedelta(minutes=10))
            client = await PrincipalClient.enrol(
                self.url, ca_pem, name, issued.token, self.keyring(name), passphrase=PASSPHRASE
            )
            await client.aclose()
            self.progress.update(self.task, completed=i)

    def start_agents_and_receivers(self) -> None:
        """One agent per principal, one receiver per site (they find their keys on their own)."""
        for name in _principals(self.topology):
            short = _short(name)
            self.procs.start(
                f"agent-{short}", "agent", "--keyring", str(self.keyring(name)),
                "--sync-interval", "0.5", "--wait", "5",
                "--status-file", str(self.dir / f"agent-{short}.status.json"),
            )  # fmt: skip
        for site in self.topology.sites:
            self.procs.start(
                f"receive-{site}", "rotation", "traffic", "receive",
                "--keyring", str(self.keyring(f"site/{site}")),
                "--keyset", self._link_to(site).keyset, "--listen", "127.0.0.1:0",
                "--stats", str(self.dir / f"receive-{site}.stats.json"),
            )  # fmt: skip

    async def start_traffic(self) -> None:
        """Senders once every site can read v1; then every agent on v1 and traffic under it."""
        links = self.topology.links
        self.step("sites installing v1, receivers listening", len(links))
        await self.until(
            lambda: sum(
                1 in self.status(k.site).get("installed", {}).get(k.keyset, [])
                and bool(self.received(k).get("listen"))
                for k in links
            ),
            len(links),
            "every site to install v1 and listen",
        )
        # A node transmits under its primary only, which it may have before its site holds
        # v1 (setup delivers to both ends at once): start sending once every site can read.
        for link in links:
            self.procs.start(
                f"send-{_link_id(link)}", "rotation", "traffic", "send",
                "--keyring", str(self.keyring(f"node/{link.node}")), "--keyset", link.keyset,
                "--connect", str(self.received(link)["listen"]), "--rate", str(RATE),
                "--stats", str(self.dir / f"send-{_link_id(link)}.stats.json"),
            )  # fmt: skip
        principals = _principals(self.topology)
        holds = {name: self._keysets(name) for name in principals}

        def on_v1() -> int:
            return sum(
                all(_is_primary(self.status(_short(name)), keyset, 1) for keyset in keysets)
                for name, keysets in holds.items()
            )

        self.step("every agent on v1", len(principals))
        await self.until(on_v1, len(principals), "every agent to use v1 as its primary")
        self.step("traffic under v1", len(links))
        await self.until(
            lambda: sum(self.received(k).get("received", 0) >= FIRST_MESSAGES for k in links),
            len(links),
            f"{FIRST_MESSAGES} messages at every receiver",
        )

    async def rollout(self, op: OperatorClient) -> RolloutOut:
        total = len(self.topology.links)
        started = await op.start_rollout(self.topology.to_mapping(), policy=POLICY)
        rid = started.rollout_id
        self.step(f"rollout {rid[:8]}", total)
        deadline = time.monotonic() + ROLLOUT_TIMEOUT
        while True:
            current = await op.show_rollout(rid, limit=0)
            busy = ", ".join(
                f"{n} {state}"
                for state, n in current.counts.items()
                if n and state not in _FINISHED
            )
            self.progress.update(
                self.task,
                completed=sum(current.counts.get(state, 0) for state in _FINISHED),
                description=f"rollout {rid[:8]}" + (f" ({busy})" if busy else ""),
            )
            if current.finished:
                return await op.rollout_with_links(rid)
            self.procs.check(f"rollout {rid}")
            if time.monotonic() > deadline:
                counts = ", ".join(f"{n} {s}" for s, n in current.counts.items() if n)
                raise RuntimeError(
                    f"rollout {rid} not finished after {ROLLOUT_TIMEOUT:.0f} s ({counts}); "
                    f"agent logs in {self.dir} (kept with `keybroker demo --keep`)"
                )
            await asyncio.sleep(0.2)

    async def drain(self) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
        """Stop senders and agents, let every receiver count the rest, stop them: the counters."""
        links = self.topology.links
        self.step("draining traffic", len(links))
        agents = [name for name in self.procs.running if name.startswith("agent-")]
        self.procs.stop(*(f"send-{_link_id(link)}" for link in links), *agents)
        sent = {link.name: self.sent(link) for link in links}
        await self.until(
            lambda: sum(
                self.received(k).get("received", 0) >= sent[k.name].get("sent", 0) for k in links
            ),
            len(links),
            "the receivers to count every message sent",
        )
        self.procs.stop(*(f"receive-{site}" for site in self.topology.sites))
        return {link.name: (sent[link.name], self.received(link)) for link in links}

    def _link_to(self, site: str) -> Link:
        return next(k for k in self.topology.links if k.site == site)

    def _keysets(self, principal: str) -> list[str]:
        kind, name = principal.split("/", 1)
        return [
            k.keyset for k in self.topology.links if (k.node if kind == "node" else k.site) == name
        ]


def _is_primary(status: dict[str, Any], keyset: str, version: int) -> bool:
    versions = status.get("versions", {}).get(keyset, [])
    return any(v["version"] == version and v["state"] == "primary" for v in versions)


def _check_rollout(final: RolloutOut) -> tuple[list[str], int]:
    """The rotated links' names and their new version; raises unless it is the promised outcome."""
    rotated: list[str] = []
    new_versions: set[int] = set()
    for link in final.links:
        if link.site == FAILING_SITE:
            if link.state != "FAILED_KEEP_OLD" or link.version_in_use != link.old_version:
                raise RuntimeError(
                    f"{link.name} (its site down) ended {link.state} on v{link.version_in_use}, "
                    f"not FAILED_KEEP_OLD on v{link.old_version}"
                )
        elif link.state != "RETIRED_OLD" or link.version_in_use != link.new_version:
            raise RuntimeError(
                f"{link.name} ended {link.state} on v{link.version_in_use} ({link.reason}), "
                f"not RETIRED_OLD on v{link.new_version}"
            )
        else:
            rotated.append(link.name)
            new_versions.add(link.version_in_use)
    if len(rotated) != len(final.links) - 1 or len(new_versions) != 1:
        raise RuntimeError(f"rollout {final.rollout_id}: unexpected outcome {final.counts}")
    return rotated, new_versions.pop()


def _check_traffic(
    counters: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    rotated: list[str],
    new: int,
) -> int:
    """Every link lost nothing; rotated links carried both versions, the failed one v1 only."""
    messages = 0
    for name, (sent, got) in counters.items():
        if not sent.get("done") or not got.get("done"):
            raise RuntimeError(f"{name}: the sender or receiver did not write its final counters")
        if not zero_loss(sent, got) or got["by_version"] != sent["sent_by_version"]:
            raise RuntimeError(
                f"{name} lost messages: sent {sent['sent']} {sent['sent_by_version']}, received "
                f"{got['received']} {got['by_version']}, {got['failed']} failed, "
                f"{got['gaps']} missing"
            )
        versions = {int(v) for v, n in got["by_version"].items() if n}
        expected = {1, new} if name in rotated else {1}
        if versions != expected:
            raise RuntimeError(
                f"{name} carried messages under {sorted(versions)}, expected {sorted(expected)}"
            )
        messages += got["received"]
    return messages


async def _run(s: DemoContext, run: _Run) -> str:
    ca_pem = (run.home / "ca.pem").read_bytes()
    token = (run.home / _TOKEN_FILE).read_text().strip()
    topology = run.topology
    async with OperatorClient(s.url, token, ca_pem) as op:
        await run.enrol(op, ca_pem)
        run.start_agents_and_receivers()
        run.step("link setup", 1)
        await op.setup_rotation(topology.to_mapping())
        await run.start_traffic()
        run.procs.stop(f"agent-{FAILING_SITE}")
        final = await run.rollout(op)
    rotated, new = _check_rollout(final)

    def retired() -> int:
        # Both ends of every rotated link forgot v1: the broker disabled it after the grace.
        return sum(
            run.status(link.node).get("installed", {}).get(link.keyset) == [new]
            and run.status(link.site).get("installed", {}).get(link.keyset) == [new]
            for link in topology.links
            if link.name in rotated
        )

    run.step("agents retiring v1", len(rotated))
    await run.until(retired, len(rotated), f"both ends of the rotated links to hold v{new} only")
    messages = _check_traffic(await run.drain(), rotated, new)
    sites = ", ".join(name.split("/", 1)[1] for name in rotated)
    return (
        f"{len(topology.links)} links, 1 upstream site with {len(topology.nodes)} nodes: "
        f"{sites} rotated v1→v{new} make-before-break, v1 retired; {FAILING_SITE} down → "
        f"FAILED_KEEP_OLD on v1; {messages} messages, 0 lost"
    )


def stage_rotation(s: DemoContext) -> str:
    """Registered in ``keybroker demo`` as ``staged rotation``."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=s.console or Console(),
        transient=True,
    ) as progress:
        run = _Run(s, progress, progress.add_task("rotation", total=None))
        try:
            return asyncio.run(_run(s, run))
        finally:
            run.procs.close()
