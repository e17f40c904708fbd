"""Principals as operators see them: list, show, revoke (for good)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from keybroker.api.auth import Context, Operator
from keybroker.api.problems import documented
from keybroker.api.routes._common import ADMIN
from keybroker.api.schemas import (
    PRINCIPAL_MAX,
    PRINCIPAL_NAME_PATTERN,
    PrincipalList,
    PrincipalOut,
    PrincipalRevoke,
)
from keybroker.broker import PrincipalInfo
from keybroker.pki import PrincipalId, PrincipalKind

router = APIRouter(tags=["principals"], dependencies=[Operator])

# ``<kind>/<name>`` as two path segments, so neither parameter holds a '/'.
KindPath = Annotated[PrincipalKind, Path(description="Principal kind")]
NamePath = Annotated[
    str,
    Path(
        pattern=PRINCIPAL_NAME_PATTERN,
        max_length=PRINCIPAL_MAX - len("site/"),
        description="Principal name (the whole `<kind>/<name>` is at most 64 characters)",
    ),
]


def principal_out(info: PrincipalInfo) -> PrincipalOut:
    return PrincipalOut(
        principal=str(info.principal),
        status=info.status,
        serial_number=info.serial_number,
        hpke_template=info.hpke_template,
        hpke_key_id=info.hpke_key_id,
        hpke_public_key=info.hpke_public_key,
        certificate_sha256=info.certificate_sha256,
        certificate_not_after=info.certificate_not_after,
        created_at=info.created_at,
        updated_at=info.updated_at,
    )


@router.get(
    "/v1/principals",
    response_model=PrincipalList,
    responses=documented(401, 422),
    openapi_extra=ADMIN,
    summary="List principals",
)
def list_principals(
    ctx: Context,
    status: Annotated[str | None, Query(pattern="^(pending|active|revoked)$")] = None,
) -> PrincipalList:
    return PrincipalList(
        principals=[principal_out(p) for p in ctx.broker.list_principals(status=status)]
    )


@router.post(
    "/v1/principals/{kind}/{name}/revoke",
    response_model=PrincipalOut,
    responses=documented(400, 401, 404, 413, 422),
    openapi_extra=ADMIN,
    summary="Revoke a principal: its certificates, and its outstanding deliveries fail",
)
def revoke_principal(
    kind: KindPath, name: NamePath, ctx: Context, body: PrincipalRevoke | None = None
) -> PrincipalOut:
    reason = body.reason if body is not None else "unspecified"
    return principal_out(ctx.broker.revoke_principal(PrincipalId(kind, name), reason=reason))


@router.get(
    "/v1/principals/{kind}/{name}",
    response_model=PrincipalOut,
    responses=documented(400, 401, 404, 422),
    openapi_extra=ADMIN,
    summary="Show one principal",
)
def show_principal(kind: KindPath, name: NamePath, ctx: Context) -> PrincipalOut:
    return principal_out(ctx.broker.show_principal(PrincipalId(kind, name)))
