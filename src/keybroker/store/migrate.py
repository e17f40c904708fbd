"""Run the Alembic migrations that ship inside the package (no alembic.ini needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config

if TYPE_CHECKING:
    from keybroker.store.engine import Store

MIGRATIONS = Path(__file__).parent / "migrations"

#: Advisory-lock name that keeps two replicas from migrating at once.
_MIGRATION_LOCK = "keybroker/store/migrate"


def alembic_config(store: Store) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["store"] = store
    return cfg


def upgrade(store: Store, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to call from several replicas at once."""
    cfg = alembic_config(store)
    with store.transaction() as conn:
        store.lock(conn, _MIGRATION_LOCK)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(store: Store, revision: str) -> None:
    cfg = alembic_config(store)
    with store.transaction() as conn:
        store.lock(conn, _MIGRATION_LOCK)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
