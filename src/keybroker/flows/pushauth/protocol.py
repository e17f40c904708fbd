"""The push-login protocol without I/O: challenges, answers, decisions, tokens.

Everything that decides lives here; the server, the phone and the terminal
are thin drivers around it. Time (``now_ms``) and randomness (``rng``) come in
as arguments, keys come in as :mod:`keybroker.keys` handles and public
keysets, and nothing here reads a clock, a socket or the database.

A login is a small state machine. Anything not in :data:`TRANSITIONS` is
refused; every final state is final::

    PENDING ──approve + right number──▶ APPROVED   (session token issued)
    PENDING ──approve + wrong number──▶ DENIED     (one try: no retry)
    PENDING ──deny─────────────────────▶ DENIED
    PENDING ──fraud────────────────────▶ FRAUD      (user locked)
    PENDING ──deadline passed──────────▶ EXPIRED

What is refused without changing anything (the login stays PENDING and the
caller gets a typed error): an answer that does not open, is not signed by the
phone the challenge went to, names another session, challenge or nonce, is
malformed, too large, or arrives after the deadline (that login then expires).
A replayed answer finds the login final and is refused too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Final, TypeVar

from keybroker.broker.messages import (
    IdentityPrivateKey,
    sign_with_identity,
    verify_identity_signature,
)
from keybroker.encoding import Message
from keybroker.errors import (
    AuthorizationError,
    ConfigurationError,
    CryptoError,
    DecodeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from keybroker.flows.pushauth.messages import (
    APPROVE,
    CHALLENGE_ID_BYTES,
    DECISIONS,
    FRAUD,
    MAX_NOTICE_BYTES,
    MAX_SEALED_ANSWER_BYTES,
    MAX_TOKEN_BYTES,
    NONCE_BYTES,
    Answer,
    BusAnswer,
    Challenge,
    Notice,
    ServerKeys,
    SessionClaims,
    SessionToken,
    SignedAnswer,
    SignedChallenge,
    SignedServerKeys,
    answer_info,
    challenge_info,
)
from keybroker.keys import HpkeHandle, PublicKeyset, SignerHandle

Random = Callable[[int], bytes]
_M = TypeVar("_M", bound=Message)


class LoginState(StrEnum):
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    DENIED = "DENIED"
    FRAUD = "FRAUD"
    EXPIRED = "EXPIRED"


class Input(StrEnum):
    APPROVE_RIGHT_NUMBER = "approve-right-number"
    APPROVE_WRONG_NUMBER = "approve-wrong-number"
    DENY = "deny"
    FRAUD = "fraud"
    DEADLINE = "deadline"


#: (state, input) → next state; anything absent is refused (``LoginFinished``).
TRANSITIONS: Final[dict[tuple[LoginState, Input], LoginState]] = {
    (LoginState.PENDING, Input.APPROVE_RIGHT_NUMBER): LoginState.APPROVED,
    (LoginState.PENDING, Input.APPROVE_WRONG_NUMBER): LoginState.DENIED,
    (LoginState.PENDING, Input.DENY): LoginState.DENIED,
    (LoginState.PENDING, Input.FRAUD): LoginState.FRAUD,
    (LoginState.PENDING, Input.DEADLINE): LoginState.EXPIRED,
}

FINAL_STATES: Final = frozenset(s for s in LoginState if s is not LoginState.PENDING)

#: Why a final state was reached, as the log and the terminal show it.
REASONS: Final[dict[Input, str]] = {
    Input.APPROVE_RIGHT_NUMBER: "approved on the phone",
    Input.APPROVE_WRONG_NUMBER: "wrong number entered on the phone",
    Input.DENY: "denied on the phone",
    Input.FRAUD: "reported as fraud on the phone",
    Input.DEADLINE: "no answer before the deadline",
}


class LoginFinished(RemoteProtocolError):
    """The login was already decided: an answer cannot change it (replays land here)."""

    status = 409


def step(state: LoginState, event: Input) -> LoginState:
    """The next state, or :class:`LoginFinished` if the table has no such transition."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise LoginFinished(f"this login is already {state.value.lower()}") from None


