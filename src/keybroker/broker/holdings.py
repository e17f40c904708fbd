"""Holdings: which keysets a principal holds, and the state of each of their versions.

A principal's agent asks this to learn what the broker decided since it last
looked: a new primary, a version disabled or destroyed that it should forget.
Only keysets the principal has an active ``hold`` grant on are listed, and only
public facts (names, purposes, version numbers, key ids, states): never key
material, which reaches a principal through deliveries alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from keybroker.broker._context import BrokerContext, principal_id
from keybroker.broker.grants import GrantMode
from keybroker.broker.principals import require_row
from keybroker.pki import PrincipalId
from keybroker.store.schema import grants, key_versions, keysets


@dataclass(frozen=True)
class HeldVersion:
    version: int
    key_id: int
    #: A :class:`~keybroker.keys.KeyState` value: pending, primary, enabled, disabled, destroyed.
    state: str


@dataclass(frozen=True)
class Holding:
    name: str
    purpose: str
    primary: int | None
    versions: tuple[HeldVersion, ...]


def holdings(ctx: BrokerContext, principal: PrincipalId | str) -> list[Holding]:
    """Every keyset ``principal`` holds an active ``hold`` grant on, by name.

    :class:`~keybroker.errors.NotFound` if there is no such principal. Read in one
    snapshot, so a keyset's versions are seen as of one moment.
    """
    pid = principal_id(principal)
    with ctx.store.snapshot() as conn:
        who = require_row(conn, pid)
        held = (
            sa.select(grants.c.keyset_id)
            .where(
                grants.c.principal_id == who.id,
                grants.c.mode == GrantMode.HOLD.value,
                grants.c.revoked_at.is_(None),
            )
            .scalar_subquery()
        )
        heads = list(
            conn.execute(
                sa.select(keysets.c.id, keysets.c.name, keysets.c.purpose)
                .where(keysets.c.id.in_(held))
                .order_by(keysets.c.name)
            )
        )
        if not heads:
            return []
        rows = conn.execute(
            sa.select(
                key_versions.c.keyset_id,
                key_versions.c.version,
                key_versions.c.key_id,
                key_versions.c.state,
            )
            .where(key_versions.c.keyset_id.in_([h.id for h in heads]))
            .order_by(key_versions.c.keyset_id, key_versions.c.version)
        )
        by_keyset: dict[str, list[HeldVersion]] = {h.id: [] for h in heads}
        for row in rows:
            by_keyset[row.keyset_id].append(HeldVersion(row.version, row.key_id, row.state))
    return [
        Holding(
            name=h.name,
            purpose=h.purpose,
            primary=next((v.version for v in by_keyset[h.id] if v.state == "primary"), None),
            versions=tuple(by_keyset[h.id]),
        )
        for h in heads
    ]
