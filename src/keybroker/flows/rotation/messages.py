"""What a rollout writes to the transparency log (one entry per fact, past tense).

``LinkStepped`` is written in the same transaction as the link's new record, with
the link's step counter ``seq``: an auditor replays a link from the log alone and
sees every step exactly once, in order (``seq`` 1, 2, 3 …, each ``from_state``
equal to the previous ``to_state``). Entries hold names, versions and delivery
ids, never key material.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

from keybroker.broker.events import Event
from keybroker.encoding import decode, message_label
from keybroker.errors import DecodeError


def _label(event: str) -> str:
    return message_label(f"keybroker/log/entry/rotation/{event}", 1)


@dataclass(frozen=True)
class RolloutStarted(Event):
    LABEL: ClassVar[str] = _label("rollout-started")
    at_ms: int
    rollout_id: str
    topology: str
    links: int
    policy_sha256: bytes


@dataclass(frozen=True)
class LinkStepped(Event):
    LABEL: ClassVar[str] = _label("link-stepped")
    at_ms: int
    rollout_id: str
    link: str
    keyset: str
    seq: int
    input: str
    from_state: str
    to_state: str
    old_version: int
    new_version: int | None
    attempt: int
    delivery_id: str | None
    reason: str | None


@dataclass(frozen=True)
class RolloutChanged(Event):
    LABEL: ClassVar[str] = _label("rollout-changed")
    at_ms: int
    rollout_id: str
    state: str
    reason: str | None


ROTATION_EVENTS: Final[dict[str, type[Event]]] = {
    cls.LABEL: cls for cls in (RolloutStarted, LinkStepped, RolloutChanged)
}


def decode_rotation_event(entry: bytes) -> Event:
    """The rotation event in a log entry; :class:`DecodeError` if it is not one."""
    label, _ = decode(tuple(ROTATION_EVENTS), entry)
    cls = ROTATION_EVENTS.get(label)
    if cls is None:  # pragma: no cover - decode() accepted only these labels
        raise DecodeError("not a rotation event")
    return cls.decode(entry)
