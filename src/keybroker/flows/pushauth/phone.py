"""The phone authenticator's driver: enrol from a URI, receive notices, answer.

A :class:`Phone` is an enrolled ``device/…`` principal. It listens on its
opaque topic of the notification service (MQTT or NATS) when given a bus URL,
and always asks the broker once for open challenges when it starts (a notice
published before it subscribed is not lost); without a bus it long-polls the
broker. While the bus is quiet it asks the broker again every ``wait`` seconds, so a
notice the bus lost is still shown while its challenge is open. Every notice is
opened and checked by
:func:`keybroker.flows.pushauth.protocol.open_notice` (sealed to us, signed by
our server, not expired); a notice that fails any check is dropped and
counted, never shown. Each challenge is shown once (ids are remembered) and
answered at most once.

On a bus whose server takes answers there (``GET /v1/pushauth/phone`` names the
answers topic), the phone publishes its sealed answer on it: one hop instead of a
signed HTTPS request. The server sends a receipt on the phone's topic; without one
within :data:`FALLBACK_AFTER` seconds the phone asks the broker whether the challenge
is still open and, if it is, posts the answer over HTTPS (a login is decided once: a
second answer is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs, urlsplit

import httpx

from keybroker.api.pushauth_schemas import AnswerIn, AnswerOut, NoticesOut, PhoneOut, ServerKeysOut
from keybroker.api.settings import utc_now
from keybroker.bus import open_bus
from keybroker.bus.interface import Bus
from keybroker.client.principal import PrincipalClient
from keybroker.errors import ConfigurationError, IdentityMismatch, KeybrokerError, TransportError
from keybroker.flows.pushauth.messages import AnswerTaken, Challenge
from keybroker.flows.pushauth.protocol import (
    ServerPublic,
    bus_answer,
    make_answer,
    open_notice,
    verify_server_keys,
)
from keybroker.flows.pushauth.server import ENROL_SCHEME
from keybroker.keys import SECRET_ACCESS
from keybroker.pki import fingerprint, load_certificate

logger = logging.getLogger("keybroker.pushauth.phone")

#: How many challenge ids a phone remembers to show each challenge once.
SEEN_CAPACITY: Final = 4096

#: What the user (or an automated stand-in) decides: (decision, number typed) or None to ignore.
Decision = tuple[str, str] | None
Handler = Callable[[Challenge], Awaitable[Decision]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class EnrolmentUri:
    url: str
    principal: str
    ca_fingerprint: bytes
    token: str = field(repr=False)

    @classmethod
    def parse(cls, uri: str) -> EnrolmentUri:
        """``keybroker-push://enrol?v=1&url=…&principal=…&token=…&ca=…``."""
        parts = urlsplit(uri.strip())
        if parts.scheme != ENROL_SCHEME or parts.netloc != "enrol":
            raise ConfigurationError(
                f"not a push enrolment URI (expected {ENROL_SCHEME}://enrol?…)"
            )
        query = parse_qs(parts.query, strict_parsing=True)
        try:
            values = {k: query[k][0] for k in ("v", "url", "principal", "token", "ca")}
        except (KeyError, IndexError):
            raise ConfigurationError(
                "the enrolment URI lacks url, principal, token or ca"
            ) from None
        if values["v"] != "1":
            raise ConfigurationError(f"unsupported enrolment URI version {values['v']!r}")
        try:
            ca = bytes.fromhex(values["ca"])
        except ValueError:
            raise ConfigurationError("the enrolment URI's CA fingerprint is not hex") from None
        if len(ca) != 32:
            raise ConfigurationError("the enrolment URI's CA fingerprint is not a SHA-256")
        if not values["principal"].startswith("device/"):
            raise ConfigurationError("a phone enrols as a device/… principal")
        return cls(values["url"], values["principal"], ca, values["token"])


async def fetch_pinned_ca(
    url: str, expected: bytes, *, transport: httpx.AsyncBaseTransport | None = None
) -> bytes:
    """The broker CA (PEM), accepted only if its SHA-256 is ``expected``.

    The certificate is fetched without TLS verification (we do not have the CA
    yet); the fingerprint from the enrolment URI is what authenticates it."""
    async with httpx.AsyncClient(transport=transport, verify=False, timeout=10) as http:  # noqa: S501
        try:
            response = await http.get(url.rstrip("/") + "/v1/ca")
        except httpx.HTTPError as exc:
            raise TransportError(f"could not fetch the broker CA: {type(exc).__name__}") from exc
    if response.status_code != 200:
        raise TransportError(f"could not fetch the broker CA: HTTP {response.status_code}")
    cert = load_certificate(response.content)
    if fingerprint(cert) != expected:
        raise IdentityMismatch(
            "the broker's CA certificate does not match the enrolment URI: not enrolling"
        )
    return response.content


