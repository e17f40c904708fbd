"""Ending outstanding deliveries in bulk, for the operations that make them moot.

A ``sent`` delivery stops being deliverable when its recipient is revoked or
re-keyed, its hold grant is revoked, or its key version is disabled or
destroyed. Those operations call :func:`fail_sent` in their own transaction,
so no ``sent`` delivery ever outlives what allowed it; :func:`expire_sent`
does the same for deliveries past their deadline.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from keybroker.broker.events import DeliveryExpired, DeliveryFailed, Event, to_ms
from keybroker.store.schema import deliveries, keysets, principals

SENT = "sent"


def _described(conn: Connection, ids: list[str]) -> list[Any]:
    if not ids:
        return []
    query = (
        sa.select(
            deliveries.c.id,
            deliveries.c.version,
            principals.c.kind,
            principals.c.name,
            keysets.c.name.label("keyset"),
        )
        .join(principals, principals.c.id == deliveries.c.principal_id)
        .join(keysets, keysets.c.id == deliveries.c.keyset_id)
        .where(deliveries.c.id.in_(ids))
        .order_by(deliveries.c.id)
    )
    return list(conn.execute(query))


def fail_sent(
    conn: Connection,
    now: datetime,
    reason: str,
    *,
    delivery_id: str | None = None,
    principal_id: str | None = None,
    keyset_id: str | None = None,
    version: int | None = None,
) -> list[Event]:
    """Mark every matching ``sent`` delivery ``failed``; return the events to log."""
    given = {
        "f_id": delivery_id,
        "f_principal": principal_id,
        "f_keyset": keyset_id,
        "f_version": version,
    }
    params: dict[str, object] = {k: v for k, v in given.items() if v is not None}
    statement = _fail_statement(frozenset(params))
    params.update(f_sent=SENT, f_at=now, f_reason=reason)
    ids = list(conn.execute(statement, params).scalars())
    return [
        DeliveryFailed(
            at_ms=to_ms(now),
            delivery_id=row.id,
            principal=f"{row.kind}/{row.name}",
            keyset=row.keyset,
            version=row.version,
            reason=reason,
        )
        for row in _described(conn, ids)
    ]


def fail_sent_versions(
    conn: Connection, now: datetime, reason: str, versions: Iterable[tuple[str, int]]
) -> list[Event]:
    """:func:`fail_sent` for every ``sent`` delivery of any of ``versions`` ((keyset row
    id, version) pairs), in one statement per 500 pairs."""
    wanted = sorted(set(versions))
    events: list[Event] = []
    for start in range(0, len(wanted), 500):
        part = wanted[start : start + 500]
        ids = list(
            conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.state == SENT,
                    sa.tuple_(deliveries.c.keyset_id, deliveries.c.version).in_(part),
                )
                .values(state="failed", completed_at=now, failure_reason=reason)
                .returning(deliveries.c.id)
            ).scalars()
        )
        events += [
            DeliveryFailed(
                at_ms=to_ms(now),
                delivery_id=row.id,
                principal=f"{row.kind}/{row.name}",
                keyset=row.keyset,
                version=row.version,
                reason=reason,
            )
            for row in _described(conn, ids)
        ]
    return events


_FILTERS: dict[str, Any] = {
    "f_id": deliveries.c.id,
    "f_principal": deliveries.c.principal_id,
    "f_keyset": deliveries.c.keyset_id,
    "f_version": deliveries.c.version,
}


@functools.cache
def _fail_statement(filters: frozenset[str]) -> Any:
    """The UPDATE of :func:`fail_sent` for one combination of filters, built once."""
    conditions = [deliveries.c.state == sa.bindparam("f_sent")]
    conditions += [_FILTERS[name] == sa.bindparam(name) for name in sorted(filters)]
    return (
        deliveries.update()
        .where(*conditions)
        .values(
            state="failed",
            completed_at=sa.bindparam("f_at"),
            failure_reason=sa.bindparam("f_reason"),
        )
        .returning(deliveries.c.id)
    )


def expire_sent(
    conn: Connection, now: datetime, *, delivery_ids: list[str] | None = None
) -> list[Event]:
    """Mark ``sent`` deliveries whose deadline has passed ``expired``; return the events."""
    conditions = [deliveries.c.state == SENT, deliveries.c.expires_at <= now]
    if delivery_ids is not None:
        conditions.append(deliveries.c.id.in_(delivery_ids))
    ids = list(
        conn.execute(
            deliveries.update()
            .where(*conditions)
            .values(state="expired", completed_at=now)
            .returning(deliveries.c.id)
        ).scalars()
    )
    return [
        DeliveryExpired(
            at_ms=to_ms(now),
            delivery_id=row.id,
            principal=f"{row.kind}/{row.name}",
            keyset=row.keyset,
            version=row.version,
        )
        for row in _described(conn, ids)
    ]
