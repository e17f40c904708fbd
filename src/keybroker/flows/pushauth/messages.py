"""The push-login messages (S7), each a canonical message with its own label.

What travels where::

    server ──bus──▶ phone    Notice{challenge_id, HPKE(phone, SignedChallenge)}
    phone ──bus──▶ server    BusAnswer{challenge_id, HPKE(server, SignedAnswer)}
    server ──bus──▶ phone    AnswerTaken{challenge_id}   (else the phone posts it)
    phone ──HTTP──▶ server   challenge_id + HPKE(server, SignedAnswer)  (no bus, or fallback)
    server ──HTTP─▶ terminal HPKE(terminal, SessionToken)   only to the terminal that asked

A :class:`Notice`, a :class:`BusAnswer` and an :class:`AnswerTaken` are all the
notification service sees: a random 16-byte
challenge id (it appears nowhere else: not in the session id the terminal
holds, not in the log) and ciphertext. HPKE ``info`` binds the recipient
principal and the challenge id (:func:`challenge_info`, :func:`answer_info`),
so a sealed challenge or answer cannot be moved to another phone or another
challenge. Inside, the challenge is signed by the server's push key and the
answer by the phone's identity key (sign, then seal).

Times are epoch milliseconds; no field is a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

from keybroker.broker.events import Event
from keybroker.encoding import Message, message_label

CHALLENGE_ID_BYTES: Final = 16
NONCE_BYTES: Final = 32

#: Largest notice a phone accepts (a sealed challenge is about 600 bytes).
MAX_NOTICE_BYTES: Final = 4096
#: Largest sealed answer the server accepts.
MAX_SEALED_ANSWER_BYTES: Final = 2048
#: Largest session token (base64url of the sealed token) a terminal accepts.
MAX_TOKEN_BYTES: Final = 4096


def _label(name: str) -> str:
    return message_label(f"keybroker/pushauth/{name}", 1)


CHALLENGE_INFO_LABEL: Final = _label("challenge-info").encode()
ANSWER_INFO_LABEL: Final = _label("answer-info").encode()
TOKEN_INFO_LABEL: Final = _label("token-info").encode()


def _info(label: bytes, principal: str, challenge_id: bytes) -> bytes:
    return label + b"\x00" + principal.encode() + b"\x00" + challenge_id


def challenge_info(device: str, challenge_id: bytes) -> bytes:
    """HPKE ``info`` of a challenge sealed to ``device``."""
    return _info(CHALLENGE_INFO_LABEL, device, challenge_id)


def answer_info(device: str, challenge_id: bytes) -> bytes:
    """HPKE ``info`` of the answer ``device`` seals to the server."""
    return _info(ANSWER_INFO_LABEL, device, challenge_id)


def token_info(terminal: str, session_id: str) -> bytes:
    """HPKE ``info`` of a session token sealed to the terminal that asked for it."""
    return _info(TOKEN_INFO_LABEL, terminal, session_id.encode())


@dataclass(frozen=True)
class Challenge(Message):
    """What the phone shows the user. The number is *not* here: the user reads it on
    the terminal and types it into the phone, so a phone (or a push-bombing
    attacker) cannot approve without seeing the terminal."""

    LABEL: ClassVar[str] = _label("challenge")
    challenge_id: bytes
    session_id: str
    device: str
    user: str
    nonce: bytes
    terminal: str
    terminal_address: str
    application: str
    issued_at_ms: int
    expires_at_ms: int


@dataclass(frozen=True)
class SignedChallenge(Message):
    """A :class:`Challenge` and the server push key's signature over its encoding."""

    LABEL: ClassVar[str] = _label("signed-challenge")
    challenge: bytes
    signature: bytes


@dataclass(frozen=True)
class Notice(Message):
    """What the server publishes on the notification service for a phone."""

    LABEL: ClassVar[str] = _label("notice")
    challenge_id: bytes
    sealed: bytes


