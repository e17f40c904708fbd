"""A broker on a fresh home (SQLite and PostgreSQL) with a clock the test moves."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keybroker.broker import Broker
from keybroker.broker.home import Home, init_home

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class Clock:
    """Returns ``now`` until a test moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class Bench:
    home: Home
    broker: Broker
    clock: Clock


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def rig(tmp_path: Path, store_url: str, clock: Clock) -> Iterator[Bench]:
    home = init_home(tmp_path / "home", db_url=store_url, clock=clock)
    try:
        yield Bench(home=home, broker=Broker.from_home(home), clock=clock)
    finally:
        home.close()
