"""Time arguments: every function in keybroker.pki takes ``now``; none reads a clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from keybroker.errors import LocalProtocolError


def as_utc(value: datetime, what: str = "now") -> datetime:
    """Return ``value`` in UTC; a naive datetime is a caller bug (its zone is a guess)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise LocalProtocolError(f"{what} must be a timezone-aware datetime")
    return value.astimezone(UTC)


def positive(value: timedelta, what: str = "validity") -> timedelta:
    if value <= timedelta(0):
        raise LocalProtocolError(f"{what} must be positive")
    return value


def is_within(not_before: datetime, not_after: datetime, now: datetime) -> bool:
    """RFC 5280 §4.1.2.5: both ends of the validity window are inclusive."""
    return not_before <= now <= not_after
