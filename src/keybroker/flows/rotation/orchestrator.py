"""The durable driver of rollouts: the store holds every link's record; this moves them.

Each call to :meth:`Orchestrator.step` finds links that have something to do
(a deadline, backoff or grace period that is over, or a delivery that was
acknowledged, refused or expired), and for each one, in **one transaction**:
reads the record and the delivery (locked), asks
:func:`~keybroker.flows.rotation.protocol.advance` what to do, performs the
actions through the broker (add a version, deliver, expire, promote, disable),
writes the new record with a compare-and-set on its step counter, and appends
a :class:`~.messages.LinkStepped` entry to the transparency log. A broker killed
at any point has either done all of that for a step or none of it, so after a
restart the rollout resumes exactly where it was, with no step repeated or
skipped; two replicas running ``step`` at once never apply the same step twice
(PostgreSQL: ``FOR UPDATE SKIP LOCKED``; SQLite: one writer at a time).

Why an ack is never reported as a timeout: the ack handler and this driver both
decide on the delivery row under its lock, and the deadline is the delivery's
own ``expires_at``. An ack the broker accepted is ``acked`` here; an ack that
arrives after the deadline is refused there. No separate timer can disagree.

Links are processed in batches (one transaction per batch, a savepoint per
link that has actions). What the links of a batch share is read once for the
batch (:class:`_Batch`): their keysets are locked and their revisions read in
one query, the ends' principals and hold grants in three, and a keyset the
orchestrator already holds unwrapped from an earlier step is reused only if its
stored id and revision are still the ones it saved or loaded (every save bumps
the revision under compare-and-set, so equal means identical). Each action still
goes through the broker's own checks and lifecycle steps
(:func:`~keybroker.broker.deliveries.deliver_loaded_in` applies
:func:`~keybroker.broker.deliveries.deliver_in`'s checks; a keyset change is
:func:`~keybroker.broker.keysets.change_in`'s sequence). ``bench/rotation.py``
measures what this costs per link (docs/benchmarks.md, ``## rotation``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from keybroker.broker import Broker, DeliveryEnvelope
from keybroker.broker._context import BrokerContext, keyset_name, record
from keybroker.broker._delivery_rows import fail_sent_versions
from keybroker.broker.deliveries import (
    DELIVERY_INSERT,
    Holder,
    deliver_in,
    deliver_loaded_in,
    delivery_lock,
    expire_in,
    holders_in,
    outstanding_deliveries,
)
from keybroker.broker.events import Event, from_ms, to_ms
from keybroker.broker.grants import GrantMode, grant_many_in
from keybroker.broker.keysets import (
    Step as KeysetStep,
)
from keybroker.broker.keysets import (
    _retire_deliveries,
    create_in,
    disable_step,
    promote_step,
    rotate_step,
)
from keybroker.errors import (
    Conflict,
    KeybrokerError,
    LocalProtocolError,
    NotFound,
    StoreError,
)
from keybroker.flows.rotation.messages import LinkStepped, RolloutChanged, RolloutStarted
from keybroker.flows.rotation.protocol import (
    ABORTABLE,
    AWAITING_ACK,
    DOWNSTREAM,
    TERMINAL,
    AddVersion,
    Deliver,
    Disable,
    ExpireDelivery,
    Input,
    LinkRecord,
    LinkState,
    Promote,
    RolloutPolicy,
    Step,
    advance,
    uses_old_key,
)
from keybroker.flows.rotation.topology import Link, Topology
from keybroker.keys import AES256_GCM, Keyset, KeyState, KeyVersionInfo
from keybroker.pki import PrincipalId
from keybroker.store.bulk import bulk_update
from keybroker.store.keysets import StoredKeyset
from keybroker.store.schema import (
    deliveries,
    grants,
    key_versions,
    keysets,
    principals,
    rotation_links,
    rotation_rollouts,
)

logger = logging.getLogger("keybroker.rotation")

RUNNING: Final = "RUNNING"
HALTED: Final = "HALTED"
ABORTED: Final = "ABORTED"
COMPLETED: Final = "COMPLETED"
#: Rollouts whose links may still move (an aborted one finishes its ACTIVE links).
LIVE_ROLLOUTS: Final = (RUNNING, HALTED, ABORTED)
_TERMINAL_NAMES: Final = tuple(s.value for s in TERMINAL)
_AWAITING_NAMES: Final = tuple(s.value for s in AWAITING_ACK)
_SENT: Final = "sent"
_OUTCOME: Final = {"acked": Input.ACKED, "failed": Input.REFUSED, "expired": Input.EXPIRED}


@dataclass(frozen=True)
class LinkStatus:
    name: str
    node: str
    site: str
    keyset: str
    state: LinkState
    old_version: int
    new_version: int | None
    attempt: int
    reason: str | None
    updated_at: datetime

    @property
    def version_in_use(self) -> int:
        """The version both ends transmit under now."""
        if uses_old_key(self.state) or self.new_version is None:
            return self.old_version
        return self.new_version


@dataclass(frozen=True)
class RolloutStatus:
    rollout_id: str
    topology: str
    state: str
    policy: RolloutPolicy
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    reason: str | None
    links: tuple[LinkStatus, ...] = field(default=())

    @property
    def counts(self) -> dict[str, int]:
        counted = Counter(link.state.value for link in self.links)
        return {state.value: counted.get(state.value, 0) for state in LinkState}

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def failed(self) -> tuple[LinkStatus, ...]:
        return tuple(
            link
            for link in self.links
            if link.state in (LinkState.FAILED_KEEP_OLD, LinkState.ABORTED_KEEP_OLD)
        )


@dataclass
class StepReport:
    """What one :meth:`Orchestrator.step` did."""

    steps: int = 0
    #: Principals something was delivered to (the caller wakes them on the bus).
    delivered_to: set[PrincipalId] = field(default_factory=set)
    #: Links whose step the broker refused and that stay as they were until the next try.
    errors: int = 0


@dataclass(frozen=True)
class SetupReport:
    keysets_created: int
    grants_created: int
    deliveries: int


class Orchestrator:
    """Rollouts over one broker. Any replica may run it: the store holds every record.

    Between calls it keeps only the unwrapped keysets of links still in flight, each
    checked against its stored revision under lock before any use, dropped when its
    link finishes, and all dropped when a transaction does not commit.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        rng: Callable[[int], bytes] = os.urandom,
        batch_size: int = 200,
    ) -> None:
        if not 1 <= batch_size <= 10_000:
            raise LocalProtocolError("batch_size must be between 1 and 10,000")
        self._ctx: BrokerContext = broker.context
        self._rng = rng
        self._batch = batch_size
        #: Link keysets loaded by earlier steps, reused only while their stored id and
        #: revision are unchanged (checked under lock each time; see _Batch).
        self._keysets: dict[str, StoredKeyset] = {}

    def __repr__(self) -> str:
        return f"Orchestrator({self._ctx.store!r})"

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A store transaction; if it does not commit, nothing loaded or saved in it is kept."""
        try:
            with self._ctx.store.transaction() as conn:
                yield conn
        except BaseException:
            self._keysets.clear()
            raise

    # -- setting links up ----------------------------------------------------------

    def setup(self, topology: Topology, *, delivery_ttl: timedelta) -> SetupReport:
        """Make every link ready to carry traffic (idempotent).

        Creates the missing link keysets (AES-256-GCM), grants ``hold`` to both
        ends, and delivers the current primary to each end that has not acknowledged it.
        Both ends must be enrolled.
        """
        ctx = self._ctx
        names = list(dict.fromkeys(link.keyset for link in topology.links))
        existing = set(ctx.keysets.names())
        with ctx.store.snapshot() as conn:
            held = _holding(conn, names)
        created = granted = 0
        # Keysets and hold grants, a batch of links per transaction (one log append and
        # one commit per batch, not one per keyset and grant); create_in's and grant_many_in's
        # checks on each.
        links = list(topology.links)
        for start in range(0, len(links), self._batch):
            part = links[start : start + self._batch]
            new = [n for n in dict.fromkeys(k.keyset for k in part) if n not in existing]
            grants_ = [
                (end, link.keyset)
                for link in part
                for end in (link.downstream, link.upstream)
                if (str(end), link.keyset) not in held
            ]
            if not new and not grants_:
                continue
            with ctx.store.transaction() as conn:
                now = ctx.now()
                made: list[Event] = []
                for name in new:
                    fresh = Keyset.generate(name, AES256_GCM, now=now)
                    made += create_in(ctx, conn, fresh, now)[1]
                given = grant_many_in(ctx, conn, grants_, GrantMode.HOLD, now=now)
                record(ctx, conn, made + given)
            existing.update(new)
            held.update((str(end), name) for end, name in grants_)
            created += len(new)
            granted += len(given)  # not those another writer made since _holding read
        with ctx.store.snapshot() as conn:
            primaries = _primaries(conn, names)
            acked = _acked(conn, names)
        missing = [n for n in names if n not in primaries]
        if missing:
            raise Conflict(f"keyset {missing[0]!r} has no primary version")
        todo: list[tuple[str, int, PrincipalId]] = []
        for link in topology.links:
            primary = primaries[link.keyset]
            for end in (link.downstream, link.upstream):
                if (str(end), link.keyset, primary) not in acked:
                    todo.append((link.keyset, primary, end))
        # The first deliveries, a batch per transaction: deliver_in's checks on each.
        for start in range(0, len(todo), self._batch):
            chunk = todo[start : start + self._batch]
            with ctx.store.transaction() as conn:
                now = ctx.now()
                # Locks in the order every writer takes them (see _Batch); each delivery
                # is of a version that exists, so all their locks are taken together.
                batch = _Batch(ctx, conn, now, {}, defer=True)
                touched = sorted({name for name, _, _ in chunk})
                batch.lock_keysets(touched)
                batch.preload(touched)
                batch.read_holders([(end, name) for name, _, end in chunk])
                batch.lock_deliveries((end, name, version) for name, version, end in chunk)
                events: list[Event] = []
                for name, version, end in chunk:
                    events += batch.deliver(name, version, end, delivery_ttl)[1]
                events += batch.flush()
                record(ctx, conn, events)
        return SetupReport(created, granted, len(todo))

    # -- rollouts ------------------------------------------------------------------

    def start(
        self,
        topology: Topology,
        policy: RolloutPolicy | None = None,
        *,
        links: Sequence[str] | None = None,
    ) -> str:
        """Create a rollout over ``links`` (names ``node/site``; default: all). Returns its id.

        Refused with :class:`Conflict` if a link keyset has no primary or is in
        another rollout that has not finished with it.
        """
        policy = policy or RolloutPolicy()
        chosen = _select(topology, links)
        ctx = self._ctx
        now = ctx.now()
        rollout_id = ctx.new_id()
        names = [link.keyset for link in chosen]
        with ctx.store.transaction() as conn:
            ctx.store.lock(conn, "rotation/start")
            primaries = _primaries(conn, names)
            missing = [n for n in names if n not in primaries]
            if missing:
                raise Conflict(
                    f"{len(missing)} link keyset(s) missing or without a primary, e.g. "
                    f"{missing[0]!r}; run `keybroker rotation setup` first"
                )
            busy = _busy_keysets(conn, names)
            if busy:
                raise Conflict(
                    f"{len(busy)} link(s) are in a rollout that has not finished, e.g. "
                    f"{sorted(busy)[0]!r}"
                )
            conn.execute(
                rotation_rollouts.insert().values(
                    id=rollout_id,
                    topology=topology.name,
                    state=RUNNING,
                    policy=policy.encode(),
                    document=_document(topology, chosen),
                    created_at=now,
                    updated_at=now,
                    finished_at=None,
                    reason=None,
                )
            )
            rows = [
                {
                    "id": ctx.new_id(),
                    "rollout_id": rollout_id,
                    "position": i,
                    "node": link.node,
                    "site": link.site,
                    "keyset": link.keyset,
                    "state": LinkState.PENDING.value,
                    "old_version": primaries[link.keyset],
                    "new_version": None,
                    "attempt": 0,
                    "delivery_id": None,
                    "next_at": _PARKED if 0 < policy.max_parallel <= i else now,
                    "reason": None,
                    "seq": 0,
                    "updated_at": now,
                }
                for i, link in enumerate(chosen)
            ]
            for chunk in _chunks(rows, 1000):
                conn.execute(rotation_links.insert(), chunk)
            started = RolloutStarted(
                at_ms=to_ms(now),
                rollout_id=rollout_id,
                topology=topology.name,
                links=len(chosen),
                policy_sha256=hashlib.sha256(policy.encode()).digest(),
            )
            record(ctx, conn, [started])
        logger.info("rollout %s started: %d links of %s", rollout_id, len(chosen), topology.name)
        return rollout_id

    def step(self) -> StepReport:
        """Move every link that has something to do; returns what was done."""
        report = StepReport()
        now = self._ctx.now()
        self._start_waiting(now)
        while True:
            # One read finds every link due now; each batch then locks its share and checks
            # it again, so finding the work costs one scan per pass, not one per batch.
            # A link a batch moves to a state that is due at once is taken by the next pass.
            due = self._due_candidates(now)
            before = report.steps
            for start in range(0, len(due), self._batch):
                self._step_batch(now, report, due[start : start + self._batch])
            if not due or report.steps == before:
                break
        self._settle_rollouts(now)
        return report

    def run_until_idle(self, *, max_rounds: int = 10_000) -> StepReport:
        """Step until nothing is due now (tests and benchmarks; the server loops on a timer)."""
        total = StepReport()
        for _ in range(max_rounds):
            report = self.step()
            total.steps += report.steps
            total.errors += report.errors
            total.delivered_to |= report.delivered_to
            if report.steps == 0:
                break
        return total

    def abort(self, rollout_id: str) -> RolloutStatus:
        """Stop a rollout: every link not yet ACTIVE keeps its old key (the new one is disabled).

        Links already ACTIVE have moved both directions; they finish retiring
        their old key. Aborting a finished rollout is refused.
        """
        ctx = self._ctx
        now = ctx.now()
        with self._transaction() as conn:
            rollout = _rollout_row(conn, rollout_id, for_update=True)
            if rollout.finished_at is not None or rollout.state == ABORTED:
                raise Conflict(f"rollout {rollout_id} is {rollout.state.lower()}; nothing to abort")
            events: list[Event] = []
            rows = conn.execute(
                rotation_links.select()
                .where(
                    rotation_links.c.rollout_id == rollout_id,
                    rotation_links.c.state.in_([s.value for s in ABORTABLE]),
                )
                .order_by(rotation_links.c.position)
            ).all()
            batch = self._batch_for(conn, now, rows)
            for row in rows:
                step = advance(_record(row), Input.ABORT, to_ms(now), _policy(rollout), self._rng)
                events += self._apply(batch, rollout_id, row, step, StepReport())
            events += batch.flush()
            events.append(self._set_rollout(conn, rollout_id, ABORTED, "aborted by operator", now))
            record(ctx, conn, events)
        self._settle_rollouts(now)
        return self.status(rollout_id)

    def retry(self, rollout_id: str, links: Sequence[str] | None = None) -> RolloutStatus:
        """Start the failed or aborted links of a rollout again (all, or those named)."""
        ctx = self._ctx
        now = ctx.now()
        with self._transaction() as conn:
            rollout = _rollout_row(conn, rollout_id, for_update=True)
            query = rotation_links.select().where(
                rotation_links.c.rollout_id == rollout_id,
                rotation_links.c.state.in_(
                    [LinkState.FAILED_KEEP_OLD.value, LinkState.ABORTED_KEEP_OLD.value]
                ),
            )
            rows = conn.execute(query.order_by(rotation_links.c.position)).all()
            if links is not None:
                wanted = set(links)
                known = {f"{r.node}/{r.site}" for r in rows}
                unknown = wanted - known
                if unknown:
                    raise NotFound(
                        f"not failed or aborted in this rollout: {', '.join(sorted(unknown))}"
                    )
                rows = [r for r in rows if f"{r.node}/{r.site}" in wanted]
            if not rows:
                raise Conflict(f"rollout {rollout_id} has no failed or aborted link to retry")
            busy = _busy_keysets(conn, [r.keyset for r in rows])
            if busy:
                raise Conflict(f"{sorted(busy)[0]!r} is in another rollout that has not finished")
            policy = _policy(rollout)
            events: list[Event] = []
            batch = self._batch_for(conn, now, rows)
            for row in rows:
                step = advance(_record(row), Input.RETRY, to_ms(now), policy, self._rng)
                events += self._apply(batch, rollout_id, row, step, StepReport())
            events += batch.flush()
            conn.execute(
                rotation_rollouts.update()
                .where(rotation_rollouts.c.id == rollout_id)
                .values(state=RUNNING, finished_at=None, reason=None, updated_at=now)
            )
            events.append(
                RolloutChanged(
                    at_ms=to_ms(now),
                    rollout_id=rollout_id,
                    state=RUNNING,
                    reason=f"retry of {len(rows)} link(s)",
                )
            )
            record(ctx, conn, events)
        return self.status(rollout_id)

    # -- reading -------------------------------------------------------------------

    def status(self, rollout_id: str) -> RolloutStatus:
        with self._ctx.store.snapshot() as conn:
            rollout = _rollout_row(conn, rollout_id)
            rows = conn.execute(
                rotation_links.select()
                .where(rotation_links.c.rollout_id == rollout_id)
                .order_by(rotation_links.c.position)
            ).all()
        return _status(rollout, rows)

    def list_rollouts(self) -> list[RolloutStatus]:
        """Every rollout, newest first, without its links."""
        with self._ctx.store.snapshot() as conn:
            rows = conn.execute(
                rotation_rollouts.select().order_by(
                    rotation_rollouts.c.created_at.desc(), rotation_rollouts.c.id
                )
            ).all()
        return [_status(row, []) for row in rows]

    # -- the machinery -------------------------------------------------------------

    def _start_waiting(self, now: datetime) -> None:
        """Release parked links of ``max_parallel`` rollouts while there is room."""
        ctx = self._ctx
        with ctx.store.snapshot() as conn:
            rollouts = conn.execute(
                rotation_rollouts.select().where(rotation_rollouts.c.state == RUNNING)
            ).all()
        for rollout in rollouts:
            policy = _policy(rollout)
            if policy.max_parallel == 0:
                continue
            with ctx.store.transaction() as conn:
                ctx.store.lock(conn, f"rotation/{rollout.id}")
                in_flight = conn.execute(
                    sa.select(sa.func.count()).where(
                        rotation_links.c.rollout_id == rollout.id,
                        rotation_links.c.state.not_in((*_TERMINAL_NAMES, LinkState.ACTIVE.value)),
                        rotation_links.c.next_at != _PARKED,
                    )
                ).scalar_one()
                room = policy.max_parallel - int(in_flight)
                if room <= 0:
                    continue
                ids = list(
                    conn.execute(
                        sa.select(rotation_links.c.id)
                        .where(
                            rotation_links.c.rollout_id == rollout.id,
                            rotation_links.c.state == LinkState.PENDING.value,
                            rotation_links.c.next_at == _PARKED,
                        )
                        .order_by(rotation_links.c.position)
                        .limit(room)
                    ).scalars()
                )
                if ids:
                    conn.execute(
                        rotation_links.update()
                        .where(rotation_links.c.id.in_(ids))
                        .values(next_at=now)
                    )

    @staticmethod
    def _due_links(now: datetime, *columns: Any) -> sa.Select[Any]:
        """``columns`` of the links due at ``now`` (any rollout), in stepping order."""
        return (
            sa.select(*columns)
            .select_from(
                rotation_links.outerjoin(
                    deliveries, deliveries.c.id == rotation_links.c.delivery_id
                )
            )
            .where(
                rotation_links.c.state.not_in(_TERMINAL_NAMES),
                sa.or_(
                    rotation_links.c.next_at <= now,
                    sa.and_(
                        rotation_links.c.state.in_(_AWAITING_NAMES),
                        sa.or_(deliveries.c.state.is_(None), deliveries.c.state != _SENT),
                    ),
                ),
            )
            .order_by(rotation_links.c.next_at, rotation_links.c.id)
        )

    def _due_candidates(self, now: datetime) -> list[str]:
        """Every link of a live rollout due now, in the order they are stepped (read
        without locks)."""
        live = sa.select(rotation_rollouts.c.id).where(rotation_rollouts.c.state.in_(LIVE_ROLLOUTS))
        query = self._due_links(now, rotation_links.c.id).where(
            rotation_links.c.rollout_id.in_(live)
        )
        with self._ctx.store.snapshot() as conn:
            return list(conn.execute(query).scalars())

    def _due_ids(self, conn: Connection, now: datetime, among: list[str]) -> list[str]:
        """Those of ``among`` still due and of a live rollout, locked (PostgreSQL: skipping
        any another replica holds; SQLite: this transaction is the only writer).

        The links are selected by their ids alone and the rollouts' states read apart: with
        the rollout in the same query, PostgreSQL's planner (on a table filled since its
        statistics were last gathered, as a new rollout's is) walked every link of the
        rollout and matched each against the ids, a cost growing with the rollout's size
        on every batch (14 ms per batch of 200 at 2,000 links, measured).
        """
        live = set(
            conn.execute(
                sa.select(rotation_rollouts.c.id).where(
                    rotation_rollouts.c.state.in_(LIVE_ROLLOUTS)
                )
            ).scalars()
        )
        if not live:
            return []
        query = self._due_links(now, rotation_links.c.id, rotation_links.c.rollout_id).where(
            rotation_links.c.id.in_(among)
        )
        if self._ctx.store.dialect == "postgresql":
            query = query.with_for_update(of=rotation_links, skip_locked=True)
        return [row.id for row in conn.execute(query) if row.rollout_id in live]

    def _step_batch(self, now: datetime, report: StepReport, among: list[str]) -> int:
        """Step the due links among ``among`` in one transaction.

        First without a savepoint per link: a link whose action the broker refuses
        is rare, and a savepoint costs two statements (two round trips on
        PostgreSQL) per link. If one is refused, the whole transaction is rolled
        back and the batch done again with a savepoint around each link, so that
        link alone is undone and recorded as failed.
        """
        scratch = StepReport()
        try:
            taken = self._step_batch_once(now, scratch, among, careful=False)
        except _Refused:
            scratch = StepReport()
            taken = self._step_batch_once(now, scratch, among, careful=True)
        report.steps += scratch.steps
        report.errors += scratch.errors
        report.delivered_to |= scratch.delivered_to
        return taken

    def _step_batch_once(
        self, now: datetime, report: StepReport, among: list[str], *, careful: bool
    ) -> int:
        ctx = self._ctx
        with self._transaction() as conn:
            ids = self._due_ids(conn, now, among)
            if not ids:
                return 0
            rows = conn.execute(
                sa.select(
                    rotation_links,
                    rotation_rollouts.c.policy,
                    rotation_rollouts.c.state.label("rollout_state"),
                )
                .join(rotation_rollouts, rotation_rollouts.c.id == rotation_links.c.rollout_id)
                .where(rotation_links.c.id.in_(ids))
                .order_by(rotation_links.c.next_at, rotation_links.c.id)
            ).all()
            # Locks in the order every other writer takes them: keysets, then principals and
            # grants, then deliveries (see _Batch).
            # Savepoints (careful) and deferred writes do not mix: a savepoint would
            # undo a link's writes but not its queued ones.
            batch = self._batch_for(conn, now, rows, defer=not careful)
            outcome = self._observe(conn, [r.delivery_id for r in rows if r.delivery_id])
            events: list[Event] = []
            policies: dict[bytes, RolloutPolicy] = {}
            for row in rows:
                policy = policies.get(bytes(row.policy))
                if policy is None:
                    policy = policies.setdefault(
                        bytes(row.policy), RolloutPolicy.decode(bytes(row.policy))
                    )
                event, reason = _input_for(row, outcome, now)
                if event is None:
                    continue
                if (
                    row.rollout_state != RUNNING
                    and row.state == LinkState.PENDING.value
                    and row.new_version is None
                ):
                    continue  # a halted or aborted rollout starts nothing new
                events += self._step_link(batch, row, event, reason, policy, report, careful)
            events += batch.flush()
            record(ctx, conn, events)
        return len(ids)

    def _batch_for(
        self, conn: Connection, now: datetime, rows: Sequence[Any], *, defer: bool = True
    ) -> _Batch:
        """A :class:`_Batch` over ``rows``' keysets (locked) and their ends' checks."""
        batch = _Batch(self._ctx, conn, now, self._keysets, defer=defer)
        names = sorted({row.keyset for row in rows})
        batch.lock_keysets(names)
        batch.preload(names)
        # Deliveries are made from PENDING (to the site) and ACKED_DOWNSTREAM (to the node);
        # a delivery to anyone not read here is checked by deliver_in itself.
        ends: list[tuple[PrincipalId, str]] = []
        for row in rows:
            link = Link(node=row.node, site=row.site, keyset=row.keyset)
            if row.state == LinkState.PENDING.value:
                ends.append((link.downstream, link.keyset))
            elif row.state == LinkState.ACKED_DOWNSTREAM.value:
                ends.append((link.upstream, link.keyset))
        if ends:
            batch.read_holders(ends)
        # The deliveries of versions that exist already (to the nodes) take their locks
        # now, together; a version added in this batch needs none (see deliver_loaded_in).
        batch.lock_deliveries(
            (link.upstream, row.keyset, row.new_version)
            for row in rows
            if row.state == LinkState.ACKED_DOWNSTREAM.value and row.new_version
            for link in (Link(node=row.node, site=row.site, keyset=row.keyset),)
        )
        return batch

    def _observe(
        self, conn: Connection, ids: list[str]
    ) -> dict[str, tuple[str, datetime, str | None]]:
        """Each outstanding delivery's state, locked so an ack in flight is seen or waits."""
        if not ids:
            return {}
        query = sa.select(
            deliveries.c.id,
            deliveries.c.state,
            deliveries.c.expires_at,
            deliveries.c.failure_reason,
        ).where(deliveries.c.id.in_(ids))
        if self._ctx.store.dialect == "postgresql":
            query = query.with_for_update()
        return {r.id: (r.state, r.expires_at, r.failure_reason) for r in conn.execute(query)}

    def _step_link(  # noqa: PLR0917 - private; every argument is needed
        self,
        batch: _Batch,
        row: Any,
        event: Input,
        reason: str | None,
        policy: RolloutPolicy,
        report: StepReport,
        careful: bool,
    ) -> list[Event]:
        before = _record(row)
        now_ms = to_ms(batch.now)
        step = advance(before, event, now_ms, policy, self._rng, reason=reason)
        try:
            if not step.actions:
                # Only the record's compare-and-set writes, and a refusal writes nothing.
                return self._apply(batch, row.rollout_id, row, step, report)
            if not careful:
                try:
                    return self._apply(batch, row.rollout_id, row, step, report)
                except KeybrokerError as exc:
                    if isinstance(exc, StoreError):
                        raise
                    raise _Refused from exc  # roll back; the batch is done again carefully
            with batch.conn.begin_nested():
                return self._apply(batch, row.rollout_id, row, step, report)
        except KeybrokerError as exc:
            # The savepoint undid this link's writes; forget what we had loaded of it too.
            batch.forget(row.keyset)
            if isinstance(exc, StoreError):
                raise
            why = _why(exc)
            logger.warning("rotation link %s/%s: %s", row.node, row.site, why)
            try:
                failed = advance(before, Input.ACTION_FAILED, now_ms, policy, self._rng, reason=why)
            except LocalProtocolError:
                report.errors += 1
                return []
            try:
                with batch.conn.begin_nested():
                    return self._apply(batch, row.rollout_id, row, failed, report)
            except KeybrokerError as again:
                batch.forget(row.keyset)
                if isinstance(again, StoreError):
                    raise
                logger.error("rotation link %s/%s stuck: %s", row.node, row.site, _why(again))
                report.errors += 1
                return []

    def _apply(
        self,
        batch: _Batch,
        rollout_id: str,
        row: Any,
        step: Step,
        report: StepReport,
    ) -> list[Event]:
        """Perform ``step``'s actions and write its record; the caller records the events."""
        conn, now = batch.conn, batch.now
        link = Link(node=row.node, site=row.site, keyset=row.keyset)
        after = step.after
        events: list[Event] = []
        for action in step.actions:
            if isinstance(action, AddVersion):
                info, more = batch.change(link.keyset, rotate_step())
                after = replace(after, new_version=info.version)
                events += more
            elif isinstance(action, Deliver):
                to = link.downstream if action.to == DOWNSTREAM else link.upstream
                version = action.version or after.new_version
                if not version:
                    raise LocalProtocolError("deliver without a version")
                envelope, more = batch.deliver(
                    link.keyset, version, to, timedelta(milliseconds=action.ttl_ms)
                )
                after = replace(after, delivery_id=envelope.delivery_id)
                report.delivered_to.add(to)
                events += more
            elif isinstance(action, ExpireDelivery):
                events += expire_in(conn, now, action.delivery_id)
            elif isinstance(action, Promote):
                _, more = batch.change(link.keyset, promote_step(action.version))
                events += more
            elif isinstance(action, Disable) and batch.version_state(
                link.keyset, action.version
            ) in (KeyState.PENDING, KeyState.ENABLED):
                _, more = batch.change(link.keyset, disable_step(action.version))
                events += more
        batch.update_link(
            {
                "b_id": row.id,
                "b_seq": row.seq,
                "b_state": after.state.value,
                "b_new_version": after.new_version,
                "b_attempt": after.attempt,
                "b_delivery_id": after.delivery_id,
                "b_next_at": from_ms(after.next_at_ms),
                "b_reason": _clip(after.reason),
                "b_updated_at": now,
            }
        )
        if after.state in TERMINAL:
            batch.release(link.keyset)  # a finished link's keyset is not kept unwrapped
        report.steps += 1
        events.append(
            LinkStepped(
                at_ms=to_ms(now),
                rollout_id=rollout_id,
                link=link.name,
                keyset=link.keyset,
                seq=row.seq + 1,
                input=step.input.value,
                from_state=step.before.state.value,
                to_state=after.state.value,
                old_version=after.old_version,
                new_version=after.new_version,
                attempt=after.attempt,
                delivery_id=after.delivery_id,
                reason=_clip(after.reason),
            )
        )
        return events

    def _settle_rollouts(self, now: datetime) -> None:
        """Halt rollouts past their failure budget; finish those with nothing left to move."""
        ctx = self._ctx
        with ctx.store.snapshot() as conn:
            live = conn.execute(
                rotation_rollouts.select().where(
                    rotation_rollouts.c.state.in_(LIVE_ROLLOUTS),
                    rotation_rollouts.c.finished_at.is_(None),
                )
            ).all()
        for rollout in live:
            with self._transaction() as conn:
                ctx.store.lock(conn, f"rotation/{rollout.id}")
                current = _rollout_row(conn, rollout.id, for_update=True)
                if current.finished_at is not None:
                    continue
                counts = _state_counts(conn, rollout.id)
                total = sum(counts.values())
                failed = counts.get(LinkState.FAILED_KEEP_OLD.value, 0)
                policy = _policy(current)
                events: list[Event] = []
                if (
                    current.state == RUNNING
                    and total
                    and failed * 100 > policy.max_failed_percent * total
                ):
                    why = (
                        f"halted: {failed} of {total} links failed "
                        f"(budget {policy.max_failed_percent}%)"
                    )
                    events += self._halt(conn, current, why, now)
                    counts = _state_counts(conn, rollout.id)
                unfinished = sum(n for s, n in counts.items() if s not in _TERMINAL_NAMES)
                if unfinished == 0:
                    state = COMPLETED if current.state == RUNNING else current.state
                    failed_now = counts.get(LinkState.FAILED_KEEP_OLD.value, 0)
                    reason = current.reason or (
                        f"{failed_now} link(s) kept their old key" if failed_now else None
                    )
                    conn.execute(
                        rotation_rollouts.update()
                        .where(rotation_rollouts.c.id == rollout.id)
                        .values(state=state, finished_at=now, updated_at=now, reason=reason)
                    )
                    events.append(
                        RolloutChanged(
                            at_ms=to_ms(now),
                            rollout_id=rollout.id,
                            state=state,
                            reason=_clip(reason),
                        )
                    )
                record(ctx, conn, events)

    def _halt(self, conn: Connection, rollout: Any, why: str, now: datetime) -> list[Event]:
        """Stop starting links: every link not yet started is aborted and keeps its old key."""
        events: list[Event] = [self._set_rollout(conn, rollout.id, HALTED, why, now)]
        rows = conn.execute(
            rotation_links.select().where(
                rotation_links.c.rollout_id == rollout.id,
                rotation_links.c.state == LinkState.PENDING.value,
                rotation_links.c.new_version.is_(None),
            )
        ).all()
        policy = _policy(rollout)
        batch = self._batch_for(conn, now, rows)
        for row in rows:
            step = advance(_record(row), Input.ABORT, to_ms(now), policy, self._rng, reason=why)
            events += self._apply(batch, rollout.id, row, step, StepReport())
        events += batch.flush()
        return events

    def _set_rollout(
        self, conn: Connection, rollout_id: str, state: str, reason: str, now: datetime
    ) -> Event:
        conn.execute(
            rotation_rollouts.update()
            .where(rotation_rollouts.c.id == rollout_id)
            .values(state=state, reason=_clip(reason), updated_at=now)
        )
        return RolloutChanged(
            at_ms=to_ms(now), rollout_id=rollout_id, state=state, reason=_clip(reason)
        )


