"""The client tests drive the same in-process broker as the API tests (see ../api/api_kit.py)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "api"))

from api_kit import Clock, Env, make_env

from keybroker.broker.home import init_home

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
async def env(tmp_path: Path, sqlite_url: str, clock: Clock) -> AsyncIterator[Env]:
    home = init_home(tmp_path / "home", db_url=sqlite_url, clock=clock)
    made = make_env(home, clock, tmp_path)
    try:
        yield made
    finally:
        await made.aclose()
        home.close()