#: The longest a challenge may stay open (Duo and CISA guidance: 60 s).
MAX_EXPIRY: Final = timedelta(seconds=60)


@dataclass(frozen=True)
class PushPolicy:
    """How logins are run; every replica should use the same.

    * ``expiry`` — how long a challenge stays open (at most 60 s);
    * ``number_digits`` — length of the number shown on the terminal (2 to 6; one try);
    * ``token_ttl`` — life of an issued session token;
    * ``rate_limit`` / ``rate_window`` — at most this many logins per user per window
      (refused above, and the refusal is logged);
    * ``lock_on_fraud`` — a fraud report locks the user until an operator unlocks;
    * ``clock_skew`` — how far a phone's ``answered_at`` may be from the server's clock.
    """

    expiry: timedelta = MAX_EXPIRY
    number_digits: int = 3
    token_ttl: timedelta = timedelta(minutes=5)
    rate_limit: int = 10
    rate_window: timedelta = timedelta(minutes=1)
    lock_on_fraud: bool = True
    clock_skew: timedelta = timedelta(seconds=30)

    def __post_init__(self) -> None:
        if not timedelta(0) < self.expiry <= MAX_EXPIRY:
            raise ConfigurationError("the challenge expiry must be positive and at most 60 s")
        if not 2 <= self.number_digits <= 6:
            raise ConfigurationError("number_digits must be between 2 and 6")
        if self.token_ttl <= timedelta(0) or self.token_ttl > timedelta(hours=12):
            raise ConfigurationError("the session token ttl must be positive and at most 12 h")
        if self.rate_limit < 1 or self.rate_window <= timedelta(0):
            raise ConfigurationError("the rate limit needs at least one login per positive window")

    @property
    def expiry_ms(self) -> int:
        return int(self.expiry.total_seconds() * 1000)


def new_number(rng: Random, digits: int) -> str:
    """A uniformly random ``digits``-digit number (leading zeros kept), by rejection
    sampling from ``rng`` (``secrets.randbelow`` cannot take an injected source)."""
    bound = 10**digits
    limit = (1 << 32) - (1 << 32) % bound
    while True:
        value = int.from_bytes(rng(4), "big")
        if value < limit:
            return f"{value % bound:0{digits}d}"


def number_commitment(mac: Callable[[bytes], bytes], session_id: str, number: str) -> bytes:
    """What the store keeps instead of the number: a MAC under a server key."""
    return mac(
        b"keybroker/pushauth/number/v1\x00" + session_id.encode() + b"\x00" + number.encode()
    )


def request_digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


# -- the server's side ---------------------------------------------------------------


@dataclass(frozen=True)
class SealedChallenge:
    """A challenge ready to publish: the notice bytes and the ids the store keeps."""

    challenge: Challenge
    notice: bytes = field(repr=False)


def build_challenge(
    *,
    session_id: str,
    device: str,
    user: str,
    terminal: str,
    terminal_address: str,
    application: str,
    now_ms: int,
    policy: PushPolicy,
    rng: Random,
    server_signer: SignerHandle,
    phone_hpke: PublicKeyset,
) -> SealedChallenge:
    """Sign, then seal to the phone's HPKE key; ``info`` binds device and challenge id."""
    challenge = Challenge(
        challenge_id=rng(CHALLENGE_ID_BYTES),
        session_id=session_id,
        device=device,
        user=user,
        nonce=rng(NONCE_BYTES),
        terminal=terminal,
        terminal_address=terminal_address,
        application=application,
        issued_at_ms=now_ms,
        expires_at_ms=now_ms + policy.expiry_ms,
    )
    body = challenge.encode()
    signed = SignedChallenge(body, server_signer.sign(body)).encode()
    sealed = phone_hpke.seal(signed, challenge_info(device, challenge.challenge_id))
    return SealedChallenge(challenge, Notice(challenge.challenge_id, sealed).encode())


@dataclass(frozen=True)
class PendingLogin:
    """What the server knows of a pending login when an answer arrives."""

    session_id: str
    challenge_id: bytes
    device: str
    nonce: bytes
    issued_at_ms: int
    expires_at_ms: int
    state: LoginState


