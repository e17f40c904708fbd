"""What the flows' ``keybroker demo`` stages share: their child processes.

Not a flow (flows do not import one another); each stage's module uses it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

#: The CLI, run by this interpreter.
KB: Final = [sys.executable, "-m", "keybroker.cli.main"]
#: Seconds a process gets to say it listens, and to stop after SIGTERM.
START_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 10.0
_LISTENING: Final = re.compile(r"^listening on 127\.0\.0\.1:(\d+)", re.MULTILINE)


class DemoProcesses:
    """The stage's child processes, output in ``<dir>/<name>.log``; :meth:`close` ends them all."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, stdin: bool = False) -> subprocess.Popen[bytes]:
        """Start ``keybroker ARGS``; with ``stdin``, its standard input is a pipe we write."""
        with open(self.directory / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(  # noqa: S603 - our interpreter, our arguments
                [*KB, *args],
                cwd=self.directory,
                env=self.env,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.running[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, name: str, pattern: str, what: str) -> re.Match[str]:
        """Wait until ``name``'s log matches ``pattern`` (a multi-line regex)."""
        compiled = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = compiled.search(self.log(name))
            if found:
                return found
            self.check(what)
            time.sleep(0.05)
        raise self.failure(name, f"no {what} within {START_TIMEOUT:.0f} s")

    def failure(self, name: str, what: str) -> RuntimeError:
        """An error naming ``what`` went wrong, ``name``'s last log line and where the logs are."""
        path = self.directory / f"{name}.log"
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        last = f" (last: {lines[-1].strip()[:160]!r})" if lines else ""
        return RuntimeError(f"{what}; see {path}{last} — kept with `keybroker demo --keep`")

    def check(self, waiting_for: str) -> None:
        """Raise if a process that should be running has exited."""
        for name, proc in self.running.items():
            if proc.poll() is not None:
                raise self.failure(
                    name, f"{name} exited with status {proc.returncode} waiting for {waiting_for}"
                )

    def stop(self, *names: str) -> None:
        """SIGTERM them all at once; each must exit cleanly (status 0) within the timeout."""
        procs = {name: self.running.pop(name) for name in names}
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        problems: list[RuntimeError] = []
        for name, proc in procs.items():
            try:
                status = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                problems.append(
                    self.failure(name, f"{name} ignored SIGTERM for {STOP_TIMEOUT:.0f} s")
                )
                continue
            if status != 0:
                problems.append(self.failure(name, f"{name} stopped with status {status}"))
        if problems:
            raise problems[0]

    def close(self) -> None:
        """End everything still running: SIGTERM, then SIGKILL whatever outlives a timeout."""
        for proc in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.running.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.running.clear()

    def listening(self, name: str) -> int:
        """The port process ``name`` says it listens on (its one ``listening on`` line)."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = (self.directory / f"{name}.log").read_text(errors="replace")
            found = _LISTENING.search(text)
            if found:
                return int(found.group(1))
            if self.running[name].poll() is not None:
                raise self.failure(name, f"{name} exited before it listened")
            time.sleep(0.05)
        raise self.failure(name, f"{name} did not listen within {START_TIMEOUT:.0f} s")
