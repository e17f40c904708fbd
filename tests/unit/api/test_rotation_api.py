"""``/v1/rotations`` over the API in-process, on SQLite and PostgreSQL: setup, start, status,
abort and retry; the background loop driving a rollout to the end with in-process agents;
refusals that change nothing; and the loop surviving failures and stopping cleanly."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from api_kit import Clock, Env, make_env, problem

from keybroker.api.rotation_loop import RotationLoop
from keybroker.api.rotation_schemas import LINK_STATES, ROLLOUT_STATES
from keybroker.broker.home import init_home
from keybroker.errors import ConfigurationError
from keybroker.flows.rotation import orchestrator as orchestrator_module
from keybroker.flows.rotation.orchestrator import StepReport
from keybroker.flows.rotation.protocol import LinkState
from keybroker.flows.rotation.simulation import SimulatedAgent
from keybroker.pki import PrincipalId

TOPOLOGY: dict[str, Any] = {
    "name": "core",
    "upstream": {"site": "up", "nodes": ["n0", "n1"]},
    "downstream": {"sites": ["s0", "s1", "s2"]},
    "links": [
        {"node": "n0", "site": "s0"},
        {"node": "n1", "site": "s1"},
        {"node": "n0", "site": "s2"},
    ],
}
LINKS = ["n0/s0", "n1/s1", "n0/s2"]
#: Quick enough for a test: no grace, short backoff; acks come within the timeout.
FAST = {"ack_timeout_ms": 10_000, "max_attempts": 2, "backoff_base_ms": 50, "grace_ms": 0}


@pytest.fixture
async def fast(tmp_path: Path, store_url: str, clock: Clock) -> AsyncIterator[Env]:
    """The API with its rollout loop stepping every 20 ms (once the lifespan runs)."""
    home = init_home(tmp_path / "home", db_url=store_url, clock=clock)
    made = make_env(home, clock, tmp_path, rotation_interval=0.02)
    try:
        yield made
    finally:
        await made.aclose()
        home.close()


class Agents:
    """A site or node agent per end, in process, acking against the same broker."""

    def __init__(self, env: Env) -> None:
        self.env = env
        ends = {f"node/{link['node']}" for link in TOPOLOGY["links"]} | {
            f"site/{link['site']}" for link in TOPOLOGY["links"]
        }
        self.by_id = {
            pid: SimulatedAgent(pid) for pid in (PrincipalId.parse(e) for e in sorted(ends))
        }
        for agent in self.by_id.values():
            agent.enrol(env.broker)

    def pump(self) -> None:
        broker = self.env.broker
        for agent in self.by_id.values():
            for envelope in agent.inbox(broker):
                broker.ack(envelope.delivery_id, agent.principal, agent.install(broker, envelope))
        for link in TOPOLOGY["links"]:
            keyset = f"rotation/core/{link['node']}/{link['site']}"
            for end in (f"node/{link['node']}", f"site/{link['site']}"):
                self.by_id[PrincipalId.parse(end)].sync(broker, keyset)

    def transmit(self, end: str, keyset: str) -> int | None:
        return self.by_id[PrincipalId.parse(end)].transmit_version(keyset)


async def _set_up(env: Env) -> Agents:
    agents = Agents(env)
    answer = await env.http().post(
        "/v1/rotations/setup",
        json={"topology": TOPOLOGY, "delivery_ttl_seconds": 600},
        headers=env.admin_headers(),
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"keysets_created": 3, "grants_created": 6, "deliveries": 6}
    agents.pump()
    return agents


async def _start(env: Env, **extra: Any) -> dict[str, Any]:
    body = {"topology": TOPOLOGY, "policy": FAST, **extra}
    answer = await env.http().post("/v1/rotations", json=body, headers=env.admin_headers())
    assert answer.status_code == 201, answer.text
    document: dict[str, Any] = answer.json()
    assert answer.headers["location"] == f"/v1/rotations/{document['rollout_id']}"
    return document


def test_the_wire_names_match_the_flow() -> None:
    assert set(LINK_STATES) == {s.value for s in LinkState}
    assert set(ROLLOUT_STATES) == {
        orchestrator_module.RUNNING,
        orchestrator_module.HALTED,
        orchestrator_module.ABORTED,
        orchestrator_module.COMPLETED,
    }


async def test_the_server_loop_drives_a_rollout_to_the_end(fast: Env) -> None:
    agents = await _set_up(fast)
    op = fast.operator()
    again = await op.setup_rotation(TOPOLOGY)
    assert (again.keysets_created, again.grants_created, again.deliveries) == (0, 0, 0)

    started = await _start(fast)
    assert started["state"] == "RUNNING" and started["total"] == 3
    assert started["counts"]["PENDING"] == 3 and set(started["counts"]) == set(LINK_STATES)
    assert [link["name"] for link in started["links"]] == LINKS
    assert all(link["version_in_use"] == 1 for link in started["links"])
    defaults = {"backoff_cap_ms": 60_000, "max_failed_percent": 100, "max_parallel": 0}
    assert started["policy"] == {**FAST, **defaults}
    rollout_id = started["rollout_id"]
    assert [r.rollout_id for r in await op.list_rollouts()] == [rollout_id]

    ctx = fast.app.state.keybroker
    woken = ctx.waker.current()
    async with fast.app.router.lifespan_context(fast.app):
        loop = fast.app.state.rotation_loop
        assert isinstance(loop, RotationLoop) and loop.running
        deadline = time.monotonic() + 30
        while True:
            agents.pump()
            status = await op.show_rollout(rollout_id)
            if status.finished or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert loop.steps > 0 and loop.failures == 0
    assert fast.app.state.rotation_loop is None and not loop.running

    assert status.state == "COMPLETED", status
    assert [link.state for link in status.links] == ["RETIRED_OLD"] * 3
    assert [(link.old_version, link.new_version, link.version_in_use) for link in status.links] == [
        (1, 2, 2)
    ] * 3
    assert woken.is_set()  # deliveries by the loop woke this process's long-polls
    agents.pump()
    for link in TOPOLOGY["links"]:
        keyset = f"rotation/core/{link['node']}/{link['site']}"
        assert agents.transmit(f"node/{link['node']}", keyset) == 2
        assert agents.transmit(f"site/{link['site']}", keyset) == 2


async def test_abort_keeps_old_keys_twice_is_409_and_retry_restarts(env: Env) -> None:
    await _set_up(env)
    http = env.http()
    admin = env.admin_headers()
    started = await _start(env, links=["n1/s1", "n0/s0"])
    rollout_id = started["rollout_id"]
    assert [link["name"] for link in started["links"]] == ["n1/s1", "n0/s0"]

    busy = await http.post("/v1/rotations", json={"topology": TOPOLOGY}, headers=admin)
    assert "in a rollout that has not finished" in problem(busy, 409, "conflict")["detail"]

    aborted = await http.post(f"/v1/rotations/{rollout_id}/abort", headers=admin)
    assert aborted.status_code == 200, aborted.text
    body = aborted.json()
    assert body["state"] == "ABORTED" and body["counts"]["ABORTED_KEEP_OLD"] == 2
    assert all(link["version_in_use"] == 1 for link in body["links"])
    problem(await http.post(f"/v1/rotations/{rollout_id}/abort", headers=admin), 409, "conflict")

    unknown = await http.post(
        f"/v1/rotations/{rollout_id}/retry", json={"links": ["n0/s2"]}, headers=admin
    )
    problem(unknown, 404, "not-found")
    one = await http.post(
        f"/v1/rotations/{rollout_id}/retry", json={"links": ["n0/s0"]}, headers=admin
    )
    assert one.status_code == 200, one.text
    assert one.json()["state"] == "RUNNING"
    states = {link["name"]: link["state"] for link in one.json()["links"]}
    assert states == {"n1/s1": "ABORTED_KEEP_OLD", "n0/s0": "PENDING"}
    rest = await env.operator().retry_rollout(rollout_id)
    assert {link.state for link in rest.links} == {"PENDING"}
    problem(await http.post(f"/v1/rotations/{rollout_id}/retry", headers=admin), 409, "conflict")


async def test_status_pages_and_filters_links(env: Env) -> None:
    await _set_up(env)
    rollout_id = (await _start(env))["rollout_id"]
    http = env.http()
    admin = env.admin_headers()

    page = (await http.get(f"/v1/rotations/{rollout_id}?limit=1&offset=1", headers=admin)).json()
    assert (page["total"], page["matched"], page["offset"]) == (3, 3, 1)
    assert [link["name"] for link in page["links"]] == ["n1/s1"]
    counts = (await http.get(f"/v1/rotations/{rollout_id}?limit=0", headers=admin)).json()
    assert counts["links"] == [] and counts["counts"]["PENDING"] == 3
    none = await http.get(
        f"/v1/rotations/{rollout_id}",
        params={"state": ["RETIRED_OLD", "FAILED_KEEP_OLD"]},
        headers=admin,
    )
    assert none.json()["matched"] == 0 and none.json()["total"] == 3
    problem(
        await http.get(f"/v1/rotations/{rollout_id}?state=DONE", headers=admin),
        422,
        "request/validation",
    )
    problem(
        await http.get(f"/v1/rotations/{rollout_id}?limit=10001", headers=admin),
        422,
        "request/validation",
    )
    everything = await env.operator().rollout_with_links(rollout_id, states=["PENDING"])
    assert [link.name for link in everything.links] == LINKS


async def test_bad_requests_are_refused_and_change_nothing(env: Env) -> None:
    Agents(env)
    http = env.http()
    admin = env.admin_headers()
    before = env.dump()
    log_size = env.log_size()

    stray = {**TOPOLOGY, "links": [*TOPOLOGY["links"], {"node": "n9", "site": "s0"}]}
    for path in ("/v1/rotations/setup", "/v1/rotations"):
        answer = await http.post(path, json={"topology": stray}, headers=admin)
        assert "'n9' is not in upstream.nodes" in problem(answer, 400, "protocol/decode")["detail"]
        extra_key = {**TOPOLOGY, "owner": "x"}
        problem(
            await http.post(path, json={"topology": extra_key}, headers=admin),
            400,
            "protocol/decode",
        )
        problem(
            await http.post(path, json={"topology": []}, headers=admin), 422, "request/validation"
        )
    unknown_link = await http.post(
        "/v1/rotations", json={"topology": TOPOLOGY, "links": ["n1/s0"]}, headers=admin
    )
    assert "no link 'n1/s0'" in problem(unknown_link, 400, "protocol/decode")["detail"]
    refused: list[dict[str, Any]] = [
        {"topology": TOPOLOGY, "links": ["n0/s0", "n0/s0"]},
        {"topology": TOPOLOGY, "links": []},
        {"topology": TOPOLOGY, "policy": {"ack_timeout_ms": 0}},
        {"topology": TOPOLOGY, "policy": {"max_attempts": 101}},
        {"topology": TOPOLOGY, "policy": {"max_failed_percent": -1}},
        {"topology": TOPOLOGY, "policy": {"backoff_base_ms": 5_000, "backoff_cap_ms": 1_000}},
        {"topology": TOPOLOGY, "policy": {"grace_seconds": 5}},
        {"topology": TOPOLOGY, "surprise": True},
    ]
    for body in refused:
        answer = await http.post("/v1/rotations", json=body, headers=admin)
        document = problem(answer, 422, "request/validation")
        assert document["errors"], body
    # Setting links up needs every end enrolled: checked before anything is made.
    lonely = {**TOPOLOGY, "downstream": {"sites": ["s0", "s1", "s2", "s3"]}}
    lonely["links"] = [*TOPOLOGY["links"], {"node": "n1", "site": "s3"}]
    answer = await http.post("/v1/rotations/setup", json={"topology": lonely}, headers=admin)
    assert "site/s3" in problem(answer, 409, "conflict")["detail"]
    # Starting before setup: the link keysets do not exist.
    answer = await http.post("/v1/rotations", json={"topology": TOPOLOGY}, headers=admin)
    assert "rotation setup" in problem(answer, 409, "conflict")["detail"]

    assert env.dump() == before
    assert env.log_size() == log_size


async def test_unknown_rollouts_are_404(env: Env) -> None:
    http = env.http()
    admin = env.admin_headers()
    missing = "7c2f9a56-0000-4000-8000-000000000000"
    problem(await http.get(f"/v1/rotations/{missing}", headers=admin), 404, "not-found")
    problem(await http.post(f"/v1/rotations/{missing}/abort", headers=admin), 404, "not-found")
    problem(await http.post(f"/v1/rotations/{missing}/retry", headers=admin), 404, "not-found")
    problem(await http.get("/v1/rotations/" + "x" * 37, headers=admin), 422, "request/validation")


async def test_rotations_are_for_operators_only(env: Env) -> None:
    await env.enrolled("site/s0")
    http = env.http()
    calls = [
        ("POST", "/v1/rotations/setup", {"topology": TOPOLOGY}),
        ("POST", "/v1/rotations", {"topology": TOPOLOGY}),
        ("GET", "/v1/rotations", None),
        ("GET", "/v1/rotations/some-id", None),
        ("POST", "/v1/rotations/some-id/abort", None),
        ("POST", "/v1/rotations/some-id/retry", None),
    ]
    before = env.dump()
    for headers in ({}, {"authorization": "Bearer kbadm_not-a-real-token"}):
        for method, path, body in calls:
            answer = await http.request(method, path, json=body, headers=headers)
            problem(answer, 401, "authentication")
    assert env.dump() == before


async def test_topologies_may_exceed_the_general_body_limit_for_operators_only(env: Env) -> None:
    sites = [f"s{i}" for i in range(2000)]
    big = {
        "name": "big",
        "upstream": {"site": "up", "nodes": ["n0"]},
        "downstream": {"sites": sites},
        "links": [{"node": "n0", "site": s} for s in sites],
    }
    http = env.http()
    body = {"topology": big}
    problem(await http.post("/v1/rotations/setup", json=body), 413, "request/too-large")
    bearer = {"authorization": "Bearer kbadm_not-a-real-token"}
    problem(
        await http.post("/v1/rotations/setup", json=body, headers=bearer), 413, "request/too-large"
    )
    # An operator's topology is read (and refused for what it says, not for its size).
    answer = await http.post("/v1/rotations/setup", json=body, headers=env.admin_headers())
    assert "not enrolled" in problem(answer, 409, "conflict")["detail"]
    # Everywhere else the general limit holds, for operators too.
    huge = {"name": "k", "template": "AES256_GCM", "pad": "x" * 70_000}
    problem(
        await http.post("/v1/keysets", json=huge, headers=env.admin_headers()),
        413,
        "request/too-large",
    )


# -- the loop itself ------------------------------------------------------------------------


class FlakyOrchestrator:
    """Fails twice (with a message that must not be logged), then delivers to one principal."""

    def __init__(self) -> None:
        self.calls = 0
        self.finished_steps = 0
        self.slow = threading.Event()

    def step(self) -> StepReport:
        self.calls += 1
        if self.calls <= 2:
            raise RuntimeError("password=hunter2 sealed=0xdeadbeef")
        if self.slow.is_set():
            time.sleep(0.3)
        self.finished_steps += 1
        return StepReport(steps=1, delivered_to={PrincipalId.parse("site/s0")})


async def test_the_loop_survives_failures_logs_no_detail_and_stops_cleanly(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="keybroker.api.rotation")
    ctx = env.app.state.keybroker
    woken = ctx.waker.current()
    fake = FlakyOrchestrator()
    loop = RotationLoop(ctx, 0.01, orchestrator=fake).start()  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while fake.finished_steps < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert loop.running and loop.failures == 2 and loop.steps >= 3
    assert woken.is_set()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError" in logged and "hunter2" not in logged and "deadbeef" not in logged

    fake.slow.set()
    loop.kick()
    await asyncio.sleep(0.05)  # a slow step is now in flight
    done = fake.finished_steps
    await loop.close()
    assert not loop.running
    assert fake.finished_steps == done + 1  # the step in flight finished before close returned
    await loop.close()  # twice is harmless


async def test_a_zero_interval_runs_no_loop(tmp_path: Path, sqlite_url: str, clock: Clock) -> None:
    home = init_home(tmp_path / "home", db_url=sqlite_url, clock=clock)
    try:
        env = make_env(home, clock, tmp_path, rotation_interval=0)
        async with env.app.router.lifespan_context(env.app):
            assert env.app.state.rotation_loop is None
        with pytest.raises(ConfigurationError):
            RotationLoop(env.app.state.keybroker, -1.0)
    finally:
        home.close()
