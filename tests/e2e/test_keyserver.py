"""The key server as a real process (``python -m keybroker.flows.keyless.keyserver_cli``).

It prints one ``listening on`` line, answers ``/healthz`` and ``/metrics``, signs for edges
over mutual TLS, reloads its grants on SIGHUP (and keeps them when the new table is bad),
stops gracefully on SIGTERM (status 0), and exits with status 2 on a bad configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.flows.keyless.pki_kit import (
    EdgeClient,
    Pki,
    check_result,
    grants_toml,
    make_pki,
    make_service_keys,
    payload_for,
    ski,
    write_keys,
)
from tests.flows.keyless.softhsm import USER_PIN, start_softhsm

from keybroker.flows.keyless.codes import ErrorCode, Op
from keybroker.flows.keyless.operations import PrivateKey
from keybroker.flows.keyless.pkcs11keys import import_private_key
from keybroker.flows.keyless.protocol import Response

KEYSERVER = [sys.executable, "-m", "keybroker.flows.keyless.keyserver_cli"]
READY = re.compile(
    r"listening on 127\.0\.0\.1:(\d+)(?: metrics on (127\.0\.0\.1:\d+(?:,127\.0\.0\.1:\d+)*))?"
)


@dataclasses.dataclass
class Setup:
    directory: Path
    pki: Pki
    keys: dict[str, PrivateKey]
    config: Path
    grants: Path


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    pki = make_pki(tmp_path / "pki")
    keys = make_service_keys()
    write_keys(tmp_path / "keys", keys)
    grants = tmp_path / "grants.toml"
    grants.write_text(grants_toml(keys, {"node/edge1": list(keys), "node/edge2": ["p256"]}))
    config = tmp_path / "keyserver.toml"
    # Paths relative to the config file's directory.
    config.write_text(
        'listen = "127.0.0.1:0"\n'
        'cert = "pki/server.crt"\n'
        'key = "pki/server.key"\n'
        'client-ca = "pki/keybroker-test-CA.pem"\n'
        'keys_dir = "keys"\n'
        'grants = "grants.toml"\n'
        "workers = 2\n"
        "metrics_port = 0\n"
    )
    return Setup(tmp_path, pki, keys, config, grants)


@dataclasses.dataclass
class KeyServerProcess:
    process: asyncio.subprocess.Process
    address: tuple[str, int]
    metrics_url: str
    log: Path
    #: Every process's metrics (one unless ``--processes``).
    metrics_urls: list[str] = dataclasses.field(default_factory=list)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.asynccontextmanager
async def keyserver(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[KeyServerProcess]:
    log = cwd / "keyserver.log"
    with log.open("ab") as sink:
        process = await asyncio.create_subprocess_exec(
            *KEYSERVER,
            *args,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=asyncio.subprocess.PIPE,
            stderr=sink,
        )
    try:
        assert process.stdout is not None
        try:
            line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        except TimeoutError:
            raise AssertionError(f"no ready line:\n{log.read_text()}") from None
        ready = READY.fullmatch(line.strip())
        assert ready, f"unexpected ready line {line!r}:\n{log.read_text()}"
        urls = [f"http://{where}" for where in (ready.group(2) or "").split(",") if where]
        yield KeyServerProcess(
            process, ("127.0.0.1", int(ready.group(1))), urls[0] if urls else "", log, urls
        )
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def metric(url: str, name: str, labels: dict[str, str]) -> float | None:
    async with httpx.AsyncClient() as http:
        text = (await http.get(url + "/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


async def admitted_so_far(url: str, ops: Sequence[Op]) -> tuple[float, float]:
    """(requests with one of ``ops`` answered ok plus key operations pending, pending)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(url + "/metrics")).text
    answered = pending = 0.0
    names = {op.name for op in ops}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "keyless_pending_requests":
                pending = sample.value
            elif (
                sample.name == "keyless_requests_total"
                and sample.labels.get("op") in names
                and sample.labels.get("result") == "ok"
            ):
                answered += sample.value
    return answered + pending, pending


async def wait_for_metric(url: str, name: str, labels: dict[str, str], value: float) -> None:
    async with asyncio.timeout(20):
        while await metric(url, name, labels) != value:
            await asyncio.sleep(0.05)


async def sign_ok(client: EdgeClient, key: PrivateKey, op: Op) -> None:
    payload = payload_for(op, key)
    response = await client.call(op, ski(key), payload)
    assert response.error_code is None, response
    check_result(op, key.public_key(), payload, response.payload)


