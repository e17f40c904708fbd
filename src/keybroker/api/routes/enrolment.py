"""Enrolment: an operator issues a one-time token; the principal trades it, a CSR and its
signed HPKE key for an identity certificate."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Response

from keybroker.api.auth import Context, Operator
from keybroker.api.problems import documented
from keybroker.api.routes._common import ADMIN, PUBLIC
from keybroker.api.schemas import (
    EnrolmentCreate,
    EnrolmentOut,
    EnrolmentTokenCreate,
    EnrolmentTokenIssued,
)
from keybroker.pki import certificate_pem

router = APIRouter(tags=["enrolment"])


@router.post(
    "/v1/enrolment-tokens",
    status_code=201,
    response_model=EnrolmentTokenIssued,
    responses=documented(400, 401, 409, 413, 422),
    dependencies=[Operator],
    openapi_extra=ADMIN,
    summary="Issue a one-time enrolment token for a principal (shown once)",
)
def create_token(
    body: EnrolmentTokenCreate, ctx: Context, response: Response
) -> EnrolmentTokenIssued:
    issued = ctx.broker.create_enrolment_token(
        body.principal, timedelta(seconds=body.ttl_seconds), dns_names=body.dns_names
    )
    # The only response that carries a secret: no cache may keep it.
    response.headers["Cache-Control"] = "no-store"
    return EnrolmentTokenIssued(
        token_id=issued.token_id,
        principal=str(issued.principal),
        expires_at=issued.expires_at,
        token=issued.secret,
        dns_names=list(issued.dns_names),
    )


@router.post(
    "/v1/enrolments",
    status_code=201,
    response_model=EnrolmentOut,
    responses=documented(400, 403, 409, 413, 422),
    openapi_extra=PUBLIC,
    summary="Enrol with a token, a CSR and the identity-signed HPKE key",
)
def enrol(body: EnrolmentCreate, ctx: Context) -> EnrolmentOut:
    result = ctx.broker.enrol(
        body.principal,
        body.token,
        body.csr_pem.encode("utf-8"),
        hpke_public_key=body.hpke.public_key,
        hpke_key_signature=body.hpke.signature,
        hpke_key_id=body.hpke.key_id,
        hpke_template=body.hpke.template,
    )
    return EnrolmentOut(
        principal=str(result.principal),
        certificate_pem=certificate_pem(result.certificate).decode("ascii"),
        ca_certificate_pem=certificate_pem(result.ca_certificate).decode("ascii"),
        reenrolled=result.reenrolled,
    )
