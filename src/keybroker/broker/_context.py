"""What every broker module shares: the context it runs in and the checks on its arguments.

Rules every module follows:

* one operation, one :meth:`Store.transaction`; its log entries are appended
  last, in one batch, on the same connection (:func:`record`), so a change and
  its record commit together and each operation signs one tree head;
* store locks (:meth:`Store.lock`) are taken before the log's, never after, so
  replicas cannot deadlock on them;
* arguments are checked before the transaction starts; a refusal changes
  nothing (the transaction rolls back on any exception).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.engine import Connection

from keybroker.broker.events import Event
from keybroker.errors import (
    ConfigurationError,
    DecodeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from keybroker.log.store_log import TransparencyLog
from keybroker.pki import CertificateAuthority, PrincipalId
from keybroker.store.engine import Store
from keybroker.store.keysets import KeysetRepository

Clock = Callable[[], datetime]
Random = Callable[[int], bytes]

#: Keysets the broker keeps for itself (its CA and log keys): never granted, delivered or changed
#: through the broker's keyset operations.
RESERVED_KEYSET_PREFIX: Final = "keybroker/"
#: ``keysets.name`` is VARCHAR(128).
MAX_KEYSET_NAME: Final = 128


class EnvelopeSigner:
    """The CA key, used only to sign delivery envelopes. Prints no key, refuses pickling."""

    __slots__ = ("_key",)

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError("the envelope signer is the CA's P-256 key")
        self._key = key

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def __repr__(self) -> str:
        return "EnvelopeSigner(CA key)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("EnvelopeSigner holds a private key and cannot be pickled")


@dataclass(frozen=True)
class Policy:
    """Bounds on what operators and principals may ask for."""

    identity_validity: timedelta = timedelta(days=365)
    max_token_ttl: timedelta = timedelta(days=30)
    max_delivery_ttl: timedelta = timedelta(days=30)


@dataclass(frozen=True)
class BrokerContext:
    store: Store
    keysets: KeysetRepository
    log: TransparencyLog
    ca: CertificateAuthority
    signer: EnvelopeSigner = field(repr=False)
    clock: Clock
    rng: Random
    policy: Policy = field(default_factory=Policy)

    def now(self) -> datetime:
        now = self.clock()
        if not isinstance(now, datetime) or now.utcoffset() is None:
            raise ConfigurationError("the broker's clock must return aware datetimes")
        return now

    def new_id(self) -> str:
        """A random (version 4) UUID from the injected randomness."""
        return str(uuid.UUID(bytes=self.rng(16), version=4))


def record(ctx: BrokerContext, conn: Connection, events: Sequence[Event]) -> None:
    """Append ``events`` to the log inside the caller's transaction."""
    if events:
        ctx.log.append_batch([e.encode() for e in events], conn=conn)


# -- argument checks -------------------------------------------------------------------


def principal_id(value: PrincipalId | str) -> PrincipalId:
    """``value`` as a :class:`PrincipalId`; :class:`DecodeError` if malformed."""
    if isinstance(value, PrincipalId):
        return value
    return PrincipalId.parse(value)


def keyset_name(name: str) -> str:
    """A name the broker's keyset operations accept; reserved names are refused."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_KEYSET_NAME:
        raise DecodeError(f"keyset names are 1 to {MAX_KEYSET_NAME} characters")
    if name.startswith(RESERVED_KEYSET_PREFIX):
        # The CA and log keys live here: granting or delivering them would hand out the broker.
        raise RemoteProtocolError(f"keyset names starting {RESERVED_KEYSET_PREFIX!r} are reserved")
    return name


def version_number(version: int) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version < 1 << 31:
        raise DecodeError("key versions are positive integers")
    return version


def ttl(value: timedelta, maximum: timedelta) -> timedelta:
    if not isinstance(value, timedelta):
        raise LocalProtocolError("ttl must be a timedelta")
    if not timedelta(0) < value <= maximum:
        raise RemoteProtocolError(f"ttl must be positive and at most {maximum}")
    return value


def delivery_id(value: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 36:
        raise DecodeError("malformed delivery id")
    return value
