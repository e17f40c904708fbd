"""Helpers to run keybroker as real processes in end-to-end tests."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

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

    def serve(self, port: int, *extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [*KB, "serve", "--port", str(port), "--log-level", "warning", *extra],
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
