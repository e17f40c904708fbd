"""Alembic environment: always run on the connection keybroker hands in."""

from __future__ import annotations

from alembic import context

from keybroker.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
context.run_migrations()
