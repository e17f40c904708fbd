"""The push-login protocol without I/O: its transition table, the challenge and answer
checks, tokens, and fuzzing of everything a peer can send (only typed errors come out)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from keybroker.errors import (
    AuthorizationError,
    ConfigurationError,
    CryptoError,
    DecodeError,
    KeybrokerError,
    RemoteProtocolError,
)
from keybroker.flows.pushauth.messages import (
    BusAnswer,
    Challenge,
    Notice,
    ServerKeys,
    SessionClaims,
)
from keybroker.flows.pushauth.protocol import (
    FINAL_STATES,
    TRANSITIONS,
    Input,
    LoginFinished,
    LoginState,
    PendingLogin,
    PushPolicy,
    ServerPublic,
    build_challenge,
    bus_answer,
    issue_token,
    judge_answer,
    make_answer,
    new_number,
    open_notice,
    read_bus_answer,
    sign_server_keys,
    step,
    verify_server_keys,
    verify_token,
)
from keybroker.keys import ED25519, SECRET_ACCESS, X25519_HPKE, Keyset

NOW = 1_795_000_000_000
DEVICE = "device/phone-0123456789abcdef"


class Keys:
    def __init__(self) -> None:
        self.server_sign = Keyset.generate("s", ED25519).signer()
        self.server_hpke = Keyset.generate("h", X25519_HPKE).hpke()
        self.phone_hpke = Keyset.generate("p", X25519_HPKE).hpke()
        self.phone_identity = Keyset.generate("i", ED25519).signer()
        self.other_identity = Keyset.generate("o", ED25519).signer()
        self.server = ServerPublic(
            self.server_sign.public_keyset(), self.server_hpke.public_keyset()
        )

    def identity_key(self, other: bool = False) -> object:
        signer = self.other_identity if other else self.phone_identity
        return signer.private_key(SECRET_ACCESS)

    def identity_public(self) -> object:
        return self.phone_identity.private_key(SECRET_ACCESS).public_key()  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


POLICY = PushPolicy()


def challenge(keys: Keys, now: int = NOW) -> tuple[Challenge, bytes]:
    sealed = build_challenge(
        session_id="s-1",
        device=DEVICE,
        user="alice",
        terminal="service/term1",
        terminal_address="192.0.2.7",
        application="ssh",
        now_ms=now,
        policy=POLICY,
        rng=os.urandom,
        server_signer=keys.server_sign,
        phone_hpke=keys.phone_hpke.public_keyset(),
    )
    return sealed.challenge, sealed.notice


def pending(c: Challenge) -> PendingLogin:
    return PendingLogin(
        c.session_id,
        c.challenge_id,
        c.device,
        c.nonce,
        c.issued_at_ms,
        c.expires_at_ms,
        LoginState.PENDING,
    )


def judge(
    keys: Keys, login: PendingLogin, sealed: bytes, *, caller: str = DEVICE, now: int = NOW
) -> Input:
    return judge_answer(
        login,
        sealed,
        caller=caller,
        server_hpke=keys.server_hpke,
        device_key=keys.identity_public(),
        number_ok=lambda n: n == "042",
        now_ms=now,
        policy=POLICY,
    )


def answer(
    keys: Keys, c: Challenge, decision: str = "approve", number: str = "042", **kw: object
) -> bytes:
    return make_answer(
        c,
        decision=decision,
        number=number,
        now_ms=int(kw.get("now", NOW + 1000)),  # type: ignore[call-overload]
        identity_key=keys.identity_key(bool(kw.get("other"))),  # type: ignore[arg-type]
        server=keys.server,
    )


def test_the_transition_table_leaves_every_final_state_final() -> None:
    assert {to for (_, to) in TRANSITIONS.items()} <= FINAL_STATES
    assert all(state is LoginState.PENDING for (state, _) in TRANSITIONS)
    for state in FINAL_STATES:
        for event in Input:
            with pytest.raises(LoginFinished):
                step(state, event)
    assert step(LoginState.PENDING, Input.APPROVE_WRONG_NUMBER) is LoginState.DENIED


def test_numbers_are_fixed_width_and_cover_their_range() -> None:
    seen = {new_number(os.urandom, 2) for _ in range(3000)}
    assert all(len(n) == 2 and n.isdigit() for n in seen)
    assert len(seen) == 100  # every value, leading zeros included
    # Rejection sampling: a source that first offers values above the limit is skipped.
    values = iter([b"\xff\xff\xff\xff", (7).to_bytes(4, "big")])
    assert new_number(lambda _n: next(values), 3) == "007"


def test_policy_bounds_are_enforced() -> None:
    from datetime import timedelta

    with pytest.raises(ConfigurationError):
        PushPolicy(expiry=timedelta(seconds=61))
    with pytest.raises(ConfigurationError):
        PushPolicy(number_digits=1)
    with pytest.raises(ConfigurationError):
        PushPolicy(rate_limit=0)


def test_a_notice_opens_only_for_its_phone_and_carries_no_number(keys: Keys) -> None:
    c, notice = challenge(keys)
    opened = open_notice(
        notice, device=DEVICE, phone_hpke=keys.phone_hpke, server=keys.server, now_ms=NOW
    )
    assert opened == c and "number" not in Challenge.__dataclass_fields__
    for secret in (b"alice", b"192.0.2.7", b"service/term1", b"ssh", c.nonce, b"s-1"):
        assert secret not in notice
    with pytest.raises(CryptoError):  # the same notice, for another device: info differs
        open_notice(
            notice,
            device="device/other",
            phone_hpke=keys.phone_hpke,
            server=keys.server,
            now_ms=NOW,
        )
    with pytest.raises(AuthorizationError):
        open_notice(
            notice,
            device=DEVICE,
            phone_hpke=keys.phone_hpke,
            server=keys.server,
            now_ms=c.expires_at_ms + 1,
        )
    # A challenge sealed to the phone but signed by someone else is refused.
    forged = Keys()
    forged_notice = build_challenge(
        session_id="s-2",
        device=DEVICE,
        user="alice",
        terminal="t",
        terminal_address="a",
        application="x",
        now_ms=NOW,
        policy=POLICY,
        rng=os.urandom,
        server_signer=forged.server_sign,
        phone_hpke=keys.phone_hpke.public_keyset(),
    ).notice
    with pytest.raises(CryptoError):
        open_notice(
            forged_notice, device=DEVICE, phone_hpke=keys.phone_hpke, server=keys.server, now_ms=NOW
        )


def test_answers_decide_as_the_table_says(keys: Keys) -> None:
    c, _ = challenge(keys)
    login = pending(c)
    assert judge(keys, login, answer(keys, c)) is Input.APPROVE_RIGHT_NUMBER
    assert judge(keys, login, answer(keys, c, number="043")) is Input.APPROVE_WRONG_NUMBER
    assert judge(keys, login, answer(keys, c, "deny")) is Input.DENY
    assert judge(keys, login, answer(keys, c, "fraud")) is Input.FRAUD
    assert judge(keys, login, answer(keys, c), now=c.expires_at_ms + 1) is Input.DEADLINE


def test_bad_answers_are_refused_with_typed_errors(keys: Keys) -> None:
    c, _ = challenge(keys)
    login = pending(c)
    good = answer(keys, c)
    with pytest.raises(AuthorizationError):
        judge(keys, login, good, caller="device/other")
    with pytest.raises(CryptoError):  # signed by another phone's identity key
        judge(keys, login, answer(keys, c, other=True))
    tampered = bytearray(good)
    tampered[-1] ^= 1
    with pytest.raises(CryptoError):
        judge(keys, login, bytes(tampered))
    other, _ = challenge(keys)
    with pytest.raises(CryptoError):  # sealed for another challenge id: info differs
        judge(keys, login, answer(keys, other))
    same_id = replace(other, challenge_id=c.challenge_id)
    with pytest.raises(RemoteProtocolError):  # right id, another session and nonce inside
        judge(keys, login, answer(keys, same_id))
    with pytest.raises(RemoteProtocolError):  # answered long before the challenge existed
        judge(keys, login, answer(keys, c, now=NOW - 120_000))
    with pytest.raises(DecodeError):
        judge(keys, login, b"\x00" * 5000)
    with pytest.raises(LoginFinished):
        judge(keys, replace(login, state=LoginState.DENIED), good)


def test_tokens_verify_only_unexpired_for_their_terminal(keys: Keys) -> None:
    claims = SessionClaims(
        "t-1", "s-1", "alice", "service/term1", "192.0.2.7", "ssh", b"d" * 32, NOW, NOW + 300_000
    )
    token = issue_token(claims, keys.server_sign)
    public = keys.server_sign.public_keyset()
    assert verify_token(token, public, now_ms=NOW + 1, terminal="service/term1") == claims
    with pytest.raises(AuthorizationError):
        verify_token(token, public, now_ms=NOW + 300_000)
    with pytest.raises(AuthorizationError):
        verify_token(token, public, now_ms=NOW + 1, terminal="service/term2")
    with pytest.raises(CryptoError):
        verify_token(token, Keyset.generate("x", ED25519).signer().public_keyset(), now_ms=NOW + 1)


def test_server_keys_are_accepted_only_under_the_pinned_ca(keys: Keys) -> None:
    ca = ec.generate_private_key(ec.SECP256R1())
    doc = ServerKeys(
        keys.server_sign.public_keyset().to_bytes(), keys.server_hpke.public_keyset().to_bytes()
    )
    signed = sign_server_keys(doc, lambda data: ca.sign(data, ec.ECDSA(hashes.SHA256())))
    got = verify_server_keys(signed, ca.public_key())
    assert got.sign.to_bytes() == keys.server_sign.public_keyset().to_bytes()
    with pytest.raises(CryptoError):
        verify_server_keys(signed, ec.generate_private_key(ec.SECP256R1()).public_key())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_fuzz_notices_raise_only_typed_errors(data: bytes) -> None:
    keys = _FUZZ_KEYS
    with pytest.raises(KeybrokerError):
        open_notice(data, device=DEVICE, phone_hpke=keys.phone_hpke, server=keys.server, now_ms=NOW)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_fuzz_answers_raise_only_typed_errors_or_nothing_decides(data: bytes) -> None:
    keys = _FUZZ_KEYS
    c, _ = _FUZZ_CHALLENGE
    with pytest.raises(KeybrokerError):
        judge(keys, pending(c), data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.binary(max_size=800))
def test_fuzz_notice_envelopes_with_garbage_inside(cid: bytes, sealed: bytes) -> None:
    keys = _FUZZ_KEYS
    with pytest.raises(KeybrokerError):
        open_notice(
            Notice(cid, sealed).encode(),
            device=DEVICE,
            phone_hpke=keys.phone_hpke,
            server=keys.server,
            now_ms=NOW,
        )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_fuzz_bus_answers_raise_only_decode_errors_or_come_apart_as_sent(data: bytes) -> None:
    try:
        challenge_id, sealed = read_bus_answer(data)
    except DecodeError:
        return
    # What reads back is exactly an envelope of this shape, and it encodes to the input.
    assert len(challenge_id) == 16 and len(sealed) <= 2048
    assert BusAnswer(challenge_id, sealed).encode() == data


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.binary(max_size=2048))
def test_bus_answer_envelopes_round_trip_and_refuse_other_shapes(cid: bytes, sealed: bytes) -> None:
    c, _ = _FUZZ_CHALLENGE
    assert read_bus_answer(bus_answer(replace(c, challenge_id=cid), sealed)) == (cid, sealed)
    with pytest.raises(DecodeError):
        read_bus_answer(BusAnswer(cid[:15], sealed).encode())
    with pytest.raises(DecodeError):
        read_bus_answer(BusAnswer(cid, sealed + b"\x00" * 2049).encode())
    with pytest.raises(DecodeError):  # a notice is not an answer, though shaped alike
        read_bus_answer(Notice(cid, sealed).encode())


_FUZZ_KEYS = Keys()
_FUZZ_CHALLENGE = challenge(_FUZZ_KEYS)
