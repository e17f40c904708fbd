"""Keyless TLS (S5): what a key server needs to authorise edges.

``GET /v1/keyless/keys`` answers a key server (a principal signing the request,
like ``/v1/holdings``) with every ``keyless/<service>`` keyset it holds: for each,
the SKI, type and policy (``allow_decrypt``) of each primary or enabled key, and
the active principals with a ``use`` grant on it. It carries no key material:
keys reach a key server only through sealed deliveries. A principal that holds
no keyless keyset is not a key server and gets 403; an operator's token is not a
signature (401).

Uploading keys and granting them is done on the broker host
(``keybroker keyless …``), so a service's private key never crosses the network
on its way to the broker.
"""

from __future__ import annotations

from fastapi import APIRouter

from keybroker.api.auth import Context, Principal
from keybroker.api.keyless_schemas import KeylessKeyOut, KeylessKeys, KeylessKeysetOut
from keybroker.api.problems import documented
from keybroker.api.routes._common import SIGNED
from keybroker.flows.keyless.service_keys import KeyServerKeyset, ServiceKeys

router = APIRouter(tags=["keyless"])


def keyset_out(held: KeyServerKeyset) -> KeylessKeysetOut:
    return KeylessKeysetOut(
        keyset=held.keyset,
        service=held.service,
        keys=[
            KeylessKeyOut(
                version=k.version,
                key_id=k.key_id,
                state=k.state,
                template=k.template,
                key_type=k.key_type,
                ski=k.ski.hex(),
                allow_decrypt=k.allow_decrypt,
            )
            for k in held.keys
        ],
        edges=[str(edge) for edge in held.edges],
    )


@router.get(
    "/v1/keyless/keys",
    response_model=KeylessKeys,
    responses=documented(401, 403),
    openapi_extra=SIGNED,
    summary="The keyless keys the calling key server holds, their policies and allowed edges",
)
def key_server_keys(ctx: Context, principal: Principal) -> KeylessKeys:
    view = ServiceKeys(ctx.broker).key_server_view(principal)
    return KeylessKeys(keysets=[keyset_out(held) for held in view])
