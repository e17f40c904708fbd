"""`keybroker pair controller` refuses an ambiguous or missing identity source before it
reads a keyring or touches the network."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from keybroker.cli.main import app


@pytest.mark.parametrize(
    "identity",
    [
        [],  # neither
        ["--code", "keybroker-pair:V:1;;", "--from-inventory", "SN-1"],  # both
    ],
)
def test_controller_needs_exactly_one_identity_source(tmp_path: Path, identity: list[str]) -> None:
    root = tmp_path / "root.pem"
    root.write_text("not read before the arguments are checked")
    result = CliRunner().invoke(
        app,
        [
            "pair",
            "controller",
            "--connect",
            "127.0.0.1:9",
            "--trust-root",
            str(root),
            "--keyring",
            str(tmp_path / "none.keyring"),
            "--keyset",
            "pairing/home",
            *identity,
        ],
        env={"KEYBROKER_KEYRING_PASSPHRASE": "x" * 12},
    )
    assert result.exit_code == 2, result.output
    assert "exactly one of --code and --from-inventory" in result.output
