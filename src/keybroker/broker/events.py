"""What the broker writes to the transparency log: one message type per state change.

Every entry is a canonical message labelled ``keybroker/log/entry/<event>/v1``
and states a fact in the past tense. Entries carry identifiers, public keys,
fingerprints and times (epoch milliseconds) — never a secret, a token, a
sealed key or anything an attacker could use to obtain one. They are written
in the same transaction as the change they record, so the log and the store
never disagree.

An auditor decodes entries with :func:`decode_event`. Other entry types exist
(the home's ``init`` entry, and later the flows' own), so an unknown label is
not an error for the log, only for this decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Final

from keybroker.encoding import Message, decode, message_label
from keybroker.errors import DecodeError


def _label(event: str) -> str:
    return message_label(f"keybroker/log/entry/{event}", 1)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


def to_ms(when: datetime) -> int:
    """Epoch milliseconds of an aware datetime (the unit of every time in an entry)."""
    return (when - _EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    return _EPOCH + ms * _MS


@dataclass(frozen=True)
class Event(Message):
    """Base of the broker's log entries; ``at_ms`` is when the change happened."""

    LABEL: ClassVar[str]


# -- enrolment and principals ---------------------------------------------------


@dataclass(frozen=True)
class EnrolmentTokenCreated(Event):
    LABEL: ClassVar[str] = _label("enrolment-token-created")
    at_ms: int
    token_id: str
    principal: str
    expires_at_ms: int


@dataclass(frozen=True)
class PrincipalEnrolled(Event):
    """A principal enrolled (``reenrolled``: an existing one was re-keyed)."""

    LABEL: ClassVar[str] = _label("principal-enrolled")
    at_ms: int
    principal: str
    token_id: str
    reenrolled: bool
    certificate_sha256: bytes
    certificate_serial: str
    identity_key_sha256: bytes
    hpke_template: str
    hpke_key_id: int
    hpke_public_key: bytes


@dataclass(frozen=True)
class CertificateRevoked(Event):
    LABEL: ClassVar[str] = _label("certificate-revoked")
    at_ms: int
    principal: str
    certificate_sha256: bytes
    certificate_serial: str
    reason: str


@dataclass(frozen=True)
class PrincipalRevoked(Event):
    LABEL: ClassVar[str] = _label("principal-revoked")
    at_ms: int
    principal: str
    reason: str


# -- keysets ----------------------------------------------------------------------


@dataclass(frozen=True)
class KeysetCreated(Event):
    LABEL: ClassVar[str] = _label("keyset-created")
    at_ms: int
    keyset: str
    purpose: str
    template: str
    version: int
    key_id: int


@dataclass(frozen=True)
class KeyVersionAdded(Event):
    """A rotation's first step: a new pending version."""

    LABEL: ClassVar[str] = _label("key-version-added")
    at_ms: int
    keyset: str
    version: int
    key_id: int
    template: str


@dataclass(frozen=True)
class KeyPromoted(Event):
    LABEL: ClassVar[str] = _label("key-promoted")
    at_ms: int
    keyset: str
    version: int
    key_id: int
    previous_primary: int | None


@dataclass(frozen=True)
class KeyEnabled(Event):
    LABEL: ClassVar[str] = _label("key-enabled")
    at_ms: int
    keyset: str
    version: int
    key_id: int


@dataclass(frozen=True)
class KeyDisabled(Event):
    LABEL: ClassVar[str] = _label("key-disabled")
    at_ms: int
    keyset: str
    version: int
    key_id: int


@dataclass(frozen=True)
class KeyDestroyed(Event):
    LABEL: ClassVar[str] = _label("key-destroyed")
    at_ms: int
    keyset: str
    version: int
    key_id: int


# -- grants -----------------------------------------------------------------------


@dataclass(frozen=True)
class GrantCreated(Event):
    LABEL: ClassVar[str] = _label("grant-created")
    at_ms: int
    grant_id: str
    principal: str
    keyset: str
    mode: str


@dataclass(frozen=True)
class GrantRevoked(Event):
    LABEL: ClassVar[str] = _label("grant-revoked")
    at_ms: int
    grant_id: str
    principal: str
    keyset: str
    mode: str


# -- deliveries -------------------------------------------------------------------


@dataclass(frozen=True)
class DeliverySent(Event):
    """``envelope_sha256`` names the signed envelope the principal will fetch."""

    LABEL: ClassVar[str] = _label("delivery-sent")
    at_ms: int
    delivery_id: str
    principal: str
    keyset: str
    version: int
    key_id: int
    expires_at_ms: int
    envelope_sha256: bytes


@dataclass(frozen=True)
class DeliveryAcknowledged(Event):
    LABEL: ClassVar[str] = _label("delivery-acknowledged")
    at_ms: int
    delivery_id: str
    principal: str
    keyset: str
    version: int


@dataclass(frozen=True)
class DeliveryFailed(Event):
    LABEL: ClassVar[str] = _label("delivery-failed")
    at_ms: int
    delivery_id: str
    principal: str
    keyset: str
    version: int
    reason: str


@dataclass(frozen=True)
class DeliveryExpired(Event):
    LABEL: ClassVar[str] = _label("delivery-expired")
    at_ms: int
    delivery_id: str
    principal: str
    keyset: str
    version: int


EVENT_TYPES: Final[dict[str, type[Event]]] = {
    cls.LABEL: cls
    for cls in (
        EnrolmentTokenCreated,
        PrincipalEnrolled,
        CertificateRevoked,
        PrincipalRevoked,
        KeysetCreated,
        KeyVersionAdded,
        KeyPromoted,
        KeyEnabled,
        KeyDisabled,
        KeyDestroyed,
        GrantCreated,
        GrantRevoked,
        DeliverySent,
        DeliveryAcknowledged,
        DeliveryFailed,
        DeliveryExpired,
    )
}


def decode_event(entry: bytes) -> Event:
    """The broker event in a log entry; :class:`DecodeError` if it is not one."""
    label, _ = decode(tuple(EVENT_TYPES), entry)
    cls = EVENT_TYPES.get(label)
    if cls is None:  # pragma: no cover - decode() accepted only these labels
        raise DecodeError("not a broker event")
    return cls.decode(entry)
