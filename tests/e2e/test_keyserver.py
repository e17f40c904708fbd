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
from collections.abc import AsyncIterator, Mapping
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

KEYSERVER = [sys.executable, "-m", "keybroker.flows.keyless.keyserver_cli"]
READY = re.compile(r"listening on 127\.0\.0\.1:(\d+)(?: metrics on 127\.0\.0\.1:(\d+))?")


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
        metrics = f"http://127.0.0.1:{ready.group(2)}" if ready.group(2) else ""
        yield KeyServerProcess(process, ("127.0.0.1", int(ready.group(1))), metrics, log)
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
        sent = {}
        for index in range(128):
            op = (Op.RSA_SIGN_SHA256, Op.RSA_PSS_SIGN_SHA384)[index % 2]
            payload = payload_for(op, keys["rsa"])
            sent[edge1.send(op, ski(keys["rsa"]), payload)] = (op, payload)
        first = await edge1.receive(1)
        server.process.send_signal(signal.SIGTERM)
        responses = list(first)
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            responses += await edge1.receive(len(sent) - len(first), timeout=20)
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
