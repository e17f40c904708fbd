"""The authentication server's side of push login: the broker's part of S7.

It runs inside ``keybroker serve`` (the routes are in
:mod:`keybroker.api.routes.pushauth`) on the broker's database, so any number of
replicas can serve logins: every decision is one transaction with a
compare-and-set on the login's state, written to the transparency log in the
same transaction.

Keys the server keeps for itself (created on first use, encrypted at rest under
the root key like every keyset, under the reserved ``keybroker/`` prefix so no
principal can be granted them):

* ``keybroker/pushauth/sign`` (Ed25519) — signs challenges and session tokens;
* ``keybroker/pushauth/hpke`` (X25519 HPKE) — phones seal their answers to it;
* ``keybroker/pushauth/mac`` (HMAC-SHA256) — derives the secret salt of the
  per-device bus topics and the MAC under which a login's number is stored.

Phones learn the first two from a document signed by the broker CA key, which
they pinned at enrolment (the enrolment URI carries its fingerprint).
"""

from __future__ import annotations

import contextlib
import hmac
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final
from urllib.parse import quote, urlencode

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from keybroker.broker import Broker
from keybroker.broker._context import record
from keybroker.broker.events import to_ms
from keybroker.broker.messages import HpkeKeyBinding
from keybroker.bus.topics import DEFAULT_PREFIX, principal_topic
from keybroker.errors import (
    AuthorizationError,
    Conflict,
    KeybrokerError,
    NotFound,
    RemoteProtocolError,
    StoreError,
)
from keybroker.flows.pushauth.messages import (
    AnswerTaken,
    LoginDecided,
    PhoneRegistered,
    ServerKeys,
    SessionClaims,
    UserLockChanged,
    token_info,
)
from keybroker.flows.pushauth.protocol import (
    REASONS,
    Input,
    LoginState,
    PendingLogin,
    PushPolicy,
    build_challenge,
    issue_token,
    judge_answer,
    new_number,
    number_commitment,
    read_bus_answer,
    request_digest,
    sign_server_keys,
    step,
)
from keybroker.keys import ED25519, HMAC_SHA256, X25519_HPKE, Keyset, KeyTemplate, PublicKeyset
from keybroker.keys.handles import HpkeHandle, MacHandle, SignerHandle
from keybroker.pki import PrincipalId, fingerprint, load_certificate
from keybroker.store.schema import pushauth_logins, pushauth_phones, pushauth_users

SIGN_KEYSET: Final = "keybroker/pushauth/sign"
HPKE_KEYSET: Final = "keybroker/pushauth/hpke"
MAC_KEYSET: Final = "keybroker/pushauth/mac"

#: The scheme of the URI a phone enrols from.
ENROL_SCHEME: Final = "keybroker-push"
#: What a user name may be (it is shown, logged and stored; it never reaches the bus).
MAX_USER: Final = 64
MAX_APPLICATION: Final = 128
MAX_ADDRESS: Final = 64
#: Phones' topics share the bus prefix (the NATS stream covers ``kb.>``); the salt keeps them apart.
TOPIC_PREFIX: Final = DEFAULT_PREFIX
#: What the answers topic is derived from, as a phone's is from its principal id (no
#: principal has this id: a principal's kind is site, node, device, service or user).
ANSWERS_TOPIC_NAME: Final = "keybroker/pushauth/answers"


class RateLimited(AuthorizationError):
    """Too many logins for this user in the window; try later."""

    status = 429


class UserLocked(AuthorizationError):
    """The user is locked (after a fraud report) until an operator unlocks them."""


def check_user(user: str) -> str:
    if (
        not isinstance(user, str)
        or not 0 < len(user) <= MAX_USER
        or not user.isprintable()
        or user != user.strip()
    ):
        raise RemoteProtocolError(f"a user name is 1 to {MAX_USER} printable characters")
    return user


def _text(value: str, limit: int, what: str) -> str:
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise RemoteProtocolError(f"{what} is at most {limit} printable characters")
    return value


