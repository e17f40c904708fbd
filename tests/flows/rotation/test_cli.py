"""``keybroker rotation …`` as an operator runs it: real processes against a real
``keybroker serve`` (whose background loop drives the rollout), over HTTPS with the
home's admin token, on SQLite and PostgreSQL. The agents are in this process
(:class:`SimulatedAgent`) and ack through the same database."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "e2e"))

from processes import KB, Env, free_port

from keybroker.broker import Broker
from keybroker.broker.home import Home, open_home
from keybroker.cli.main import app
from keybroker.errors import DecodeError, KeybrokerError
from keybroker.flows.rotation.simulation import SimulatedAgent
from keybroker.pki import PrincipalId

TOPOLOGY = """\
name = "edge"

[upstream]
site = "up"
nodes = ["n0"]

[downstream]
sites = ["s0", "s1"]

[[links]]
node = "n0"
site = "s0"

[[links]]
node = "n0"
site = "s1"
"""
#: One attempt per stage, so a refused delivery fails its link at once; no grace period.
QUICK = ["--ack-timeout", "60s", "--attempts", "1", "--grace", "0s", "--backoff", "100ms"]


@dataclass
class Served:
    env: Env
    url: str
    topology: Path
    home: Home
    broker: Broker
    agents: dict[str, SimulatedAgent]

    def kb(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        return self.env.run("rotation", *args, "--url", self.url, ok=ok)

    def pump(self, *, bad_proof: frozenset[str] = frozenset()) -> None:
        """Every agent installs and acks its deliveries (those in ``bad_proof`` with a wrong
        proof of possession, which the broker refuses), then syncs its keysets."""
        for name, agent in self.agents.items():
            for envelope in agent.inbox(self.broker):
                proof = agent.install(self.broker, envelope)
                if name in bad_proof:
                    proof = bytes(len(proof))
                try:
                    self.broker.ack(envelope.delivery_id, agent.principal, proof)
                except KeybrokerError:
                    continue  # refused or late: the rollout sees the outcome
            for keyset in ("rotation/edge/n0/s0", "rotation/edge/n0/s1"):
                agent.sync(self.broker, keyset)

    def watch(self, rollout_id: str, *, bad_proof: frozenset[str] = frozenset()) -> tuple[int, str]:
        """Run ``watch`` while the agents work; its exit status and output."""
        proc = subprocess.Popen(
            [*KB, "rotation", "watch", rollout_id, "--interval", "0.2", "--url", self.url],
            cwd=self.env.workdir,
            env=self.env.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            self.pump(bad_proof=bad_proof)
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        output, _ = proc.communicate(timeout=10)
        assert proc.returncode is not None
        return proc.returncode, output

    def status(self, rollout_id: str) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.kb("status", rollout_id, "--json").stdout)
        return document


@pytest.fixture
def served(tmp_path: Path, store_url: str) -> Iterator[Served]:
    env = Env(tmp_path / "home", tmp_path)
    env.run("init", "--db", store_url)
    port = free_port()
    server = env.serve(port, "--rotation-interval", "0.1")
    topology = tmp_path / "edge.toml"
    topology.write_text(TOPOLOGY)
    home = open_home(env.home)
    try:
        broker = Broker.from_home(home)
        agents = {
            name: SimulatedAgent(PrincipalId.parse(name))
            for name in ("node/n0", "site/s0", "site/s1")
        }
        for agent in agents.values():
            agent.enrol(broker)
        yield Served(env, f"https://127.0.0.1:{port}", topology, home, broker, agents)
    finally:
        home.close()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        stderr = server.stderr.read().decode() if server.stderr else ""
        # uvicorn re-raises SIGTERM once it has shut down gracefully (lifespan included).
        assert server.returncode in (0, -signal.SIGTERM), stderr
        assert "Traceback" not in stderr and "rotation step failed" not in stderr, stderr


def _by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {link["name"]: link for link in document["links"]}


def test_a_failed_site_keeps_its_key_watch_says_so_and_retry_finishes(served: Served) -> None:
    setup = served.kb("setup", str(served.topology))
    assert "2 link(s) ready" in setup.stdout and "4 first key(s)" in setup.stdout
    served.pump()

    started = served.kb("start", str(served.topology), *QUICK)
    rollout_id = started.stdout.strip()
    assert len(rollout_id) == 36, started.stdout
    assert "started rollout over 2 link(s) of edge" in started.stderr

    code, output = served.watch(rollout_id, bad_proof=frozenset({"site/s1"}))
    assert code == 3, output
    assert "1 of 2 link(s) on their new key" in output
    assert "1 link(s) kept their old key" in output
    report = output[output.index("kept their old key") :]
    assert "n0/s1" in report and "FAILED_KEEP_OLD" in report and "(1 attempts)" in report
    assert "rotation/edge/n0/s1 v1" in report
    assert "n0/s0" not in report

    document = served.status(rollout_id)
    assert document["rollout_id"] == rollout_id and document["state"] == "COMPLETED"
    assert document["finished"] is True and document["total"] == document["matched"] == 2
    links = _by_name(document)
    assert links["n0/s0"]["state"] == "RETIRED_OLD" and links["n0/s0"]["version_in_use"] == 2
    assert links["n0/s1"]["state"] == "FAILED_KEEP_OLD" and links["n0/s1"]["version_in_use"] == 1
    assert "attempts" in links["n0/s1"]["reason"]
    # The upstream node never got the key its downstream site did not acknowledge.
    assert not served.agents["node/n0"].holds("rotation/edge/n0/s1", 2)

    table = served.kb("status", rollout_id, "--state", "failed_keep_old").stdout
    assert "n0/s1" in table and "n0/s0" not in table and "v1→v2" in table
    assert rollout_id in served.kb("list").stdout

    retried = served.kb("retry", rollout_id, "--link", "n0/s1")
    assert "RUNNING" in retried.stdout
    code, output = served.watch(rollout_id)
    assert code == 0, output
    assert "2 of 2 link(s) on their new key" in output
    links = _by_name(served.status(rollout_id))
    assert links["n0/s1"]["state"] == "RETIRED_OLD" and links["n0/s1"]["version_in_use"] == 3
    served.pump()
    assert served.agents["node/n0"].transmit_version("rotation/edge/n0/s1") == 3


def test_abort_over_https_keeps_old_keys_and_refuses_twice(served: Served) -> None:
    served.kb("setup", str(served.topology), "--delivery-ttl", "10m")
    served.pump()
    # Nobody acks: the links wait at their first delivery until the operator aborts.
    rollout_id = served.kb("start", str(served.topology), "--link", "n0/s1").stdout.strip()
    first = served.status(rollout_id)
    assert first["state"] == "RUNNING" and list(_by_name(first)) == ["n0/s1"]

    aborted = served.kb("abort", rollout_id)
    assert f"rollout {rollout_id} ABORTED" in aborted.stdout
    again = served.kb("abort", rollout_id, ok=False)
    assert again.returncode == 2 and "nothing to abort" in again.stderr

    document = served.status(rollout_id)
    (link,) = document["links"]
    assert link["state"] == "ABORTED_KEEP_OLD" and link["version_in_use"] == 1
    assert document["counts"]["ABORTED_KEEP_OLD"] == 1


def test_mistakes_are_reported_before_or_by_the_broker(served: Served, tmp_path: Path) -> None:
    # Found here, before anything is sent (in process: no broker needed).
    runner = CliRunner()
    bad = tmp_path / "bad.toml"
    bad.write_text(TOPOLOGY.replace('node = "n0"\nsite = "s1"', 'node = "n9"\nsite = "s1"'))
    result = runner.invoke(app, ["rotation", "start", str(bad), "--url", "https://nowhere:1"])
    assert isinstance(result.exception, DecodeError)
    assert "'n9' is not in upstream.nodes" in str(result.exception)
    result = runner.invoke(
        app, ["rotation", "start", str(served.topology), "--link", "n0/s7", "--url", "x"]
    )
    assert isinstance(result.exception, DecodeError) and "no link 'n0/s7'" in str(result.exception)
    result = runner.invoke(app, ["rotation", "start", str(served.topology), "--grace", "soon"])
    assert result.exit_code == 2 and "not a duration" in result.output
    result = runner.invoke(app, ["rotation", "status", "x", "--state", "done", "--url", "x"])
    assert result.exit_code == 2 and "is not one of" in result.output

    # Refused by the broker, reported as a one-line error with exit status 2.
    result = served.kb("start", str(served.topology), ok=False)
    assert result.returncode == 2 and "rotation setup" in result.stderr
    result = served.kb("status", "0f0f0f0f-0000-4000-8000-000000000000", ok=False)
    assert result.returncode == 2 and "no such rollout" in result.stderr
    wrong_token = tmp_path / "wrong.token"
    wrong_token.write_text("kbadm_" + "x" * 43)
    result = served.kb("list", "--admin-token-file", str(wrong_token), ok=False)
    assert result.returncode == 2 and "admin credential" in result.stderr
