"""Keysets and their versions: create, rotate, promote, enable, disable, destroy; list, show.

Keyset names contain ``/`` (``site/fra1/restore``), so they are matched with a
``{name:path}`` parameter, and every route below ends in a fixed suffix
(``/rotate``, ``/versions/{n}/promote`` …): the name is whatever precedes it,
so ``POST /v1/keysets/a/versions/2/versions/1/promote`` promotes version 1 of
``a/versions/2`` and no name is ambiguous. The only GET on a name is ``show``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path

from keybroker.api.auth import Context, Operator
from keybroker.api.problems import documented
from keybroker.api.routes._common import ADMIN
from keybroker.api.schemas import (
    KEYSET_MAX,
    KEYSET_PATTERN,
    KeysetCreate,
    KeysetList,
    KeysetOut,
    KeysetRotate,
    KeyVersionOut,
)
from keybroker.broker import KeysetSummary
from keybroker.keys import KeyVersionInfo

router = APIRouter(tags=["keysets"], dependencies=[Operator])

NamePath = Annotated[
    str, Path(pattern=KEYSET_PATTERN, max_length=KEYSET_MAX, description="Keyset name")
]
VersionPath = Annotated[int, Path(ge=1, lt=1 << 31)]
Action = Literal["promote", "enable", "disable", "destroy"]


def version_out(info: KeyVersionInfo) -> KeyVersionOut:
    return KeyVersionOut(
        version=info.version,
        key_id=info.key_id,
        template=info.template.name,
        state=info.state.value,
        public_key=info.public_key,
        created_at=info.created_at,
        state_changed_at=info.state_changed_at,
    )


def keyset_out(summary: KeysetSummary) -> KeysetOut:
    return KeysetOut(
        name=summary.name,
        purpose=summary.purpose,
        template=summary.template,
        revision=summary.revision,
        primary=summary.primary,
        versions=[
            KeyVersionOut(
                version=v.version,
                key_id=v.key_id,
                template=v.template,
                state=v.state,
                public_key=v.public_key,
                created_at=v.created_at,
                state_changed_at=v.state_changed_at,
            )
            for v in summary.versions
        ],
        created_at=summary.created_at,
        updated_at=summary.updated_at,
    )


@router.post(
    "/v1/keysets",
    status_code=201,
    response_model=KeysetOut,
    responses=documented(400, 401, 409, 413, 422),
    openapi_extra=ADMIN,
    summary="Create a keyset; its version 1 is primary",
)
def create_keyset(body: KeysetCreate, ctx: Context) -> KeysetOut:
    ctx.broker.create_keyset(body.name, body.template)
    return keyset_out(ctx.broker.show_keyset(body.name))


@router.get(
    "/v1/keysets",
    response_model=KeysetList,
    responses=documented(401),
    openapi_extra=ADMIN,
    summary="List keysets (public facts only)",
)
def list_keysets(ctx: Context) -> KeysetList:
    return KeysetList(keysets=[keyset_out(k) for k in ctx.broker.list_keysets()])


@router.post(
    "/v1/keysets/{name:path}/rotate",
    status_code=201,
    response_model=KeyVersionOut,
    responses=documented(400, 401, 404, 409, 413, 422),
    openapi_extra=ADMIN,
    summary="Add a new pending version (the first step of a rotation)",
)
def rotate_keyset(name: NamePath, ctx: Context, body: KeysetRotate | None = None) -> KeyVersionOut:
    template = body.template if body is not None else None
    return version_out(ctx.broker.rotate_keyset(name, template=template))


@router.post(
    "/v1/keysets/{name:path}/versions/{version}/{action}",
    response_model=KeyVersionOut,
    responses=documented(400, 401, 404, 409, 422),
    openapi_extra=ADMIN,
    summary="Move a version through its lifecycle: promote, enable, disable or destroy",
)
def change_version(
    name: NamePath, version: VersionPath, action: Action, ctx: Context
) -> KeyVersionOut:
    step = {
        "promote": ctx.broker.promote_version,
        "enable": ctx.broker.enable_version,
        "disable": ctx.broker.disable_version,
        "destroy": ctx.broker.destroy_version,
    }[action]
    return version_out(step(name, version))


@router.get(
    "/v1/keysets/{name:path}",
    response_model=KeysetOut,
    responses=documented(400, 401, 404, 422),
    openapi_extra=ADMIN,
    summary="Show a keyset and its versions",
)
def show_keyset(name: NamePath, ctx: Context) -> KeysetOut:
    return keyset_out(ctx.broker.show_keyset(name))