class _Refused(Exception):
    """A link's action was refused in a batch stepped without savepoints."""


#: One link's record, compare-and-set on its step counter.
#: Each link record written with a compare-and-set on its step counter (one statement
#: for the whole batch on PostgreSQL; see keybroker.store.bulk).
_LINK_UPDATE: Final = bulk_update(
    rotation_links,
    match={"id": "b_id", "seq": "b_seq"},
    assign={
        "state": "b_state",
        "new_version": "b_new_version",
        "attempt": "b_attempt",
        "delivery_id": "b_delivery_id",
        "next_at": "b_next_at",
        "reason": "b_reason",
        "updated_at": "b_updated_at",
    },
    computed={"seq": rotation_links.c.seq + 1},
)


class _Batch:
    """What the links stepped in one transaction share: their keysets and their ends' checks.

    * **Keysets.** Each link keyset is locked (PostgreSQL: ``FOR UPDATE``; SQLite:
      the transaction is the only writer) and its id and revision read, all in one
      query. A keyset the orchestrator loaded or saved in an earlier step is reused
      only if both still match: a keyset row's revision goes up on every save
      (compare-and-set, :mod:`keybroker.store.keysets`), so a match means the stored
      versions are exactly those held. Anything else is loaded again. A change is
      :func:`~keybroker.broker.keysets.change_in`'s own sequence (the same lifecycle
      step, a compare-and-set save, outstanding deliveries of a retired version
      failed) on the keyset held. What a link's savepoint undoes, or a transaction
      that does not commit, is forgotten; a finished link's keyset is dropped.
    * **Recipients.** Both ends' principal and hold grant are read for the whole
      batch (:func:`~keybroker.broker.deliveries.holders_in`, locked ``FOR SHARE``
      on PostgreSQL so a revocation waits for this transaction and then fails what
      it delivered), and each delivery applies :func:`deliver_in`'s checks to them.

    Locks are taken keysets first, then principals and grants, then deliveries: the
    order in which an operator's keyset change or revocation takes them, so neither
    can deadlock with a step.
    """

    def __init__(
        self,
        ctx: BrokerContext,
        conn: Connection,
        now: datetime,
        cache: dict[str, StoredKeyset],
        *,
        defer: bool = False,
    ) -> None:
        self.ctx, self.conn, self.now = ctx, conn, now
        self._cache = cache
        self._heads: dict[str, tuple[str, int]] = {}
        self._holders: dict[tuple[PrincipalId, str], Holder] = {}
        self._postgres = ctx.store.dialect == "postgresql"
        self._link_updates: list[dict[str, Any]] = []
        #: Deliveries (principal, keyset, version) whose lock this transaction holds, and
        #: what was on its way for them when it was taken (outstanding_deliveries).
        self._locked: set[tuple[PrincipalId, str, int]] = set()
        self._outstanding: dict[tuple[str, str, int], Any] = {}
        #: Versions added in this transaction: nothing can have been delivered of them.
        self._added: set[tuple[str, int]] = set()
        #: Deferred mode: new delivery rows, and retired versions (keyset row id, version)
        #: by reason, whose outstanding deliveries flush() fails.
        self._inserts: list[dict[str, Any]] = []
        self._retired: dict[str, list[tuple[str, int]]] = {}
        #: Keysets changed in memory and not yet saved (deferred mode only).
        self._dirty: dict[str, StoredKeyset] = {}
        self._defer = defer

    def update_link(self, values: dict[str, Any]) -> None:
        """Queue one link record's compare-and-set write; :meth:`flush` does them all."""
        self._link_updates.append(values)

    def flush(self) -> list[Event]:
        """Write the deferred keyset changes, deliveries and link records, one statement
        per kind of write, and fail the outstanding deliveries of the versions retired;
        returns the events of those. :class:`Conflict` (the whole batch rolls back) if
        a keyset or link was changed since it was read."""
        inserts, self._inserts = self._inserts, []
        if inserts:
            self.conn.execute(DELIVERY_INSERT, inserts)
        events: list[Event] = []
        retired, self._retired = self._retired, {}
        for reason, versions in retired.items():
            events += fail_sent_versions(self.conn, self.now, reason, versions)
        dirty, self._dirty = self._dirty, {}
        for saved in self.ctx.keysets.save_many(list(dirty.values()), conn=self.conn):
            name = keyset_name(saved.keyset.name)
            if name in self._cache:  # not released by a finished link
                self._cache[name] = saved
            self._heads[name] = (saved.id, saved.revision)
        updates, self._link_updates = self._link_updates, []
        if not updates:
            return events
        if _LINK_UPDATE.run(self.conn, updates) != len(updates):
            raise Conflict("a link was changed concurrently")
        return events

    def lock_keysets(self, names: list[str]) -> None:
        for start in range(0, len(names), 500):
            query = sa.select(keysets.c.name, keysets.c.id, keysets.c.revision).where(
                keysets.c.name.in_(names[start : start + 500])
            )
            if self._postgres:
                query = query.order_by(keysets.c.name).with_for_update(of=keysets)
            self._heads.update(
                (name, (ident, rev)) for name, ident, rev in self.conn.execute(query)
            )

    def preload(self, names: Iterable[str]) -> None:
        """Load, in a few queries, each keyset of ``names`` not already held at its revision."""
        stale = []
        for name in names:
            held = self._cache.get(name)
            head = self._heads.get(name)
            if head is not None and (held is None or head != (held.id, held.revision)):
                stale.append(name)
        for name, stored in self.ctx.keysets.load_many(stale, conn=self.conn).items():
            self._cache[name] = stored
            self._heads[name] = (stored.id, stored.revision)

    def lock_deliveries(self, which: Iterable[tuple[PrincipalId, str, int]]) -> None:
        """Take the delivery locks of ``which`` (principal, keyset, version) in one go, and
        read under them the deliveries already on their way (one query, not one each)."""
        wanted = {(to, keyset_name(name), version) for to, name, version in which}
        wanted = {w for w in wanted if (w[0], w[1]) in self._holders}
        if not wanted:
            return
        self.ctx.store.lock_many(
            self.conn, [delivery_lock(to, name, version) for to, name, version in wanted]
        )
        rows = [(self._holders[(to, name)], version) for to, name, version in wanted]
        self._outstanding.update(
            outstanding_deliveries(self.conn, [(h.row_id, h.keyset_id, v) for h, v in rows])
        )
        self._locked |= wanted

    def read_holders(self, pairs: list[tuple[PrincipalId, str]]) -> None:
        self._holders.update(holders_in(self.conn, pairs, lock=self._postgres))

    def keyset(self, name: str) -> StoredKeyset:
        name = keyset_name(name)
        dirty = self._dirty.get(name)
        if dirty is not None:
            return dirty  # changed in this batch and not saved yet
        held = self._cache.get(name)
        if held is not None and self._heads.get(name) == (held.id, held.revision):
            return held
        stored = self.ctx.keysets.load(name, conn=self.conn)
        self._cache[name] = stored
        self._heads[name] = (stored.id, stored.revision)
        return stored

    def version_state(self, name: str, version: int) -> KeyState | None:
        try:
            stored = self.keyset(name)
        except NotFound:
            return None
        for info in stored.keyset.versions:
            if info.version == version:
                return info.state
        return None

    def change(self, name: str, step: KeysetStep) -> tuple[KeyVersionInfo, list[Event]]:
        """:func:`~keybroker.broker.keysets.change_in` on the keyset held.

        Deferred (see :meth:`flush`), the save waits for the end of the batch: the
        keyset stays held as loaded, changed in memory, and every later use in the
        batch sees the change; one compare-and-set per keyset then writes them all.
        """
        stored = self.keyset(name)
        known = {info.version for info in stored.keyset.versions}
        try:
            info, events = step(stored, self.now)
            if info.version not in known:
                self._added.add((keyset_name(name), info.version))
            if self._defer:
                self._dirty[keyset_name(name)] = stored
                saved = stored
            else:
                saved = self.ctx.keysets.save(stored, conn=self.conn)
        except BaseException:
            self.forget(name)  # the held object may have been changed; the store was not
            raise
        if saved is not stored:
            self._cache[keyset_name(name)] = saved
            self._heads[keyset_name(name)] = (saved.id, saved.revision)
        if self._defer and info.state.value in ("disabled", "destroyed"):
            # Its outstanding deliveries are failed with the others at flush().
            self._retired.setdefault(f"key version {info.state.value}", []).append(
                (saved.id, info.version)
            )
            return info, events
        return info, events + _retire_deliveries(self.conn, saved, info, self.now)

    def deliver(
        self, name: str, version: int, to: PrincipalId, ttl_: timedelta
    ) -> tuple[DeliveryEnvelope, list[Event]]:
        """:func:`deliver_in`, with the keyset held and the recipient's checks read."""
        holder = self._holders.get((to, name))
        if holder is None:
            # Not read (no such principal or keyset?): deliver_in says what is wrong.
            return deliver_in(self.ctx, self.conn, name, version, to, ttl_, self.now)
        stored = self.keyset(name)
        covered = (to, keyset_name(name), version) in self._locked
        return deliver_loaded_in(
            self.ctx,
            self.conn,
            stored,
            version,
            holder,
            ttl_,
            self.now,
            new_in_this_transaction=(keyset_name(name), version) in self._added,
            locked=covered,
            inserts=self._inserts if self._defer else None,
            outstanding=self._outstanding if covered else None,
        )

    def forget(self, name: str) -> None:
        """Drop what is held of ``name``: the next use loads it from the store."""
        self._cache.pop(name, None)
        self._heads.pop(name, None)
        # A deferred change is only ever forgotten on the way to rolling the whole
        # transaction back (deferred batches have no savepoints).
        self._dirty.pop(keyset_name(name), None)
        self._added = {(n, v) for n, v in self._added if n != keyset_name(name)}

    def release(self, name: str) -> None:
        """Keep ``name`` for the rest of this batch, but not for later steps."""
        self._cache.pop(name, None)