async def test_serves_reloads_on_sighup_and_stops_gracefully_on_sigterm(setup: Setup) -> None:
    pki, keys = setup.pki, setup.keys
    async with keyserver("--config", str(setup.config), cwd=setup.directory) as server:
        async with httpx.AsyncClient() as http:
            health = await http.get(server.metrics_url + "/healthz")
        assert health.status_code == 200 and health.text.startswith("ok: 4 keys")

        edge1 = await EdgeClient.connect(server.address, pki.client_context(pki.edge1))
        edge2 = await EdgeClient.connect(server.address, pki.client_context(pki.edge2))
        await sign_ok(edge1, keys["p256"], Op.ECDSA_SIGN_SHA256)
        await sign_ok(edge1, keys["rsa"], Op.RSA_PSS_SIGN_SHA256)
        await sign_ok(edge1, keys["ed25519"], Op.ED25519_SIGN)
        rsa_payload = payload_for(Op.RSA_PSS_SIGN_SHA256, keys["rsa"])
        refused = await edge2.call(Op.RSA_PSS_SIGN_SHA256, ski(keys["rsa"]), rsa_payload)
        assert refused.error_code is ErrorCode.NOT_AUTHORIZED

        # SIGHUP: the new grants apply, on the connections already open.
        setup.grants.write_text(
            grants_toml(keys, {"node/edge1": list(keys), "node/edge2": ["p256", "rsa"]})
        )
        server.process.send_signal(signal.SIGHUP)
        await wait_for_metric(server.metrics_url, "keyless_reloads_total", {"result": "ok"}, 1)
        await sign_ok(edge2, keys["rsa"], Op.RSA_PSS_SIGN_SHA256)

        # A bad table is refused; the previous grants stay.
        setup.grants.write_text("[edges]\nnode/edge2 = oops\n")
        server.process.send_signal(signal.SIGHUP)
        await wait_for_metric(server.metrics_url, "keyless_reloads_total", {"result": "failed"}, 1)
        await sign_ok(edge2, keys["rsa"], Op.RSA_PSS_SIGN_SHA256)
        assert "reload refused" in server.log_text()
        await edge2.close()

        # SIGTERM with requests in flight: what was admitted is answered, then a clean stop.
        # SIGTERM goes once the server has read (admitted) every request and while most
        # are still being signed; a request still on the wire at SIGTERM would be left
        # unread, which is not what this checks.
        ops = (Op.RSA_SIGN_SHA256, Op.RSA_PSS_SIGN_SHA384)
        sent = {}
        for index in range(768):
            op = ops[index % 2]
            payload = payload_for(op, keys["rsa"])
            sent[edge1.send(op, ski(keys["rsa"]), payload)] = (op, payload)
        async with asyncio.timeout(20):
            while (admitted := await admitted_so_far(server.metrics_url, ops))[0] < len(sent):
                pass
        server.process.send_signal(signal.SIGTERM)
        assert admitted[1] > 0, "every request was answered before SIGTERM: nothing in flight"
        responses: list[Response] = []
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            responses += await edge1.receive(len(sent), timeout=20)
        assert sorted(r.id for r in responses) == sorted(sent)
        for response in responses:
            op, payload = sent[response.id]
            assert response.error_code is None, response
            check_result(op, keys["rsa"].public_key(), payload, response.payload)
        await edge1.close()
        assert await asyncio.wait_for(server.process.wait(), 20) == 0
        log = server.log_text()
        assert re.search(r"shutting down: waiting for \d+ key operations", log), log
        assert "key server stopped" in log and "unfinished" not in log
        assert "Traceback" not in log


