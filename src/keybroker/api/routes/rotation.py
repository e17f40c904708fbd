"""Rotations (S10): set links up, start, follow, abort and retry rollouts. Operators only.

A rollout is driven by the background loop every replica runs
(:mod:`keybroker.api.rotation_loop`); these routes only create and change
rollout records, and read them. Each answers with the rollout's state, its
policy, the number of links in each state, and **one page** of its links
(``limit``, ``offset``, optionally only links in some ``state``): a rollout may
have 100,000 links, and a client following one needs the counts, not every
link each second.

Errors: a topology the broker cannot read is 400 ``protocol/decode`` (naming the
first mistake) and changes nothing; an unknown rollout is 404; starting over a
link that is in another unfinished rollout, or aborting a finished one, is 409.

Topology documents can be large (about 100 bytes a link), so these paths accept
bodies up to ``ApiSettings.max_topology_bytes`` instead of the general limit, but
only from a caller whose admin token verified before the body is read
(:class:`TopologyBodyLimit`): nobody else can make the server buffer more than
the general limit.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Annotated, Final

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from keybroker.api.admin import verify_admin_token
from keybroker.api.auth import ApiContext, Context, Operator
from keybroker.api.middleware import BodyLimit
from keybroker.api.problems import InvalidRequest, documented
from keybroker.api.rotation_loop import RotationLoop
from keybroker.api.rotation_schemas import (
    DEFAULT_PAGE,
    MAX_PAGE,
    ROLLOUT_ID_MAX,
    LinkOut,
    LinkStateName,
    RolloutCreate,
    RolloutList,
    RolloutOut,
    RolloutPolicyIn,
    RolloutPolicyOut,
    RolloutRetry,
    RolloutSummary,
    RotationSetup,
    SetupOut,
)
from keybroker.api.routes._common import ADMIN
from keybroker.broker import Broker
from keybroker.errors import ConfigurationError, Conflict, DecodeError
from keybroker.flows.rotation.orchestrator import Orchestrator, RolloutStatus
from keybroker.flows.rotation.protocol import RolloutPolicy
from keybroker.flows.rotation.topology import Topology
from keybroker.store.engine import Store

PREFIX: Final = "/v1/rotations"

router = APIRouter(tags=["rotations"], dependencies=[Operator])

RolloutIdPath = Annotated[str, Path(min_length=1, max_length=ROLLOUT_ID_MAX)]


# -- conversions ----------------------------------------------------------------------------


def topology_from(document: dict[str, object]) -> Topology:
    """The topology a request carries; :class:`DecodeError` (400) names its first mistake."""
    return Topology.from_mapping(document)


def policy_from(body: RolloutPolicyIn) -> RolloutPolicy:
    try:
        return RolloutPolicy(
            ack_timeout_ms=body.ack_timeout_ms,
            max_attempts=body.max_attempts,
            backoff_base_ms=body.backoff_base_ms,
            backoff_cap_ms=body.cap_ms(),
            grace_ms=body.grace_ms,
            max_failed_percent=body.max_failed_percent,
            max_parallel=body.max_parallel,
        )
    except ConfigurationError as exc:
        # The schema's ranges are the policy's; this is a second line, never a 500.
        error = {"loc": ["body", "policy"], "msg": str(exc), "type": "value_error"}
        raise InvalidRequest("the rollout policy is out of range", errors=[error]) from None


def narrowed(topology: Topology, names: list[str] | None) -> Topology:
    """``topology`` with only the links ``names`` (in that order): what the rollout covers."""
    if names is None:
        return topology
    by_name = {link.name: link for link in topology.links}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise DecodeError(f"no link {missing[0]!r} in topology {topology.name!r}")
    return dataclasses.replace(topology, links=tuple(by_name[name] for name in names))


def policy_out(policy: RolloutPolicy) -> RolloutPolicyOut:
    return RolloutPolicyOut(
        ack_timeout_ms=policy.ack_timeout_ms,
        max_attempts=policy.max_attempts,
        backoff_base_ms=policy.backoff_base_ms,
        backoff_cap_ms=policy.backoff_cap_ms,
        grace_ms=policy.grace_ms,
        max_failed_percent=policy.max_failed_percent,
        max_parallel=policy.max_parallel,
    )


def summary_out(status: RolloutStatus) -> RolloutSummary:
    return RolloutSummary(
        rollout_id=status.rollout_id,
        topology=status.topology,
        state=status.state,
        created_at=status.created_at,
        updated_at=status.updated_at,
        finished_at=status.finished_at,
        finished=status.finished,
        reason=status.reason,
    )


def rollout_out(
    status: RolloutStatus,
    *,
    states: list[str] | None = None,
    limit: int = DEFAULT_PAGE,
    offset: int = 0,
) -> RolloutOut:
    wanted = set(states) if states else None
    matched = [link for link in status.links if wanted is None or link.state.value in wanted]
    page = matched[offset : offset + limit]
    return RolloutOut(
        **summary_out(status).model_dump(),
        policy=policy_out(status.policy),
        counts=status.counts,
        total=len(status.links),
        matched=len(matched),
        offset=offset,
        links=[
            LinkOut(
                name=link.name,
                node=link.node,
                site=link.site,
                keyset=link.keyset,
                state=link.state.value,
                old_version=link.old_version,
                new_version=link.new_version,
                attempt=link.attempt,
                reason=link.reason,
                version_in_use=link.version_in_use,
                updated_at=link.updated_at,
            )
            for link in page
        ],
    )


def require_enrolled(broker: Broker, topology: Topology) -> None:
    """Refuse (409, nothing changed) unless both ends of every link are active principals."""
    active = {p.principal for p in broker.list_principals(status="active")}
    ends = {end for link in topology.links for end in (link.upstream, link.downstream)}
    missing = sorted(str(end) for end in ends - active)
    if missing:
        raise Conflict(
            f"{len(missing)} principal(s) of the topology are not enrolled and active, e.g. "
            f"{missing[0]}; enrol them first"
        )


def _loop(request: Request) -> RotationLoop | None:
    loop = getattr(request.app.state, "rotation_loop", None)
    return loop if isinstance(loop, RotationLoop) else None


async def _wake(ctx: ApiContext) -> None:
    ctx.waker.wake()
    if ctx.wakeups is not None:
        await ctx.wakeups.notify()


# -- routes ---------------------------------------------------------------------------------


@router.post(
    PREFIX + "/setup",
    response_model=SetupOut,
    responses=documented(400, 401, 403, 404, 409, 413, 422),
    openapi_extra=ADMIN,
    summary="Make every link of a topology ready: keysets, hold grants, first keys (idempotent)",
)
async def setup_rotation(body: RotationSetup, ctx: Context) -> SetupOut:
    topology = topology_from(body.topology)
    broker = ctx.broker
    ttl = timedelta(seconds=body.delivery_ttl_seconds)

    def setup() -> SetupOut:
        require_enrolled(broker, topology)
        report = Orchestrator(broker).setup(topology, delivery_ttl=ttl)
        return SetupOut(
            keysets_created=report.keysets_created,
            grants_created=report.grants_created,
            deliveries=report.deliveries,
        )

    out = await run_in_threadpool(setup)
    if out.deliveries:
        await _wake(ctx)
    return out


@router.post(
    PREFIX,
    status_code=201,
    response_model=RolloutOut,
    responses=documented(400, 401, 409, 413, 422),
    openapi_extra=ADMIN,
    summary="Start a rollout over a topology's links (all, or those named)",
)
async def start_rollout(
    body: RolloutCreate, request: Request, response: Response, ctx: Context
) -> RolloutOut:
    topology = narrowed(topology_from(body.topology), body.links)
    policy = policy_from(body.policy)
    orchestrator = Orchestrator(ctx.broker)

    def start() -> RolloutStatus:
        return orchestrator.status(orchestrator.start(topology, policy))

    status = await run_in_threadpool(start)
    loop = _loop(request)
    if loop is not None:
        loop.kick()
    response.headers["location"] = f"{PREFIX}/{status.rollout_id}"
    return rollout_out(status)


@router.get(
    PREFIX,
    response_model=RolloutList,
    responses=documented(401),
    openapi_extra=ADMIN,
    summary="Every rollout, newest first (without links)",
)
def list_rollouts(ctx: Context) -> RolloutList:
    found = Orchestrator(ctx.broker).list_rollouts()
    return RolloutList(rollouts=[summary_out(status) for status in found])


@router.get(
    PREFIX + "/{rollout_id}",
    response_model=RolloutOut,
    responses=documented(401, 404, 422),
    openapi_extra=ADMIN,
    summary="A rollout: state, counts per link state, and one page of its links",
)
def show_rollout(
    rollout_id: RolloutIdPath,
    ctx: Context,
    state: Annotated[
        list[LinkStateName] | None,
        Query(description="Only links in these states (repeatable)"),
    ] = None,
    limit: Annotated[
        int, Query(ge=0, le=MAX_PAGE, description="Links per page (0: counts only)")
    ] = DEFAULT_PAGE,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> RolloutOut:
    status = Orchestrator(ctx.broker).status(rollout_id)
    return rollout_out(status, states=list(state or []), limit=limit, offset=offset)


@router.post(
    PREFIX + "/{rollout_id}/abort",
    response_model=RolloutOut,
    responses=documented(401, 404, 409, 422),
    openapi_extra=ADMIN,
    summary="Abort: every link not yet ACTIVE keeps its old key; the new one is disabled",
)
def abort_rollout(rollout_id: RolloutIdPath, ctx: Context) -> RolloutOut:
    return rollout_out(Orchestrator(ctx.broker).abort(rollout_id))


@router.post(
    PREFIX + "/{rollout_id}/retry",
    response_model=RolloutOut,
    responses=documented(401, 404, 409, 413, 422),
    openapi_extra=ADMIN,
    summary="Start the failed or aborted links of a rollout again (all, or those named)",
)
async def retry_rollout(
    rollout_id: RolloutIdPath, request: Request, ctx: Context, body: RolloutRetry | None = None
) -> RolloutOut:
    links = body.links if body is not None else None
    orchestrator = Orchestrator(ctx.broker)
    status = await run_in_threadpool(orchestrator.retry, rollout_id, links)
    loop = _loop(request)
    if loop is not None:
        loop.kick()
    return rollout_out(status)


# -- the body limit of these routes -----------------------------------------------------------


class TopologyBodyLimit:
    """:class:`BodyLimit` with ``max_topology_bytes`` under :data:`PREFIX` for verified
    operators, and ``max_bytes`` for every other request (a pure ASGI middleware)."""

    def __init__(
        self, app: ASGIApp, *, store: Store, max_bytes: int, max_topology_bytes: int
    ) -> None:
        self._store = store
        self._general = BodyLimit(app, max_bytes)
        self._topology = BodyLimit(app, max(max_bytes, max_topology_bytes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and _under_prefix(scope)
            and await self._operator(scope)
        ):
            await self._topology(scope, receive, send)
        else:
            await self._general(scope, receive, send)

    async def _operator(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer":
                    return False
                try:
                    await run_in_threadpool(verify_admin_token, self._store, token.strip())
                except Exception:  # not verified, whatever the reason: the general limit
                    return False
                return True
        return False


def _under_prefix(scope: Scope) -> bool:
    path = str(scope.get("path", ""))
    return path == PREFIX or path.startswith(PREFIX + "/")
