"""Helpers every ``bench/<flow>.py`` shares: the machine, PostgreSQL reachability, failures."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import sqlalchemy as sa

from keybroker.store.engine import normalise_url


class Broken(Exception):
    """A cross-check failed: the thing measured does not do what it should."""


def pg_admin(pg_url: str) -> sa.Engine:
    return sa.create_engine(
        normalise_url(pg_url), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )


def pg_unreachable(pg_url: str) -> str | None:
    """None if PostgreSQL answers at ``pg_url``, else why not."""
    try:
        engine = pg_admin(pg_url)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return platform.processor() or "unknown"
    return platform.processor() or "unknown"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"
