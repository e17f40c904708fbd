"""The broker as people run it: `keybroker init`, `serve` (one or two replicas), principals
enrolling and receiving through the CLI over real HTTPS, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .conftest import database_for
from .processes import Env, free_port


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    _stop(started)


def _stop(started: list[subprocess.Popen[bytes]]) -> None:
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize(
    ("backend", "replicas"), [("sqlite", 1), ("postgresql", 1), ("postgresql", 2)]
)
def test_enrol_deliver_ack_refuse_verify(
    tmp_path: Path,
    backend: str,
    replicas: int,
    servers: list[subprocess.Popen[bytes]],
    request: pytest.FixtureRequest,
) -> None:
    env = Env(tmp_path / "home", tmp_path)
    init = ["init"]
    if backend == "postgresql":
        init += ["--db", database_for(request, lambda: _stop(servers))]
    env.run(*init)
    ports = [free_port() for _ in range(replicas)]
    for port in ports:
        servers.append(env.serve(port))
    urls = [f"https://127.0.0.1:{port}" for port in ports]

    tokens = {
        name: env.run("principal", "token", name).stdout.strip().splitlines()[-1]
        for name in ("site/a", "site/b")
    }
    for i, (name, token) in enumerate(tokens.items()):
        env.run(
            "enroll", name, "--url", urls[i % len(urls)], "--ca", str(env.home / "ca.pem"),
            "--token", token, "--keyring", f"{name.replace('/', '_')}.keyring",
        )  # fmt: skip
    reused = env.run(
        "enroll", "site/c", "--url", urls[0], "--ca", str(env.home / "ca.pem"),
        "--token", tokens["site/a"], "--keyring", "c.keyring", ok=False,
    )  # fmt: skip
    assert reused.returncode == 2
    assert "token" in reused.stderr

    env.run("keyset", "create", "links/a")
    env.run("grant", "add", "site/a", "links/a")
    env.run("delivery", "create", "links/a", "site/a")
    refused = env.run("delivery", "create", "links/a", "site/b", ok=False)
    assert refused.returncode == 2
    assert "no hold grant" in refused.stderr

    # The principal receives from the *last* replica: with two, not the one that enrolled it.
    got = env.run("receive", "--keyring", "site_a.keyring", "--wait", "10", "--url", urls[-1])
    assert "links/a v1: acked" in got.stdout
    nothing = env.run("receive", "--keyring", "site_b.keyring", "--url", urls[0])
    assert "no deliveries" in nothing.stdout

    listed = env.run("delivery", "list").stdout
    assert "acked" in listed and "site/b" not in listed
    first = env.run("log", "verify", "--full").stdout
    assert "log ok" in first
    env.run("keyset", "rotate", "links/a")
    second = env.run("log", "verify", "--full").stdout
    assert "consistent with size" in second
    # The same check over the API, like a CT monitor, pinning the log key on first use.
    remote = ["log", "verify", "--url", urls[0], "--ca", str(env.home / "ca.pem")]
    assert "log ok" in env.run(*remote).stdout
    assert (env.home / "log-monitor.key").exists()
    env.run("keyset", "rotate", "links/a")
    assert "consistent with size" in env.run(*remote).stdout
    other_key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    (env.home / "log-monitor.key").write_bytes(other_key)  # as if the broker changed its key
    forged = env.run(*remote, ok=False)
    assert forged.returncode == 2
    for keyring in tmp_path.glob("*.keyring"):
        assert oct(keyring.stat().st_mode & 0o777) == "0o600"
