"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
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
