"""Many rows' updates in one statement on PostgreSQL.

A batch that updates N rows the way ``executemany`` does (each row: find it by its
key columns, set some columns) costs PostgreSQL N statement executions, and this
process SQLAlchemy's and psycopg's per-row work for each. :class:`BulkUpdate` sends
the N rows as one array per column and runs one statement (measured, 200 rows of a
compare-and-set update with a timestamp: 22 → 15 µs per row, this process's CPU
19 → 10 µs)::

    UPDATE t SET c1 = v.p1, ... FROM unnest(:p0, :p1, ...) AS v(p0, p1, ...)
    WHERE t.k = v.p0 AND ...

Built once with SQLAlchemy (the arrays are typed bind parameters, so each value goes
through its column's own bind processing, and the statement text is the same for
every batch: psycopg prepares it once). The row count is what the caller checks a
compare-and-set with, as with ``executemany``: a row whose key no longer matches is
not updated and not counted. On SQLite the same update runs as ``executemany`` of
the one-row statement (SQLite has no per-statement server round trip to save).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

Params = Mapping[str, Any]


@dataclass(frozen=True)
class BulkUpdate:
    """One ``UPDATE`` applied to many rows, each given as a mapping of parameter names."""

    #: The one-row statement (``executemany`` on SQLite).
    per_row: sa.Update
    #: The same update over arrays, one per parameter (PostgreSQL).
    arrays: sa.Update
    #: The parameter names every row must give.
    names: tuple[str, ...]

    def run(self, conn: Connection, rows: Sequence[Params]) -> int:
        """Apply the update for each of ``rows``; return how many rows it changed."""
        if not rows:
            return 0
        if conn.dialect.name != "postgresql":
            # SQLite's driver counts the rows of every execution of an executemany.
            return int(conn.execute(self.per_row, list(rows)).rowcount)
        columns = {name: [row[name] for row in rows] for name in self.names}
        return int(conn.execute(self.arrays, columns).rowcount)


def bulk_update(
    table: sa.Table,
    *,
    match: Mapping[str, str],
    assign: Mapping[str, str],
    computed: Mapping[str, sa.ColumnElement[Any]] | None = None,
) -> BulkUpdate:
    """An update of ``table`` that finds each row by ``match`` (column → parameter name)
    and sets ``assign`` (column → parameter name) and ``computed`` (column → an SQL
    expression over ``table`` alone, e.g. ``table.c.seq + 1``)."""
    params = {**{p: c for c, p in match.items()}, **{p: c for c, p in assign.items()}}
    if len(params) != len(match) + len(assign):
        raise ValueError("a parameter name is used twice")
    names = tuple(params)
    computed = dict(computed or {})

    per_row = (
        table.update()
        .where(*(table.c[col] == sa.bindparam(p) for col, p in match.items()))
        .values({col: sa.bindparam(p) for col, p in assign.items()} | computed)
    )
    arrays = [sa.bindparam(p, type_=postgresql.ARRAY(table.c[params[p]].type)) for p in names]
    rows = sa.func.unnest(*arrays).table_valued(*names).render_derived(name="v")
    bulk = (
        table.update()
        .where(*(table.c[col] == rows.c[p] for col, p in match.items()))
        .values({col: rows.c[p] for col, p in assign.items()} | computed)
    )
    return BulkUpdate(per_row=per_row, arrays=bulk, names=names)


__all__ = ["BulkUpdate", "bulk_update"]
