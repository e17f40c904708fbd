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
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
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
    KeysetError,
    LocalProtocolError,
    NotFound,
)
from keybroker.keys import CONSUMING_STATES
from keybroker.pki import PrincipalId, PrincipalKind
from keybroker.store.schema import deliveries, keysets, principals

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


_SELECT: Final = (
    sa.select(
        deliveries,
        principals.c.kind,
        principals.c.name.label("principal_name"),
        keysets.c.name.label("keyset_name"),
    )
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
    ctx.store.lock(conn, f"delivery/{pid}/{name}/{number}")
    who = require_row(conn, pid)
    if who.status != ACTIVE or who.hpke_public_key is None:
        raise AuthorizationError(f"{pid} is not an enrolled, active principal")
    what = keyset_id(conn, name)
    if active_grant(conn, who.id, what, GrantMode.HOLD) is None:
        raise AuthorizationError(f"{pid} has no hold grant on {name!r}")

    events: list[Event] = []
    current = conn.execute(
        _SELECT.where(
            deliveries.c.principal_id == who.id,
            deliveries.c.keyset_id == what,
            deliveries.c.version == number,
            deliveries.c.state == SENT,
        )
    ).one_or_none()
    if current is not None:
        if current.expires_at > now:
            return _envelope(current), events
        events += expire_sent(conn, now, delivery_ids=[current.id])

    stored = ctx.keysets.load(name, conn=conn)
    state = stored.keyset.version(number).state
    if state not in CONSUMING_STATES:
        raise KeysetError(f"version {number} of {name!r} is {state.value}; not delivered")
    recipient = HpkeKeyBinding(
        str(pid), who.hpke_template, who.hpke_key_id, bytes(who.hpke_public_key)
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
    conn.execute(
        deliveries.insert().values(
            id=new_id,
            principal_id=who.id,
            keyset_id=what,
            version=number,
            state=SENT,
            sealed=sealed,
            challenge=challenge,
            created_at=now,
            expires_at=expires_at,
            completed_at=None,
            failure_reason=None,
            signature=envelope.signature,
            ack_proof=None,
        )
    )
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
    """The principal's own ``sent``, unexpired deliveries, oldest first. Changes nothing."""
    pid = principal_id(principal)
    now = ctx.now()
    with ctx.store.snapshot() as conn:
        who = require_row(conn, pid)
        if who.status != ACTIVE:
            raise AuthorizationError(f"{pid} is {who.status}")
        rows = conn.execute(
            _SELECT.where(
                deliveries.c.principal_id == who.id,
                deliveries.c.state == SENT,
                deliveries.c.expires_at > now,
            ).order_by(deliveries.c.created_at, deliveries.c.id)
        )
        return [_envelope(row) for row in rows]


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
    try:
        verify_ack_proof(stored.keyset, row.version, bytes(row.challenge), row.id, proof)
    except CryptoError:
        reason = WRONG_PROOF
    except KeysetError:
        reason = "key version no longer available"
    else:
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id == row.id, deliveries.c.state == SENT)
            .values(state=ACKED, completed_at=now, ack_proof=proof)
        )
        acked = DeliveryAcknowledged(
            at_ms=to_ms(now),
            delivery_id=row.id,
            principal=str(_principal(row)),
            keyset=row.keyset_name,
            version=row.version,
        )
        record(ctx, conn, [acked])
        return ACKED
    record(ctx, conn, fail_sent(conn, now, reason, delivery_id=row.id))
    return FAILED


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
