"""Two API processes on one database: nothing either keeps in memory matters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from api_kit import URL, Clock, Env, make_env, problem

from keybroker.broker.home import open_home
from keybroker.client import PrincipalClient


@pytest.fixture
async def replica(env: Env, tmp_path: Path, clock: Clock) -> AsyncIterator[Env]:
    home = open_home(env.home.config.home, clock=clock)
    other = make_env(home, clock, tmp_path)
    try:
        yield other
    finally:
        await other.aclose()
        home.close()


async def test_replicas_share_credentials_nonces_and_deliveries(env: Env, replica: Env) -> None:
    fra1 = await env.enrolled("site/fra1")
    # A's admin token works on B.
    on_b = httpx.AsyncClient(transport=replica.transport, base_url=URL)
    replica.clients.append(on_b)
    assert (await on_b.get("/v1/keysets", headers=env.admin_headers())).status_code == 200

    # A request accepted by A is a replay on B.
    request = env.http().build_request("GET", f"{URL}/v1/deliveries")
    fra1._sign(request)
    assert (await env.http().send(request)).status_code == 200
    problem(await on_b.send(request), 401, "authentication/replayed")

    # A principal waiting on B gets what an operator delivered through A (found by polling
    # the database: B's process was never told).
    via_b = PrincipalClient.open(
        env.tmp / "site_fra1.keyring",
        kek=fra1._source._kek,
        transport=replica.transport,
        clock=env.clock,
    )
    replica.clients.append(via_b)
    op = env.operator()
    await op.create_keyset("k", "AES256_GCM")
    await op.grant("site/fra1", "k", "hold")
    waiting = asyncio.create_task(via_b.fetch_deliveries(wait=30))
    await asyncio.sleep(0.1)
    sent = await op.deliver("k", 1, "site/fra1")
    (delivery,) = await asyncio.wait_for(waiting, timeout=10)
    assert delivery.delivery_id == sent.delivery_id
    via_b.open_delivery(delivery)
    assert (await via_b.ack(delivery)).state == "acked"
    assert (await op.show_delivery(sent.delivery_id)).state == "acked"
