"""Push login (S7): the authentication server's routes.

* a **terminal** (any enrolled principal, signing its requests) starts a login
  for a user — ``POST /v1/pushauth/logins`` — shows the number it gets back,
  and long-polls ``GET /v1/pushauth/logins/{id}`` until the login is decided;
  an approved login carries the session token sealed to that terminal;
* a **phone** (the ``device/…`` principal registered for the user) asks where
  to listen (``GET /v1/pushauth/phone``), receives notices on the notification
  service — or long-polls ``GET /v1/pushauth/notices`` when the broker has no
  bus — and publishes its sealed answer on the server's answers topic
  (:func:`listen_for_answers`) or, without a bus, posts it to
  ``POST /v1/pushauth/answers``;
* ``GET /v1/pushauth/server-keys`` (public) gives the push keys, signed by the
  broker CA key the phone pinned.

Publishing a notice is best effort (the phone also long-polls), so a bus that
is down delays a login but never approves or loses one. Long-polls here are
woken per login and per phone (``KeyedWaker``) by what happens on this replica;
what another replica decides is seen at the next ``poll_interval_seconds``. Operators manage
phones and locks on the broker host (``keybroker pushauth …``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from keybroker.api.auth import ApiContext, Context, Principal
from keybroker.api.problems import documented
from keybroker.api.pushauth_schemas import (
    CHALLENGE_ID_PATTERN,
    AnswerIn,
    AnswerOut,
    LoginIn,
    LoginStarted,
    LoginStatusOut,
    NoticesOut,
    Notification,
    PhoneOut,
    ServerKeysOut,
)
from keybroker.api.routes._common import PUBLIC, SIGNED
from keybroker.bus.interface import Bus
from keybroker.errors import KeybrokerError, RemoteProtocolError, TransportError
from keybroker.flows.pushauth.protocol import LoginState
from keybroker.flows.pushauth.server import LoginStatus, PushAuthServer

logger = logging.getLogger("keybroker.api.pushauth")

router = APIRouter(tags=["pushauth"])

MIN_TERMINAL_NONCE = 16
SessionPath = Annotated[str, Path(min_length=1, max_length=36, pattern=r"^[0-9a-f-]+$")]
Wait = Annotated[int, Query(ge=0, le=600, description="Seconds to wait for a change")]


#: Answers from the bus judged at once (each holds a thread of the pool while it runs).
ANSWERS_IN_PARALLEL = 32


def _server(ctx: ApiContext) -> PushAuthServer:
    server = ctx.pushauth
    assert server is not None
    return server


def _notification(ctx: ApiContext) -> Notification:
    if ctx.push_bus is None:
        return "long-poll"
    url = ctx.settings.bus_url or ""
    scheme = url.split(":", 1)[0]
    if scheme in ("nats", "tls"):
        return "nats"
    if scheme in ("mqtt", "mqtts"):
        return "mqtt"
    return "memory"


def _login_key(session_id: str) -> str:
    return f"login/{session_id}"


def _phone_key(device: str) -> str:
    return f"phone/{device}"


@router.get(
    "/v1/pushauth/server-keys",
    response_model=ServerKeysOut,
    openapi_extra=PUBLIC,
    responses=documented(),
    summary="The push-login keys, signed by the broker CA key",
)
def server_keys(ctx: Context) -> ServerKeysOut:
    return ServerKeysOut(document=_server(ctx).server_keys_document())


@router.post(
    "/v1/pushauth/logins",
    response_model=LoginStarted,
    status_code=201,
    responses=documented(400, 401, 403, 404, 413, 422, 429),
    openapi_extra=SIGNED,
    summary="Start a push login for a user; show the returned number on the terminal",
)
async def start_login(
    request: Request, body: LoginIn, ctx: Context, terminal: Principal
) -> LoginStarted:
    if len(body.nonce) < MIN_TERMINAL_NONCE:
        raise RemoteProtocolError(f"the terminal nonce is at least {MIN_TERMINAL_NONCE} bytes")
    server = _server(ctx)
    address = request.client.host if request.client is not None else "unknown"
    raw = await request.body()
    started = await run_in_threadpool(
        lambda: server.start_login(
            terminal=terminal,
            terminal_address=address,
            user=body.user,
            application=body.application,
            request_body=raw,
        )
    )
    if ctx.push_bus is not None:
        try:
            await ctx.push_bus.publish(started.topic, started.notice)
        except KeybrokerError as exc:
            logger.warning(
                "push notice not published (%s); the phone will poll", type(exc).__name__
            )
    ctx.keyed.wake(_phone_key(started.device))
    return LoginStarted(
        session_id=started.session_id,
        number=started.number,
        expires_at=started.expires_at,
        notification=_notification(ctx),
    )


def _status_out(status: LoginStatus) -> LoginStatusOut:
    return LoginStatusOut(
        session_id=status.session_id,
        state=status.state.value,
        reason=status.reason,
        expires_at=status.expires_at,
        sealed_token=status.sealed_token,
    )


@router.get(
    "/v1/pushauth/logins/{session_id}",
    response_model=LoginStatusOut,
    responses=documented(401, 403, 404, 422),
    openapi_extra=SIGNED,
    summary="Where a login stands; long-polls up to `wait` seconds while it is pending",
)
async def login_status(
    request: Request, session_id: SessionPath, ctx: Context, terminal: Principal, wait: Wait = 0
) -> LoginStatusOut:
    server = _server(ctx)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, ctx.settings.max_wait_seconds)
    while True:
        # Before the query: a wake-up in between is not lost. Only this login's answer
        # wakes it here; one decided on another replica is seen at the next poll.
        woken = ctx.keyed.current(_login_key(session_id))
        status = await run_in_threadpool(server.login_status, session_id, terminal)
        remaining = deadline - loop.time()
        if (
            status.state is not LoginState.PENDING
            or remaining <= 0
            or await request.is_disconnected()
        ):
            return _status_out(status)
        # Wake at the deadline too, so an unanswered login is reported expired on time.
        until_expiry = (status.expires_at - ctx.settings.clock()).total_seconds() + 0.01
        timeout = max(0.0, min(remaining, ctx.settings.poll_interval_seconds, until_expiry))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), timeout=timeout)


@router.get(
    "/v1/pushauth/phone",
    response_model=PhoneOut,
    responses=documented(401, 403),
    openapi_extra=SIGNED,
    summary="Where the calling phone receives its notices",
)
def phone(ctx: Context, device: Principal) -> PhoneOut:
    server = _server(ctx)
    topic = server.phone_topic(device)
    answers = server.answers_topic() if ctx.push_bus is not None else None
    return PhoneOut(
        device=str(device), topic=topic, notification=_notification(ctx), answers_topic=answers
    )


@router.get(
    "/v1/pushauth/notices",
    response_model=NoticesOut,
    responses=documented(401, 403, 422),
    openapi_extra=SIGNED,
    summary="The calling phone's open challenges (sealed); long-polls up to `wait` seconds",
)
async def notices(request: Request, ctx: Context, device: Principal, wait: Wait = 0) -> NoticesOut:
    server = _server(ctx)
    await run_in_threadpool(server.phone_topic, device)  # 403 unless a registered phone
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, ctx.settings.max_wait_seconds)
    while True:
        woken = ctx.keyed.current(_phone_key(str(device)))
        found = await run_in_threadpool(server.pending_notices, device)
        remaining = deadline - loop.time()
        if found or remaining <= 0 or await request.is_disconnected():
            return NoticesOut(notices=found)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                woken.wait(), timeout=min(remaining, ctx.settings.poll_interval_seconds)
            )


@router.post(
    "/v1/pushauth/answers",
    response_model=AnswerOut,
    responses=documented(400, 401, 403, 404, 409, 413, 422),
    openapi_extra=SIGNED,
    summary="The calling phone's sealed answer to one of its challenges",
)
async def answer(body: AnswerIn, ctx: Context, device: Principal) -> AnswerOut:
    server = _server(ctx)
    status = await run_in_threadpool(
        server.answer, device, bytes.fromhex(body.challenge_id), body.sealed
    )
    ctx.keyed.wake(_login_key(status.session_id))
    return AnswerOut(session_id=status.session_id, state=status.state.value, reason=status.reason)


async def listen_for_answers(ctx: ApiContext, bus: Bus, ready: asyncio.Event) -> None:
    """Judge the answers phones publish on the answers topic until cancelled.

    The subscription is not durable: an answer published while no replica listens is
    lost, and the phone posts it to ``POST /v1/pushauth/answers`` when it sees the
    challenge still open (:class:`~keybroker.flows.pushauth.phone.Phone`). Every replica
    listening judges every answer; the compare-and-set on the login's state lets one
    decide, the others find it decided. A message that fails a check changes nothing
    and is logged by its error's type only (it may be anyone's)."""
    server = _server(ctx)
    topic = await run_in_threadpool(server.answers_topic)
    # Answers are judged side by side, as posted ones are (a queue of them behind one
    # slow transaction would delay every login); at most this many at once.
    slots = asyncio.Semaphore(ANSWERS_IN_PARALLEL)
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            try:
                async with bus.subscribe(topic) as answers:
                    ready.set()
                    async for message in answers:
                        await slots.acquire()
                        task = asyncio.create_task(
                            _judge_bus_answer(ctx, server, bus, message.payload, slots)
                        )
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                return  # the bus was closed: the server is stopping
            except TransportError as exc:
                # Phones fall back to HTTPS meanwhile; nothing is decided without us.
                logger.warning("answers topic lost (%s); subscribing again in 1 s", exc)
                await asyncio.sleep(1)
    finally:
        for task in tasks:
            task.cancel()  # a decision under way finishes in its thread; its wake-up is moot


async def _judge_bus_answer(
    ctx: ApiContext, server: PushAuthServer, bus: Bus, payload: bytes, slots: asyncio.Semaphore
) -> None:
    """Judge one answer; wake its terminal; send the phone its receipt."""
    try:
        try:
            decided = await run_in_threadpool(server.answer_from_bus, payload)
        except KeybrokerError as exc:
            logger.info("an answer from the bus was refused (%s)", type(exc).__name__)
            return
    finally:
        slots.release()
    ctx.keyed.wake(_login_key(decided.status.session_id))
    try:
        await bus.publish(decided.receipt_topic, decided.receipt)
    except KeybrokerError as exc:
        # The phone will post the answer again over HTTPS and be told it is decided.
        logger.info("no receipt for an answer taken from the bus (%s)", type(exc).__name__)


__all__ = ["CHALLENGE_ID_PATTERN", "listen_for_answers", "router"]
