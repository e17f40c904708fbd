"""Holdings: what the calling principal holds, as the broker sees it now.

``GET /v1/holdings`` lists every keyset the caller has an active ``hold``
grant on, with each version's number, key id and state. An agent compares it
with its keyring to retire the versions the broker disabled or destroyed. Like
the inbox, it answers for the identity the signature proved and nobody else,
and it carries no key material.
"""

from __future__ import annotations

from fastapi import APIRouter

from keybroker.api.auth import Context, Principal
from keybroker.api.problems import documented
from keybroker.api.routes._common import SIGNED
from keybroker.api.schemas import HeldVersionOut, HoldingOut, Holdings
from keybroker.broker.holdings import Holding

router = APIRouter(tags=["holdings"])


def holding_out(holding: Holding) -> HoldingOut:
    return HoldingOut(
        name=holding.name,
        purpose=holding.purpose,
        primary=holding.primary,
        versions=[
            HeldVersionOut(version=v.version, key_id=v.key_id, state=v.state)
            for v in holding.versions
        ],
    )


@router.get(
    "/v1/holdings",
    response_model=Holdings,
    responses=documented(401, 403),
    openapi_extra=SIGNED,
    summary="The keysets the calling principal holds, with their versions' states (no keys)",
)
def list_holdings(ctx: Context, principal: Principal) -> Holdings:
    return Holdings(holdings=[holding_out(h) for h in ctx.broker.holdings(principal)])
