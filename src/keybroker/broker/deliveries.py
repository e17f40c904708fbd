"""Deliveries: one key version sealed to one principal, acknowledged by proof of possession.

States and what moves them (anything else is refused and changes nothing)::

    (none) ──deliver──► sent ──ack, proof verifies────────► acked
                         │ ──ack, proof does not verify────► failed
                         │ ──ack or sweep after expires_at─► expired
                         └ ──recipient revoked or re-keyed,
                             hold grant revoked,
                             version disabled or destroyed─► failed

* :func:`deliver` needs an active principal with an HPKE key and an active
  ``hold`` grant, and only pending, primary or enabled versions are sealed.
  Under a store lock on (principal, keyset, version) it returns the ``sent``
  delivery that is already there, if any: asking twice, on any replica,
  never makes two.
* The envelope is signed by the broker CA (see
  :class:`~keybroker.broker.messages.DeliveryEnvelope`); its HPKE ``info``
  binds recipient, keyset, version and delivery id; its challenge is 32 fresh
  random bytes.
* :func:`ack` verifies the proof against the broker's own copy of the key.
  A wrong proof fails the delivery (logged, then :class:`CryptoError`); a late
  ack expires it (logged, then :class:`AuthorizationError`). Repeating the ack
  that succeeded returns the acked delivery and changes nothing. A delivery
  that belongs to someone else is :class:`NotFound`, exactly as one that does
  not exist, so acks are no oracle for other principals' delivery ids.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from keybroker.broker._context import (
    BrokerContext,
    delivery_id,
    keyset_name,
    principal_id,
    record,
    ttl,
    version_number,
)
from keybroker.broker._delivery_rows import SENT, expire_sent, fail_sent
from keybroker.broker.events import (
    DeliveryAcknowledged,
    DeliveryExpired,
    DeliveryFailed,
    DeliverySent,
    Event,
    to_ms,
)
from keybroker.broker.grants import GrantMode, active_grant, keyset_id
from keybroker.broker.messages import (
    CHALLENGE_SIZE,
    MAX_PROOF_SIZE,
    DeliveryEnvelope,
    HpkeKeyBinding,
    delivery_info,
    verify_ack_proof,
)
from keybroker.broker.principals import ACTIVE, require_row
from keybroker.errors import (
    AuthorizationError,
    Conflict,
    CryptoError,
    DecodeError,
    KeybrokerError,
    KeysetError,
    LocalProtocolError,
    NotFound,
)
from keybroker.keys import CONSUMING_STATES, Keyset
from keybroker.pki import PrincipalId, PrincipalKind
from keybroker.store.bulk import bulk_update
from keybroker.store.keysets import StoredKeyset
from keybroker.store.schema import deliveries, grants, keysets, principals

ACKED: Final = "acked"
FAILED: Final = "failed"
EXPIRED: Final = "expired"
WRONG_PROOF: Final = "proof of possession did not verify"


@dataclass(frozen=True)
class DeliveryInfo:
    """A delivery as operators see it (no sealed bytes, no challenge)."""

    delivery_id: str
    principal: PrincipalId
    keyset: str
    version: int
    state: str
    created_at: datetime
    expires_at: datetime
    completed_at: datetime | None
    failure_reason: str | None


#: A delivery row with its principal's kind and name and its keyset's name.
_COLUMNS: Final = (
    deliveries,
    principals.c.kind,
    principals.c.name.label("principal_name"),
    keysets.c.name.label("keyset_name"),
)
_SELECT: Final = (
    sa.select(*_COLUMNS)
    .join(principals, principals.c.id == deliveries.c.principal_id)
    .join(keysets, keysets.c.id == deliveries.c.keyset_id)
)


def _principal(row: Any) -> PrincipalId:
    return PrincipalId(PrincipalKind(row.kind), row.principal_name)


def _info(row: Any) -> DeliveryInfo:
    return DeliveryInfo(
        delivery_id=row.id,
        principal=_principal(row),
        keyset=row.keyset_name,
        version=row.version,
        state=row.state,
        created_at=row.created_at,
        expires_at=row.expires_at,
        completed_at=row.completed_at,
        failure_reason=row.failure_reason,
    )


def _envelope(row: Any) -> DeliveryEnvelope:
    return DeliveryEnvelope(
        delivery_id=row.id,
        recipient=str(_principal(row)),
        keyset=row.keyset_name,
        version=row.version,
        challenge=bytes(row.challenge),
        expires_at_ms=to_ms(row.expires_at),
        sealed=bytes(row.sealed),
        signature=bytes(row.signature),
    )


def _to_ms_precision(when: datetime) -> datetime:
    # The envelope carries milliseconds; stored times must round-trip to the same signed bytes.
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def _select_one(conn: Connection, did: str, *, for_update: bool = False) -> Any | None:
    query = _SELECT.where(deliveries.c.id == did)
    if for_update:
        query = query.with_for_update(of=deliveries)
    return conn.execute(query).one_or_none()


def deliver(
    ctx: BrokerContext,
    keyset: str,
    version: int,
    principal: PrincipalId | str,
    ttl_: timedelta,
) -> DeliveryEnvelope:
    """Seal ``version`` of ``keyset`` to ``principal``, or return the one already on its way."""
    now = _to_ms_precision(ctx.now())
    with ctx.store.transaction() as conn:
        envelope, events = deliver_in(ctx, conn, keyset, version, principal, ttl_, now)
        record(ctx, conn, events)
    return envelope


def outstanding_deliveries(
    conn: Connection, which: Iterable[tuple[str, str, int]]
) -> dict[tuple[str, str, int], Any]:
    """The ``sent`` delivery of each (principal row id, keyset row id, version) in
    ``which`` that has one, in one query per 300; read under the deliveries' locks
    (:func:`delivery_lock`) it is what :func:`deliver_loaded_in` would look up."""
    wanted = set(which)
    keyset_ids = sorted({keyset for _, keyset, _ in wanted})
    found: dict[tuple[str, str, int], Any] = {}
    # By keyset, the rest picked here: given the (principal, keyset, version) tuples,
    # PostgreSQL walked every sent delivery (6.4 ms per batch of 200 at 3,000 links in
    # flight, measured with pg_stat_statements; 3.2-3.9 ms this way). Not without the
    # state: on statistics older than the rollout that made PostgreSQL scan the table.
    for start in range(0, len(keyset_ids), 300):
        rows = conn.execute(
            _OUTSTANDING, {"o_keysets": keyset_ids[start : start + 300], "o_state": SENT}
        )
        for row in rows:
            key = (row.principal_id, row.keyset_id, row.version)
            if key in wanted:
                found[key] = row
    return found


_OUTSTANDING: Final = _SELECT.where(
    deliveries.c.keyset_id.in_(sa.bindparam("o_keysets", expanding=True)),
    deliveries.c.state == sa.bindparam("o_state"),
)


def delivery_lock(principal: PrincipalId, keyset: str, version: int) -> str:
    """The name of the lock a delivery of ``version`` of ``keyset`` to ``principal`` takes
    (:meth:`~keybroker.store.engine.Store.lock`), so two cannot both be made."""
    return f"delivery/{principal}/{keyset_name(keyset)}/{version_number(version)}"


def deliver_in(  # noqa: PLR0917 - deliver()'s arguments plus the transaction and its time
    ctx: BrokerContext,
    conn: Connection,
    keyset: str,
    version: int,
    principal: PrincipalId | str,
    ttl_: timedelta,
    now: datetime,
) -> tuple[DeliveryEnvelope, list[Event]]:
    """:func:`deliver` inside the caller's transaction; the caller records the events."""
    pid, name, number = principal_id(principal), keyset_name(keyset), version_number(version)
    lifetime = ttl(ttl_, ctx.policy.max_delivery_ttl)
    now = _to_ms_precision(now)
    ctx.store.lock(conn, delivery_lock(pid, name, number))
    who = require_row(conn, pid)
    if who.status != ACTIVE or who.hpke_public_key is None:
        raise AuthorizationError(f"{pid} is not an enrolled, active principal")
    what = keyset_id(conn, name)
    if active_grant(conn, who.id, what, GrantMode.HOLD) is None:
        raise AuthorizationError(f"{pid} has no hold grant on {name!r}")
    holder = _holder(pid, who, what, granted=True)
    return _deliver_checked(
        ctx, conn, holder, name, number, lifetime, now, lambda: ctx.keysets.load(name, conn=conn)
    )


