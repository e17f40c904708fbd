"""kill -9 the server while a principal acks deliveries in a loop: after a restart every ack
that got a 2xx is still recorded, nothing half-done shows, and the log verifies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from keybroker.broker.home import open_home
from keybroker.broker.service import Broker
from keybroker.cli.credentials import read_admin_token
from keybroker.client.operator import OperatorClient
from keybroker.client.principal import PrincipalClient
from keybroker.errors import KeybrokerError

from .processes import PASSPHRASE, Env, free_port

KEYSETS = 40
KILL_AFTER = 12


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_acks_survive_kill_9(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    env = Env(tmp_path / "home", tmp_path)
    init = ["init"] + (
        ["--db", request.getfixturevalue("pg_url")] if backend == "postgresql" else []
    )
    env.run(*init)
    with open_home(env.home) as home:
        broker = Broker.from_home(home)
        for i in range(KEYSETS):
            broker.create_keyset(f"crash/k{i}", "AES256_GCM")
        token = broker.create_enrolment_token("site/crash", timedelta(hours=1))
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    server = env.serve(port)
    ca_pem = (env.home / "ca.pem").read_bytes()
    admin = read_admin_token(env.home)
    acked: list[str] = []

    async def work(start: int, stop_after: int | None) -> int:
        """Deliver, open and ack keysets from ``start``; return where it stopped."""
        async with (
            OperatorClient(url, admin, ca_pem) as op,
            PrincipalClient.open(tmp_path / "crash.keyring", passphrase=PASSPHRASE) as principal,
        ):
            i = start
            while i < KEYSETS:
                try:
                    await op.grant("site/crash", f"crash/k{i}", "hold")
                    await op.deliver(f"crash/k{i}", 1, "site/crash")
                    for delivery in await principal.fetch_deliveries(wait=5):
                        principal.open_delivery(delivery)
                        out = await principal.ack(delivery)
                        assert out.state == "acked"
                        acked.append(out.delivery_id)
                        if stop_after is not None and len(acked) == stop_after:
                            os.kill(server.pid, signal.SIGKILL)  # mid-loop: the next call fails
                except (KeybrokerError, httpx.HTTPError, OSError):
                    return i
                i += 1
            return i

    async def enrol() -> None:
        client = await PrincipalClient.enrol(
            url, ca_pem, "site/crash", token.secret, tmp_path / "crash.keyring",
            passphrase=PASSPHRASE,
        )  # fmt: skip
        await client.aclose()

    asyncio.run(enrol())
    stopped = asyncio.run(work(0, KILL_AFTER))
    server.wait(timeout=10)
    assert server.returncode == -signal.SIGKILL
    assert len(acked) >= KILL_AFTER
    assert stopped < KEYSETS

    server = env.serve(port)  # restart on the same home and database
    try:
        finished = asyncio.run(work(stopped, None))
        assert finished == KEYSETS

        async def states() -> dict[str, str]:
            async with OperatorClient(url, admin, ca_pem) as op:
                return {d.delivery_id: d.state for d in await op.list_deliveries()}

        recorded = asyncio.run(states())
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)
    for delivery_id in acked:
        assert recorded[delivery_id] == "acked"
    assert set(recorded.values()) <= {"acked", "sent", "failed"}
    with open_home(env.home) as home:
        head = Broker.from_home(home).verify_log(full=True)
    assert head.tree_size > 2 * len(acked)
