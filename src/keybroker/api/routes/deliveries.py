"""Deliveries: operators seal a key version to a principal; the principal long-polls for
its own envelopes and acknowledges each with a proof of possession.

``GET /v1/deliveries?wait=N`` answers at once if the caller has ``sent``
deliveries, else waits up to ``N`` seconds for one: woken immediately by a
delivery made through this process, and looking at the database every
``poll_interval_seconds`` for those made by other replicas. No bus is needed,
and nothing about a waiting principal is kept anywhere but in its request.
A principal only ever sees its own deliveries: the query is by the identity
the signature proved, never by anything in the request.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from keybroker.api.auth import Context, Operator, Principal
from keybroker.api.problems import documented
from keybroker.api.routes._common import ADMIN, SIGNED
from keybroker.api.schemas import (
    DELIVERY_ID_MAX,
    KEYSET_MAX,
    PRINCIPAL_MAX,
    PRINCIPAL_PATTERN,
    AckIn,
    DeliveryCreate,
    DeliveryList,
    DeliveryOut,
    EnvelopeOut,
    Inbox,
)
from keybroker.broker import Broker, DeliveryEnvelope, DeliveryInfo
from keybroker.pki import PrincipalId

router = APIRouter(tags=["deliveries"])

DeliveryIdPath = Annotated[str, Path(min_length=1, max_length=DELIVERY_ID_MAX)]


def delivery_out(info: DeliveryInfo) -> DeliveryOut:
    return DeliveryOut(
        delivery_id=info.delivery_id,
        principal=str(info.principal),
        keyset=info.keyset,
        version=info.version,
        state=info.state,
        created_at=info.created_at,
        expires_at=info.expires_at,
        completed_at=info.completed_at,
        failure_reason=info.failure_reason,
    )


@router.post(
    "/v1/deliveries",
    status_code=201,
    response_model=DeliveryOut,
    responses=documented(400, 401, 403, 404, 409, 413, 422),
    dependencies=[Operator],
    openapi_extra=ADMIN,
    summary="Seal a key version to a holding principal (returns the one on its way, if any)",
)
async def create_delivery(body: DeliveryCreate, ctx: Context) -> DeliveryOut:
    broker = ctx.broker

    def deliver() -> DeliveryInfo:
        envelope = broker.deliver(
            body.keyset, body.version, body.principal, timedelta(seconds=body.ttl_seconds)
        )
        return broker.show_delivery(envelope.delivery_id)

    info = await run_in_threadpool(deliver)
    ctx.waker.wake()
    if ctx.wakeups is not None:
        await ctx.wakeups.notify()
    return delivery_out(info)


def _inbox(broker: Broker, principal: PrincipalId) -> list[EnvelopeOut]:
    envelopes = broker.fetch_deliveries(principal)
    purposes = {name: broker.show_keyset(name).purpose for name in {e.keyset for e in envelopes}}
    return [_envelope_out(e, purposes[e.keyset]) for e in envelopes]


def _envelope_out(envelope: DeliveryEnvelope, purpose: str) -> EnvelopeOut:
    return EnvelopeOut(
        delivery_id=envelope.delivery_id,
        recipient=envelope.recipient,
        keyset=envelope.keyset,
        purpose=purpose,
        version=envelope.version,
        expires_at_ms=envelope.expires_at_ms,
        envelope=envelope.encode(),
    )


@router.get(
    "/v1/deliveries",
    response_model=Inbox,
    responses=documented(401, 403, 422),
    openapi_extra=SIGNED,
    summary="The calling principal's outstanding deliveries; long-polls up to `wait` seconds",
)
async def inbox(
    request: Request,
    ctx: Context,
    principal: Principal,
    wait: Annotated[int, Query(ge=0, le=600, description="Seconds to wait for one")] = 0,
) -> Inbox:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, ctx.settings.max_wait_seconds)
    while True:
        woken = ctx.waker.current()  # before the query: a wake-up in between is not lost
        found = await run_in_threadpool(_inbox, ctx.broker, principal)
        remaining = deadline - loop.time()
        if found or remaining <= 0 or await request.is_disconnected():
            return Inbox(deliveries=found)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                woken.wait(), timeout=min(remaining, ctx.settings.poll_interval_seconds)
            )


@router.post(
    "/v1/deliveries/{delivery_id}/ack",
    response_model=DeliveryOut,
    responses=documented(400, 401, 403, 404, 409, 413, 422),
    openapi_extra=SIGNED,
    summary="Acknowledge one's own delivery with the proof of possession",
)
def ack(
    delivery_id: DeliveryIdPath, body: AckIn, ctx: Context, principal: Principal
) -> DeliveryOut:
    return delivery_out(ctx.broker.ack(delivery_id, principal, body.proof))


@router.get(
    "/v1/deliveries/records",
    response_model=DeliveryList,
    responses=documented(400, 401, 422),
    dependencies=[Operator],
    openapi_extra=ADMIN,
    summary="Every delivery as operators see it (no sealed bytes)",
)
def list_deliveries(
    ctx: Context,
    principal: Annotated[
        str | None, Query(pattern=PRINCIPAL_PATTERN, max_length=PRINCIPAL_MAX)
    ] = None,
    keyset: Annotated[str | None, Query(max_length=KEYSET_MAX)] = None,
    state: Annotated[str | None, Query(pattern="^(sent|acked|failed|expired)$")] = None,
) -> DeliveryList:
    found = ctx.broker.list_deliveries(principal=principal, keyset=keyset, state=state)
    return DeliveryList(deliveries=[delivery_out(d) for d in found])


@router.get(
    "/v1/deliveries/{delivery_id}",
    response_model=DeliveryOut,
    responses=documented(400, 401, 404, 422),
    dependencies=[Operator],
    openapi_extra=ADMIN,
    summary="Show one delivery",
)
def show_delivery(delivery_id: DeliveryIdPath, ctx: Context) -> DeliveryOut:
    return delivery_out(ctx.broker.show_delivery(delivery_id))