def _decode(cls: type[_M], data: bytes, max_size: int) -> _M:
    if not isinstance(data, bytes) or len(data) > max_size:
        raise DecodeError(f"{cls.LABEL}: too large")
    return cls.decode(data, max_size=max_size)


def judge_answer(
    login: PendingLogin,
    sealed: bytes,
    *,
    caller: str,
    server_hpke: HpkeHandle,
    device_key: object,
    number_ok: Callable[[str], bool],
    now_ms: int,
    policy: PushPolicy,
) -> Input:
    """Check an answer against its login; return the input it makes, or raise.

    Raises (and the caller changes nothing): :class:`AuthorizationError` if
    ``caller`` is not the phone the challenge went to, :class:`CryptoError` if the
    answer does not open or its signature is not that phone's,
    :class:`DecodeError` for malformed or oversized answers,
    :class:`RemoteProtocolError` for an answer about another session, challenge or
    nonce, or out of its time window, :class:`LoginFinished` if already decided.
    A deadline that has passed returns :attr:`Input.DEADLINE` (the login expires).
    """
    if login.state is not LoginState.PENDING:
        raise LoginFinished(f"this login is already {login.state.value.lower()}")
    if caller != login.device:
        raise AuthorizationError("this challenge was not sent to the calling phone")
    if now_ms > login.expires_at_ms:
        return Input.DEADLINE
    if not isinstance(sealed, bytes) or len(sealed) > MAX_SEALED_ANSWER_BYTES:
        raise DecodeError("the sealed answer is too large")
    plain = server_hpke.open(sealed, answer_info(login.device, login.challenge_id))
    signed = _decode(SignedAnswer, plain, MAX_SEALED_ANSWER_BYTES)
    verify_identity_signature(device_key, signed.signature, signed.answer)
    answer = _decode(Answer, signed.answer, MAX_SEALED_ANSWER_BYTES)
    if (
        answer.challenge_id != login.challenge_id
        or answer.session_id != login.session_id
        or answer.device != login.device
        or answer.nonce != login.nonce
    ):
        raise RemoteProtocolError("the answer is for another challenge")
    skew = int(policy.clock_skew.total_seconds() * 1000)
    if not login.issued_at_ms - skew <= answer.answered_at_ms <= login.expires_at_ms + skew:
        raise RemoteProtocolError("the answer's time is outside the challenge's window")
    if answer.decision not in DECISIONS:
        raise DecodeError("unknown decision")
    if answer.decision == FRAUD:
        return Input.FRAUD
    if answer.decision != APPROVE:
        return Input.DENY
    if number_ok(answer.number):
        return Input.APPROVE_RIGHT_NUMBER
    return Input.APPROVE_WRONG_NUMBER


def issue_token(claims: SessionClaims, server_signer: SignerHandle) -> bytes:
    body = claims.encode()
    return SessionToken(body, server_signer.sign(body)).encode()


def verify_token(
    token: bytes, server_public: PublicKeyset, *, now_ms: int, terminal: str | None = None
) -> SessionClaims:
    """The claims of a valid, unexpired session token (for ``terminal`` if given).

    :class:`CryptoError` for a bad signature, :class:`DecodeError` for garbage,
    :class:`AuthorizationError` if expired or for another terminal.
    """
    signed = _decode(SessionToken, token, MAX_TOKEN_BYTES)
    server_public.verify(signed.signature, signed.claims)
    claims = _decode(SessionClaims, signed.claims, MAX_TOKEN_BYTES)
    if not claims.issued_at_ms <= now_ms < claims.expires_at_ms:
        raise AuthorizationError("the session token is expired or not yet valid")
    if terminal is not None and claims.terminal != terminal:
        raise AuthorizationError("the session token was issued to another terminal")
    return claims


def sign_server_keys(keys: ServerKeys, ca_sign: Callable[[bytes], bytes]) -> bytes:
    body = keys.encode()
    return SignedServerKeys(body, ca_sign(body)).encode()


