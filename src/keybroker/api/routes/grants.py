"""Grants: principal P may ``use`` or ``hold`` keyset K; create, list, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from keybroker.api.auth import Context, Operator
from keybroker.api.problems import documented
from keybroker.api.routes._common import ADMIN
from keybroker.api.schemas import (
    KEYSET_MAX,
    PRINCIPAL_MAX,
    PRINCIPAL_PATTERN,
    GrantIn,
    GrantList,
    GrantOut,
)
from keybroker.broker import GrantInfo

router = APIRouter(tags=["grants"], dependencies=[Operator])


def grant_out(info: GrantInfo) -> GrantOut:
    return GrantOut(
        grant_id=info.grant_id,
        principal=str(info.principal),
        keyset=info.keyset,
        mode=info.mode.value,
        created_at=info.created_at,
        revoked_at=info.revoked_at,
    )


@router.post(
    "/v1/grants",
    status_code=201,
    response_model=GrantOut,
    responses=documented(400, 401, 403, 404, 413, 422),
    openapi_extra=ADMIN,
    summary="Grant (idempotent: an active grant is returned as it is)",
)
def create_grant(body: GrantIn, ctx: Context) -> GrantOut:
    return grant_out(ctx.broker.grant(body.principal, body.keyset, body.mode))


@router.post(
    "/v1/grants/revoke",
    response_model=GrantOut,
    responses=documented(400, 401, 404, 413, 422),
    openapi_extra=ADMIN,
    summary="Revoke the active grant; revoking `hold` fails outstanding deliveries",
)
def revoke_grant(body: GrantIn, ctx: Context) -> GrantOut:
    return grant_out(ctx.broker.revoke_grant(body.principal, body.keyset, body.mode))


@router.get(
    "/v1/grants",
    response_model=GrantList,
    responses=documented(400, 401, 422),
    openapi_extra=ADMIN,
    summary="List grants",
)
def list_grants(
    ctx: Context,
    principal: Annotated[
        str | None, Query(pattern=PRINCIPAL_PATTERN, max_length=PRINCIPAL_MAX)
    ] = None,
    keyset: Annotated[str | None, Query(max_length=KEYSET_MAX)] = None,
    include_revoked: bool = False,
) -> GrantList:
    grants = ctx.broker.list_grants(
        principal=principal, keyset=keyset, include_revoked=include_revoked
    )
    return GrantList(grants=[grant_out(g) for g in grants])
