"""Principals authenticate every request with an RFC 9421 HTTP Message Signature.

Why signatures and not mutual TLS:

* uvicorn does not hand client certificates to the ASGI application (the ASGI
  TLS extension is not implemented), so with mTLS the app could not tell which
  principal is calling without a TLS-terminating proxy passing the certificate
  in a header — a header that then has to be trusted blindly;
* a signature survives TLS-terminating proxies and load balancers in front of
  N replicas, and is checked by whichever replica gets the request;
* a signature binds the request itself — method, target URI and, through an
  RFC 9530 ``Content-Digest``, the body — not only the connection it came on.

The profile (what :func:`verify_request` accepts):

* exactly one signature, with ``tag="keybroker"`` (RFC 9421 §2.3: an
  application tag, so a signature made for another protocol is not accepted);
* ``keyid`` is the principal id (``site/fra1``); the key is the public key of
  its current, unrevoked identity certificate, which must validate to the
  broker CA now; the algorithm follows from the key (Ed25519 → ``ed25519``,
  P-256 → ``ecdsa-p256-sha256``, §3.3.6 / §3.3.4) and an ``alg`` parameter, if
  present, must name that algorithm;
* covered components include ``@method`` and ``@target-uri``, and
  ``content-digest`` whenever there is a body (its SHA-256 or SHA-512 value must
  match the body bytes received);
* ``created`` within :attr:`ApiSettings.signature_max_skew` of the server clock
  (either way), ``expires`` (if present) not passed;
* a ``nonce`` of 16 to 64 characters, accepted once per principal: the pair is
  inserted into the ``request_nonces`` table, shared by every replica, and
  kept until a signature carrying it would be refused as too old anyway.
  That insert is the replay check, so it is the last step, made only for a
  signature that verified (an attacker cannot fill the table).

Signature base construction and verification are the ``http-message-signatures``
library's; this module only chooses the key and algorithm, feeds it the
request as received, and enforces the profile above. The one piece written
here is reading ``keyid`` before verification (to know which key to load),
with ``http_sf``, the structured-field parser the library itself uses.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import http_sf
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from http_message_signatures import (
    HTTPMessageSignaturesException,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    InvalidSignature,
    algorithms,
)
from sqlalchemy.dialects import postgresql, sqlite

from keybroker.api.problems import Replayed, Unauthenticated
from keybroker.store.engine import Store
from keybroker.store.schema import request_nonces

TAG: Final = "keybroker"
REQUIRED_COMPONENTS: Final = ("@method", "@target-uri")
MIN_NONCE: Final = 16
MAX_NONCE: Final = 64
_MAX_FIELD: Final = 4096
_REFUSAL: Final = "request signature missing or invalid"

IdentityKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class ReceivedRequest:
    """A request as the server got it, in the shape the signature library reads."""

    method: str
    url: str
    headers: _Fields
    body: bytes


class _Fields:
    """Header field lines in wire order (the library reads only ``items()``)."""

    def __init__(self, lines: Iterable[tuple[str, str]]) -> None:
        self._lines = list(lines)

    def items(self) -> list[tuple[str, str]]:
        return list(self._lines)

    def get(self, name: str) -> str | None:
        values = [v for k, v in self._lines if k.lower() == name]
        return ", ".join(values) if values else None


def received(
    method: str, url: str, raw_headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> ReceivedRequest:
    return ReceivedRequest(
        method=method,
        url=url,
        headers=_Fields((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers),
        body=body,
    )


def signer_of(request: ReceivedRequest) -> str:
    """The ``keyid`` of the request's one signature, read before verifying it.

    Raises :class:`Unauthenticated` if there is not exactly one well-formed signature.
    """
    value = request.headers.get("signature-input")
    if value is None or request.headers.get("signature") is None:
        raise Unauthenticated("request is not signed (RFC 9421 Signature-Input and Signature)")
    if len(value) > _MAX_FIELD:
        raise Unauthenticated(_REFUSAL)
    try:
        parsed: Any = http_sf.parse(value.encode("ascii"), tltype="dictionary")
    except Exception:  # http_sf raises assorted errors for garbage; all mean "malformed"
        raise Unauthenticated(_REFUSAL) from None
    if not isinstance(parsed, dict) or len(parsed) != 1:
        raise Unauthenticated("exactly one request signature is accepted")
    ((member, params),) = parsed.values()
    keyid = params.get("keyid") if isinstance(params, dict) else None
    if not isinstance(member, list) or not isinstance(keyid, str):
        raise Unauthenticated(_REFUSAL)
    return keyid


class _OneKey(HTTPSignatureKeyResolver):
    def __init__(self, keyid: str, key: IdentityKey) -> None:
        self._keyid = keyid
        self._key = key

    def resolve_public_key(self, key_id: str) -> IdentityKey | None:
        return self._key if key_id == self._keyid else None

    def resolve_private_key(self, key_id: str) -> Any:
        raise InvalidSignature("this resolver verifies only")


class _Verifier(HTTPMessageVerifier):
    """The library's verifier with our clock and freshness rule (``created`` both ways)."""

    def __init__(
        self,
        *,
        algorithm: type[algorithms.HTTPSignatureAlgorithm],
        resolver: _OneKey,
        now: dt.datetime,
        max_skew: dt.timedelta,
    ) -> None:
        super().__init__(signature_algorithm=algorithm, key_resolver=resolver)
        self._now = now
        self._skew = max_skew

    def validate_created_and_expires(self, sig_input: Any, max_age: Any = None) -> None:
        params = sig_input.params
        created = params.get("created")
        if type(created) is not int:
            raise InvalidSignature("signature has no integer 'created' parameter")
        now = self._now.timestamp()
        if abs(now - created) > self._skew.total_seconds():
            raise InvalidSignature("signature 'created' is outside the allowed clock skew")
        expires = params.get("expires")
        if expires is not None and (type(expires) is not int or expires < now):
            raise InvalidSignature("signature has expired")


