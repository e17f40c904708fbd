"""Push login (S7) over the API in-process, on SQLite and PostgreSQL: a terminal asks, the
phone (long-poll: no bus in-process) answers, the server decides once; every refusal changes
nothing; decisions are in the transparency log; secrets are in no response or row."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from api_kit import URL, Env, raw_rows

from keybroker.api.pushauth_schemas import AnswerIn, AnswerOut
from keybroker.api.routes.pushauth import listen_for_answers
from keybroker.broker.events import to_ms
from keybroker.bus import MemoryBus
from keybroker.bus.interface import Bus
from keybroker.client import PrincipalClient
from keybroker.errors import (
    AuthorizationError,
    CryptoError,
    DecodeError,
    KeybrokerError,
    NotFound,
    RemoteProtocolError,
)
from keybroker.flows.pushauth.messages import (
    LOG_ENTRIES,
    AnswerTaken,
    BusAnswer,
    Challenge,
    LoginDecided,
    Notice,
    UserLockChanged,
)
from keybroker.flows.pushauth.phone import Decision, Phone, enrol_phone
from keybroker.flows.pushauth.protocol import LoginState, bus_answer, make_answer
from keybroker.flows.pushauth.server import PushAuthServer, ca_fingerprint
from keybroker.flows.pushauth.terminal import LoginResult, push_login
from keybroker.keys import SECRET_ACCESS


def server_of(env: Env) -> PushAuthServer:
    server = env.app.state.keybroker.pushauth
    assert isinstance(server, PushAuthServer)
    return server


async def phone_for(env: Env, user: str) -> Phone:
    reg = server_of(env).register_phone(user, timedelta(hours=1))
    uri = reg.uri(URL, ca_fingerprint(env.broker))
    client = await enrol_phone(
        uri,
        env.tmp / f"{user}-phone.keyring",
        kek=env.kek(),
        transport=env.transport,
        clock=env.clock,
    )
    env.clients.append(client)
    return Phone(client, wait=5, clock_ms=lambda: to_ms(env.clock()))


@dataclass
class Login:
    """A login in progress: the number the terminal shows, and its result when done."""

    number: asyncio.Future[str]
    result: asyncio.Task[LoginResult]


def start(env: Env, terminal: PrincipalClient, user: str) -> Login:
    number: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        push_login(
            terminal,
            user,
            application="ssh",
            on_number=lambda n, _at: number.set_result(n),
            poll=5,
            clock_ms=lambda: to_ms(env.clock()),
        )
    )
    return Login(number, task)


@contextlib.asynccontextmanager
async def running(
    phone: Phone, handler: Callable[[Challenge], Awaitable[Decision]]
) -> AsyncIterator[None]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(phone.run(handler, stop, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def next_challenge(phone: Phone) -> Challenge:
    for _ in range(100):
        for notice in await phone.pending(0):
            challenge = await phone.open(notice)
            if challenge is not None:
                return challenge
        await asyncio.sleep(0.02)
    raise AssertionError("no challenge reached the phone")


def decisions(env: Env, since: int) -> list[Any]:
    out = []
    for entry in env.home.log.entries(since, env.log_size()):
        for cls in LOG_ENTRIES.values():
            with contextlib.suppress(KeybrokerError):
                out.append(cls.decode(entry))
                break
    return out


async def test_the_right_number_on_the_phone_opens_a_session_bound_to_the_terminal(
    env: Env,
) -> None:
    phone = await phone_for(env, "alice")
    terminal = await env.enrolled("service/term1")
    numbers: dict[str, str] = {}
    seen: list[Challenge] = []

    async def approve(challenge: Challenge) -> Decision:
        seen.append(challenge)
        return ("approve", numbers["n"])

    size = env.log_size()
    async with running(phone, approve):
        login = start(env, terminal, "alice")
        numbers["n"] = await asyncio.wait_for(login.number, 10)
        result = await asyncio.wait_for(login.result, 20)
    assert result.state is LoginState.APPROVED
    assert result.claims is not None and result.token is not None
    assert (result.claims.user, result.claims.terminal, result.claims.application) == (
        "alice",
        "service/term1",
        "ssh",
    )
    (challenge,) = seen
    assert challenge.session_id == result.session_id and challenge.user == "alice"
    assert challenge.terminal == "service/term1" and challenge.device == phone.device
    assert challenge.expires_at_ms - challenge.issued_at_ms == 60_000
    (decided,) = [e for e in decisions(env, size) if isinstance(e, LoginDecided)]
    assert (decided.outcome, decided.session_id, decided.token_id) == (
        "APPROVED",
        result.session_id,
        result.claims.token_id,
    )
    # The number and the token are in no row, and in no response but the terminal's own.
    rows = raw_rows(env.store)
    assert result.token not in rows
    # The number is only in the terminal's own response (the login it started).
    number_json = b'"number":"' + numbers["n"].encode() + b'"'
    assert sum(number_json in seen for seen in env.transport.seen) == 1


async def test_a_wrong_number_denies_and_the_challenge_takes_no_second_try(env: Env) -> None:
    phone = await phone_for(env, "bob")
    terminal = await env.enrolled("service/term1")
    login = start(env, terminal, "bob")
    number = await asyncio.wait_for(login.number, 10)
    challenge = await next_challenge(phone)
    wrong = f"{(int(number) + 1) % 1000:03d}"
    out = await phone.answer(challenge, "approve", wrong)
    assert out.state == "DENIED" and out.reason == "wrong number entered on the phone"
    result = await asyncio.wait_for(login.result, 10)
    assert result.state is LoginState.DENIED and result.token is None
    before = env.dump()
    with pytest.raises(RemoteProtocolError, match="already denied"):
        await phone.answer(challenge, "approve", number)  # the right one, too late
    assert env.dump() == before


async def test_no_answer_expires_at_the_deadline(env: Env) -> None:
    await phone_for(env, "carol")
    terminal = await env.enrolled("service/term1")
    login = start(env, terminal, "carol")
    await asyncio.wait_for(login.number, 10)
    await asyncio.sleep(0.2)  # the terminal's long-poll is in (signed at the old time)
    env.clock.advance(timedelta(seconds=61))
    result = await asyncio.wait_for(login.result, 10)
    assert result.state is LoginState.EXPIRED and result.reason == "no answer before the deadline"


async def test_a_fraud_report_locks_the_user_and_the_log_shows_it(env: Env) -> None:
    phone = await phone_for(env, "dave")
    terminal = await env.enrolled("service/term1")
    size = env.log_size()
    login = start(env, terminal, "dave")
    await asyncio.wait_for(login.number, 10)
    out = await phone.answer(await next_challenge(phone), "fraud")
    assert out.state == "FRAUD"
    assert (await asyncio.wait_for(login.result, 10)).state is LoginState.FRAUD
    with pytest.raises(AuthorizationError, match="is locked"):
        await push_login(terminal, "dave", poll=1)
    entries = decisions(env, size)
    locks = [e for e in entries if isinstance(e, UserLockChanged)]
    assert [(e.user, e.locked, e.session_id) for e in locks] == [("dave", True, out.session_id)]
    outcomes = [e.outcome for e in entries if isinstance(e, LoginDecided)]
    assert outcomes == ["FRAUD", "LOCKED"]
    assert [u.locked for u in server_of(env).users() if u.user == "dave"] == [True]
    server_of(env).set_lock("dave", False, "checked with dave")
    assert [u.locked for u in server_of(env).users() if u.user == "dave"] == [False]


@pytest.mark.parametrize(
    "case", ["replayed", "other-session", "other-phone", "forged", "oversized"]
)
async def test_refused_answers_change_nothing_and_the_session_stays_unopened(
    env: Env, case: str
) -> None:
    phone = await phone_for(env, "erin")
    other = await phone_for(env, "frank")
    terminal = await env.enrolled("service/term1")
    first = start(env, terminal, "erin")
    number = await asyncio.wait_for(first.number, 10)
    challenge = await next_challenge(phone)
    server = await phone.server()
    key = phone.client.keyring.identity.signer().private_key(SECRET_ACCESS)

    def sealed_for(c: Challenge, decision: str = "approve", n: str = number) -> bytes:
        return make_answer(
            c,
            decision=decision,
            number=n,
            now_ms=to_ms(env.clock()),
            identity_key=key,
            server=server,  # type: ignore[arg-type]
        )

    target = challenge
    if case == "replayed":
        # An answer captured from an earlier login (denied), replayed against it and this one.
        earlier = sealed_for(challenge, "deny")
        await phone.answer(challenge, "deny")
        await asyncio.wait_for(first.result, 10)
        second = start(env, terminal, "erin")
        number = await asyncio.wait_for(second.number, 10)
        target = await next_challenge(phone)
        posts = [
            (challenge.challenge_id, earlier, RemoteProtocolError),
            (target.challenge_id, earlier, CryptoError),
        ]
        client = phone.client
    elif case == "other-session":
        second = start(env, terminal, "frank")
        await asyncio.wait_for(second.number, 10)
        foreign = await next_challenge(other)
        # The answer made for erin's challenge, posted as an answer to another challenge.
        posts = [(foreign.challenge_id, sealed_for(challenge), AuthorizationError)]
        client = phone.client
    elif case == "other-phone":
        other_key = other.client.keyring.identity.signer().private_key(SECRET_ACCESS)
        forged = make_answer(
            challenge,
            decision="approve",
            number=number,
            now_ms=to_ms(env.clock()),
            identity_key=other_key,
            server=server,  # type: ignore[arg-type]
        )
        posts = [
            (challenge.challenge_id, forged, AuthorizationError),  # frank's phone posting
            (
                challenge.challenge_id,
                forged,
                CryptoError,
            ),  # erin's phone relaying frank's signature
        ]
        client = other.client
    elif case == "forged":
        good = bytearray(sealed_for(challenge))
        good[-5] ^= 1
        posts = [(challenge.challenge_id, bytes(good), CryptoError)]
        client = phone.client
    else:
        posts = [(challenge.challenge_id, b"\x00" * 3000, RemoteProtocolError)]
        client = phone.client
    before = env.dump()
    for i, (cid, sealed, error) in enumerate(posts):
        caller = client if case != "other-phone" or i == 0 else phone.client
        with pytest.raises(error):
            await caller.call(
                AnswerOut,
                "POST",
                "/v1/pushauth/answers",
                body=AnswerIn(challenge_id=cid.hex(), sealed=sealed),
            )
    assert env.dump() == before
    # The session is still open for its own phone and the right number.
    out = await phone.answer(target, "approve", number)
    assert out.state == "APPROVED"


async def test_logins_above_the_rate_limit_are_refused_and_logged(env: Env) -> None:
    await phone_for(env, "gina")
    terminal = await env.enrolled("service/term1")
    limit = server_of(env).policy.rate_limit
    for _ in range(limit):
        login = start(env, terminal, "gina")
        await asyncio.wait_for(login.number, 10)
        login.result.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await login.result
    with pytest.raises(AuthorizationError, match="try later"):
        await push_login(terminal, "gina", poll=1)
    env.clock.advance(timedelta(minutes=2))
    login = start(env, terminal, "gina")
    await asyncio.wait_for(login.number, 10)
    login.result.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await login.result


# -- answers on the notification service ---------------------------------------------------


@contextlib.asynccontextmanager
async def on_a_bus(env: Env, *, listening: bool = True) -> AsyncIterator[MemoryBus]:
    """The API with a notification service (one in-process bus its phones share), and the
    server taking answers from it unless ``listening`` is false."""
    bus = MemoryBus()
    ctx = env.app.state.keybroker
    ctx.push_bus = bus
    ready = asyncio.Event()
    task = asyncio.create_task(listen_for_answers(ctx, bus, ready)) if listening else None
    if task is not None:
        await asyncio.wait_for(ready.wait(), 10)
    try:
        yield bus
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        ctx.push_bus = None


def _decoded(payload: bytes) -> Notice | AnswerTaken:
    try:
        return Notice.decode(payload)
    except KeybrokerError:
        return AnswerTaken.decode(payload)


async def bus_phone(env: Env, user: str, bus: MemoryBus, fallback_after: float = 3.0) -> Phone:
    plain = await phone_for(env, user)

    async def shared(_url: str) -> Bus:
        return bus

    return Phone(
        plain.client,
        bus_url="memory://",
        wait=5,
        clock_ms=lambda: to_ms(env.clock()),
        fallback_after=fallback_after,
        bus_opener=shared,
    )


@pytest.mark.parametrize("listening", [True, False], ids=["taken-from-the-bus", "posted-later"])
async def test_a_phone_on_a_bus_answers_there_and_posts_only_what_the_server_did_not_take(
    env: Env, listening: bool
) -> None:
    async with on_a_bus(env, listening=listening) as bus:
        phone = await bus_phone(env, "hana", bus, fallback_after=0.2)
        where = await phone.where()
        assert where.answers_topic is not None and where.answers_topic.startswith("kb.")
        assert "hana" not in where.answers_topic and where.answers_topic != where.topic
        # Anyone can publish there: what is not an answer is refused and the server listens on.
        await bus.publish(where.answers_topic, b"not an answer")
        terminal = await env.enrolled("service/term1")
        numbers: dict[str, str] = {}
        shown = asyncio.Event()

        async def approve(_challenge: Challenge) -> Decision:
            await asyncio.wait_for(shown.wait(), 10)
            return ("approve", numbers["n"])

        async with bus.subscribe(where.topic) as spy, running(phone, approve):
            login = start(env, terminal, "hana")
            numbers["n"] = await asyncio.wait_for(login.number, 10)
            shown.set()
            result = await asyncio.wait_for(login.result, 20)
            await asyncio.sleep(0.4)  # past the fallback's check
            kinds = []
            while True:
                try:
                    message = await asyncio.wait_for(anext(spy), 0.1)
                except TimeoutError:
                    break
                kinds.append(type(_decoded(message.payload)).__name__)
        # On the phone's topic: its notice, then the server's receipt if it took the answer.
        assert kinds == (["Notice", "AnswerTaken"] if listening else ["Notice"])
        assert result.state is LoginState.APPROVED and result.claims is not None
        assert (phone.stats.answered_on_bus, phone.stats.fell_back) == (
            (1, 0) if listening else (1, 1)
        )
        # Posted over HTTPS as well only when the server did not take it from the bus.
        assert phone.stats.answered == (1 if listening else 2)


@pytest.mark.parametrize(
    "case",
    ["replayed", "other-session", "other-phone", "forged", "oversized", "garbage", "unknown"],
)
async def test_refused_answers_from_the_bus_change_nothing(env: Env, case: str) -> None:
    phone = await phone_for(env, "ivan")
    other = await phone_for(env, "jane")
    terminal = await env.enrolled("service/term1")
    server = server_of(env)
    first = start(env, terminal, "ivan")
    number = await asyncio.wait_for(first.number, 10)
    challenge = await next_challenge(phone)
    keys = await phone.server()

    def sealed_by(who: Phone, c: Challenge, decision: str = "approve") -> bytes:
        return make_answer(
            c,
            decision=decision,
            number=number,
            now_ms=to_ms(env.clock()),
            identity_key=who.client.keyring.identity.signer().private_key(SECRET_ACCESS),
            server=keys,  # type: ignore[arg-type]
        )

    target = challenge
    if case == "replayed":
        earlier = bus_answer(challenge, sealed_by(phone, challenge, "deny"))
        server.answer_from_bus(earlier)
        await asyncio.wait_for(first.result, 10)
        second = start(env, terminal, "ivan")
        number = await asyncio.wait_for(second.number, 10)
        target = await next_challenge(phone)
        moved = BusAnswer(target.challenge_id, BusAnswer.decode(earlier).sealed).encode()
        payloads = [(earlier, RemoteProtocolError), (moved, CryptoError)]
    elif case == "other-session":
        start(env, terminal, "jane")
        foreign = await next_challenge(other)
        sealed = sealed_by(phone, challenge)
        payloads = [(BusAnswer(foreign.challenge_id, sealed).encode(), CryptoError)]
    elif case == "other-phone":
        payloads = [(bus_answer(challenge, sealed_by(other, challenge)), CryptoError)]
    elif case == "forged":
        sealed = bytearray(sealed_by(phone, challenge))
        sealed[-5] ^= 1
        payloads = [(bus_answer(challenge, bytes(sealed)), CryptoError)]
    elif case == "oversized":
        payloads = [(bus_answer(challenge, b"\x00" * 3000), DecodeError)]
    elif case == "garbage":
        payloads = [(b"\xff" * 40, DecodeError), (b"", DecodeError)]
    else:
        gone = BusAnswer(b"\x01" * 16, sealed_by(phone, challenge)).encode()
        payloads = [(gone, NotFound)]
    before = env.dump()
    for payload, error in payloads:
        with pytest.raises(error):
            server.answer_from_bus(payload)
    assert env.dump() == before
    # The session is still open for its own phone's answer, taken from the bus.
    decided = server.answer_from_bus(bus_answer(target, sealed_by(phone, target)))
    assert decided.status.state is LoginState.APPROVED
    assert decided.receipt_topic == server.topic_of(phone.device)
    assert AnswerTaken.decode(decided.receipt).challenge_id == target.challenge_id
