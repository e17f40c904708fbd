"""The terminal's driver: ask for a push login, show the number, wait, check the token.

The terminal is an enrolled principal (its identity signs every request, so
the server knows which terminal asks). It sends a fresh random nonce with its
request; the session token it gets back is sealed to its own HPKE key, signed
by the server's push key (checked against the broker CA it pinned at
enrolment), names this terminal and this session, and carries the SHA-256 of
this exact request.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from keybroker.api.pushauth_schemas import LoginIn, LoginStarted, LoginStatusOut, ServerKeysOut
from keybroker.client.principal import PrincipalClient
from keybroker.errors import AuthorizationError, RemoteProtocolError
from keybroker.flows.pushauth.messages import SessionClaims, token_info
from keybroker.flows.pushauth.protocol import (
    LoginState,
    ServerPublic,
    request_digest,
    verify_server_keys,
    verify_token,
)
from keybroker.pki import load_certificate

NONCE_BYTES = 32


@dataclass(frozen=True)
class LoginResult:
    session_id: str
    state: LoginState
    reason: str | None
    claims: SessionClaims | None = None
    #: The verified session token (canonical encoding), approved logins only.
    token: bytes | None = field(default=None, repr=False)


def _request_bytes(body: LoginIn) -> bytes:
    """The exact body the SDK sends (``Connection.send``): what the server digests."""
    return json.dumps(body.model_dump(mode="json"), separators=(",", ":")).encode()


class LoginTerminal:
    """A terminal's push logins; keeps the server's checked push keys between logins."""

    def __init__(
        self, client: PrincipalClient, *, clock_ms: Callable[[], int] | None = None
    ) -> None:
        self.client = client
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._server: ServerPublic | None = None

    def __repr__(self) -> str:
        return f"LoginTerminal({self.client.principal})"

    async def server(self) -> ServerPublic:
        """The server's push keys, checked against the broker CA pinned at enrolment."""
        if self._server is None:
            doc = await self.client.call(ServerKeysOut, "GET", "/v1/pushauth/server-keys")
            ca = load_certificate(self.client.keyring.ca_pem).public_key()
            self._server = verify_server_keys(doc.document, ca)
        return self._server

    async def login(
        self,
        user: str,
        *,
        application: str = "login",
        on_number: Callable[[str, datetime], None] | None = None,
        on_start: Callable[[LoginStarted], None] | None = None,
        poll: float = 30.0,
    ) -> LoginResult:
        """Run one login to its end; returns the decided (or expired) result.

        Raises what the server refuses with (unknown user, locked, rate limited) as
        typed errors. ``on_number`` gets the number to show; ``on_start`` everything
        the server answered (session id included).
        """
        client = self.client
        server = await self.server()
        body = LoginIn(user=user, application=application, nonce=os.urandom(NONCE_BYTES))
        started = await client.call(LoginStarted, "POST", "/v1/pushauth/logins", body=body)
        if on_start is not None:
            on_start(started)
        if on_number is not None:
            on_number(started.number, started.expires_at)
        status: LoginStatusOut
        while True:
            status = await client.call(
                LoginStatusOut, "GET", f"/v1/pushauth/logins/{started.session_id}", wait=poll
            )
            if status.state != LoginState.PENDING.value:
                break
        state = LoginState(status.state)
        if state is not LoginState.APPROVED:
            return LoginResult(status.session_id, state, status.reason)
        if status.sealed_token is None:
            raise RemoteProtocolError("an approved login came without its session token")
        token = client.keyring.hpke.hpke().open(
            status.sealed_token, token_info(str(client.principal), started.session_id)
        )
        claims = verify_token(
            token, server.sign, now_ms=self._clock_ms(), terminal=str(client.principal)
        )
        if claims.session_id != started.session_id or claims.user != user:
            raise AuthorizationError("the session token is for another login")
        if claims.request_digest != request_digest(_request_bytes(body)):
            raise AuthorizationError("the session token is not bound to our request")
        return LoginResult(status.session_id, state, status.reason, claims, token)


async def push_login(
    client: PrincipalClient,
    user: str,
    *,
    application: str = "login",
    on_number: Callable[[str, datetime], None] | None = None,
    poll: float = 30.0,
    clock_ms: Callable[[], int] | None = None,
) -> LoginResult:
    """One login from a fresh :class:`LoginTerminal` (see :meth:`LoginTerminal.login`)."""
    terminal = LoginTerminal(client, clock_ms=clock_ms)
    return await terminal.login(user, application=application, on_number=on_number, poll=poll)