# -- helpers -----------------------------------------------------------------------------

#: next_at of links a max_parallel rollout has not released yet (far in the future).
_PARKED: Final = from_ms(253_402_214_400_000)  # 9999-12-31


def _select(topology: Topology, names: Sequence[str] | None) -> list[Link]:
    if names is None:
        return list(topology.links)
    chosen = [topology.link(name) for name in names]
    if not chosen:
        raise LocalProtocolError("a rollout needs at least one link")
    if len({link.name for link in chosen}) != len(chosen):
        raise LocalProtocolError("a link is named twice")
    return chosen


def _document(topology: Topology, chosen: Iterable[Link]) -> bytes:
    from keybroker.encoding import encode

    doc = topology.to_mapping()
    doc["links"] = [{"node": k.node, "site": k.site, "keyset": k.keyset} for k in chosen]
    return encode("keybroker/rotation/topology/v1", doc)


def _chunks(rows: list[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def _primaries(conn: Connection, names: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for chunk in range(0, len(names), 900):
        part = names[chunk : chunk + 900]
        rows = conn.execute(
            sa.select(keysets.c.name, key_versions.c.version)
            .join(key_versions, key_versions.c.keyset_id == keysets.c.id)
            .where(keysets.c.name.in_(part), key_versions.c.state == KeyState.PRIMARY.value)
        )
        found.update({r.name: r.version for r in rows})
    return found


def _holding(conn: Connection, names: list[str]) -> set[tuple[str, str]]:
    """(principal, keyset) pairs with an active hold grant, for the keysets ``names``."""
    found: set[tuple[str, str]] = set()
    for chunk in range(0, len(names), 500):
        rows = conn.execute(
            sa.select(principals.c.kind, principals.c.name, keysets.c.name.label("keyset"))
            .select_from(
                grants.join(principals, principals.c.id == grants.c.principal_id).join(
                    keysets, keysets.c.id == grants.c.keyset_id
                )
            )
            .where(
                keysets.c.name.in_(names[chunk : chunk + 500]),
                grants.c.mode == GrantMode.HOLD.value,
                grants.c.revoked_at.is_(None),
            )
        )
        found.update((f"{r.kind}/{r.name}", r.keyset) for r in rows)
    return found


def _acked(conn: Connection, names: list[str]) -> set[tuple[str, str, int]]:
    """(principal, keyset, version) of every acknowledged delivery of the keysets ``names``."""
    found: set[tuple[str, str, int]] = set()
    for chunk in range(0, len(names), 500):
        rows = conn.execute(
            sa.select(
                principals.c.kind,
                principals.c.name,
                keysets.c.name.label("keyset"),
                deliveries.c.version,
            )
            .select_from(
                deliveries.join(principals, principals.c.id == deliveries.c.principal_id).join(
                    keysets, keysets.c.id == deliveries.c.keyset_id
                )
            )
            .where(keysets.c.name.in_(names[chunk : chunk + 500]), deliveries.c.state == "acked")
        )
        found.update((f"{r.kind}/{r.name}", r.keyset, r.version) for r in rows)
    return found


def _busy_keysets(conn: Connection, names: list[str]) -> set[str]:
    live = sa.select(rotation_rollouts.c.id).where(rotation_rollouts.c.state.in_(LIVE_ROLLOUTS))
    busy: set[str] = set()
    for chunk in range(0, len(names), 900):
        part = names[chunk : chunk + 900]
        busy.update(
            conn.execute(
                sa.select(rotation_links.c.keyset).where(
                    rotation_links.c.keyset.in_(part),
                    rotation_links.c.state.not_in(_TERMINAL_NAMES),
                    rotation_links.c.rollout_id.in_(live),
                )
            ).scalars()
        )
    return busy


def _state_counts(conn: Connection, rollout_id: str) -> dict[str, int]:
    rows = conn.execute(
        sa.select(rotation_links.c.state, sa.func.count())
        .where(rotation_links.c.rollout_id == rollout_id)
        .group_by(rotation_links.c.state)
    )
    return {state: int(n) for state, n in rows}


def _rollout_row(conn: Connection, rollout_id: str, *, for_update: bool = False) -> Any:
    if not isinstance(rollout_id, str) or not 0 < len(rollout_id) <= 36:
        raise NotFound("no such rollout")
    query = rotation_rollouts.select().where(rotation_rollouts.c.id == rollout_id)
    if for_update:
        query = query.with_for_update()
    row = conn.execute(query).one_or_none()
    if row is None:
        raise NotFound("no such rollout")
    return row


def _policy(rollout: Any) -> RolloutPolicy:
    return RolloutPolicy.decode(bytes(rollout.policy))


def _record(row: Any) -> LinkRecord:
    return LinkRecord(
        state=LinkState(row.state),
        old_version=row.old_version,
        new_version=row.new_version,
        attempt=row.attempt,
        delivery_id=row.delivery_id,
        next_at_ms=to_ms(row.next_at),
        reason=row.reason,
    )


def _input_for(
    row: Any, outcome: dict[str, tuple[str, datetime, str | None]], now: datetime
) -> tuple[Input | None, str | None]:
    state = LinkState(row.state)
    if state in AWAITING_ACK:
        seen = outcome.get(row.delivery_id) if row.delivery_id else None
        if seen is None:
            return Input.REFUSED, "the delivery is gone"
        delivery_state, expires_at, failure = seen
        if delivery_state == _SENT:
            return (Input.DUE, None) if expires_at <= now else (None, None)
        event = _OUTCOME.get(delivery_state)
        if event is None:
            return Input.REFUSED, f"delivery {delivery_state}"
        return event, failure
    if row.next_at <= now and state not in TERMINAL:
        return Input.DUE, None
    return None, None


def _status(rollout: Any, rows: Sequence[Any]) -> RolloutStatus:
    return RolloutStatus(
        rollout_id=rollout.id,
        topology=rollout.topology,
        state=rollout.state,
        policy=_policy(rollout),
        created_at=rollout.created_at,
        updated_at=rollout.updated_at,
        finished_at=rollout.finished_at,
        reason=rollout.reason,
        links=tuple(
            LinkStatus(
                name=f"{r.node}/{r.site}",
                node=r.node,
                site=r.site,
                keyset=r.keyset,
                state=LinkState(r.state),
                old_version=r.old_version,
                new_version=r.new_version,
                attempt=r.attempt,
                reason=r.reason,
                updated_at=r.updated_at,
            )
            for r in rows
        ),
    )


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return _clip(f"{type(exc).__name__}: {text}") or type(exc).__name__


def _clip(text: str | None) -> str | None:
    if text is None:
        return None
    return text if len(text) <= 256 else text[:253] + "..."


__all__ = [
    "LinkStatus",
    "Orchestrator",
    "RolloutStatus",
    "SetupReport",
    "StepReport",
]
