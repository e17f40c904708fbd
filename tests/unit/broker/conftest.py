"""A broker on a fresh home (SQLite and PostgreSQL), a settable clock, and principals that enrol."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

# The suite runs with --import-mode=importlib; the test modules share helpers from broker_kit.
sys.path.insert(0, str(Path(__file__).parent))

from broker_kit import Clock, World

from keybroker.broker import Broker
from keybroker.broker.home import init_home

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def world(tmp_path: Path, store_url: str, clock: Clock) -> Iterator[World]:
    home = init_home(tmp_path / "home", db_url=store_url, clock=clock)
    try:
        yield World(home=home, broker=Broker.from_home(home), clock=clock)
    finally:
        home.close()


@pytest.fixture
def minute() -> timedelta:
    return timedelta(minutes=1)
