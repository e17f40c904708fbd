"""Wire formats of ``/v1/pairing`` (S9 pairing), shared with the controller's SDK call.

The conventions of :mod:`keybroker.api.schemas` hold; certificates and CRLs
travel as PEM text, as operators and ``openssl`` write them. Like
:mod:`keybroker.api.schemas`, this module needs pydantic only.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from keybroker.api.schemas import Response


class ManufacturerCrlOut(Response):
    """One manufacturer CA and its latest CRL, relayed as published: verify before use."""

    issuer: str = Field(description="the CA's subject (RFC 4514)")
    issuer_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the CA certificate (DER), hex"
    )
    issuer_certificate: str = Field(description="the CA certificate (PEM)")
    crl_number: int = Field(ge=0)
    this_update: datetime
    next_update: datetime
    crl: str = Field(description="the CRL (PEM), signed by the CA")


class ManufacturerCrls(Response):
    crls: list[ManufacturerCrlOut]


class InventoryRecordOut(Response):
    """The broker's inventory record of a device: what its pairing code would carry."""

    serial: str = Field(description="the device's serial number")
    hardware_id: str = Field(description="its hardware id (48-bit MAC, 12 lower-case hex digits)")
    model: str
    key_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the device key's SPKI (DER), hex"
    )
    code: str = Field(description="the same as a pairing code (keybroker-pair:V:1;…;;)")
    added_by: str = Field(description="the operator who recorded it")
    added_at: datetime
