"""Who is calling: an operator (admin bearer token) or a principal (RFC 9421 signature).

Each route names the caller it accepts through one of the dependencies here
(:func:`operator`, :func:`principal`, :func:`reader`); a route with none is
public (health, metrics, the CA certificate, the log's public key, and
enrolment, which the one-time token authorises). See
:mod:`keybroker.api.signatures` for the signature profile and
:mod:`keybroker.api.admin` for operator tokens.

Order of checks for a principal, each failure changing nothing:

1. one well-formed signature whose ``keyid`` is a principal id (else 401);
2. the principal exists (else 401, like a bad signature), is active and has a
   current certificate that validates to the broker CA now (else 403);
3. the signature verifies under that certificate's key, fresh (else 401);
4. its nonce was not seen before (else 401 ``authentication/replayed``).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from keybroker.api import signatures
from keybroker.api.admin import verify_admin_token
from keybroker.api.problems import Unauthenticated
from keybroker.api.settings import ApiSettings
from keybroker.broker import Broker
from keybroker.errors import AuthorizationError, DecodeError, NotFound
from keybroker.pki import PrincipalId, load_certificate, verify_principal_certificate
from keybroker.store.engine import Store

if TYPE_CHECKING:
    from keybroker.api.wakeups import BusWakeups
    from keybroker.bus import Bus
    from keybroker.flows.pushauth.server import PushAuthServer

_BEARER = "bearer "


class Waker:
    """Wakes long-polls in this process when a delivery is made here.

    Only a shortcut: waiters also poll the database, which is what sees
    deliveries made by other replicas. Capture :meth:`current` *before*
    querying, then :meth:`wait` on it, and no wake-up can be lost in between.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()


