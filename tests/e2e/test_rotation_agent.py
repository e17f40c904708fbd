"""S10 with real processes: `keybroker serve`, one `keybroker agent` per site and node, and
`keybroker rotation traffic send|receive` on loopback, through a staged rotation.

The operator adds v2, delivers it to the site, waits for the site's ack, only then delivers
it to the node, promotes it and disables v1. Traffic flows throughout: the receiver counts
messages under both versions with nothing lost, the node's sender moves to v2, and both
agents forget v1 once the broker disabled it. The site agent is killed (SIGKILL) mid-way
and restarted: its installed keys survive and it picks up what was delivered meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from keybroker.cli.credentials import read_admin_token
from keybroker.client.keyring import KekSource, Keyring
from keybroker.client.operator import OperatorClient
from keybroker.flows.rotation.agent import durable_name
from keybroker.flows.rotation.traffic import zero_loss

from .conftest import database_for
from .processes import PASSPHRASE, Procs, free_port, read, until

LINK = "rotation/n1/s1"
NATS_URL = os.environ.get("KEYBROKER_TEST_NATS_URL", "nats://127.0.0.1:4222")


def _reachable(url: str) -> bool:
    import socket

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(
    ("backend", "bus"), [("sqlite", None), ("postgresql", None), ("sqlite", "nats")]
)
async def test_staged_rotation_with_agents_and_traffic(
    tmp_path: Path,
    procs: Procs,
    backend: str,
    bus: str | None,
    request: pytest.FixtureRequest,
    require: Callable[[str], None],
) -> None:
    env = procs.env
    if bus == "nats" and not _reachable(NATS_URL):
        require(f"NATS at {NATS_URL}")
    init = ["init"] if backend == "sqlite" else ["init", "--db", database_for(request, procs.close)]
    env.run(*init)
    port = free_port()
    topic = f"kb.wake{secrets.token_hex(4)}"
    bus_args = ["--bus", NATS_URL, "--wake-topic", topic] if bus else []
    procs.running["serve"] = env.serve(port, *bus_args)
    url = f"https://127.0.0.1:{port}"
    ca = env.home / "ca.pem"
    for name in ("site/s1", "node/n1"):
        token = env.run("principal", "token", name).stdout.strip().splitlines()[-1]
        keyring = f"{name.split('/')[1]}.keyring"
        env.run(
            "enroll", name, "--url", url, "--ca", str(ca), "--token", token, "--keyring", keyring
        )
    env.run("keyset", "create", LINK, "--template", "AES256_GCM")
    for name in ("site/s1", "node/n1"):
        env.run("grant", "add", name, LINK)
        env.run("delivery", "create", LINK, name)  # v1, the primary

    def agent(short: str) -> None:
        procs.start(
            f"agent-{short}", "agent", "--keyring", f"{short}.keyring", "--sync-interval", "0.5",
            "--wait", "10", "--status-file", f"{short}.status.json", *bus_args,
        )  # fmt: skip

    def installed(short: str) -> list[int] | None:
        got: list[int] | None = (
            read(tmp_path / f"{short}.status.json").get("installed", {}).get(LINK)
        )
        return got

    agent("s1")
    agent("n1")
    await until(lambda: installed("s1") == [1] and installed("n1") == [1], "v1 installed", procs)

    traffic_port = free_port()
    procs.start(
        "receive", "rotation", "traffic", "receive", "--keyring", "s1.keyring",
        "--keyset", LINK, "--listen", f"127.0.0.1:{traffic_port}", "--stats", "receive.json",
    )  # fmt: skip
    await until(lambda: read(tmp_path / "receive.json").get("listen"), "the receiver", procs)
    procs.start(
        "send", "rotation", "traffic", "send", "--keyring", "n1.keyring", "--keyset", LINK,
        "--connect", f"127.0.0.1:{traffic_port}", "--rate", "100", "--stats", "send.json",
    )  # fmt: skip
    received = lambda n: read(tmp_path / "receive.json").get("received", 0) >= n  # noqa: E731
    await until(lambda: received(50), "traffic under v1", procs)

    ca_pem = ca.read_bytes()
    async with OperatorClient(url, read_admin_token(env.home), ca_pem) as op:

        async def acked(delivery_id: str) -> bool:
            return (await op.show_delivery(delivery_id)).state == "acked"

        await op.rotate_keyset(LINK)
        # The site agent dies hard; v2 is delivered while it is down.
        procs.kill("agent-s1")
        to_site = await op.deliver(LINK, 2, "site/s1")
        await asyncio.sleep(1.0)
        assert not await acked(to_site.delivery_id)
        agent("s1")
        await until(lambda: acked(to_site.delivery_id), "the site's ack of v2", procs)
        await until(lambda: installed("s1") == [1, 2], "v1 surviving, v2 installed", procs)
        # Only now is the node given v2; until then it sends under v1.
        assert installed("n1") == [1]
        assert read(tmp_path / "send.json")["current_version"] == 1
        to_node = await op.deliver(LINK, 2, "node/n1")
        await until(lambda: acked(to_node.delivery_id), "the node's ack of v2", procs)
        await until(lambda: installed("n1") == [1, 2], "v2 installed at the node", procs)
        await asyncio.sleep(1.0)  # two syncs: installed is not transmitting
        assert read(tmp_path / "send.json")["current_version"] == 1
        # Both ends hold v2: the broker promotes it and the node transmits under it.
        await op.promote_version(LINK, 2)
        await until(
            lambda: read(tmp_path / "send.json").get("current_version") == 2,
            "the sender moving to v2",
            procs,
        )
        await until(
            lambda: read(tmp_path / "receive.json").get("by_version", {}).get("2", 0) >= 50,
            "traffic under v2",
            procs,
        )
        await op.disable_version(LINK, 1)
        await until(lambda: installed("s1") == [2] and installed("n1") == [2], "v1 retired", procs)
        await asyncio.sleep(1.0)  # traffic goes on after the retirement, under v2

    assert procs.terminate("send") == 0
    sent = read(tmp_path / "send.json")
    assert sent["done"]
    await until(lambda: received(sent["sent"]), "the last messages", procs, timeout=20)
    assert procs.terminate("receive") == 0
    got = read(tmp_path / "receive.json")
    assert got["done"]
    for short in ("s1", "n1"):
        assert procs.terminate(f"agent-{short}") == 0, procs.log(f"agent-{short}")

    assert got["failed"] == 0 and got["gaps"] == 0 and got["received"] == sent["sent"], (got, sent)
    assert zero_loss(sent, got)
    assert got["by_version"]["1"] > 0 and got["by_version"]["2"] > 0
    assert got["by_version"] == sent["sent_by_version"]
    assert sent["current_version"] == 2
    for short in ("s1", "n1"):
        status = read(tmp_path / f"{short}.status.json")
        assert status["installed"] == {LINK: [2]}
        keyring = Keyring.load(tmp_path / f"{short}.keyring", KekSource(passphrase=PASSPHRASE))
        assert [v.version for v in keyring.received[LINK].versions] == [2]
    site_log = procs.log("agent-s1")
    assert f"installed {LINK} v2" in site_log and f"retired {LINK} v1" in site_log
    assert oct((tmp_path / "s1.keyring").stat().st_mode & 0o777) == "0o600"

    if bus:
        await _delete_durables(tmp_path)


async def _delete_durables(tmp_path: Path) -> None:
    from keybroker.bus.natsbus import NatsBus

    probe = await NatsBus.connect(NATS_URL)
    try:
        for short in ("s1", "n1"):
            keyring = Keyring.load(tmp_path / f"{short}.keyring", KekSource(passphrase=PASSPHRASE))
            name = durable_name(keyring.certificate_pem)
            info = await probe._js.consumer_info(probe.stream, name)  # it was durable
            assert info.config.durable_name == name
            with contextlib.suppress(Exception):
                await probe._js.delete_consumer(probe.stream, name)
    finally:
        await probe.close()