@dataclass(frozen=True)
class PhoneRegistration:
    """A phone slot for ``user``: the device principal and its one-time enrolment token."""

    user: str
    device: PrincipalId
    expires_at: datetime
    token: str = field(repr=False)

    def uri(self, broker_url: str, ca_fingerprint: bytes) -> str:
        """``keybroker-push://enrol?…``: everything a phone needs, for a QR code.

        It carries the one-time token: show it only to the phone's owner."""
        query = urlencode(
            {
                "v": "1",
                "url": broker_url,
                "principal": str(self.device),
                "token": self.token,
                "ca": ca_fingerprint.hex(),
            },
            quote_via=quote,
        )
        return f"{ENROL_SCHEME}://enrol?{query}"


@dataclass(frozen=True)
class StartedLogin:
    session_id: str
    device: str
    topic: str
    expires_at: datetime
    notice: bytes = field(repr=False)
    #: Shown on the terminal only; never stored in clear, never published.
    number: str = field(repr=False)


@dataclass(frozen=True)
class LoginStatus:
    session_id: str
    state: LoginState
    reason: str | None
    expires_at: datetime
    #: The session token sealed to the terminal (approved logins only).
    sealed_token: bytes | None = field(default=None, repr=False)
    #: The phone the challenge went to (set when an answer decided the login).
    device: str | None = None


@dataclass(frozen=True)
class BusDecision:
    """A login decided by an answer from the bus, and the phone's receipt."""

    status: LoginStatus
    #: Where the receipt goes: the phone's own topic.
    receipt_topic: str
    #: An :class:`~keybroker.flows.pushauth.messages.AnswerTaken`, encoded.
    receipt: bytes


@dataclass(frozen=True)
class UserInfo:
    user: str
    device: str | None
    locked: bool
    reason: str | None


def _sealing_key(broker: Broker, principal: str, conn: Connection) -> PublicKeyset:
    """The HPKE key ``principal`` registered at enrolment (it must be active)."""
    info = broker.principal_credentials(principal, conn=conn)
    if (
        info.status != "active"
        or info.hpke_public_key is None
        or info.hpke_template is None
        or info.hpke_key_id is None
    ):
        raise NotFound(f"{principal} has not enrolled (or is revoked)")
    return HpkeKeyBinding(
        principal, info.hpke_template, info.hpke_key_id, info.hpke_public_key
    ).recipient()


class _Keys:
    __slots__ = ("hpke", "mac", "sign")

    def __init__(self, sign: SignerHandle, hpke: HpkeHandle, mac: MacHandle) -> None:
        self.sign = sign
        self.hpke = hpke
        self.mac = mac

    def __repr__(self) -> str:
        return "PushAuthKeys(<handles>)"