@dataclass(frozen=True)
class ServerPublic:
    """The server's push keys as a phone holds them, after checking the CA signature."""

    sign: PublicKeyset
    hpke: PublicKeyset


def verify_server_keys(signed_bytes: bytes, ca_public_key: object) -> ServerPublic:
    """Check the document's signature by the broker CA key pinned at enrolment."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    signed = _decode(SignedServerKeys, signed_bytes, 16 * 1024)
    if not isinstance(ca_public_key, ec.EllipticCurvePublicKey):
        raise ConfigurationError("the broker CA key is a P-256 key")
    try:
        ca_public_key.verify(signed.signature, signed.keys, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CryptoError() from None
    keys = _decode(ServerKeys, signed.keys, 16 * 1024)
    return ServerPublic(
        PublicKeyset.from_bytes(keys.sign_public), PublicKeyset.from_bytes(keys.hpke_public)
    )


# -- the phone's side -----------------------------------------------------------------


def open_notice(
    notice_bytes: bytes,
    *,
    device: str,
    phone_hpke: HpkeHandle,
    server: ServerPublic,
    now_ms: int,
) -> Challenge:
    """The challenge inside a notice, if it is for us, signed by our server and open.

    :class:`DecodeError`/:class:`CryptoError`/:class:`RemoteProtocolError` otherwise; an
    expired challenge is :class:`AuthorizationError` (the phone shows nothing).
    """
    notice = _decode(Notice, notice_bytes, MAX_NOTICE_BYTES)
    if len(notice.challenge_id) != CHALLENGE_ID_BYTES:
        raise DecodeError("malformed challenge id")
    plain = phone_hpke.open(notice.sealed, challenge_info(device, notice.challenge_id))
    signed = _decode(SignedChallenge, plain, MAX_NOTICE_BYTES)
    server.sign.verify(signed.signature, signed.challenge)
    challenge = _decode(Challenge, signed.challenge, MAX_NOTICE_BYTES)
    if challenge.challenge_id != notice.challenge_id or challenge.device != device:
        raise RemoteProtocolError("the challenge is not the one this notice announced")
    if now_ms > challenge.expires_at_ms:
        raise AuthorizationError("this challenge has expired")
    return challenge


def make_answer(
    challenge: Challenge,
    *,
    decision: str,
    number: str,
    now_ms: int,
    identity_key: IdentityPrivateKey,
    server: ServerPublic,
) -> bytes:
    """The sealed, signed answer to ``challenge``."""
    if decision not in DECISIONS:
        raise LocalProtocolError(f"decision is one of {', '.join(DECISIONS)}")
    answer = Answer(
        challenge_id=challenge.challenge_id,
        session_id=challenge.session_id,
        device=challenge.device,
        nonce=challenge.nonce,
        decision=decision,
        number=number if decision == APPROVE else "",
        answered_at_ms=now_ms,
    )
    body = answer.encode()
    signed = SignedAnswer(body, sign_with_identity(identity_key, body)).encode()
    return server.hpke.seal(signed, answer_info(challenge.device, challenge.challenge_id))


#: Largest answer the server takes from the bus: a sealed answer and its challenge id.
MAX_BUS_ANSWER_BYTES: Final = MAX_SEALED_ANSWER_BYTES + 64


def bus_answer(challenge: Challenge, sealed: bytes) -> bytes:
    """What a phone publishes on the server's answers topic for ``sealed``
    (:func:`make_answer`'s output): the challenge id and the sealed answer, nothing else."""
    return BusAnswer(challenge.challenge_id, sealed).encode()


def read_bus_answer(payload: bytes) -> tuple[bytes, bytes]:
    """``(challenge_id, sealed)`` from a message on the answers topic, or
    :class:`DecodeError` (anyone may publish there: it is checked like a request body)."""
    answer = _decode(BusAnswer, payload, MAX_BUS_ANSWER_BYTES)
    if len(answer.challenge_id) != CHALLENGE_ID_BYTES:
        raise DecodeError("a challenge id is 16 bytes")
    if len(answer.sealed) > MAX_SEALED_ANSWER_BYTES:
        raise DecodeError("the sealed answer is too large")
    return answer.challenge_id, answer.sealed
