"""Helpers every ``bench/<flow>.py`` shares: the machine, PostgreSQL reachability, failures."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Figure:
    """One benchmark figure and the ``BENCH`` line it prints (DESIGN.md §6)."""

    metric: str
    value: float
    unit: str
    decimals: int
    #: (op, number) or None for an informational figure (printed as goal=>=0).
    goal: tuple[str, float] | None
    how: str

    @property
    def shown(self) -> str:
        return f"{self.value:,.{self.decimals}f}"

    @property
    def goal_text(self) -> str:
        if self.goal is None:
            return ">=0"
        op, number = self.goal
        return f"{op}{number:g}"

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        op, number = self.goal
        return self.value >= number if op == ">=" else self.value <= number

    def bench_line(self, flow: str) -> str:
        return (
            f"BENCH {flow}.{self.metric} value={self.value:.{self.decimals}f} "
            f"unit={self.unit} goal={self.goal_text}"
        )
