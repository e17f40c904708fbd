"""The CLI as a user runs it: real processes, a real home directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

KEYBROKER = [sys.executable, "-m", "keybroker.cli.main"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KEYBROKER, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {}), "COLUMNS": "200"},
        check=False,
    )


def test_demo_runs_every_stage() -> None:
    result = _run("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in (
        "init",
        "keyset lifecycle",
        "identity certificate",
        "transparency log",
        "broker service",
        "enrolment",
        "delivery and ack",
        "log over the API",
        "staged rotation",
        "keyless TLS",
        "push login",
        "device pairing",
    ):
        assert stage in result.stdout
    # The result column; "FAILED_KEEP_OLD" in what the rotation stage proved is fine.
    assert not re.search(r"│\s*FAILED\s*│", result.stdout)


def test_init_creates_a_home_and_refuses_twice(tmp_path: Path) -> None:
    home = tmp_path / "kb"
    first = _run("init", "--home", str(home))
    assert first.returncode == 0, first.stderr
    assert "initialised" in first.stdout
    assert (home / "root.key").exists()
    assert oct((home / "admin.token").stat().st_mode & 0o777) == "0o600"
    assert (home / "ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    second = _run("init", "--home", str(home))
    assert second.returncode == 2
    assert "already a keybroker home" in second.stderr


def test_init_with_home_from_environment(tmp_path: Path) -> None:
    home = tmp_path / "envhome"
    result = _run("init", env={"KEYBROKER_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    settings = (home / "keybroker.toml").read_text()
    assert 'root_key = "file:root.key"' in settings
    key_line = (home / "root.key").read_text().splitlines()[-1]
    assert key_line not in settings
