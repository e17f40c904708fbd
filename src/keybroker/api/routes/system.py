"""Health, Prometheus metrics and the CA certificate: public, needed before anything else."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from keybroker.api.auth import Context
from keybroker.api.problems import Unavailable, documented
from keybroker.api.routes._common import PUBLIC
from keybroker.api.schemas import Health
from keybroker.errors import StoreError
from keybroker.pki import certificate_pem

router = APIRouter(tags=["system"])

PEM_CHAIN = "application/pem-certificate-chain"


def _text_response(media_type: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {media_type: {"schema": {"type": "string"}}}}, **documented()}


@router.get(
    "/v1/health",
    response_model=Health,
    responses=documented(503),
    openapi_extra=PUBLIC,
    summary="Whether this replica can reach its database",
)
def health(ctx: Context) -> Health:
    try:
        with ctx.store.snapshot() as conn:
            conn.execute(sa.text("SELECT 1"))
        size = ctx.broker.log.size()
    except StoreError:
        raise Unavailable("the database is unreachable") from None
    return Health(status="ok", database="ok", log_size=size)


@router.get(
    "/metrics",
    response_class=Response,
    responses=_text_response(CONTENT_TYPE_LATEST.split(";")[0]),
    openapi_extra=PUBLIC,
    summary="Prometheus metrics",
)
def metrics(request: Request) -> Response:
    registry = request.app.state.metrics
    assert isinstance(registry, CollectorRegistry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/ca",
    response_class=Response,
    responses=_text_response(PEM_CHAIN),
    openapi_extra=PUBLIC,
    summary="The broker CA certificate (PEM), which signs identities and deliveries",
)
def ca_certificate(ctx: Context) -> Response:
    return Response(certificate_pem(ctx.broker.ca_certificate), media_type=PEM_CHAIN)
