"""Operator keyset operations: create, rotate, promote, enable, disable, destroy; list and show.

Each change loads the keyset, applies one lifecycle step
(:mod:`keybroker.keys.lifecycle` decides what is allowed), saves it with the
repository's compare-and-set on ``keysets.revision`` and logs it, all in one
transaction: two replicas changing one keyset at once cannot both win, the
loser gets :class:`~keybroker.errors.Conflict` and changes nothing.

Disabling or destroying a version fails its outstanding deliveries: nobody
should be installing a key the operator just retired.

Listing reads the tables, never key material: what it shows is public.
Keysets named ``keybroker/…`` (the broker's own CA and log keys) are refused
by every operation here and left out of listings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from keybroker.broker._context import (
    RESERVED_KEYSET_PREFIX,
    BrokerContext,
    keyset_name,
    record,
    version_number,
)
from keybroker.broker._delivery_rows import fail_sent
from keybroker.broker.events import (
    Event,
    KeyDestroyed,
    KeyDisabled,
    KeyEnabled,
    KeyPromoted,
    KeysetCreated,
    KeyVersionAdded,
    to_ms,
)
from keybroker.errors import KeysetError, NotFound
from keybroker.keys import Keyset, KeyTemplate, KeyVersionInfo, get_template
from keybroker.store.keysets import StoredKeyset
from keybroker.store.schema import key_versions, keysets


@dataclass(frozen=True)
class VersionSummary:
    version: int
    key_id: int
    template: str
    state: str
    public_key: bytes | None
    created_at: datetime
    state_changed_at: datetime


@dataclass(frozen=True)
class KeysetSummary:
    name: str
    purpose: str
    template: str
    revision: int
    primary: int | None
    versions: tuple[VersionSummary, ...]
    created_at: datetime
    updated_at: datetime


def _summaries(conn: Connection, where: sa.ColumnElement[bool]) -> list[KeysetSummary]:
    heads = list(conn.execute(sa.select(keysets).where(where).order_by(keysets.c.name)))
    if not heads:
        return []
    rows = conn.execute(
        sa.select(key_versions)
        .where(key_versions.c.keyset_id.in_([h.id for h in heads]))
        .order_by(key_versions.c.keyset_id, key_versions.c.version)
    )
    by_keyset: dict[str, list[VersionSummary]] = {h.id: [] for h in heads}
    for r in rows:
        by_keyset[r.keyset_id].append(
            VersionSummary(
                version=r.version,
                key_id=r.key_id,
                template=r.template,
                state=r.state,
                public_key=None if r.public_key is None else bytes(r.public_key),
                created_at=r.created_at,
                state_changed_at=r.state_changed_at,
            )
        )
    return [
        KeysetSummary(
            name=h.name,
            purpose=h.purpose,
            template=h.template,
            revision=h.revision,
            primary=next((v.version for v in by_keyset[h.id] if v.state == "primary"), None),
            versions=tuple(by_keyset[h.id]),
            created_at=h.created_at,
            updated_at=h.updated_at,
        )
        for h in heads
    ]


def list_keysets(ctx: BrokerContext) -> list[KeysetSummary]:
    with ctx.store.snapshot() as conn:
        return _summaries(conn, ~keysets.c.name.startswith(RESERVED_KEYSET_PREFIX, autoescape=True))


def show_keyset(ctx: BrokerContext, name: str) -> KeysetSummary:
    keyset = keyset_name(name)
    with ctx.store.snapshot() as conn:
        found = _summaries(conn, keysets.c.name == keyset)
    if not found:
        raise NotFound(f"no keyset {keyset!r}")
    return found[0]


def create_keyset(ctx: BrokerContext, name: str, template: KeyTemplate | str) -> KeyVersionInfo:
    """A new keyset whose version 1 is primary; :class:`Conflict` if the name is taken."""
    keyset = keyset_name(name)
    tpl = get_template(template)
    now = ctx.now()
    created = Keyset.generate(keyset, tpl, now=now)
    with ctx.store.transaction() as conn:
        primary, events = create_in(ctx, conn, created, now)
        record(ctx, conn, events)
    return primary


def create_in(
    ctx: BrokerContext, conn: Connection, created: Keyset, now: datetime
) -> tuple[KeyVersionInfo, list[Event]]:
    """Store the new keyset ``created`` (from :meth:`Keyset.generate`) inside the caller's
    transaction; its primary and the event the caller records. :class:`Conflict` if the
    name is taken."""
    keyset = keyset_name(created.name)
    primary = created.primary
    if primary is None:
        raise KeysetError("a new keyset needs a primary version")
    ctx.keysets.create(created, conn=conn)
    event = KeysetCreated(
        at_ms=to_ms(now),
        keyset=keyset,
        purpose=created.purpose.value,
        template=primary.template.name,
        version=primary.version,
        key_id=primary.key_id,
    )
    return primary, [event]


Step = Callable[[StoredKeyset, datetime], tuple[KeyVersionInfo, list[Event]]]


def _change(ctx: BrokerContext, name: str, step: Step) -> KeyVersionInfo:
    now = ctx.now()
    with ctx.store.transaction() as conn:
        info, events = change_in(ctx, conn, name, step, now)
        record(ctx, conn, events)
    return info


def change_in(
    ctx: BrokerContext, conn: Connection, name: str, step: Step, now: datetime
) -> tuple[KeyVersionInfo, list[Event]]:
    """Apply ``step`` to a keyset inside the caller's transaction; the caller records events.

    Disabling or destroying a version fails its outstanding deliveries in the same
    transaction, so no late ack can settle one.
    """
    stored = ctx.keysets.load(keyset_name(name), conn=conn)
    info, events = step(stored, now)
    ctx.keysets.save(stored, conn=conn)
    events += _retire_deliveries(conn, stored, info, now)
    return info, events


def _retire_deliveries(
    conn: Connection, stored: StoredKeyset, info: KeyVersionInfo, now: datetime
) -> list[Event]:
    if info.state.value not in ("disabled", "destroyed"):
        return []
    return fail_sent(
        conn,
        now,
        f"key version {info.state.value}",
        keyset_id=stored.id,
        version=info.version,
    )


def rotate_keyset(
    ctx: BrokerContext, name: str, *, template: KeyTemplate | str | None = None
) -> KeyVersionInfo:
    """Add a new ``pending`` version (the first step of a rotation)."""
    return _change(ctx, name, rotate_step(template))


def rotate_step(template: KeyTemplate | str | None = None) -> Step:
    """The step that adds a ``pending`` version (for :func:`change_in`)."""

    def step(stored: StoredKeyset, now: datetime) -> tuple[KeyVersionInfo, list[Event]]:
        info = stored.keyset.add(template, now=now)
        event = KeyVersionAdded(
            at_ms=to_ms(now),
            keyset=stored.keyset.name,
            version=info.version,
            key_id=info.key_id,
            template=info.template.name,
        )
        return info, [event]

    return step


def promote_version(ctx: BrokerContext, name: str, version: int) -> KeyVersionInfo:
    return _change(ctx, name, promote_step(version))


def promote_step(version: int) -> Step:
    """The step that makes ``version`` primary (for :func:`change_in`)."""
    number = version_number(version)

    def step(stored: StoredKeyset, now: datetime) -> tuple[KeyVersionInfo, list[Event]]:
        previous = stored.keyset.primary
        info = stored.keyset.promote(number, now=now)
        event = KeyPromoted(
            at_ms=to_ms(now),
            keyset=stored.keyset.name,
            version=info.version,
            key_id=info.key_id,
            previous_primary=None if previous is None else previous.version,
        )
        return info, [event]

    return step


def _simple_step(
    op: Callable[[Keyset, int, datetime], KeyVersionInfo],
    event_type: type[KeyEnabled] | type[KeyDisabled] | type[KeyDestroyed],
    version: int,
) -> Step:
    number = version_number(version)

    def step(stored: StoredKeyset, now: datetime) -> tuple[KeyVersionInfo, list[Event]]:
        info = op(stored.keyset, number, now)
        event = event_type(
            at_ms=to_ms(now), keyset=stored.keyset.name, version=info.version, key_id=info.key_id
        )
        return info, [event]

    return step


def enable_version(ctx: BrokerContext, name: str, version: int) -> KeyVersionInfo:
    return _change(
        ctx, name, _simple_step(lambda k, v, now: k.enable(v, now=now), KeyEnabled, version)
    )


def disable_version(ctx: BrokerContext, name: str, version: int) -> KeyVersionInfo:
    return _change(ctx, name, disable_step(version))


def disable_step(version: int) -> Step:
    """The step that disables ``version`` (for :func:`change_in`)."""
    return _simple_step(lambda k, v, now: k.disable(v, now=now), KeyDisabled, version)


def destroy_version(ctx: BrokerContext, name: str, version: int) -> KeyVersionInfo:
    """Drop a disabled version's material for good (its row keeps number, key id, public key)."""
    return _change(
        ctx, name, _simple_step(lambda k, v, now: k.destroy(v, now=now), KeyDestroyed, version)
    )
