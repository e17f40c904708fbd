"""The operator credential that ``keybroker init`` leaves in the home for local CLI use."""

from __future__ import annotations

import os
from pathlib import Path

from keybroker.api.admin import create_admin_credential
from keybroker.broker.home import Home

ADMIN_TOKEN_FILENAME = "admin.token"  # noqa: S105 - a file name


def write_admin_token(home: Home) -> Path:
    """Create an admin credential and store the token in ``<home>/admin.token`` (0600).

    Only its hash is in the database; this file is the one copy of the token.
    """
    token = create_admin_credential(home.store, now=home.clock())
    path = home.config.home / ADMIN_TOKEN_FILENAME
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return path


def read_admin_token(home_dir: Path) -> str:
    return (home_dir / ADMIN_TOKEN_FILENAME).read_text().strip()