def algorithm_for(key: object) -> type[algorithms.HTTPSignatureAlgorithm]:
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return algorithms.ED25519
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return algorithms.ECDSA_P256_SHA256
    raise Unauthenticated("identity keys are Ed25519 or P-256")


@dataclass(frozen=True)
class VerifiedSignature:
    keyid: str
    nonce: str
    created: dt.datetime


def verify_request(
    request: ReceivedRequest,
    keyid: str,
    key: IdentityKey,
    *,
    now: dt.datetime,
    max_skew: dt.timedelta,
) -> VerifiedSignature:
    """Verify the request's signature under ``key`` against the profile in the module docstring.

    Raises :class:`Unauthenticated` (saying which rule failed, never more).
    """
    verifier = _Verifier(
        algorithm=algorithm_for(key), resolver=_OneKey(keyid, key), now=now, max_skew=max_skew
    )
    try:
        results = verifier.verify(
            request,
            max_age=None,
            expect_tag=TAG,
            require_components=REQUIRED_COMPONENTS,
            body=request.body,
        )
    except (InvalidSignature, HTTPMessageSignaturesException) as exc:
        raise Unauthenticated(f"{_REFUSAL}: {_reason(exc)}") from None
    if len(results) != 1:
        raise Unauthenticated("exactly one request signature is accepted")
    (result,) = results
    nonce = result.nonce
    if not isinstance(nonce, str) or not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise Unauthenticated(f"signatures need a nonce of {MIN_NONCE} to {MAX_NONCE} characters")
    created = result.parameters.get("created")
    assert isinstance(created, int)  # _Verifier checked it
    return VerifiedSignature(keyid, nonce, dt.datetime.fromtimestamp(created, dt.UTC))


def _reason(exc: Exception) -> str:
    # The library's messages name the rule that failed ("Signature age exceeds ...");
    # they never contain key material. Keep them short and on one line.
    text = " ".join(str(exc).split())
    return text[:160] if text else "does not verify"


# -- the replay cache ----------------------------------------------------------------


#: How often a replica deletes expired nonces (they cannot be replayed anyway: their
#: signatures are too old to be accepted).
PURGE_EVERY = dt.timedelta(seconds=1)


class NonceCache:
    """``(principal, nonce)`` pairs seen recently, in the database all replicas share."""

    def __init__(self, store: Store, max_skew: dt.timedelta) -> None:
        self._store = store
        self._keep = max_skew + dt.timedelta(seconds=1)
        self._purged_at: dt.datetime | None = None
        self._purge = request_nonces.delete().where(
            request_nonces.c.expires_at < sa.bindparam("now")
        )
        insert: Callable[..., Any] = (
            postgresql.insert if store.dialect == "postgresql" else sqlite.insert
        )
        self._insert = (
            insert(request_nonces)
            .on_conflict_do_nothing(index_elements=["principal", "nonce"])
            .returning(request_nonces.c.nonce)
        )

    def remember(self, signature: VerifiedSignature, now: dt.datetime) -> None:
        """Record the nonce; :class:`Replayed` if this principal used it already.

        Expired pairs are purged in the same transaction: they can no longer be
        replayed, since their signatures are now too old.
        """
        with self._store.transaction() as conn:
            # Housekeeping at most once a second per process, not on every request.
            if self._purged_at is None or now - self._purged_at >= PURGE_EVERY:
                conn.execute(self._purge, {"now": now})
                self._purged_at = now
            # RETURNING, not rowcount: psycopg reports -1 for ON CONFLICT DO NOTHING.
            fresh = conn.execute(
                self._insert,
                {
                    "principal": signature.keyid,
                    "nonce": signature.nonce,
                    "expires_at": signature.created + self._keep,
                },
            ).first()
        if fresh is None:
            raise Replayed("this request signature's nonce was used already")

    def size(self) -> int:
        with self._store.snapshot() as conn:
            count: int = conn.execute(
                sa.select(sa.func.count()).select_from(request_nonces)
            ).scalar_one()
        return count
