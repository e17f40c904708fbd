"""The per-link rollout state machine (sans-IO: facts and ``now`` in, a new state and actions out).

Everything that decides how one link moves lives in this file. The driver
(:mod:`.orchestrator`) reads the link's record and what happened to its
outstanding delivery, calls :func:`advance`, performs the returned actions and
writes the new record, all in one database transaction.

The make-before-break order (the patent's claim, and MACsec's install → form →
retire)::

    PENDING ──due──► DELIVERED_DOWNSTREAM ──acked──► ACKED_DOWNSTREAM ──due──► DELIVERED_UPSTREAM
       ▲    deliver to the site      │        (site receives old and new)   deliver to the node │
       └──── refused/expired, ───────┘                  ▲                                       │
             attempts left (backoff)                    └── refused/expired, attempts left ─────┤
                                                                                                │
    RETIRED_OLD ◄──due (grace over): disable old── ACTIVE ◄──acked: promote new (transmit)──────┘

    any unfinished state ──attempts exhausted──► FAILED_KEEP_OLD ──retry──► PENDING
    any unfinished state ──abort─────────────► ABORTED_KEEP_OLD ──retry──► PENDING

Rules the table and :func:`advance` keep:

* The upstream node is delivered the new version only from ``ACKED_DOWNSTREAM``,
  which only an ``ACKED`` downstream delivery reaches.
* Transmit switches when the new version is promoted (``ACTIVE``): agents send
  under the keyset's primary and accept every installed, enabled version.
* The old version is disabled only from ``ACTIVE`` once ``grace`` has passed.
* A failed or aborted link disables the new version (if one was made) and keeps
  the old one primary, so both ends go on exactly as before. Disabling also
  fails any delivery still outstanding, so a late ack cannot revive it.
* Time is an argument, never read; jitter comes from the ``rng`` argument.

Anything not in :data:`TRANSITIONS` is invalid: :func:`advance` raises
:class:`LocalProtocolError` and the record is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import ClassVar, Final

from keybroker.encoding import Message, message_label
from keybroker.errors import ConfigurationError, LocalProtocolError


class LinkState(StrEnum):
    PENDING = "PENDING"
    DELIVERED_DOWNSTREAM = "DELIVERED_DOWNSTREAM"
    ACKED_DOWNSTREAM = "ACKED_DOWNSTREAM"
    DELIVERED_UPSTREAM = "DELIVERED_UPSTREAM"
    ACTIVE = "ACTIVE"
    RETIRED_OLD = "RETIRED_OLD"
    FAILED_KEEP_OLD = "FAILED_KEEP_OLD"
    ABORTED_KEEP_OLD = "ABORTED_KEEP_OLD"


class Input(StrEnum):
    """What can happen to a link."""

    DUE = "due"  # now >= next_at: deliver, give up waiting, or retire
    ACKED = "acked"  # the outstanding delivery was acknowledged with a valid proof
    REFUSED = "refused"  # the outstanding delivery failed (wrong proof, grant gone, …)
    EXPIRED = "expired"  # the outstanding delivery expired unacknowledged
    ACTION_FAILED = "action-failed"  # the broker refused the step (e.g. no grant)
    ABORT = "abort"
    RETRY = "retry"


TERMINAL: Final = frozenset(
    {LinkState.RETIRED_OLD, LinkState.FAILED_KEEP_OLD, LinkState.ABORTED_KEEP_OLD}
)
#: States with a delivery on its way; the outcome of that delivery is their input.
AWAITING_ACK: Final = frozenset({LinkState.DELIVERED_DOWNSTREAM, LinkState.DELIVERED_UPSTREAM})
#: States the rollout may still abort (ACTIVE has moved both directions already).
ABORTABLE: Final = frozenset(
    {
        LinkState.PENDING,
        LinkState.DELIVERED_DOWNSTREAM,
        LinkState.ACKED_DOWNSTREAM,
        LinkState.DELIVERED_UPSTREAM,
    }
)

S = LinkState
#: Every legal (state, input) → state. Where two targets are listed the second is taken
#: when the stage's attempts are exhausted (a retry becomes a failure).
TRANSITIONS: Final[dict[tuple[LinkState, Input], tuple[LinkState, ...]]] = {
    (S.PENDING, Input.DUE): (S.DELIVERED_DOWNSTREAM,),
    (S.PENDING, Input.ACTION_FAILED): (S.PENDING, S.FAILED_KEEP_OLD),
    (S.PENDING, Input.ABORT): (S.ABORTED_KEEP_OLD,),
    (S.DELIVERED_DOWNSTREAM, Input.ACKED): (S.ACKED_DOWNSTREAM,),
    (S.DELIVERED_DOWNSTREAM, Input.REFUSED): (S.PENDING, S.FAILED_KEEP_OLD),
    (S.DELIVERED_DOWNSTREAM, Input.EXPIRED): (S.PENDING, S.FAILED_KEEP_OLD),
    (S.DELIVERED_DOWNSTREAM, Input.DUE): (S.PENDING, S.FAILED_KEEP_OLD),
    (S.DELIVERED_DOWNSTREAM, Input.ABORT): (S.ABORTED_KEEP_OLD,),
    (S.ACKED_DOWNSTREAM, Input.DUE): (S.DELIVERED_UPSTREAM,),
    (S.ACKED_DOWNSTREAM, Input.ACTION_FAILED): (S.ACKED_DOWNSTREAM, S.FAILED_KEEP_OLD),
    (S.ACKED_DOWNSTREAM, Input.ABORT): (S.ABORTED_KEEP_OLD,),
    (S.DELIVERED_UPSTREAM, Input.ACKED): (S.ACTIVE,),
    (S.DELIVERED_UPSTREAM, Input.REFUSED): (S.ACKED_DOWNSTREAM, S.FAILED_KEEP_OLD),
    (S.DELIVERED_UPSTREAM, Input.EXPIRED): (S.ACKED_DOWNSTREAM, S.FAILED_KEEP_OLD),
    (S.DELIVERED_UPSTREAM, Input.DUE): (S.ACKED_DOWNSTREAM, S.FAILED_KEEP_OLD),
    (S.DELIVERED_UPSTREAM, Input.ABORT): (S.ABORTED_KEEP_OLD,),
    (S.ACTIVE, Input.DUE): (S.RETIRED_OLD,),
    # Retiring can only fail if an operator changed the keyset by hand; keep trying.
    (S.ACTIVE, Input.ACTION_FAILED): (S.ACTIVE,),
    (S.FAILED_KEEP_OLD, Input.RETRY): (S.PENDING,),
    (S.ABORTED_KEEP_OLD, Input.RETRY): (S.PENDING,),
}
del S


@dataclass(frozen=True)
class RolloutPolicy(Message):
    """How patient a rollout is. Times are milliseconds (the log's unit)."""

    LABEL: ClassVar[str] = message_label("keybroker/rotation/policy", 1)

    #: How long a site or node has to install and acknowledge (the delivery's TTL).
    ack_timeout_ms: int = 60_000
    #: Deliveries per stage before the link fails and keeps its old key.
    max_attempts: int = 3
    #: Backoff before attempt n+1: min(cap, base * 2**(n-1)), plus up to 20 % jitter.
    backoff_base_ms: int = 2_000
    backoff_cap_ms: int = 60_000
    #: After the new version is promoted, how long the old one is still accepted. Must
    #: cover the agents' sync interval plus the longest a message can be in flight.
    grace_ms: int = 30_000
    #: Stop starting new links once more than this percentage of all links has failed.
    max_failed_percent: int = 100
    #: At most this many links between PENDING and ACTIVE at once (0: no limit).
    max_parallel: int = 0

    def __post_init__(self) -> None:
        for name in ("ack_timeout_ms", "backoff_base_ms", "backoff_cap_ms"):
            if not 1 <= getattr(self, name) <= 30 * 86_400_000:
                raise ConfigurationError(f"{name} must be between 1 ms and 30 days")
        if not 0 <= self.grace_ms <= 30 * 86_400_000:
            raise ConfigurationError("grace_ms must be between 0 and 30 days")
        if not 1 <= self.max_attempts <= 100:
            raise ConfigurationError("max_attempts must be between 1 and 100")
        if self.backoff_cap_ms < self.backoff_base_ms:
            raise ConfigurationError("backoff_cap_ms must be at least backoff_base_ms")
        if not 0 <= self.max_failed_percent <= 100:
            raise ConfigurationError("max_failed_percent must be between 0 and 100")
        if not 0 <= self.max_parallel <= 1_000_000:
            raise ConfigurationError("max_parallel must be between 0 and 1,000,000")

    def backoff_ms(self, attempt: int, rng: Callable[[int], bytes]) -> int:
        base: int = min(self.backoff_cap_ms, self.backoff_base_ms << min(attempt - 1, 30))
        jitter = int.from_bytes(rng(2), "big") * base // (5 * 65536)
        return base + jitter


@dataclass(frozen=True)
class LinkRecord:
    """What the store keeps for one link of one rollout."""

    state: LinkState
    old_version: int
    new_version: int | None = None
    #: Deliveries made (or tried) at the current stage.
    attempt: int = 0
    #: The delivery the link waits on, in AWAITING_ACK states.
    delivery_id: str | None = None
    #: When DUE fires: deliver at, give up waiting at, or retire at.
    next_at_ms: int = 0
    #: Why the last attempt failed, or why the link failed or was aborted.
    reason: str | None = None


# -- actions: what the driver must do, in order, in the same transaction ---------------


@dataclass(frozen=True)
class AddVersion:
    """Add a pending version to the link keyset; the driver fills ``new_version``."""


@dataclass(frozen=True)
class Deliver:
    """Seal ``version`` to the downstream site or the upstream node; fills ``delivery_id``."""

    to: str  # "downstream" | "upstream"
    version: int
    ttl_ms: int


@dataclass(frozen=True)
class ExpireDelivery:
    """Mark the outstanding delivery expired (its deadline passed without an ack)."""

    delivery_id: str


@dataclass(frozen=True)
class Promote:
    """Make ``version`` the keyset's primary: both ends now transmit under it."""

    version: int


@dataclass(frozen=True)
class Disable:
    """Disable ``version`` (retire the old one, or withdraw a new one that did not make it)."""

    version: int


Action = AddVersion | Deliver | ExpireDelivery | Promote | Disable


@dataclass(frozen=True)
class Step:
    before: LinkRecord
    after: LinkRecord
    input: Input
    actions: tuple[Action, ...] = field(default=())

    @property
    def changed_state(self) -> bool:
        return self.before.state != self.after.state


DOWNSTREAM: Final = "downstream"
UPSTREAM: Final = "upstream"


def advance(
    link: LinkRecord,
    event: Input,
    now_ms: int,
    policy: RolloutPolicy,
    rng: Callable[[int], bytes],
    *,
    reason: str | None = None,
) -> Step:
    """The next record and the actions that get there; :class:`LocalProtocolError` if illegal."""
    targets = TRANSITIONS.get((link.state, event))
    if targets is None:
        raise LocalProtocolError(f"a link in {link.state} cannot take {event}")
    if event is Input.DUE and now_ms < link.next_at_ms:
        raise LocalProtocolError(f"a link in {link.state} is not due until {link.next_at_ms}")
    S = LinkState
    state = link.state

    if event is Input.ABORT:
        return _give_up(link, event, S.ABORTED_KEEP_OLD, reason or "aborted by operator", now_ms)
    if event is Input.RETRY:
        # A withdrawn version is disabled for good: a retry starts from a fresh one.
        after = LinkRecord(state=S.PENDING, old_version=link.old_version, next_at_ms=now_ms)
        return Step(link, after, event)

    if state is S.PENDING and event is Input.DUE:
        actions: list[Action] = []
        if link.new_version is None:
            actions.append(AddVersion())
        # The driver replaces version 0 with the one AddVersion made.
        version = link.new_version or 0
        actions.append(Deliver(DOWNSTREAM, version, policy.ack_timeout_ms))
        after = replace(
            link,
            state=S.DELIVERED_DOWNSTREAM,
            attempt=link.attempt + 1,
            next_at_ms=now_ms + policy.ack_timeout_ms,
        )
        return Step(link, after, event, tuple(actions))
    if state is S.ACKED_DOWNSTREAM and event is Input.DUE:
        after = replace(
            link,
            state=S.DELIVERED_UPSTREAM,
            attempt=link.attempt + 1,
            next_at_ms=now_ms + policy.ack_timeout_ms,
        )
        return Step(link, after, event, (Deliver(UPSTREAM, _new(link), policy.ack_timeout_ms),))
    if event is Input.ACKED and state is S.DELIVERED_DOWNSTREAM:
        after = replace(
            link,
            state=S.ACKED_DOWNSTREAM,
            attempt=0,
            delivery_id=None,
            next_at_ms=now_ms,
            reason=None,
        )
        return Step(link, after, event)
    if event is Input.ACKED and state is S.DELIVERED_UPSTREAM:
        after = replace(
            link,
            state=S.ACTIVE,
            attempt=0,
            delivery_id=None,
            next_at_ms=now_ms + policy.grace_ms,
            reason=None,
        )
        return Step(link, after, event, (Promote(_new(link)),))
    if state is S.ACTIVE and event is Input.DUE:
        after = replace(link, state=S.RETIRED_OLD, next_at_ms=now_ms, reason=None)
        return Step(link, after, event, (Disable(link.old_version),))
    if state is S.ACTIVE and event is Input.ACTION_FAILED:
        after = replace(link, next_at_ms=now_ms + policy.backoff_cap_ms, reason=reason)
        return Step(link, after, event)

    # A failed attempt: the outstanding delivery failed or expired, or the step was refused.
    why = reason or _DEFAULT_REASON[event]
    actions = []
    if event is Input.DUE and link.delivery_id is not None:
        actions.append(ExpireDelivery(link.delivery_id))
    retry_state, fail_state = targets
    # A refused step never made its delivery, so it counts as an attempt here.
    attempts = link.attempt + (1 if event is Input.ACTION_FAILED else 0)
    if attempts >= policy.max_attempts:
        failed = _give_up(link, event, fail_state, f"{why} ({attempts} attempts)", now_ms)
        return Step(link, failed.after, event, tuple(actions) + failed.actions)
    after = replace(
        link,
        state=retry_state,
        attempt=attempts,
        delivery_id=None,
        next_at_ms=now_ms + policy.backoff_ms(max(attempts, 1), rng),
        reason=why,
    )
    return Step(link, after, event, tuple(actions))


_DEFAULT_REASON: Final = {
    Input.DUE: "no acknowledgement before the deadline",
    Input.EXPIRED: "the delivery expired unacknowledged",
    Input.REFUSED: "the delivery was refused",
    Input.ACTION_FAILED: "the broker refused the step",
}


def _new(link: LinkRecord) -> int:
    if link.new_version is None:
        raise LocalProtocolError(f"a link in {link.state} has no new version")
    return link.new_version


def _give_up(link: LinkRecord, event: Input, state: LinkState, reason: str, now_ms: int) -> Step:
    actions: tuple[Action, ...] = ()
    if link.new_version is not None:
        actions = (Disable(link.new_version),)
    after = LinkRecord(
        state=state,
        old_version=link.old_version,
        new_version=link.new_version,
        attempt=link.attempt,
        delivery_id=None,
        next_at_ms=now_ms,
        reason=reason,
    )
    return Step(link, after, event, actions)


def stage(state: LinkState) -> str:
    """Which end a state's delivery goes to (for reports)."""
    if state in (LinkState.PENDING, LinkState.DELIVERED_DOWNSTREAM):
        return DOWNSTREAM
    return UPSTREAM


def uses_old_key(state: LinkState) -> bool:
    """Whether both ends of a link in ``state`` still transmit under the old version."""
    return state is not LinkState.ACTIVE and state is not LinkState.RETIRED_OLD