class KeyedWaker:
    """Wakes the long-polls waiting on one key (a login, a phone) in this process.

    Unlike :class:`Waker`, a wake-up reaches only that key's waiters, so a thousand
    terminals waiting on a thousand logins are not all woken (and do not all re-read
    the database) each time one of them is decided. Capture :meth:`current` before
    querying, as with :class:`Waker`. Events live only while someone waits on them.
    """

    def __init__(self) -> None:
        self._events: weakref.WeakValueDictionary[str, asyncio.Event] = (
            weakref.WeakValueDictionary()
        )

    def current(self, key: str) -> asyncio.Event:
        event = self._events.get(key)
        if event is None:
            event = asyncio.Event()
            self._events[key] = event
        return event

    def wake(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()


IdentityKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


class VerifiedKeys:
    """Identity keys of certificates that passed path validation, by certificate fingerprint.

    Validating a certificate against the broker CA and checking its identity is a
    pure function of the certificate, the CA, the principal id and the time, so the
    result is kept per fingerprint (a certificate's SHA-256) and only the validity
    window is checked again on each use. Status and revocation are *not* cached:
    every request reads the principal's status and current certificate from the
    database, so revoking takes effect on the next request, on every replica.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._keys: OrderedDict[bytes, tuple[PrincipalId, IdentityKey, datetime, datetime]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    def get(self, fingerprint: bytes, pid: PrincipalId, now: datetime) -> IdentityKey | None:
        with self._lock:
            found = self._keys.get(fingerprint)
            if found is None:
                return None
            self._keys.move_to_end(fingerprint)
        owner, key, not_before, not_after = found
        if owner != pid or not not_before <= now <= not_after:
            return None  # validated again (and refused with the precise reason)
        return key

    def put(
        self,
        fingerprint: bytes,
        pid: PrincipalId,
        key: IdentityKey,
        window: tuple[datetime, datetime],
    ) -> None:
        with self._lock:
            self._keys[fingerprint] = (pid, key, *window)
            while len(self._keys) > self._capacity:
                self._keys.popitem(last=False)


@dataclass
class ApiContext:
    broker: Broker
    settings: ApiSettings
    nonces: signatures.NonceCache
    waker: Waker = field(default_factory=Waker)
    #: Set while a bus is configured and connected (``api/wakeups.py``).
    wakeups: BusWakeups | None = None
    #: Per-key wake-ups (push logins and phones: ``api/routes/pushauth.py``).
    keyed: KeyedWaker = field(default_factory=KeyedWaker)
    #: Identity keys of certificates already validated (see :class:`VerifiedKeys`).
    verified_keys: VerifiedKeys = field(default_factory=VerifiedKeys)
    #: Push login (S7): the server, and the bus its notices go out on (if any).
    pushauth: PushAuthServer | None = None
    push_bus: Bus | None = None

    @property
    def store(self) -> Store:
        return self.broker.store


async def context(request: Request) -> ApiContext:
    ctx = request.app.state.keybroker
    assert isinstance(ctx, ApiContext)
    return ctx


Context = Annotated[ApiContext, Depends(context)]


# -- operators ------------------------------------------------------------------------


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if value is None:
        return None
    if not value.lower().startswith(_BEARER):
        raise Unauthenticated("missing or invalid admin credential")
    return value[len(_BEARER) :].strip()


def operator(request: Request, ctx: Context) -> None:
    """Require a valid admin bearer token (a sync dependency: the check reads the database)."""
    token = _bearer(request)
    if token is None:
        raise Unauthenticated("this operation needs an admin credential (Authorization: Bearer)")
    verify_admin_token(ctx.store, token)


# -- principals -----------------------------------------------------------------------


def target_uri(request: Request, settings: ApiSettings) -> str:
    """The ``@target-uri`` as the client addressed it (RFC 9421 §2.2.2).

    The path is the raw one from the request line (not percent-decoded), so the
    signature base is byte-for-byte what the client signed.
    """
    scope = request.scope
    raw = scope.get("raw_path")
    path = raw.decode("latin-1").split("?", 1)[0] if raw else request.url.path
    query = scope.get("query_string", b"").decode("latin-1")
    if settings.public_url:
        origin = settings.public_url.rstrip("/")
    else:
        host = request.headers.get("host") or request.url.netloc
        origin = f"{request.url.scheme}://{host}"
    return f"{origin}{path}?{query}" if query else f"{origin}{path}"


def _identity_key(ctx: ApiContext, pid: PrincipalId) -> IdentityKey:
    broker = ctx.broker
    try:
        creds = broker.principal_credentials(pid)
    except NotFound:
        raise Unauthenticated("request signature missing or invalid") from None
    if creds.status != "active":
        raise AuthorizationError(f"{pid} is {creds.status}")
    if creds.certificate_der is None or creds.certificate_sha256 is None:
        raise AuthorizationError(f"{pid} has no current identity certificate")
    now = ctx.settings.clock()
    key = ctx.verified_keys.get(creds.certificate_sha256, pid, now)
    if key is not None:
        return key
    cert = load_certificate(creds.certificate_der)
    # Path validation to the broker CA and the identity check: a row edited in the
    # database does not make a certificate we did not issue acceptable.
    verify_principal_certificate(cert, [], [broker.ca_certificate], pid, now, crls=None)
    public = cert.public_key()
    if not isinstance(public, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise AuthorizationError("identity certificate has an unsupported key type")
    ca = broker.ca_certificate
    window = (
        max(cert.not_valid_before_utc, ca.not_valid_before_utc),
        min(cert.not_valid_after_utc, ca.not_valid_after_utc),
    )
    ctx.verified_keys.put(creds.certificate_sha256, pid, public, window)
    return public


async def _authenticate(request: Request, ctx: ApiContext) -> PrincipalId:
    body = await request.body()
    message = signatures.received(
        request.method, target_uri(request, ctx.settings), request.headers.raw, body
    )
    keyid = signatures.signer_of(message)
    try:
        pid = PrincipalId.parse(keyid)
    except DecodeError:
        raise Unauthenticated("signature keyid is not a principal id") from None

    def check() -> None:
        # One trip to the thread pool for the three steps (each hand-over costs a GIL
        # switch, up to sys.getswitchinterval(), while the loop thread waits for it).
        key = _identity_key(ctx, pid)
        now = ctx.settings.clock()
        verified = signatures.verify_request(
            message, str(pid), key, now=now, max_skew=ctx.settings.signature_max_skew
        )
        ctx.nonces.remember(verified, now)

    await run_in_threadpool(check)
    return pid


async def principal(request: Request, ctx: Context) -> PrincipalId:
    """Require a request signed by an active principal; return who it is."""
    return await _authenticate(request, ctx)


@dataclass(frozen=True)
class Reader:
    """Whoever may read the log: an operator (``principal`` is ``None``) or a principal."""

    principal: PrincipalId | None


async def reader(request: Request, ctx: Context) -> Reader:
    """Require either credential: an admin token, or else a principal's signature."""
    signed = "signature" in request.headers or "signature-input" in request.headers
    if request.headers.get("authorization") is not None:
        if signed:
            # Two credentials: which one speaks? Refuse rather than pick.
            raise Unauthenticated("send an admin credential or a signature, not both")
        await run_in_threadpool(operator, request, ctx)
        return Reader(None)
    if signed:
        return Reader(await _authenticate(request, ctx))
    raise Unauthenticated("this operation needs an admin credential or a signed request")


Operator = Depends(operator)
Principal = Annotated[PrincipalId, Depends(principal)]
AnyReader = Annotated[Reader, Depends(reader)]
