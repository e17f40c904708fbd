from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from keybroker.cli.main import app
from keybroker.errors import KeyStateError

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    target = tmp_path / "home"
    result = runner.invoke(app, ["init", "--home", str(target)])
    assert result.exit_code == 0, result.output
    return target


def kb(home: Path, *args: str) -> str:
    result = runner.invoke(app, [*args, "--home", str(home)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{args}: {result.output} {result.exception!r}"
    return result.output


def test_keyset_lifecycle_through_the_cli(home: Path) -> None:
    assert "version 1 (HMAC_SHA256) is primary" in kb(
        home, "keyset", "create", "links/a", "--template", "HMAC_SHA256"
    )
    assert "version 2 added, pending" in kb(home, "keyset", "rotate", "links/a")
    assert "version 2 is primary" in kb(home, "keyset", "promote", "links/a", "2")
    assert "version 1 is disabled" in kb(home, "keyset", "disable", "links/a", "1")
    assert "version 1 is destroyed" in kb(home, "keyset", "destroy", "links/a", "1")
    shown = kb(home, "keyset", "show", "links/a")
    assert "destroyed" in shown and "primary" in shown
    assert "links/a" in kb(home, "keyset", "list")


def test_forbidden_transition_is_a_clear_error(home: Path) -> None:
    kb(home, "keyset", "create", "k")
    result = runner.invoke(app, ["keyset", "destroy", "k", "1", "--home", str(home)])
    assert result.exit_code != 0
    assert isinstance(result.exception, KeyStateError)


def test_token_is_printed_once_and_not_stored(home: Path) -> None:
    output = kb(home, "principal", "token", "site/fra1", "--ttl", "15m")
    token = output.strip().splitlines()[-1]
    assert len(token) >= 40
    blob = b"".join(p.read_bytes() for p in home.glob("keybroker.db*"))
    assert token.encode() not in blob


def test_bad_duration_is_refused(home: Path) -> None:
    result = runner.invoke(
        app, ["principal", "token", "site/x", "--ttl", "soon", "--home", str(home)]
    )
    assert result.exit_code == 2
    assert "not a duration" in result.output


def test_log_verify_remembers_the_last_head(home: Path) -> None:
    first = kb(home, "log", "verify")
    assert "log ok" in first and "consistent" not in first
    kb(home, "keyset", "create", "k2")
    second = kb(home, "log", "verify")
    assert "consistent with size" in second
    assert (home / "log-head.seen").exists()
