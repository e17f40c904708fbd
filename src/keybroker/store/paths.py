"""Where a keybroker home is, without importing the database layer (the CLI's start-up
path uses this; :mod:`keybroker.store.engine` re-exports it)."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    """``$KEYBROKER_HOME``, or ``./.keybroker``."""
    return Path(os.environ.get("KEYBROKER_HOME", ".keybroker"))
