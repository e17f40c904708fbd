"""Pairing (S9): the manufacturer CRLs the broker publishes to controllers.

``GET /v1/pairing/crls`` answers a principal (signing the request, like
``/v1/holdings``) with the latest CRL of every manufacturer CA an operator
published on the broker host (``keybroker pair crl-publish``), each with the CA
certificate that signed it. CRLs are public documents and carry no secret; the
route is signed so that only enrolled principals learn which manufacturers a
deployment trusts. The broker only relays them: a controller keeps a CRL only
if it verifies under a manufacturer root the controller itself trusts
(:func:`keybroker.flows.pairing.crls.trusted_crls`).

``GET /v1/pairing/inventory/{serial}`` answers a principal with the broker's
inventory record of a device (``keybroker pair inventory-add`` on the broker
host): the identification info and key hash a controller checks the device's
certificate against (``pair controller --from-inventory``), 404 if there is none.
"""

from __future__ import annotations

from typing import Annotated

from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import APIRouter, Path

from keybroker.api.auth import Context, Principal
from keybroker.api.pairing_schemas import (
    InventoryRecordOut,
    ManufacturerCrlOut,
    ManufacturerCrls,
)
from keybroker.api.problems import documented
from keybroker.api.routes._common import SIGNED
from keybroker.flows.pairing.crls import CrlPublisher, PublishedCrl
from keybroker.flows.pairing.inventory import SERIAL_PATTERN, Inventory, InventoryRecord
from keybroker.pki import certificate_pem

router = APIRouter(tags=["pairing"])


def crl_out(published: PublishedCrl) -> ManufacturerCrlOut:
    crl = published.crl
    next_update = crl.next_update_utc
    assert next_update is not None  # the publisher refuses a CRL without one
    return ManufacturerCrlOut(
        issuer=published.name,
        issuer_sha256=published.issuer_sha256.hex(),
        issuer_certificate=certificate_pem(published.issuer).decode("ascii"),
        crl_number=published.number,
        this_update=crl.last_update_utc,
        next_update=next_update,
        crl=crl.public_bytes(Encoding.PEM).decode("ascii"),
    )


@router.get(
    "/v1/pairing/crls",
    response_model=ManufacturerCrls,
    responses=documented(401),
    openapi_extra=SIGNED,
    summary="The latest CRL of every manufacturer CA, with the CA certificate that signed it",
)
def manufacturer_crls(ctx: Context, principal: Principal) -> ManufacturerCrls:
    return ManufacturerCrls(crls=[crl_out(p) for p in CrlPublisher(ctx.broker).current()])


def inventory_out(found: InventoryRecord) -> InventoryRecordOut:
    ident = found.code.identity
    return InventoryRecordOut(
        serial=ident.serial,
        hardware_id=ident.hardware_id,
        model=ident.model,
        key_sha256=found.code.key_sha256.hex(),
        code=found.code.to_uri(),
        added_by=found.added_by,
        added_at=found.added_at,
    )


SerialPath = Annotated[
    str, Path(pattern=SERIAL_PATTERN, max_length=64, description="Device serial number")
]


@router.get(
    "/v1/pairing/inventory/{serial}",
    response_model=InventoryRecordOut,
    responses=documented(401, 404, 422),
    openapi_extra=SIGNED,
    summary="The broker's inventory record of a device: identification info and key hash",
)
def inventory_record(ctx: Context, principal: Principal, serial: SerialPath) -> InventoryRecordOut:
    return inventory_out(Inventory(ctx.broker).get(serial))