@dataclass(frozen=True)
class BusAnswer(Message):
    """A phone's answer published on the server's answers topic: the same sealed answer
    it would post to ``POST /v1/pushauth/answers``. Nothing but the phone's signature
    inside the seal says who sent it, and that is what the server checks."""

    LABEL: ClassVar[str] = _label("bus-answer")
    challenge_id: bytes
    sealed: bytes


@dataclass(frozen=True)
class AnswerTaken(Message):
    """The server's receipt for an answer it took from the bus, on the phone's topic.

    It is not signed: it only tells the phone not to post the same answer over HTTPS.
    A forged one can suppress that fallback, but whoever can forge it on the bus can as
    well drop the answer and the notices: nothing it does decides a login."""

    LABEL: ClassVar[str] = _label("answer-taken")
    challenge_id: bytes


#: What a phone may answer.
APPROVE: Final = "approve"
DENY: Final = "deny"
FRAUD: Final = "fraud"
DECISIONS: Final = (APPROVE, DENY, FRAUD)


@dataclass(frozen=True)
class Answer(Message):
    """The user's answer; ``number`` is what they typed (empty unless approving)."""

    LABEL: ClassVar[str] = _label("answer")
    challenge_id: bytes
    session_id: str
    device: str
    nonce: bytes
    decision: str
    number: str
    answered_at_ms: int


@dataclass(frozen=True)
class SignedAnswer(Message):
    """An :class:`Answer` and the phone identity key's signature over its encoding."""

    LABEL: ClassVar[str] = _label("signed-answer")
    answer: bytes
    signature: bytes


@dataclass(frozen=True)
class SessionClaims(Message):
    """What a session token asserts. ``request_digest`` is the SHA-256 of the
    terminal's login request (which carries the terminal's own nonce): the token
    is bound to that request and to the terminal principal that made it."""

    LABEL: ClassVar[str] = _label("session-claims")
    token_id: str
    session_id: str
    user: str
    terminal: str
    terminal_address: str
    application: str
    request_digest: bytes
    issued_at_ms: int
    expires_at_ms: int


@dataclass(frozen=True)
class SessionToken(Message):
    """:class:`SessionClaims` signed by the server's push key."""

    LABEL: ClassVar[str] = _label("session-token")
    claims: bytes
    signature: bytes


@dataclass(frozen=True)
class ServerKeys(Message):
    """The server's push keys (public keyset encodings), signed by the broker CA key,
    which phones pinned at enrolment."""

    LABEL: ClassVar[str] = _label("server-keys")
    sign_public: bytes
    hpke_public: bytes


@dataclass(frozen=True)
class SignedServerKeys(Message):
    LABEL: ClassVar[str] = _label("signed-server-keys")
    keys: bytes
    signature: bytes


# -- transparency log entries ---------------------------------------------------------


def _entry(event: str) -> str:
    return message_label(f"keybroker/log/entry/pushauth/{event}", 1)


@dataclass(frozen=True)
class PhoneRegistered(Event):
    LABEL: ClassVar[str] = _entry("phone-registered")
    at_ms: int
    user: str
    device: str


@dataclass(frozen=True)
class LoginDecided(Event):
    """One login's outcome: approved, denied, fraud, expired or refused (rate limit,
    locked user, no phone). Written in the transaction that decided it."""

    LABEL: ClassVar[str] = _entry("login-decided")
    at_ms: int
    session_id: str
    user: str
    device: str | None
    terminal: str
    terminal_address: str
    application: str
    outcome: str
    reason: str | None
    token_id: str | None


@dataclass(frozen=True)
class UserLockChanged(Event):
    LABEL: ClassVar[str] = _entry("user-lock-changed")
    at_ms: int
    user: str
    locked: bool
    reason: str
    session_id: str | None


LOG_ENTRIES: Final = {cls.LABEL: cls for cls in (PhoneRegistered, LoginDecided, UserLockChanged)}
