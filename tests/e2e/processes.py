"""Helpers to run keybroker as real processes in end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


class Procs:
    """Long-running processes of one test, their stderr kept in files, all ended at teardown."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.env.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [*KB, *args], cwd=self.env.workdir, env=self.env.env, stdout=log, stderr=log
        )
        log.close()
        self.running[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.env.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def terminate(self, name: str, timeout: float = 20) -> int:
        proc = self.running.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"{name} ignored SIGTERM:\n{self.log(name)}") from None

    def kill(self, name: str) -> None:
        proc = self.running.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self) -> None:
        for proc in self.running.values():
            proc.kill()
        for proc in self.running.values():
            proc.wait(timeout=10)


def read(path: Path) -> dict[str, Any]:
    try:
        document: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return document


async def until(check: Callable[[], Any], what: str, procs: Procs, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        for name, proc in procs.running.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited while waiting for {what}:\n{procs.log(name)}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{procs.log(n)}" for n in procs.running)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        await asyncio.sleep(0.1)