def test_bad_configuration_exits_with_status_2(setup: Setup) -> None:
    setup.config.write_text(setup.config.read_text().replace('"keys"', '"no-such-dir"'))
    result = subprocess.run(
        [*KEYSERVER, "--config", str(setup.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "configuration error: keys_dir: cannot list" in result.stderr
    assert "listening" not in result.stdout


@pytest.mark.hsm
async def test_pkcs11_token_through_the_command(setup: Setup, tmp_path: Path) -> None:
    token = "ks-e2e"
    (tmp_path / "hsm").mkdir()
    hsm = start_softhsm(tmp_path / "hsm", (token,))
    import_private_key(hsm.module, token, USER_PIN, setup.keys["p256"])
    args = [
        *("--cert", str(setup.pki.server.cert), "--key", str(setup.pki.server.key)),
        *("--client-ca", str(setup.pki.ca.path), "--grants", str(setup.grants)),
        *("--pkcs11-module", hsm.module, "--pkcs11-token", token),
        *("--pkcs11-pin-env", "KS_TEST_PIN", "--listen", "127.0.0.1:0", "--workers", "1"),
    ]
    env = {"SOFTHSM2_CONF": str(hsm.conf)}
    no_pin = subprocess.run(
        [*KEYSERVER, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )
    assert no_pin.returncode == 2 and "pkcs11_pin_env: " in no_pin.stderr
    assert USER_PIN not in no_pin.stderr
    async with keyserver(
        *args, cwd=setup.directory, env={**env, "KS_TEST_PIN": USER_PIN}
    ) as server:
        client = await EdgeClient.connect(server.address, setup.pki.client_context(setup.pki.edge1))
        await sign_ok(client, setup.keys["p256"], Op.ECDSA_SIGN_SHA256)
        response = await client.call(Op.ED25519_SIGN, ski(setup.keys["ed25519"]), b"m")
        assert response.error_code is ErrorCode.KEY_NOT_FOUND  # granted, not in the token
        await client.close()
        server.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.process.wait(), 20) == 0
        assert USER_PIN not in server.log_text()


def children_of(pid: int) -> list[int]:
    """The key-server processes ``pid`` started (Linux ``/proc``; multiprocessing's
    resource tracker, also its child, is left out)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            command = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in command:
                found.append(int(child))
    return sorted(found)


async def test_processes_share_one_listener_reload_together_and_stop_together(
    setup: Setup,
) -> None:
    pki, keys = setup.pki, setup.keys
    setup.config.write_text(
        setup.config.read_text().replace("workers = 2\n", "workers = 1\nprocesses = 2\n")
    )
    async with keyserver("--config", str(setup.config), cwd=setup.directory) as server:
        assert len(server.metrics_urls) == 2, server.metrics_urls
        workers = children_of(server.process.pid)
        assert len(workers) == 2, workers
        for url in server.metrics_urls:
            async with httpx.AsyncClient() as http:
                health = await http.get(url + "/healthz")
            assert health.status_code == 200 and health.text.startswith("ok: 4 keys")

        # Connections go to the processes in turn: four edges, two each, all served.
        edges = [
            await EdgeClient.connect(server.address, pki.client_context(pki.edge1))
            for _ in range(3)
        ]
        edges.append(await EdgeClient.connect(server.address, pki.client_context(pki.edge2)))
        for edge in edges:
            await sign_ok(edge, keys["p256"], Op.ECDSA_SIGN_SHA256)
        for url in server.metrics_urls:
            await wait_for_metric(url, "keyless_connections", {}, 2)
        rsa_payload = payload_for(Op.RSA_PSS_SIGN_SHA256, keys["rsa"])
        refused = await edges[3].call(Op.RSA_PSS_SIGN_SHA256, ski(keys["rsa"]), rsa_payload)
        assert refused.error_code is ErrorCode.NOT_AUTHORIZED

        # SIGHUP to the supervisor reloads every process: edge2 may now use the RSA key,
        # on its open connection and on a new one (which lands in the other process).
        setup.grants.write_text(
            grants_toml(keys, {"node/edge1": list(keys), "node/edge2": ["p256", "rsa"]})
        )
        server.process.send_signal(signal.SIGHUP)
        for url in server.metrics_urls:
            await wait_for_metric(url, "keyless_reloads_total", {"result": "ok"}, 1)
        await sign_ok(edges[3], keys["rsa"], Op.RSA_PSS_SIGN_SHA256)
        another = await EdgeClient.connect(server.address, pki.client_context(pki.edge2))
        await sign_ok(another, keys["rsa"], Op.RSA_PSS_SIGN_SHA256)
        for edge in [*edges, another]:
            await edge.close()

        # SIGTERM: the supervisor stops every process and exits 0.
        server.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.process.wait(), 30) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid), pid
        log = server.log_text()
        assert log.count("key server stopped") == 2, log
        assert "Traceback" not in log


def _state(pid: int) -> str:
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return "gone"


async def test_a_process_that_dies_stops_the_key_server_with_status_1(setup: Setup) -> None:
    setup.config.write_text(
        setup.config.read_text().replace("workers = 2\n", "workers = 1\nprocesses = 2\n")
    )
    async with keyserver("--config", str(setup.config), cwd=setup.directory) as server:
        workers = children_of(server.process.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        assert await asyncio.wait_for(server.process.wait(), 30) == 1
        log = server.log_text()
        assert re.search(r"key-server process \d exited \(status -9\)", log), log
        assert "the other 1 were stopped" in log
        await asyncio.sleep(0.5)
        for pid in workers[1:]:
            assert _state(pid) in ("gone", "Z"), pid
