"""The broker as people run it: `keybroker init`, `serve` (one or two replicas), principals
enrolling and receiving through the CLI over real HTTPS, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

KB = [sys.executable, "-m", "keybroker.cli.main"]
PASSPHRASE = "correct-horse-battery-staple"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Env:
    def __init__(self, home: Path, workdir: Path) -> None:
        self.home = home
        self.workdir = workdir
        self.env = {
            **os.environ,
            "KEYBROKER_HOME": str(home),
            "KEYBROKER_KEYRING_PASSPHRASE": PASSPHRASE,
            "COLUMNS": "200",
        }

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*KB, *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if ok:
            assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
        return result

    def serve(self, port: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [*KB, "serve", "--port", str(port), "--log-level", "warning"],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        ctx = ssl.create_default_context(cafile=str(self.home / "ca.pem"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
                ):
                    return proc
            except OSError:
                time.sleep(0.2)
        proc.kill()
        raise AssertionError("keybroker serve did not come up")


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
        init += ["--db", request.getfixturevalue("pg_url")]
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
    for keyring in tmp_path.glob("*.keyring"):
        assert oct(keyring.stat().st_mode & 0o777) == "0o600"
