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
from dataclasses import dataclass, field
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
from keybroker.pki import PrincipalId, verify_principal_certificate
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


@dataclass
class ApiContext:
    broker: Broker
    settings: ApiSettings
    nonces: signatures.NonceCache
    waker: Waker = field(default_factory=Waker)
    #: Set while a bus is configured and connected (``api/wakeups.py``).
    wakeups: BusWakeups | None = None
    #: Push login (S7): the server, and the bus its notices go out on (if any).
    pushauth: PushAuthServer | None = None
    push_bus: Bus | None = None

    @property
    def store(self) -> Store:
        return self.broker.store


def context(request: Request) -> ApiContext:
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


def _identity_key(
    ctx: ApiContext, pid: PrincipalId
) -> ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey:
    broker = ctx.broker
    try:
        info = broker.show_principal(pid)
    except NotFound:
        raise Unauthenticated("request signature missing or invalid") from None
    if info.status != "active":
        raise AuthorizationError(f"{pid} is {info.status}")
    try:
        cert = broker.principal_certificate(pid)
    except NotFound:
        raise AuthorizationError(f"{pid} has no current identity certificate") from None
    # Path validation to the broker CA and the identity check: a row edited in the
    # database does not make a certificate we did not issue acceptable.
    verify_principal_certificate(
        cert, [], [broker.ca_certificate], pid, ctx.settings.clock(), crls=None
    )
    key = cert.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise AuthorizationError("identity certificate has an unsupported key type")
    return key


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
    key = await run_in_threadpool(_identity_key, ctx, pid)
    now = ctx.settings.clock()
    verified = signatures.verify_request(
        message, str(pid), key, now=now, max_skew=ctx.settings.signature_max_skew
    )
    await run_in_threadpool(ctx.nonces.remember, verified, now)
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