@dataclass(frozen=True)
class Holder:
    """What :func:`deliver` checks about a principal and its hold grant on one keyset.

    Read for many deliveries at once by :func:`holders_in`, then handed to
    :func:`deliver_loaded_in`, which applies exactly :func:`deliver_in`'s checks to it.
    """

    principal: PrincipalId
    row_id: str
    status: str
    hpke_template: str | None
    hpke_key_id: int | None
    hpke_public_key: bytes | None
    keyset_id: str
    #: An active (not revoked) ``hold`` grant exists.
    holds: bool


def _holder(pid: PrincipalId, who: Any, keyset_row_id: str, *, granted: bool) -> Holder:
    return Holder(
        principal=pid,
        row_id=who.id,
        status=who.status,
        hpke_template=who.hpke_template,
        hpke_key_id=who.hpke_key_id,
        hpke_public_key=None if who.hpke_public_key is None else bytes(who.hpke_public_key),
        keyset_id=keyset_row_id,
        holds=granted,
    )


def holders_in(
    conn: Connection, pairs: Iterable[tuple[PrincipalId, str]], *, lock: bool = False
) -> dict[tuple[PrincipalId, str], Holder]:
    """:func:`deliver`'s checks on many ``(principal, keyset name)`` pairs, in three reads.

    Pairs whose principal or keyset does not exist are left out (:func:`deliver`
    says :class:`NotFound` for them). With ``lock`` (PostgreSQL), the principal
    and grant rows read are locked ``FOR SHARE`` until the transaction ends, so
    a revocation of either waits for it and then fails what it delivered: the
    checks stay true until the deliveries commit.
    """
    wanted = {(principal_id(p), keyset_name(k)) for p, k in pairs}
    names = sorted({p.name for p, _ in wanted})
    sets = sorted({k for _, k in wanted})
    who: dict[PrincipalId, Any] = {}
    for part in _parts(names):
        query = sa.select(principals).where(principals.c.name.in_(part))
        if lock:
            query = query.order_by(principals.c.id).with_for_update(read=True)
        for row in conn.execute(query):
            who[PrincipalId(PrincipalKind(row.kind), row.name)] = row
    what: dict[str, str] = {}
    for part in _parts(sets):
        query2 = sa.select(keysets.c.name, keysets.c.id).where(keysets.c.name.in_(part))
        what.update((name, ident) for name, ident in conn.execute(query2))
    held: set[tuple[str, str]] = set()
    row_ids = sorted({who[p].id for p, _ in wanted if p in who})
    keyset_ids = sorted({what[k] for _, k in wanted if k in what})
    for part in _parts(row_ids):
        query3 = sa.select(grants.c.principal_id, grants.c.keyset_id).where(
            grants.c.principal_id.in_(part),
            grants.c.keyset_id.in_(keyset_ids),
            grants.c.mode == GrantMode.HOLD.value,
            grants.c.revoked_at.is_(None),
        )
        if lock:
            query3 = query3.order_by(grants.c.id).with_for_update(read=True)
        held.update((a, b) for a, b in conn.execute(query3))
    found: dict[tuple[PrincipalId, str], Holder] = {}
    for pid, name in wanted:
        principal_row, ident = who.get(pid), what.get(name)
        if principal_row is not None and ident is not None:
            granted = (principal_row.id, ident) in held
            found[pid, name] = _holder(pid, principal_row, ident, granted=granted)
    return found


