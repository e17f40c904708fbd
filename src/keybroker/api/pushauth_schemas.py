"""Wire formats of ``/v1/pushauth`` (S7 push login), shared with the phone and terminal.

The conventions of :mod:`keybroker.api.schemas` hold: binary fields are
unpadded base64url, times are RFC 3339. Nothing here is plaintext of a
challenge or an answer except what the terminal itself asked for (its user,
its number): challenges, answers and session tokens cross as HPKE ciphertext.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import Field

from keybroker.api.schemas import (
    _B64_OUT,
    Request,
    Response,
    _b64_schema,
    _b64_validator,
)

#: A sealed answer (about 250 bytes) or notice (about 600); generous bounds, then refused.
SealedAnswer = Annotated[bytes, _b64_validator(4096), _B64_OUT, _b64_schema(4096)]
Notice = Annotated[bytes, _b64_validator(8192), _B64_OUT, _b64_schema(8192)]
SealedToken = Annotated[bytes, _b64_validator(8192), _B64_OUT, _b64_schema(8192)]
Document = Annotated[bytes, _b64_validator(16384), _B64_OUT, _b64_schema(16384)]
TerminalNonce = Annotated[bytes, _b64_validator(64), _B64_OUT, _b64_schema(64)]

#: 32 hex digits: a challenge id (16 random bytes).
CHALLENGE_ID_PATTERN: Final = r"^[0-9a-f]{32}$"

LoginStateName = Literal["PENDING", "APPROVED", "DENIED", "FRAUD", "EXPIRED"]
Notification = Literal["nats", "mqtt", "memory", "long-poll"]


class ServerKeysOut(Response):
    document: Document = Field(
        description="the push keys (canonical encoding), signed by the broker CA key"
    )


class LoginIn(Request):
    user: str = Field(min_length=1, max_length=64)
    application: str = Field(default="login", min_length=1, max_length=128)
    nonce: TerminalNonce = Field(
        description="16 to 64 random bytes from the terminal; the session token is bound "
        "to this request through the SHA-256 of its body"
    )


class LoginStarted(Response):
    session_id: str
    number: str = Field(description="show this on the terminal; the user types it on the phone")
    expires_at: datetime
    notification: Notification = Field(description="how the server reached the phone")


class LoginStatusOut(Response):
    session_id: str
    state: LoginStateName
    reason: str | None
    expires_at: datetime
    sealed_token: SealedToken | None = Field(
        default=None, description="the session token, HPKE-sealed to the calling terminal"
    )


class PhoneOut(Response):
    device: str
    topic: str = Field(description="the phone's notification topic (opaque)")
    notification: Notification = Field(description="what the server publishes on")
    answers_topic: str | None = Field(
        default=None,
        description="where to publish sealed answers on the same service (opaque); "
        "absent without a notification service: post them to /v1/pushauth/answers",
    )


class NoticesOut(Response):
    notices: list[Notice]


class AnswerIn(Request):
    challenge_id: str = Field(pattern=CHALLENGE_ID_PATTERN)
    sealed: SealedAnswer


class AnswerOut(Response):
    session_id: str
    state: LoginStateName
    reason: str | None
