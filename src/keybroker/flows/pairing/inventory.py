"""The broker's device inventory: the other out-of-band identity a controller checks against.

Instead of a pairing code read off the device's label, a controller may take the
identity to check from the broker's **inventory record** for that device
(``pair controller --from-inventory SERIAL``): exactly what a pairing code carries
(serial number, hardware id, model, SHA-256 of the key's SubjectPublicKeyInfo),
entered by an operator on the broker host (``keybroker pair inventory-add``, from
the code on the device's label or box, or the fields one by one) and served to
principals with ``GET /v1/pairing/inventory/{serial}`` (RFC 9421-signed, over the
pinned TLS). The controller then runs the same checks as with a code: chain,
validity, revocation, key usage, identification info equal, key hash equal.

Here the broker *is* the one vouching for the device (as the issue puts it: an
identity "the user or the broker vouches for"); every addition and removal is a
transparency-log entry (``keybroker/log/entry/pairing/inventory-added`` and
``…/inventory-removed``), with who made it. Nothing in a record is secret.

One record per serial number. Adding the same record again is a no-op; adding a
different one for a serial already recorded is a Conflict (remove it first), so
a record never changes silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar, Final

import sqlalchemy as sa

from keybroker.broker._context import record
from keybroker.broker.events import Event, to_ms
from keybroker.broker.service import Broker
from keybroker.encoding import message_label
from keybroker.errors import Conflict, DecodeError, NotFound
from keybroker.flows.pairing.code import PairingCode
from keybroker.pki import DeviceIdentity
from keybroker.store.schema import pairing_inventory

if TYPE_CHECKING:
    from keybroker.client.principal import PrincipalClient

MAX_OPERATOR: Final = 128
#: A serial number as :class:`~keybroker.pki.DeviceIdentity` accepts it.
SERIAL_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_SERIAL_RE: Final = re.compile(SERIAL_PATTERN)


def _entry(event: str) -> str:
    return message_label(f"keybroker/log/entry/pairing/{event}", 1)


@dataclass(frozen=True)
class InventoryAdded(Event):
    """An operator recorded a device (its identification info and key hash) at the broker."""

    LABEL: ClassVar[str] = _entry("inventory-added")
    at_ms: int
    serial: str
    hardware_id: str
    model: str
    key_sha256: bytes
    operator: str


@dataclass(frozen=True)
class InventoryRemoved(Event):
    """An operator removed a device's record: controllers can no longer pair from it."""

    LABEL: ClassVar[str] = _entry("inventory-removed")
    at_ms: int
    serial: str
    hardware_id: str
    model: str
    key_sha256: bytes
    operator: str


LOG_ENTRIES: Final = {cls.LABEL: cls for cls in (InventoryAdded, InventoryRemoved)}


def check_serial(serial: str) -> str:
    if not isinstance(serial, str) or not _SERIAL_RE.fullmatch(serial):
        raise DecodeError("device serial number must be 1-64 of A-Z a-z 0-9 . _ -")
    return serial