def _parts(items: list[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def deliver_loaded_in(  # noqa: PLR0917 - deliver_in()'s arguments, read beforehand
    ctx: BrokerContext,
    conn: Connection,
    stored: StoredKeyset,
    version: int,
    holder: Holder,
    ttl_: timedelta,
    now: datetime,
    *,
    new_in_this_transaction: bool = False,
    locked: bool = False,
    inserts: list[dict[str, Any]] | None = None,
    outstanding: Mapping[tuple[str, str, int], Any] | None = None,
) -> tuple[DeliveryEnvelope, list[Event]]:
    """:func:`deliver_in` with the keyset already loaded in this transaction and the
    principal's checks read by :func:`holders_in`: the same checks, outcome and events.

    ``new_in_this_transaction``: the caller added ``version`` in this transaction, so
    no delivery of it can exist yet and nobody else can see it: neither the lookup
    of one on its way nor the lock is needed. ``locked``: the caller already holds
    :func:`delivery_lock` for this delivery (taken with others in one statement).
    ``inserts``: the new row is appended there instead of written, and the caller
    writes it (:data:`DELIVERY_INSERT`, with others) before its transaction ends.
    ``outstanding``: what :func:`outstanding_deliveries` read for this delivery among
    others, under its lock; absent from it means none is on its way.
    """
    name, number = keyset_name(stored.keyset.name), version_number(version)
    if holder.keyset_id != stored.id:
        raise LocalProtocolError("the holder was read for another keyset")
    lifetime = ttl(ttl_, ctx.policy.max_delivery_ttl)
    now = _to_ms_precision(now)
    if not (locked or new_in_this_transaction):
        ctx.store.lock(conn, delivery_lock(holder.principal, name, number))
    return _deliver_checked(
        ctx,
        conn,
        holder,
        name,
        number,
        lifetime,
        now,
        lambda: stored,
        new_in_this_transaction,
        inserts,
        outstanding,
    )


def _deliver_checked(  # noqa: PLR0917 - private; deliver_in()'s checked arguments
    ctx: BrokerContext,
    conn: Connection,
    who: Holder,
    name: str,
    number: int,
    lifetime: timedelta,
    now: datetime,
    load: Callable[[], StoredKeyset],
    unseen: bool = False,
    inserts: list[dict[str, Any]] | None = None,
    outstanding: Mapping[tuple[str, str, int], Any] | None = None,
) -> tuple[DeliveryEnvelope, list[Event]]:
    """The rest of :func:`deliver_in`, under its lock (``now`` at millisecond precision).

    ``unseen``: the version is new in this transaction; no delivery of it exists.
    """
    pid = who.principal
    if who.status != ACTIVE or who.hpke_public_key is None:
        raise AuthorizationError(f"{pid} is not an enrolled, active principal")
    if not who.holds:
        raise AuthorizationError(f"{pid} has no hold grant on {name!r}")
    what = who.keyset_id

    events: list[Event] = []
    current = (
        None
        if unseen
        else outstanding.get((who.row_id, what, number))
        if outstanding is not None
        else next(
            (
                row
                for row in conn.execute(
                    _CURRENT, {"principal_row": who.row_id, "keyset_row": what, "number": number}
                )
                if row.state == SENT
            ),
            None,
        )
    )
    if current is not None:
        if current.expires_at > now:
            return _envelope(current), events
        events += expire_sent(conn, now, delivery_ids=[current.id])

    stored = load()
    state = stored.keyset.version(number).state
    if state not in CONSUMING_STATES:
        raise KeysetError(f"version {number} of {name!r} is {state.value}; not delivered")
    if who.hpke_template is None or who.hpke_key_id is None:
        raise AuthorizationError(f"{pid} is not an enrolled, active principal")
    recipient = HpkeKeyBinding(
        str(pid), who.hpke_template, who.hpke_key_id, who.hpke_public_key
    ).recipient()
    new_id = ctx.new_id()
    challenge = ctx.rng(CHALLENGE_SIZE)
    expires_at = _to_ms_precision(now + lifetime)
    sealed = stored.keyset.seal_version(
        number, recipient, info=delivery_info(new_id, str(pid), name, number)
    )
    unsigned = DeliveryEnvelope(
        delivery_id=new_id,
        recipient=str(pid),
        keyset=name,
        version=number,
        challenge=challenge,
        expires_at_ms=to_ms(expires_at),
        sealed=sealed,
        signature=b"",
    )
    envelope = replace(unsigned, signature=ctx.signer.sign(unsigned.signed_bytes()))
    row = {
        "id": new_id,
        "principal_id": who.row_id,
        "keyset_id": what,
        "version": number,
        "state": SENT,
        "sealed": sealed,
        "challenge": challenge,
        "created_at": now,
        "expires_at": expires_at,
        "completed_at": None,
        "failure_reason": None,
        "signature": envelope.signature,
        "ack_proof": None,
    }
    if inserts is None:
        conn.execute(_INSERT, row)
    else:
        inserts.append(row)
    events.append(
        DeliverySent(
            at_ms=to_ms(now),
            delivery_id=new_id,
            principal=str(pid),
            keyset=name,
            version=number,
            key_id=stored.keyset.version(number).key_id,
            expires_at_ms=envelope.expires_at_ms,
            envelope_sha256=hashlib.sha256(envelope.encode()).digest(),
        )
    )
    return envelope, events


#: Every delivery of one version to one principal (a few: the ``sent`` one, if any, is picked
#: in Python). Not filtered on ``state`` in SQL: the share of ``sent`` rows swings from
#: none to most during a rollout, faster than PostgreSQL's statistics follow, and on stale
#: statistics its planner chose the ``(state, expires_at)`` index and walked every ``sent``
#: delivery for each lookup (0.25 ms each at 3,000 links, growing with the rollout).
_CURRENT: Final = _SELECT.where(
    deliveries.c.principal_id == sa.bindparam("principal_row"),
    deliveries.c.keyset_id == sa.bindparam("keyset_row"),
    deliveries.c.version == sa.bindparam("number"),
)
_INSERT: Final = deliveries.insert()
#: Writes the rows :func:`deliver_loaded_in` appended to its ``inserts``.
DELIVERY_INSERT: Final = _INSERT
_SETTLE: Final = (
    deliveries.update()
    .where(deliveries.c.id == sa.bindparam("b_id"), deliveries.c.state == sa.bindparam("b_sent"))
    .values(state=ACKED, completed_at=sa.bindparam("b_at"), ack_proof=sa.bindparam("b_proof"))
)

#: _SETTLE for many rows (one statement on PostgreSQL; keybroker.store.bulk).
_SETTLE_MANY: Final = bulk_update(
    deliveries,
    match={"id": "b_id", "state": "b_sent"},
    assign={"completed_at": "b_at", "ack_proof": "b_proof"},
    computed={"state": sa.literal(ACKED, sa.String)},
)


def expire_in(conn: Connection, now: datetime, delivery: str) -> list[Event]:
    """Expire one ``sent`` delivery in the caller's transaction (nothing if it is settled)."""
    return expire_sent(conn, now, delivery_ids=[delivery_id(delivery)])


def delivery_states(conn: Connection, ids: list[str]) -> dict[str, tuple[str, datetime]]:
    """State and deadline of each delivery in ``ids`` (those that exist)."""
    if not ids:
        return {}
    rows = conn.execute(
        sa.select(deliveries.c.id, deliveries.c.state, deliveries.c.expires_at).where(
            deliveries.c.id.in_(ids)
        )
    )
    return {row.id: (row.state, row.expires_at) for row in rows}


def fetch_deliveries(ctx: BrokerContext, principal: PrincipalId | str) -> list[DeliveryEnvelope]:
    """The principal's own ``sent``, unexpired deliveries, oldest first. Changes nothing.

    One statement (the principal, outer-joined to its inbox), so it needs no snapshot
    across statements: on PostgreSQL it runs in autocommit, one round trip instead of
    four (BEGIN, the principal, the inbox, ROLLBACK). Every agent makes this call on
    every wake-up and long-poll.
    """
    pid = principal_id(principal)
    now = ctx.now()
    with ctx.store.reader() as conn:
        rows = conn.execute(
            _INBOX, {"i_kind": pid.kind.value, "i_name": pid.name, "i_state": SENT}
        ).all()
    if not rows:
        raise NotFound(f"no principal {pid}")
    if rows[0].principal_status != ACTIVE:
        raise AuthorizationError(f"{pid} is {rows[0].principal_status}")
    # The deadline is checked here, not in SQL: given "expires_at > ?" SQLite (no
    # statistics) scans every sent delivery by (state, expires_at) instead of this
    # principal's by (principal_id, state), which made each fetch cost O(all in flight).
    return [_envelope(row) for row in rows if row.id is not None and row.expires_at > now]


# The principal row comes back once even with an empty inbox (the outer join), so
# "no such principal" and "nothing waiting" stay apart. The join's ON clause carries
# the state so that both databases walk this principal's (principal_id, state) index.
# (Outer joins one after the other: a nested "deliveries JOIN keysets" made SQLite
# materialise every sent delivery first.)
_INBOX_JOIN: Final = principals.outerjoin(
    deliveries,
    sa.and_(
        deliveries.c.principal_id == principals.c.id,
        deliveries.c.state == sa.bindparam("i_state"),
    ),
).outerjoin(keysets, keysets.c.id == deliveries.c.keyset_id)
_INBOX: Final = (
    sa.select(*_COLUMNS, principals.c.status.label("principal_status"))
    .select_from(_INBOX_JOIN)
    .where(principals.c.kind == sa.bindparam("i_kind"), principals.c.name == sa.bindparam("i_name"))
    .order_by(deliveries.c.created_at, deliveries.c.id)
)


def ack(
    ctx: BrokerContext, delivery: str, principal: PrincipalId | str, proof: bytes
) -> DeliveryInfo:
    """Acknowledge a delivery with a proof of possession (see the module docstring)."""
    did, pid = delivery_id(delivery), principal_id(principal)
    if not isinstance(proof, bytes) or not 0 < len(proof) <= MAX_PROOF_SIZE:
        raise DecodeError("malformed proof of possession")
    now = ctx.now()
    with ctx.store.transaction() as conn:
        row = _select_one(conn, did, for_update=True)
        if row is None or _principal(row) != pid:
            raise NotFound("no such delivery")
        if row.state == ACKED:
            # Only the very ack that succeeded may be repeated; HMAC proofs are deterministic.
            if row.ack_proof is not None and hmac.compare_digest(bytes(row.ack_proof), proof):
                return _info(row)
            raise Conflict("delivery is already acknowledged")
        if row.state == EXPIRED:
            raise AuthorizationError("delivery expired")
        if row.state != SENT:
            raise Conflict(f"delivery is {row.state}")

        if row.expires_at <= now:
            record(ctx, conn, expire_sent(conn, now, delivery_ids=[did]))
            outcome = EXPIRED
        else:
            outcome = _verify_and_settle(ctx, conn, row, proof, now)
        settled = _select_one(conn, did)
    if outcome == EXPIRED:
        raise AuthorizationError("delivery expired")
    if outcome == FAILED:
        raise CryptoError()
    return _info(settled)


def _verify_and_settle(
    ctx: BrokerContext, conn: Connection, row: Any, proof: bytes, now: datetime
) -> str:
    # Loaded outside the try: a store or root-key failure is an error, not a wrong proof.
    stored = ctx.keysets.load(row.keyset_name, conn=conn)
    outcome, events = _settle(conn, stored.keyset, row, proof, now)
    record(ctx, conn, events)
    return outcome


def _settle(  # noqa: PLR0917 - ack()'s row, proof and time, and where an ack's update goes
    conn: Connection,
    keyset: Keyset,
    row: Any,
    proof: bytes,
    now: datetime,
    deferred: list[dict[str, Any]] | None = None,
) -> tuple[str, list[Event]]:
    """Check ``proof`` on the broker's copy and settle the ``sent`` row; the caller logs.

    With ``deferred``, an accepted ack's update is appended there for the caller to run
    (one statement for many, in the same transaction, with the row still locked)."""
    try:
        verify_ack_proof(keyset, row.version, bytes(row.challenge), row.id, proof)
    except CryptoError:
        reason = WRONG_PROOF
    except KeysetError:
        reason = "key version no longer available"
    else:
        update = {"b_id": row.id, "b_sent": SENT, "b_at": now, "b_proof": proof}
        if deferred is None:
            conn.execute(_SETTLE, update)
        else:
            deferred.append(update)
        acked = DeliveryAcknowledged(
            at_ms=to_ms(now),
            delivery_id=row.id,
            principal=str(_principal(row)),
            keyset=row.keyset_name,
            version=row.version,
        )
        return ACKED, [acked]
    return FAILED, fail_sent(conn, now, reason, delivery_id=row.id)


AckRequest = tuple[str, PrincipalId | str, bytes]
"""``(delivery id, principal, proof)``: one acknowledgement for :func:`ack_many`."""


def ack_many(
    ctx: BrokerContext, requests: Sequence[AckRequest]
) -> list[DeliveryInfo | KeybrokerError]:
    """Settle many acknowledgements in one transaction, as :func:`ack` would one by one.

    This is what a consumer of acks arriving on the bus does: it drains what is
    queued and settles it together, so N acks cost one transaction and one signed
    tree head instead of N. Each request gets exactly the checks, the outcome and
    the log entries :func:`ack` gives it, in order (a delivery named twice is
    settled by the first and judged against that by the second). Returned, one
    per request and in order: the acked :class:`DeliveryInfo`, or the error
    :func:`ack` would have raised (nothing is raised for a refused request, and
    a refused request changes nothing but what :func:`ack` would have committed:
    a wrong proof fails its delivery, a late ack expires it). A store or
    root-key failure raises and rolls the whole batch back.
    """
    results: list[DeliveryInfo | KeybrokerError | None] = [None] * len(requests)
    checked: list[tuple[int, str, PrincipalId, bytes]] = []
    for i, (did_, principal, proof) in enumerate(requests):
        try:
            did, pid = delivery_id(did_), principal_id(principal)
            if not isinstance(proof, bytes) or not 0 < len(proof) <= MAX_PROOF_SIZE:
                raise DecodeError("malformed proof of possession")
        except KeybrokerError as exc:
            results[i] = exc
            continue
        checked.append((i, did, pid, proof))
    if checked:
        now = ctx.now()
        with ctx.store.transaction() as conn:
            rows = _rows_for_update(conn, sorted({did for _, did, _, _ in checked}))
            events: list[Event] = []
            # Every key version a pending ack needs, in a few queries rather than one per
            # keyset, and only those versions unwrapped (a proof is checked on one).
            wanted: dict[str, set[int]] = {}
            for r in rows.values():
                if r.state == SENT:
                    wanted.setdefault(r.keyset_name, set()).add(r.version)
            keysets_ = ctx.keysets.load_versions(wanted, conn=conn)
            acked: list[dict[str, Any]] = []
            for i, did, pid, proof in checked:
                results[i] = _ack_one(
                    ctx, conn, rows, keysets_, (did, pid, proof), now, events, acked
                )
            # The accepted acks' rows, locked above and still sent: one statement.
            if _SETTLE_MANY.run(conn, acked) != len(acked):
                raise Conflict("an acknowledged delivery changed under its lock")
            record(ctx, conn, events)
    return [r for r in results if r is not None]


def _rows_for_update(conn: Connection, ids: list[str]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for start in range(0, len(ids), 500):
        query = _SELECT.where(deliveries.c.id.in_(ids[start : start + 500]))
        rows.update((r.id, r) for r in conn.execute(query.with_for_update(of=deliveries)))
    return rows


def _ack_one(  # noqa: PLR0917 - ack()'s body over rows read for the whole batch
    ctx: BrokerContext,
    conn: Connection,
    rows: dict[str, Any],
    keysets_: dict[str, Keyset],
    request: tuple[str, PrincipalId, bytes],
    now: datetime,
    events: list[Event],
    acked: list[dict[str, Any]],
) -> DeliveryInfo | KeybrokerError:
    did, pid, proof = request
    row = rows.get(did)
    if row is None or _principal(row) != pid:
        return NotFound("no such delivery")
    if row.state == ACKED:
        if row.ack_proof is not None and hmac.compare_digest(bytes(row.ack_proof), proof):
            return _info(row)
        return Conflict("delivery is already acknowledged")
    if row.state == EXPIRED:
        return AuthorizationError("delivery expired")
    if row.state != SENT:
        return Conflict(f"delivery is {row.state}")
    if row.expires_at <= now:
        events += expire_sent(conn, now, delivery_ids=[did])
        rows[did] = _settled(row, state=EXPIRED, completed_at=now)
        return AuthorizationError("delivery expired")
    keyset = keysets_.get(row.keyset_name)
    if keyset is None:
        # A store or root-key failure is an error for the whole batch, as it is for ack().
        keyset = keysets_[row.keyset_name] = ctx.keysets.load(row.keyset_name, conn=conn).keyset
    outcome, more = _settle(conn, keyset, row, proof, now, acked)
    events += more
    if outcome == FAILED:
        reason = more[0].reason if more and isinstance(more[0], DeliveryFailed) else None
        rows[did] = _settled(row, state=FAILED, completed_at=now, failure_reason=reason)
        return CryptoError()
    rows[did] = _settled(row, state=ACKED, completed_at=now, ack_proof=proof)
    return _info(rows[did])


def _settled(row: Any, **changes: Any) -> SimpleNamespace:
    """``row`` as it reads after an update that set ``changes``."""
    return SimpleNamespace(**{**row._asdict(), **changes})


def expire_overdue(ctx: BrokerContext, now: datetime | None = None) -> list[str]:
    """Mark every ``sent`` delivery past its deadline ``expired``; return their ids."""
    if now is not None and (not isinstance(now, datetime) or now.utcoffset() is None):
        raise LocalProtocolError("expire_overdue needs an aware datetime")
    when = ctx.now() if now is None else now
    with ctx.store.transaction() as conn:
        events = expire_sent(conn, when)
        record(ctx, conn, events)
    return [e.delivery_id for e in events if isinstance(e, DeliveryExpired)]


def show_delivery(ctx: BrokerContext, delivery: str) -> DeliveryInfo:
    did = delivery_id(delivery)
    with ctx.store.snapshot() as conn:
        row = _select_one(conn, did)
    if row is None:
        raise NotFound("no such delivery")
    return _info(row)


def list_deliveries(
    ctx: BrokerContext,
    *,
    principal: PrincipalId | str | None = None,
    keyset: str | None = None,
    state: str | None = None,
) -> list[DeliveryInfo]:
    query = _SELECT.order_by(deliveries.c.created_at, deliveries.c.id)
    if principal is not None:
        pid = principal_id(principal)
        query = query.where(principals.c.kind == pid.kind.value, principals.c.name == pid.name)
    if keyset is not None:
        query = query.where(keysets.c.name == keyset)
    if state is not None:
        query = query.where(deliveries.c.state == state)
    with ctx.store.snapshot() as conn:
        return [_info(row) for row in conn.execute(query)]
