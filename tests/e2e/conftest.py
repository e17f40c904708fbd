"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .processes import Env, Procs


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    made = Procs(Env(tmp_path / "home", tmp_path))
    try:
        yield made
    finally:
        made.close()


def database_for(request: pytest.FixtureRequest, stop: Callable[[], None]) -> str:
    """The URL of this test's fresh PostgreSQL schema, with ``stop`` (what ends the test's
    broker and agent processes) run before the schema is dropped.

    Requested inside a test, the schema fixture is set up after the process fixtures, so
    it would be torn down before them (teardown is last in, first out), and dropping a
    schema under a running broker can deadlock with the broker's own transactions (seen
    once in CI as an error at teardown). A finalizer added after the request runs first.
    """
    url: str = request.getfixturevalue("pg_url")
    request.addfinalizer(stop)
    return url