def _operator(name: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_OPERATOR or not name.isprintable():
        raise DecodeError(f"the operator's name is 1 to {MAX_OPERATOR} printable characters")
    return name


@dataclass(frozen=True)
class InventoryRecord:
    """One device as the broker's inventory knows it: its code, who recorded it and when."""

    code: PairingCode
    added_by: str
    added_at: datetime

    @property
    def serial(self) -> str:
        return self.code.identity.serial


def _record_of(row: sa.Row[tuple[object, ...]]) -> InventoryRecord:
    identity = DeviceIdentity(row.serial, row.hardware_id, row.model)
    return InventoryRecord(PairingCode(identity, bytes(row.key_sha256)), row.added_by, row.added_at)


class Inventory:
    """The broker's side: operators add and remove records, principals read them."""

    def __init__(self, broker: Broker) -> None:
        self._ctx = broker.context

    def add(self, code: PairingCode, operator: str) -> InventoryRecord:
        """Record the device ``code`` describes; the same record again is a no-op, a
        different one for the same serial a :class:`Conflict` (nothing changes)."""
        operator = _operator(operator)
        now = self._ctx.now()
        ident = code.identity
        with self._ctx.store.transaction() as conn:
            self._ctx.store.lock(conn, f"pairing-inventory/{ident.serial}")
            row = conn.execute(
                sa.select(pairing_inventory).where(pairing_inventory.c.serial == ident.serial)
            ).first()
            if row is not None:
                existing = _record_of(row)
                if existing.code == code:
                    return existing
                raise Conflict(
                    f"serial {ident.serial} is already recorded as {existing.code}; "
                    "remove that record first"
                )
            conn.execute(
                pairing_inventory.insert().values(
                    serial=ident.serial,
                    hardware_id=ident.hardware_id,
                    model=ident.model,
                    key_sha256=code.key_sha256,
                    added_by=operator,
                    added_at=now,
                )
            )
            record(
                self._ctx,
                conn,
                [
                    InventoryAdded(
                        at_ms=to_ms(now),
                        serial=ident.serial,
                        hardware_id=ident.hardware_id,
                        model=ident.model,
                        key_sha256=code.key_sha256,
                        operator=operator,
                    )
                ],
            )
        return InventoryRecord(code, operator, now)

    def remove(self, serial: str, operator: str) -> InventoryRecord:
        """Remove the record of ``serial`` (NotFound if there is none) and return it."""
        serial = check_serial(serial)
        operator = _operator(operator)
        now = self._ctx.now()
        with self._ctx.store.transaction() as conn:
            self._ctx.store.lock(conn, f"pairing-inventory/{serial}")
            row = conn.execute(
                sa.select(pairing_inventory).where(pairing_inventory.c.serial == serial)
            ).first()
            if row is None:
                raise NotFound(f"no inventory record for device serial {serial}")
            removed = _record_of(row)
            conn.execute(pairing_inventory.delete().where(pairing_inventory.c.serial == serial))
            ident = removed.code.identity
            record(
                self._ctx,
                conn,
                [
                    InventoryRemoved(
                        at_ms=to_ms(now),
                        serial=ident.serial,
                        hardware_id=ident.hardware_id,
                        model=ident.model,
                        key_sha256=removed.code.key_sha256,
                        operator=operator,
                    )
                ],
            )
        return removed

    def get(self, serial: str) -> InventoryRecord:
        """The record of ``serial``; NotFound if the inventory has none."""
        serial = check_serial(serial)
        with self._ctx.store.snapshot() as conn:
            row = conn.execute(
                sa.select(pairing_inventory).where(pairing_inventory.c.serial == serial)
            ).first()
        if row is None:
            raise NotFound(f"no inventory record for device serial {serial}")
        return _record_of(row)


# -- the controller's side --------------------------------------------------------------------


async def fetch_inventory_code(client: PrincipalClient, serial: str) -> PairingCode:
    """``GET /v1/pairing/inventory/{serial}`` as ``client``'s principal: the device's identity
    as a :class:`PairingCode` (NotFound if the broker has no record of it).

    The answer must name the serial asked for; its code is parsed as strictly as a
    label's, so the controller checks against exactly what a code would carry."""
    from keybroker.api.pairing_schemas import InventoryRecordOut

    path = f"/v1/pairing/inventory/{check_serial(serial)}"
    found = await client.call(InventoryRecordOut, "GET", path)
    code = PairingCode.from_uri(found.code)
    ident = code.identity
    fields = (found.serial, found.hardware_id, found.model, found.key_sha256)
    if fields != (ident.serial, ident.hardware_id, ident.model, code.key_sha256.hex()):
        raise DecodeError("the broker's inventory record does not agree with its own code")
    if ident.serial != serial:
        raise DecodeError(f"the broker answered for serial {ident.serial[:64]}, not {serial}")
    return code
