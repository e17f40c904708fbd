"""Grants: principal P may ``use`` keyset K (ask the broker to operate) or ``hold`` it
(receive sealed copies).

Granting is idempotent: under a store lock on (principal, keyset, mode) an
active grant is looked up first and returned if there is one, so two replicas
granting at once still leave exactly one. Revoking a ``hold`` grant fails the
principal's outstanding deliveries of that keyset.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from keybroker.broker._context import BrokerContext, keyset_name, principal_id, record
from keybroker.broker._delivery_rows import fail_sent
from keybroker.broker.events import Event, GrantCreated, GrantRevoked, to_ms
from keybroker.broker.principals import ACTIVE, require_row
from keybroker.errors import AuthorizationError, DecodeError, NotFound, StoreError
from keybroker.pki import PrincipalId, PrincipalKind
from keybroker.store.schema import grants, keysets, principals


class GrantMode(StrEnum):
    USE = "use"
    HOLD = "hold"


@dataclass(frozen=True)
class GrantInfo:
    grant_id: str
    principal: PrincipalId
    keyset: str
    mode: GrantMode
    created_at: datetime
    revoked_at: datetime | None


def grant_mode(mode: GrantMode | str) -> GrantMode:
    try:
        return GrantMode(mode)
    except ValueError:
        raise DecodeError("grant mode is 'use' or 'hold'") from None


def keyset_id(conn: Connection, name: str) -> str:
    found: str | None = conn.execute(
        sa.select(keysets.c.id).where(keysets.c.name == name)
    ).scalar_one_or_none()
    if found is None:
        raise NotFound(f"no keyset {name!r}")
    return found


_SELECT = (
    sa.select(
        grants,
        principals.c.kind,
        principals.c.name.label("principal_name"),
        keysets.c.name.label("keyset_name"),
    )
    .join(principals, principals.c.id == grants.c.principal_id)
    .join(keysets, keysets.c.id == grants.c.keyset_id)
)


def _info(row: Any) -> GrantInfo:
    return GrantInfo(
        grant_id=row.id,
        principal=PrincipalId(PrincipalKind(row.kind), row.principal_name),
        keyset=row.keyset_name,
        mode=GrantMode(row.mode),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def active_grant(
    conn: Connection, principal_row_id: str, keyset_row_id: str, mode: GrantMode
) -> Any | None:
    return conn.execute(
        _SELECT.where(
            grants.c.principal_id == principal_row_id,
            grants.c.keyset_id == keyset_row_id,
            grants.c.mode == mode.value,
            grants.c.revoked_at.is_(None),
        )
        .order_by(grants.c.created_at, grants.c.id)
        .limit(1)
    ).one_or_none()


def grant(
    ctx: BrokerContext, principal: PrincipalId | str, keyset: str, mode: GrantMode | str
) -> GrantInfo:
    pid, name, how = principal_id(principal), keyset_name(keyset), grant_mode(mode)
    now = ctx.now()
    with ctx.store.transaction() as conn:
        record(ctx, conn, grant_many_in(ctx, conn, [(pid, name)], how, now=now))
        row = active_grant(conn, require_row(conn, pid).id, keyset_id(conn, name), how)
        if row is None:  # made or found just now, under the lock
            raise StoreError("the grant is not there after granting it")
        return _info(row)


def grant_many_in(
    ctx: BrokerContext,
    conn: Connection,
    pairs: Iterable[tuple[PrincipalId | str, str]],
    mode: GrantMode | str,
    *,
    now: datetime,
) -> list[Event]:
    """Grant ``mode`` on each (principal, keyset) of ``pairs`` inside the caller's
    transaction, in a few statements whatever their number. Under a store lock on each
    (principal, keyset, mode), taken in one go in key order: each principal must exist
    and be active and each keyset exist (the first failure raises, and the caller's
    transaction writes nothing); a grant is made only where there is no active one. The
    events of the grants made, for the caller to record."""
    how = grant_mode(mode)
    wanted = list(dict.fromkeys((principal_id(p), keyset_name(k)) for p, k in pairs))
    if not wanted:
        return []
    ctx.store.lock_many(conn, [f"grant/{pid}/{name}/{how.value}" for pid, name in wanted])
    people: dict[tuple[str, str], Any] = {}
    pids = sorted({(pid.kind.value, pid.name) for pid, _ in wanted})
    query = sa.select(principals.c.id, principals.c.kind, principals.c.name, principals.c.status)
    for start in range(0, len(pids), 500):
        part = pids[start : start + 500]
        people.update(
            ((row.kind, row.name), row)
            for row in conn.execute(
                query.where(sa.tuple_(principals.c.kind, principals.c.name).in_(part))
            )
        )
    names = sorted({name for _, name in wanted})
    ids: dict[str, str] = {}
    held: set[tuple[str, str]] = set()
    for start in range(0, len(names), 500):
        chunk = names[start : start + 500]
        found: dict[str, str] = {
            name: ident
            for name, ident in conn.execute(
                sa.select(keysets.c.name, keysets.c.id).where(keysets.c.name.in_(chunk))
            )
        }
        ids.update(found)
        held.update(
            (who, what)
            for who, what in conn.execute(
                sa.select(grants.c.principal_id, grants.c.keyset_id).where(
                    grants.c.keyset_id.in_(list(found.values())),
                    grants.c.mode == how.value,
                    grants.c.revoked_at.is_(None),
                )
            )
        )
    rows: list[dict[str, Any]] = []
    events: list[Event] = []
    for pid, name in wanted:
        who = people.get((pid.kind.value, pid.name))
        if who is None:
            raise NotFound(f"no principal {pid}")
        if who.status != ACTIVE:
            raise AuthorizationError(f"{pid} is {who.status}")
        what = ids.get(name)
        if what is None:
            raise NotFound(f"no keyset {name!r}")
        if (who.id, what) in held:
            continue
        held.add((who.id, what))
        new_id = ctx.new_id()
        rows.append(
            {
                "id": new_id,
                "principal_id": who.id,
                "keyset_id": what,
                "mode": how.value,
                "created_at": now,
                "revoked_at": None,
            }
        )
        events.append(
            GrantCreated(
                at_ms=to_ms(now), grant_id=new_id, principal=str(pid), keyset=name, mode=how.value
            )
        )
    if rows:
        conn.execute(grants.insert(), rows)
    return events


def revoke_grant(
    ctx: BrokerContext, principal: PrincipalId | str, keyset: str, mode: GrantMode | str
) -> GrantInfo:
    """End the active grant; :class:`NotFound` if there is none."""
    pid, name, how = principal_id(principal), keyset_name(keyset), grant_mode(mode)
    now = ctx.now()
    with ctx.store.transaction() as conn:
        ctx.store.lock(conn, f"grant/{pid}/{name}/{how.value}")
        who = require_row(conn, pid)
        what = keyset_id(conn, name)
        existing = active_grant(conn, who.id, what, how)
        if existing is None:
            raise NotFound(f"{pid} has no active {how.value} grant on {name!r}")
        conn.execute(grants.update().where(grants.c.id == existing.id).values(revoked_at=now))
        events: list[Event] = [
            GrantRevoked(
                at_ms=to_ms(now),
                grant_id=existing.id,
                principal=str(pid),
                keyset=name,
                mode=how.value,
            )
        ]
        if how is GrantMode.HOLD:
            events += fail_sent(
                conn, now, "hold grant revoked", principal_id=who.id, keyset_id=what
            )
        record(ctx, conn, events)
        return _info(conn.execute(_SELECT.where(grants.c.id == existing.id)).one())


def list_grants(
    ctx: BrokerContext,
    *,
    principal: PrincipalId | str | None = None,
    keyset: str | None = None,
    include_revoked: bool = False,
) -> list[GrantInfo]:
    query = _SELECT.order_by(grants.c.created_at, grants.c.id)
    if principal is not None:
        pid = principal_id(principal)
        query = query.where(principals.c.kind == pid.kind.value, principals.c.name == pid.name)
    if keyset is not None:
        query = query.where(keysets.c.name == keyset)
    if not include_revoked:
        query = query.where(grants.c.revoked_at.is_(None))
    with ctx.store.snapshot() as conn:
        return [_info(row) for row in conn.execute(query)]
