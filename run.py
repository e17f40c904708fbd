#!/usr/bin/env python3
"""Bootstrap and run keybroker from a fresh checkout with nothing but Python 3.11+.

    python3 run.py demo     # keybroker demo on the embedded default (SQLite, file root key)
    python3 run.py test     # lint, type-check and the whole test suite

Each command creates ``.venv`` next to this file on first use and installs the
project into it (again whenever pyproject.toml changes). Extra arguments are
passed on: ``python3 run.py test -k log``, ``python3 run.py keybroker --help``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("KEYBROKER_VENV", ROOT / ".venv"))
BIN = VENV / "bin"


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, check=False)  # noqa: S603
    if result.returncode != 0:
        sys.exit(result.returncode)


def ensure_venv(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - run.py is what an old Python meets first
        sys.exit(f"keybroker needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not (BIN / "python").exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".stamp-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    _run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    target = f".[{extras}]" if extras else "."
    _run(BIN / "python", "-m", "pip", "install", "--quiet", "-e", target)
    stamp.write_text(digest)


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    what, rest = argv[0], argv[1:]
    if what == "demo":
        ensure_venv("")
        _run(BIN / "keybroker", "demo", *rest)
    elif what == "test":
        ensure_venv("dev")
        _run(BIN / "ruff", "check", "src", "tests", "bench")
        _run(BIN / "ruff", "format", "--check", "src", "tests", "bench")
        _run(BIN / "mypy", "src")
        workers = os.environ.get("KEYBROKER_TEST_WORKERS", "2")
        _run(BIN / "pytest", "-n", workers, *rest)
    elif what == "keybroker":
        ensure_venv("dev")
        _run(BIN / "keybroker", *rest)
    else:
        sys.exit(f"unknown command {what!r}; try: demo, test, keybroker")


if __name__ == "__main__":
    main(sys.argv[1:])