async def enrol_phone(
    uri: str,
    keyring: Path,
    *,
    passphrase: str | bytes | None = None,
    kek: object = None,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> PrincipalClient:
    """Enrol as the device principal the URI names, pinning the broker CA it names."""
    parsed = EnrolmentUri.parse(uri)
    ca_pem = await fetch_pinned_ca(parsed.url, parsed.ca_fingerprint, transport=transport)
    return await PrincipalClient.enrol(
        parsed.url,
        ca_pem,
        parsed.principal,
        parsed.token,
        keyring,
        passphrase=passphrase,
        kek=kek,  # type: ignore[arg-type]
        transport=transport,
        clock=clock,
    )


@dataclass
class PhoneStats:
    shown: int = 0
    #: Answers the phone sent: on the bus, or posted over HTTPS.
    answered: int = 0
    #: Of those, answers published on the bus.
    answered_on_bus: int = 0
    #: Answers posted over HTTPS because the challenge was still open after one on the bus.
    fell_back: int = 0
    dropped: int = 0


#: After answering on the bus, how long a phone waits for the server's receipt before
#: asking whether the challenge is still open (and posting the answer over HTTPS if it
#: is). Long enough for a busy server (a receipt comes after the login is decided), short
#: enough to leave most of a challenge's 60 s when the bus lost the answer.
FALLBACK_AFTER: Final = 10.0


class Phone:
    """One enrolled phone. ``clock_ms`` is the phone's clock (epoch ms)."""

    def __init__(
        self,
        client: PrincipalClient,
        *,
        bus_url: str | None = None,
        wait: float = 30.0,
        clock_ms: Callable[[], int] = now_ms,
        fallback_after: float = FALLBACK_AFTER,
        bus_opener: Callable[[str], Awaitable[Bus]] = open_bus,
    ) -> None:
        self.client = client
        self.bus_url = bus_url
        self.wait = wait
        self.fallback_after = fallback_after
        self._open_bus = bus_opener
        #: While listening on a bus whose server takes answers there: (bus, answers topic).
        self._answers: tuple[Bus, str] | None = None
        #: Receipts awaited for answers published on the bus, by challenge id.
        self._receipts: dict[bytes, asyncio.Event] = {}
        self._clock_ms = clock_ms
        self._server: ServerPublic | None = None
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = PhoneStats()
        self.device = str(client.principal)
        self._identity = client.keyring.identity.signer().private_key(SECRET_ACCESS)
        self._hpke = client.keyring.hpke.hpke()

    def __repr__(self) -> str:
        return f"Phone({self.device})"

    async def server(self) -> ServerPublic:
        """The server's push keys, checked against the broker CA pinned at enrolment."""
        if self._server is None:
            doc = await self.client.call(ServerKeysOut, "GET", "/v1/pushauth/server-keys")
            ca = load_certificate(self.client.keyring.ca_pem)
            self._server = verify_server_keys(doc.document, ca.public_key())
        return self._server

    async def where(self) -> PhoneOut:
        return await self.client.call(PhoneOut, "GET", "/v1/pushauth/phone")

    async def open(self, notice: bytes) -> Challenge | None:
        """The challenge in ``notice`` if it is new and valid for us, else ``None``."""
        server = await self.server()
        try:
            challenge = open_notice(
                notice,
                device=self.device,
                phone_hpke=self._hpke,
                server=server,
                now_ms=self._clock_ms(),
            )
        except KeybrokerError as exc:
            self.stats.dropped += 1
            logger.warning("dropped a notice that failed its checks (%s)", type(exc).__name__)
            return None
        if challenge.challenge_id in self._seen:
            return None
        self._seen[challenge.challenge_id] = None
        while len(self._seen) > SEEN_CAPACITY:
            self._seen.popitem(last=False)
        self.stats.shown += 1
        return challenge

    async def _sealed_answer(self, challenge: Challenge, decision: str, number: str) -> bytes:
        return make_answer(
            challenge,
            decision=decision,
            number=number,
            now_ms=self._clock_ms(),
            identity_key=self._identity,  # type: ignore[arg-type]
            server=await self.server(),
        )

    async def answer(self, challenge: Challenge, decision: str, number: str = "") -> AnswerOut:
        """Post the answer over HTTPS and return how the server decided."""
        sealed = await self._sealed_answer(challenge, decision, number)
        body = AnswerIn(challenge_id=challenge.challenge_id.hex(), sealed=sealed)
        out = await self.client.call(AnswerOut, "POST", "/v1/pushauth/answers", body=body)
        self.stats.answered += 1
        return out

    async def publish_answer(
        self, bus: Bus, topic: str, challenge: Challenge, decision: str, number: str = ""
    ) -> None:
        """Publish the answer on the server's answers topic (no reply comes back: the
        terminal learns the outcome). :class:`TransportError` if the bus refused it."""
        sealed = await self._sealed_answer(challenge, decision, number)
        await bus.publish(topic, bus_answer(challenge, sealed))
        self.stats.answered += 1
        self.stats.answered_on_bus += 1

    async def _still_open(self, notice: bytes) -> bool:
        return notice in await self.pending(0)

    async def _answer_on_bus(
        self, answers: tuple[Bus, str], notice: bytes, challenge: Challenge, decision: Decision
    ) -> None:
        assert decision is not None
        bus, topic = answers
        taken = self._receipts[challenge.challenge_id] = asyncio.Event()
        try:
            try:
                await self.publish_answer(bus, topic, challenge, *decision)
            except TransportError as exc:
                logger.warning("could not publish our answer (%s); posting it", exc)
            else:
                # The server sends a receipt on our topic. Without one in time, ask whether
                # the challenge is still open (the receipt may be what was lost).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(taken.wait(), self.fallback_after)
                    return
                if not await self._still_open(notice):
                    return
                logger.warning("the server did not take our answer from the bus; posting it")
                self.stats.fell_back += 1
        finally:
            self._receipts.pop(challenge.challenge_id, None)
        await self.answer(challenge, *decision)

    def _received(self, payload: bytes, handler: Handler) -> None:
        """A message on our topic: a receipt for an answer, else a notice to open."""
        with contextlib.suppress(KeybrokerError):
            waiting = self._receipts.get(AnswerTaken.decode(payload).challenge_id)
            if waiting is not None:
                waiting.set()
            return
        self._spawn(payload, handler)

    async def pending(self, wait: float = 0) -> list[bytes]:
        found = await self.client.call(NoticesOut, "GET", "/v1/pushauth/notices", wait=wait)
        return found.notices

    async def _handle(self, notice: bytes, handler: Handler) -> None:
        challenge = await self.open(notice)
        if challenge is None:
            return
        decision = await handler(challenge)
        if decision is None:
            return
        try:
            if self._answers is not None:
                await self._answer_on_bus(self._answers, notice, challenge, decision)
            else:
                await self.answer(challenge, *decision)
        except KeybrokerError as exc:
            logger.warning("the server refused our answer: %s", exc)

    def _spawn(self, notice: bytes, handler: Handler) -> None:
        task = asyncio.create_task(self._handle(notice, handler))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(
        self, handler: Handler, stop: asyncio.Event, *, ready: asyncio.Event | None = None
    ) -> None:
        """Receive and answer until ``stop`` is set; ``ready`` is set once listening."""
        await self.server()
        if self.bus_url is None:
            await self._long_poll(handler, stop, ready)
        else:
            await self._listen(handler, stop, ready)
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, KeybrokerError):
                await task

    async def _long_poll(
        self, handler: Handler, stop: asyncio.Event, ready: asyncio.Event | None
    ) -> None:
        if ready is not None:
            ready.set()
        while not stop.is_set():
            poll = asyncio.ensure_future(self.pending(self.wait))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({poll, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not poll.done():
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll
                return
            try:
                notices = poll.result()
            except TransportError as exc:
                logger.warning("broker unreachable (%s); retrying", exc)
                await asyncio.sleep(1)
                continue
            for notice in notices:
                self._spawn(notice, handler)

    async def _listen(
        self, handler: Handler, stop: asyncio.Event, ready: asyncio.Event | None
    ) -> None:
        assert self.bus_url is not None
        where = await self.where()
        topic = where.topic
        async with await self._open_bus(self.bus_url) as bus, bus.subscribe(topic) as sub:
            if where.answers_topic is not None:
                self._answers = (bus, where.answers_topic)
            # Anything published before we subscribed is still open at the broker.
            for notice in await self.pending(0):
                self._spawn(notice, handler)
            if ready is not None:
                ready.set()
            stopped = asyncio.ensure_future(stop.wait())
            try:
                while not stop.is_set():
                    receive = asyncio.ensure_future(sub.__anext__())
                    await asyncio.wait(
                        {receive, stopped},
                        timeout=self.wait,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if not receive.done():
                        receive.cancel()
                        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                            await receive
                        if stop.is_set():
                            break
                        # Quiet for a while: a notice the bus lost is still open at the broker.
                        with contextlib.suppress(TransportError):
                            for notice in await self.pending(0):
                                self._spawn(notice, handler)
                        continue
                    try:
                        message = receive.result()
                    except StopAsyncIteration:
                        break
                    self._received(message.payload, handler)
            finally:
                stopped.cancel()
                self._answers = None
