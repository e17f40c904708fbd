"""What an API process is configured with. Nothing here is a secret."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from keybroker.flows.pushauth.protocol import PushPolicy

#: Request bodies above this are refused (413) before the application reads them.
DEFAULT_MAX_BODY_BYTES: Final = 64 * 1024
#: The larger limit of the rotation routes, whose bodies carry a whole topology
#: (100,000 links at ~100 bytes each).
DEFAULT_MAX_TOPOLOGY_BYTES: Final = 16 * 1024 * 1024


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ApiSettings:
    """Settings of one API process; every replica on a database should use the same.

    * ``max_body_bytes`` — largest request body accepted (413 above).
    * ``signature_max_skew`` — an RFC 9421 signature's ``created`` must be within
      this of the server's clock, either way; its nonce is remembered that long.
    * ``max_wait_seconds`` — the longest long-poll a principal may ask for.
    * ``poll_interval_seconds`` — how often a waiting long-poll looks at the
      database for deliveries made by *other* replicas (deliveries made through
      this process wake it at once).
    * ``public_url`` — scheme and authority principals use to reach the broker
      (``https://broker.example:8443``), when a proxy in front rewrites them;
      signatures cover the target URI the client saw. ``None``: take them from
      the request.
    * ``bus_url`` / ``wake_topic`` — with a bus, a delivery made on one replica
      wakes the long-polls of every replica at once (see ``api/wakeups.py``).
    * ``max_topology_bytes`` — largest body of the ``/v1/rotations`` routes, which
      carry a topology document (413 above).
    * ``rotation_interval`` — seconds between two steps of the rollout driver
      this process runs in the background (``api/rotation_loop.py``); every
      replica may run it. ``0`` disables it: then some other process must step
      rollouts, or none moves.
    * ``push_policy`` — how push logins run (expiry, number length, rate limit…;
      :class:`~keybroker.flows.pushauth.protocol.PushPolicy`); ``None``: its defaults.
    * ``clock`` — the time used for signature freshness, certificate validity
      and the nonce cache; the broker's clock in tests.
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    signature_max_skew: timedelta = timedelta(seconds=60)
    max_wait_seconds: int = 60
    poll_interval_seconds: float = 1.0
    public_url: str | None = None
    clock: Callable[[], datetime] = utc_now
    title: str = "keybroker"
    #: ``nats://…`` / ``mqtt://…``: wake long-polls on every replica through this bus.
    bus_url: str | None = None
    wake_topic: str = "kb.wake"
    max_topology_bytes: int = DEFAULT_MAX_TOPOLOGY_BYTES
    rotation_interval: float = 1.0
    push_policy: PushPolicy | None = None