class PushAuthServer:
    """Push login on one broker. Thread-safe: the API calls it from its thread pool."""

    def __init__(self, broker: Broker, policy: PushPolicy | None = None) -> None:
        self._broker = broker
        self._ctx = broker.context
        self.policy = policy or PushPolicy()
        self._keys: _Keys | None = None
        self._salt: bytes | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PushAuthServer({self._ctx.store!r})"

    # -- keys ---------------------------------------------------------------------------

    def _load_or_create(self, name: str, template: KeyTemplate) -> Keyset:
        repo = self._ctx.keysets
        with contextlib.suppress(NotFound):
            return repo.load(name).keyset
        try:
            return repo.create(Keyset.generate(name, template)).keyset
        except (Conflict, StoreError):
            # Another replica created it first: theirs is the one.
            return repo.load(name).keyset

    def keys(self) -> _Keys:
        with self._lock:
            if self._keys is None:
                self._keys = _Keys(
                    self._load_or_create(SIGN_KEYSET, ED25519).signer(),
                    self._load_or_create(HPKE_KEYSET, X25519_HPKE).hpke(),
                    self._load_or_create(MAC_KEYSET, HMAC_SHA256).mac(),
                )
            return self._keys

    def server_keys_document(self) -> bytes:
        """The push keys, signed by the broker CA key (phones pinned its certificate)."""
        keys = self.keys()
        doc = ServerKeys(
            sign_public=keys.sign.public_keyset().to_bytes(),
            hpke_public=keys.hpke.public_keyset().to_bytes(),
        )
        return sign_server_keys(doc, self._ctx.signer.sign)

    def sign_public(self) -> PublicKeyset:
        return self.keys().sign.public_keyset()

    def _topic_salt(self) -> bytes:
        if self._salt is None:
            self._salt = self.keys().mac.compute_mac(b"keybroker/pushauth/topic-salt/v1")
        return self._salt

    def topic_of(self, device: str) -> str:
        """The phone's notification topic: opaque, stable, no name in it."""
        return principal_topic(device, self._topic_salt(), prefix=TOPIC_PREFIX)

    # -- operators ------------------------------------------------------------------------

    def register_phone(self, user: str, ttl: timedelta) -> PhoneRegistration:
        """A device principal and enrolment token for ``user``'s phone (one per user)."""
        check_user(user)
        device = PrincipalId.parse(f"device/phone-{self._ctx.rng(8).hex()}")
        now = self._ctx.now()
        with self._ctx.store.transaction() as conn:
            self._ctx.store.lock(conn, f"pushauth-user/{user}")
            taken = conn.execute(
                sa.select(pushauth_phones.c.device).where(pushauth_phones.c.user == user)
            ).first()
            if taken is not None:
                raise Conflict(
                    f"user {user!r} already has a phone ({taken.device}); remove it first"
                )
            conn.execute(
                pushauth_phones.insert().values(device=str(device), user=user, created_at=now)
            )
            record(
                self._ctx, conn, [PhoneRegistered(at_ms=to_ms(now), user=user, device=str(device))]
            )
        token = self._broker.create_enrolment_token(device, ttl)
        return PhoneRegistration(user, device, token.expires_at, token.secret)

    def remove_phone(self, user: str) -> str:
        """Forget ``user``'s phone and revoke its principal; returns the device id."""
        with self._ctx.store.transaction() as conn:
            row = conn.execute(
                sa.select(pushauth_phones.c.device).where(
                    pushauth_phones.c.user == check_user(user)
                )
            ).first()
            if row is None:
                raise NotFound(f"user {user!r} has no phone")
            conn.execute(pushauth_phones.delete().where(pushauth_phones.c.user == user))
        with contextlib.suppress(NotFound):  # registered but never enrolled: nothing to revoke
            self._broker.revoke_principal(row.device, reason="superseded")
        return str(row.device)

    def users(self) -> list[UserInfo]:
        with self._ctx.store.snapshot() as conn:
            phones = {r.user: r.device for r in conn.execute(sa.select(pushauth_phones))}
            locks = {r.user: r for r in conn.execute(sa.select(pushauth_users))}
        return [
            UserInfo(
                user,
                phones.get(user),
                bool(locks[user].locked) if user in locks else False,
                locks[user].reason if user in locks else None,
            )
            for user in sorted(set(phones) | set(locks))
        ]

    def set_lock(self, user: str, locked: bool, reason: str) -> None:
        now = self._ctx.now()
        with self._ctx.store.transaction() as conn:
            self._write_lock(conn, check_user(user), locked, reason[:256], now, None)

    def _write_lock(  # noqa: PLR0917 - one row and its log entry
        self,
        conn: Connection,
        user: str,
        locked: bool,
        reason: str,
        now: datetime,
        session_id: str | None,
    ) -> None:
        updated = conn.execute(
            pushauth_users.update()
            .where(pushauth_users.c.user == user)
            .values(locked=locked, reason=reason, updated_at=now)
        ).rowcount
        if not updated:
            conn.execute(
                pushauth_users.insert().values(
                    user=user, locked=locked, reason=reason, updated_at=now
                )
            )
        record(
            self._ctx,
            conn,
            [
                UserLockChanged(
                    at_ms=to_ms(now), user=user, locked=locked, reason=reason, session_id=session_id
                )
            ],
        )

    # -- terminals ------------------------------------------------------------------------

    def _refuse(  # noqa: PLR0917 - the refused request, field by field
        self,
        conn: Connection,
        now: datetime,
        user: str,
        terminal: str,
        address: str,
        application: str,
        outcome: str,
        reason: str,
    ) -> None:
        record(
            self._ctx,
            conn,
            [
                LoginDecided(
                    at_ms=to_ms(now),
                    session_id=self._ctx.new_id(),
                    user=user,
                    device=None,
                    terminal=terminal,
                    terminal_address=address,
                    application=application,
                    outcome=outcome,
                    reason=reason,
                    token_id=None,
                )
            ],
        )

    def start_login(
        self,
        *,
        terminal: PrincipalId,
        terminal_address: str,
        user: str,
        application: str,
        request_body: bytes,
    ) -> StartedLogin:
        """Open a challenge for ``user`` and return what to publish and to show.

        Refused (and logged): a locked user (:class:`UserLocked`), too many logins
        in the window (:class:`RateLimited`). :class:`NotFound` if the user has no
        enrolled phone (not logged: nothing was decided about anyone).
        """
        check_user(user)
        _text(application, MAX_APPLICATION, "the application")
        _text(terminal_address, MAX_ADDRESS, "the terminal address")
        keys = self.keys()
        now = self._ctx.now()
        refusal: KeybrokerError | None = None
        with self._ctx.store.transaction() as conn:
            self._ctx.store.lock(conn, f"pushauth-user/{user}")
            device = self._phone_of(user, conn)
            lock = conn.execute(
                sa.select(pushauth_users.c.locked).where(pushauth_users.c.user == user)
            ).first()
            recent = conn.execute(
                sa.select(sa.func.count())
                .select_from(pushauth_logins)
                .where(
                    pushauth_logins.c.user == user,
                    pushauth_logins.c.created_at > now - self.policy.rate_window,
                )
            ).scalar_one()
            if lock is not None and lock.locked:
                refusal = UserLocked(f"user {user!r} is locked; an operator must unlock them")
                outcome = "LOCKED"
            elif recent >= self.policy.rate_limit:
                refusal = RateLimited(
                    f"more than {self.policy.rate_limit} logins for {user!r} within "
                    f"{int(self.policy.rate_window.total_seconds())} s; try later"
                )
                outcome = "RATE_LIMITED"
            if refusal is not None:
                self._refuse(
                    conn,
                    now,
                    user,
                    str(terminal),
                    terminal_address,
                    application,
                    outcome,
                    str(refusal),
                )
            else:
                phone_hpke = _sealing_key(self._broker, device, conn)
                session_id = self._ctx.new_id()
                number = new_number(self._ctx.rng, self.policy.number_digits)
                sealed = build_challenge(
                    session_id=session_id,
                    device=device,
                    user=user,
                    terminal=str(terminal),
                    terminal_address=terminal_address,
                    application=application,
                    now_ms=to_ms(now),
                    policy=self.policy,
                    rng=self._ctx.rng,
                    server_signer=keys.sign,
                    phone_hpke=phone_hpke,
                )
                challenge = sealed.challenge
                expires_at = now + self.policy.expiry
                conn.execute(
                    pushauth_logins.insert().values(
                        id=session_id,
                        challenge_id=challenge.challenge_id,
                        user=user,
                        device=device,
                        terminal=str(terminal),
                        terminal_address=terminal_address,
                        application=application,
                        number_mac=number_commitment(keys.mac.compute_mac, session_id, number),
                        nonce=challenge.nonce,
                        request_digest=request_digest(request_body),
                        notice=sealed.notice,
                        state=LoginState.PENDING.value,
                        created_at=now,
                        expires_at=expires_at,
                    )
                )
        if refusal is not None:
            raise refusal
        return StartedLogin(
            session_id, device, self.topic_of(device), expires_at, sealed.notice, number
        )

    def _phone_of(self, user: str, conn: Connection | None = None) -> str:
        query = sa.select(pushauth_phones.c.device).where(pushauth_phones.c.user == user)
        if conn is None:
            with self._ctx.store.reader() as own:
                row = own.execute(query).first()
        else:
            row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"user {user!r} has no phone registered for push login")
        return str(row.device)

    def _row(self, conn: Connection, **where: object) -> sa.Row[tuple[object, ...]] | None:
        query = sa.select(pushauth_logins).where(
            *(pushauth_logins.c[name] == value for name, value in where.items())
        )
        if self._ctx.store.dialect == "postgresql":
            query = query.with_for_update()
        return conn.execute(query).first()

    def login_status(self, session_id: str, terminal: PrincipalId) -> LoginStatus:
        """Where a login stands, for the terminal that started it (expires it if due)."""
        if not isinstance(session_id, str) or len(session_id) > 36:
            raise NotFound("no such login")
        with self._ctx.store.reader() as conn:
            row = conn.execute(
                sa.select(pushauth_logins).where(pushauth_logins.c.id == session_id)
            ).first()
        if row is None or row.terminal != str(terminal):
            # Another terminal's login is as good as absent: no oracle on session ids.
            raise NotFound("no such login")
        if row.state == LoginState.PENDING.value and self._ctx.now() > row.expires_at:
            self._expire(session_id)
            return self.login_status(session_id, terminal)
        return LoginStatus(
            row.id,
            LoginState(row.state),
            row.reason,
            row.expires_at,
            None if row.sealed_token is None else bytes(row.sealed_token),
        )

    def _decide(
        self,
        conn: Connection,
        row: sa.Row[tuple[object, ...]],
        event: Input,
        now: datetime,
        terminal_hpke: PublicKeyset | None = None,
    ) -> LoginStatus:
        """Apply ``event`` to a PENDING login inside ``conn`` (compare-and-set on state)."""
        state = step(LoginState(str(row.state)), event)
        reason = REASONS[event]
        token_id: str | None = None
        sealed_token: bytes | None = None
        session_id = str(row.id)
        if state is LoginState.APPROVED:
            token_id = self._ctx.new_id()
            claims = SessionClaims(
                token_id=token_id,
                session_id=session_id,
                user=str(row.user),
                terminal=str(row.terminal),
                terminal_address=str(row.terminal_address),
                application=str(row.application),
                request_digest=bytes(row.request_digest),
                issued_at_ms=to_ms(now),
                expires_at_ms=to_ms(now + self.policy.token_ttl),
            )
            token = issue_token(claims, self.keys().sign)
            if terminal_hpke is None:
                raise AuthorizationError("the terminal has no usable sealing key")
            sealed_token = terminal_hpke.seal(token, token_info(str(row.terminal), session_id))
        changed = conn.execute(
            pushauth_logins.update()
            .where(
                pushauth_logins.c.id == session_id,
                pushauth_logins.c.state == LoginState.PENDING.value,
            )
            .values(
                state=state.value,
                decided_at=now,
                reason=reason,
                token_id=token_id,
                sealed_token=sealed_token,
            )
        ).rowcount
        if changed != 1:
            raise Conflict("the login was decided concurrently")
        events: list[LoginDecided | UserLockChanged] = [
            LoginDecided(
                at_ms=to_ms(now),
                session_id=session_id,
                user=str(row.user),
                device=str(row.device),
                terminal=str(row.terminal),
                terminal_address=str(row.terminal_address),
                application=str(row.application),
                outcome=state.value,
                reason=reason,
                token_id=token_id,
            )
        ]
        record(self._ctx, conn, events)
        if state is LoginState.FRAUD and self.policy.lock_on_fraud:
            self._write_lock(
                conn, str(row.user), True, "fraud reported on the phone", now, session_id
            )
        return LoginStatus(
            session_id, state, reason, row.expires_at, sealed_token, device=str(row.device)
        )

    def _expire(self, session_id: str) -> None:
        now = self._ctx.now()
        with self._ctx.store.transaction() as conn:
            row = self._row(conn, id=session_id)
            if row is None or row.state != LoginState.PENDING.value or now <= row.expires_at:
                return
            self._decide(conn, row, Input.DEADLINE, now)

    def expire_overdue(self) -> int:
        """Expire every pending login past its deadline; returns how many."""
        now = self._ctx.now()
        with self._ctx.store.reader() as conn:
            due = [
                r.id
                for r in conn.execute(
                    sa.select(pushauth_logins.c.id).where(
                        pushauth_logins.c.state == LoginState.PENDING.value,
                        pushauth_logins.c.expires_at < now,
                    )
                )
            ]
        for session_id in due:
            self._expire(session_id)
        return len(due)

    # -- phones --------------------------------------------------------------------------

    def phone_topic(self, device: PrincipalId) -> str:
        with self._ctx.store.reader() as conn:
            row = conn.execute(
                sa.select(pushauth_phones.c.user).where(pushauth_phones.c.device == str(device))
            ).first()
        if row is None:
            raise AuthorizationError(f"{device} is not a push-login phone")
        return self.topic_of(str(device))

    def pending_notices(self, device: PrincipalId) -> list[bytes]:
        """Notices of this phone's open challenges (the long-poll fallback)."""
        now = self._ctx.now()
        with self._ctx.store.reader() as conn:
            rows = conn.execute(
                sa.select(pushauth_logins.c.notice)
                .where(
                    pushauth_logins.c.device == str(device),
                    pushauth_logins.c.state == LoginState.PENDING.value,
                    pushauth_logins.c.expires_at >= now,
                )
                .order_by(pushauth_logins.c.created_at)
            )
            return [bytes(r.notice) for r in rows]

    def answers_topic(self) -> str:
        """The topic phones publish their sealed answers on (one for the server, opaque)."""
        return principal_topic(ANSWERS_TOPIC_NAME, self._topic_salt(), prefix=TOPIC_PREFIX)

    def answer_from_bus(self, payload: bytes) -> BusDecision:
        """Judge an answer a phone published on :meth:`answers_topic`; return the decision
        and the receipt to publish for the phone.

        Anyone can publish there, so nothing about the sender is taken on trust: the
        challenge id only finds the login, and the answer must open with the server's
        key and carry the signature of the phone the challenge was sent to, exactly as
        on ``POST /v1/pushauth/answers`` (which also authenticates the request). A
        message that fails any check changes nothing and raises the same typed errors.
        """
        challenge_id, sealed = read_bus_answer(payload)
        status = self.answer(None, challenge_id, sealed)
        assert status.device is not None  # a decision by an answer names its phone
        return BusDecision(status, self.topic_of(status.device), AnswerTaken(challenge_id).encode())

    def answer(self, device: PrincipalId | None, challenge_id: bytes, sealed: bytes) -> LoginStatus:
        """Judge a phone's sealed answer; decide the login or refuse with a typed error.

        ``device``: the principal whose signed request carried the answer, which must be
        the challenge's phone; ``None`` for an answer from the bus, which only the
        phone's signature inside the seal vouches for."""
        if not isinstance(challenge_id, bytes) or len(challenge_id) != 16:
            raise NotFound("no such challenge")
        keys = self.keys()
        now = self._ctx.now()
        with self._ctx.store.transaction() as conn:
            row = self._row(conn, challenge_id=challenge_id)
            if row is None:
                raise NotFound("no such challenge")
            if device is not None and str(device) != row.device:
                raise AuthorizationError("this challenge was not sent to the calling phone")
            caller = str(row.device) if device is None else str(device)
            creds = self._broker.principal_credentials(str(row.device), conn=conn)
            if creds.status != "active" or creds.certificate_der is None:
                raise AuthorizationError(f"{row.device} is {creds.status} or has no certificate")
            device_key = load_certificate(creds.certificate_der).public_key()
            try:
                terminal_hpke: PublicKeyset | None = _sealing_key(
                    self._broker, str(row.terminal), conn
                )
            except NotFound:
                terminal_hpke = None  # a revoked terminal gets no token (approval is refused)
            login = PendingLogin(
                session_id=str(row.id),
                challenge_id=bytes(row.challenge_id),
                device=str(row.device),
                nonce=bytes(row.nonce),
                issued_at_ms=to_ms(row.created_at),
                expires_at_ms=to_ms(row.expires_at),
                state=LoginState(str(row.state)),
            )

            def number_ok(number: str) -> bool:
                expected = bytes(row.number_mac)
                given = number_commitment(keys.mac.compute_mac, login.session_id, number)
                return hmac.compare_digest(given, expected)

            event = judge_answer(
                login,
                sealed,
                caller=caller,
                server_hpke=keys.hpke,
                device_key=device_key,
                number_ok=number_ok,
                now_ms=to_ms(now),
                policy=self.policy,
            )
            return self._decide(conn, row, event, now, terminal_hpke)


def ca_fingerprint(broker: Broker) -> bytes:
    """SHA-256 of the broker CA certificate (DER): what an enrolment URI pins."""
    return fingerprint(broker.ca_certificate)


__all__ = [
    "ENROL_SCHEME",
    "BusDecision",
    "LoginStatus",
    "PhoneRegistration",
    "PushAuthServer",
    "RateLimited",
    "StartedLogin",
    "UserInfo",
    "UserLocked",
    "ca_fingerprint",
    "check_user",
]
