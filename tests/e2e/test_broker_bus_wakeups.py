"""Two replicas on one PostgreSQL with a real bus: a delivery made through replica A wakes a
principal's long-poll on replica B at once. Each replica polls the database only every 60 s,
so before the long-poll's deadline the delivery can only arrive through the bus wake-up."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from keybroker.cli.credentials import read_admin_token
from keybroker.client.operator import OperatorClient
from keybroker.client.principal import PrincipalClient

from .processes import PASSPHRASE, Env, free_port

BUSES = {
    "nats": os.environ.get("KEYBROKER_TEST_NATS_URL", "nats://127.0.0.1:4222"),
    "mqtt": os.environ.get("KEYBROKER_TEST_MQTT_URL", "mqtt://127.0.0.1:1883"),
}


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize("bus", sorted(BUSES))
def test_delivery_on_one_replica_wakes_long_poll_on_another(
    tmp_path: Path,
    bus: str,
    pg_url: str,
    servers: list[subprocess.Popen[bytes]],
    require: Callable[[str], None],
) -> None:
    bus_url = BUSES[bus]
    if not _reachable(bus_url):
        require(f"{bus} at {bus_url}")
    env = Env(tmp_path / "home", tmp_path)
    env.run("init", "--db", pg_url)
    topic = f"kb.wake{secrets.token_hex(4)}"
    ports = [free_port(), free_port()]
    for port in ports:
        servers.append(
            env.serve(port, "--bus", bus_url, "--wake-topic", topic, "--poll-interval", "60")
        )
    url_a, url_b = (f"https://127.0.0.1:{p}" for p in ports)
    token = env.run("principal", "token", "site/w").stdout.strip().splitlines()[-1]
    env.run("keyset", "create", "links/w")
    ca_pem = (env.home / "ca.pem").read_bytes()

    async def scenario() -> list[str]:
        principal = await PrincipalClient.enrol(
            url_b, ca_pem, "site/w", token, tmp_path / "w.keyring", passphrase=PASSPHRASE
        )
        async with principal, OperatorClient(url_a, read_admin_token(env.home), ca_pem) as op:
            await op.grant("site/w", "links/w", "hold")
            waiting = asyncio.create_task(principal.fetch_deliveries(wait=60))
            await asyncio.sleep(1.5)  # the long-poll has read the empty inbox and is waiting
            assert not waiting.done()
            await op.deliver("links/w", 1, "site/w")
            # Without a wake-up the long-poll would answer only at its 60 s deadline (its
            # final look at the database); 20 s tells the two outcomes apart with room to spare.
            got = await asyncio.wait_for(waiting, timeout=20)
            return [d.keyset for d in got]

    assert asyncio.run(scenario()) == ["links/w"]
