"""One PKI world per test session: keys are generated once (RSA especially is slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The suite runs with --import-mode=importlib, which leaves sys.path alone; the test
# modules here share raw-certificate builders from the sibling module pki_builders.
sys.path.insert(0, str(Path(__file__).parent))

from pki_builders import World, build_world


@pytest.fixture(scope="session")
def world() -> World:
    return build_world()
