"""The sans-IO pairing machines, wired together in memory."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keybroker.encoding import Message
from keybroker.errors import CryptoError, LocalProtocolError, RemoteProtocolError
from keybroker.flows.pairing.code import PairingCode
from keybroker.flows.pairing.messages import (
    DeviceProof,
    Hello,
    KeyConfirmation,
    KeyDelivery,
    Record,
    Refusal,
)
from keybroker.flows.pairing.protocol import (
    CONTROLLER_TRANSITIONS,
    DEVICE_TRANSITIONS,
    Controller,
    ControllerState,
    Device,
    DevicePaired,
    DeviceState,
    KeyInstalled,
    MessageReceived,
    PairingRefused,
    Send,
)
from keybroker.flows.pairing.refusals import RefusalReason
from keybroker.flows.pairing.verification import DevicePolicy
from keybroker.pki import DeviceIdentity, certificate_der

from .conftest import Wire, common_keyset, common_material, make_controller, make_device
from .pairing_kit import LAMP, NOW, PLUG, acme, code_for, device_key

WireFactory = Callable[[Controller, Device], Wire]


def paired(wire: WireFactory, kind: str = "p256") -> Wire:
    key = device_key(kind)
    device = make_device(key)
    w = wire(make_controller(code_for(acme().device(key=key))), device)
    w.run(w.controller.start())
    return w


@pytest.mark.parametrize("kind", ["p256", "rsa2048"])
def test_genuine_device_pairs_and_both_talk_under_the_common_key(
    wire: WireFactory, kind: str
) -> None:
    w = paired(wire, kind)
    assert w.controller.state is ControllerState.PAIRED
    assert w.device.state is DeviceState.PAIRED
    done = [e for e in w.events if isinstance(e, DevicePaired | KeyInstalled)]
    assert {type(e) for e in done} == {DevicePaired, KeyInstalled}
    assert w.device.keyset is not None
    assert w.device.keyset.versions[0].key_id == w.controller._common.versions[0].key_id
    scheme = KeyDelivery.decode(w.sent_by_controller[1]).scheme
    assert scheme == ("rsa-oaep-sha256" if kind != "p256" else "hpke-p256-hkdf-sha256-aes128gcm")
    (record,) = w.controller.send(b"turn on")
    assert isinstance(record, Send)
    assert w.device.receive(record.data, NOW) == [MessageReceived(b"turn on")]
    (reply,) = w.device.send(b"on")
    assert isinstance(reply, Send)
    assert w.controller.receive(reply.data, NOW) == [MessageReceived(b"on")]


def test_common_key_never_in_the_clear_nor_in_any_repr(wire: WireFactory) -> None:
    common = common_keyset()
    key = device_key()
    w = wire(make_controller(code_for(acme().device(key=key)), common=common), make_device(key))
    w.run(w.controller.start())
    secret = common_material(common)
    assert w.controller.state is ControllerState.PAIRED
    assert not any(secret in data for data in w.sent_by_controller)
    shown = " ".join(repr(x) for x in (w.controller, w.device, w.device.keyset, common, *w.events))
    shown += repr(KeyDelivery.decode(w.sent_by_controller[1]))
    assert secret.hex() not in shown and repr(secret) not in shown


def test_record_replay_reorder_and_reflection_are_refused(wire: WireFactory) -> None:
    w = paired(wire)
    first = w.controller.send(b"one")[0]
    second = w.controller.send(b"two")[0]
    assert isinstance(first, Send) and isinstance(second, Send)
    with pytest.raises(RemoteProtocolError):
        w.device.receive(second.data, NOW)  # out of order
    w2 = paired(wire)
    r = w2.controller.send(b"one")[0]
    assert isinstance(r, Send)
    w2.device.receive(r.data, NOW)
    with pytest.raises(RemoteProtocolError):
        w2.device.receive(r.data, NOW)  # replayed
    w3 = paired(wire)
    own = w3.controller.send(b"mine")[0]
    assert isinstance(own, Send)
    with pytest.raises(CryptoError):
        w3.controller.receive(own.data, NOW)  # reflected: sender is bound into the AAD


def run_to_proof(controller: Controller, device: Device) -> tuple[bytes, bytes]:
    (hello,) = controller.start()
    assert isinstance(hello, Send)
    (proof,) = device.receive(hello.data, NOW)
    assert isinstance(proof, Send)
    return hello.data, proof.data


def assert_refused(controller: Controller, proof: bytes, reason: RefusalReason) -> list[bytes]:
    events = controller.receive(proof, NOW)
    sent = [e.data for e in events if isinstance(e, Send)]
    (refused,) = [e for e in events if isinstance(e, PairingRefused)]
    assert refused.reason is reason and refused.by_us
    assert controller.state is ControllerState.REFUSED
    assert [Refusal.decode(s).reason for s in sent] == [reason.value]
    return sent


def test_replayed_proof_from_an_earlier_session_is_refused(wire: WireFactory) -> None:
    key = device_key()
    code = code_for(acme().device(key=key))
    _, old_proof = run_to_proof(make_controller(code), make_device(key))
    fresh = make_controller(code)
    fresh.start()
    assert_refused(fresh, old_proof, RefusalReason.REPLAYED_PROOF)


def test_proof_with_fresh_nonce_but_old_signature_is_a_bad_proof() -> None:
    key = device_key()
    code = code_for(acme().device(key=key))
    _, old = run_to_proof(make_controller(code), make_device(key))
    fresh = make_controller(code)
    (hello,) = fresh.start()
    assert isinstance(hello, Send)
    stale = DeviceProof.decode(old)
    spliced = DeviceProof(
        controller_nonce=Hello.decode(hello.data).nonce,
        device_nonce=stale.device_nonce,
        chain=stale.chain,
        signature=stale.signature,
    )
    assert_refused(fresh, spliced.encode(), RefusalReason.BAD_PROOF)


def test_certificate_of_device_x_cannot_pair_as_device_y() -> None:
    x_key, y_key = device_key("p256", 0), device_key("p256", 1)
    pki = acme()
    y_cert = pki.device(PLUG, key=y_key)
    code_y = code_for(y_cert)
    # X presents its own genuine certificate against Y's code: identity mismatch.
    controller = make_controller(code_y)
    _, proof = run_to_proof(controller, make_device(x_key))
    assert_refused(controller, proof, RefusalReason.IDENTITY_MISMATCH)
    # X presents Y's certificate (public, copied) but signs with its own key: bad proof.
    controller = make_controller(code_y)
    (hello,) = controller.start()
    assert isinstance(hello, Send)
    x_device = make_device(x_key)
    genuine = DeviceProof.decode(x_device.receive(hello.data, NOW)[0].data)  # type: ignore[union-attr]
    forged = DeviceProof(
        controller_nonce=genuine.controller_nonce,
        device_nonce=genuine.device_nonce,
        chain=[certificate_der(y_cert), certificate_der(pki.intermediate.certificate)],
        signature=genuine.signature,
    )
    assert_refused(controller, forged.encode(), RefusalReason.BAD_PROOF)
    # And X's own certificate re-issued with Y's identification info but X's key: key hash.
    x_as_y = pki.device(PLUG, key=x_key)
    controller = make_controller(code_y)
    device = make_device(x_key, [x_as_y, pki.intermediate.certificate])
    _, proof = run_to_proof(controller, device)
    assert_refused(controller, proof, RefusalReason.PUBLIC_KEY_MISMATCH)


def test_delivery_for_another_session_does_not_open() -> None:
    key = device_key()
    code = code_for(acme().device(key=key))
    controller, device = make_controller(code), make_device(key)
    _, proof = run_to_proof(controller, device)
    (delivery,) = controller.receive(proof, NOW)
    assert isinstance(delivery, Send)
    other_controller, other_device = make_controller(code), make_device(key)
    run_to_proof(other_controller, other_device)
    with pytest.raises(RemoteProtocolError):
        other_device.receive(delivery.data, NOW)
    assert other_device.state is DeviceState.ERROR and other_device.keyset is None


def test_wrong_key_confirmation_is_refused(wire: WireFactory) -> None:
    key = device_key()
    controller = make_controller(code_for(acme().device(key=key)))
    _, proof = run_to_proof(controller, make_device(key))
    controller.receive(proof, NOW)
    bad = KeyConfirmation(mac=b"\x01" + bytes(36)).encode()
    events = controller.receive(bad, NOW)
    assert controller.state is ControllerState.REFUSED
    assert any(
        isinstance(e, PairingRefused) and e.reason is RefusalReason.KEY_CONFIRMATION_FAILED
        for e in events
    )


def test_device_hears_the_refusal_reason() -> None:
    key = device_key()
    controller = make_controller(code_for(acme().device(PLUG, key=device_key("p256", 1))))
    device = make_device(key)
    _, proof = run_to_proof(controller, device)
    (refusal,) = [e for e in controller.receive(proof, NOW) if isinstance(e, Send)]
    (heard,) = device.receive(refusal.data, NOW)
    assert isinstance(heard, PairingRefused) and not heard.by_us
    assert heard.reason is RefusalReason.IDENTITY_MISMATCH
    assert device.state is DeviceState.REFUSED


WIRE = [Hello, DeviceProof, KeyDelivery, KeyConfirmation, Record, Refusal]


@pytest.mark.parametrize("state", list(ControllerState))
@pytest.mark.parametrize("kind", WIRE)
def test_controller_table_is_the_only_way_to_move(state: ControllerState, kind: type) -> None:
    controller = make_controller(code_for(acme().device()))
    controller.state = state
    samples: dict[type, Message] = {
        Hello: Hello(controller="x", nonce=bytes(32)),
        DeviceProof: DeviceProof(
            controller_nonce=bytes(32), device_nonce=bytes(32), chain=[b"x"], signature=b"s"
        ),
        KeyDelivery: KeyDelivery(keyset="k", version=1, scheme="s", sealed=b"x"),
        KeyConfirmation: KeyConfirmation(mac=b"m"),
        Record: Record(seq=0, ciphertext=b"c"),
        Refusal: Refusal(reason="expired", detail="d"),
    }
    if (state, kind) in CONTROLLER_TRANSITIONS:
        return  # allowed inputs are exercised by the pairing tests
    with pytest.raises(RemoteProtocolError):
        controller.receive(samples[kind].encode(), NOW)
    assert controller.state is ControllerState.ERROR


@pytest.mark.parametrize("state", list(DeviceState))
def test_device_refuses_everything_outside_its_table(state: DeviceState) -> None:
    for kind in (DeviceProof, KeyConfirmation, Hello, KeyDelivery, Record):
        device = make_device()
        device.state = state
        if (state, kind) in DEVICE_TRANSITIONS:
            continue
        data = {
            DeviceProof: DeviceProof(
                controller_nonce=bytes(32), device_nonce=bytes(32), chain=[b"x"], signature=b"s"
            ),
            KeyConfirmation: KeyConfirmation(mac=b"m"),
            Hello: Hello(controller="x", nonce=bytes(32)),
            KeyDelivery: KeyDelivery(keyset="k", version=1, scheme="s", sealed=b"x"),
            Record: Record(seq=0, ciphertext=b"c"),
        }[kind].encode()
        with pytest.raises(RemoteProtocolError):
            device.receive(data, NOW)
        assert device.state is DeviceState.ERROR


def test_local_misuse_is_a_local_error() -> None:
    controller = make_controller(code_for(acme().device()))
    with pytest.raises(LocalProtocolError):
        controller.send(b"too early")
    with pytest.raises(LocalProtocolError):
        make_device().send(b"too early")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_peer_garbage_raises_only_remote_protocol_errors(data: bytes) -> None:
    controller = make_controller(code_for(acme().device()))
    controller.start()
    try:
        controller.receive(data, NOW)
    except RemoteProtocolError:
        assert controller.state is ControllerState.ERROR
    device = make_device()
    try:
        device.receive(data, NOW)
    except RemoteProtocolError:
        assert device.state is DeviceState.ERROR


def test_device_refuses_a_key_that_is_not_its_certificates() -> None:
    with pytest.raises(LocalProtocolError):
        make_device(
            device_key("p256", 1),
            [acme().device(key=device_key()), acme().intermediate.certificate],
        )


def test_pairing_code_round_trip_and_strictness() -> None:
    code = code_for(acme().device())
    assert PairingCode.from_uri(code.to_uri()) == code
    assert code.identity == LAMP
    text = code.to_uri()
    bad = [
        text.replace("V:1", "V:2"),
        text.replace(LAMP.hardware_id, LAMP.hardware_id.upper()),
        text[:-1],
        text + "x",
        text.replace("keybroker-pair:", "DPP:"),
        text.replace(";P:", ";X:"),
        "keybroker-pair:" + "A" * 300,
    ]
    from keybroker.errors import DecodeError

    for candidate in bad:
        with pytest.raises(DecodeError):
            PairingCode.from_uri(candidate)
    with pytest.raises(DecodeError):
        DeviceIdentity("has space", "0024be804ff1", "m")
    assert os.urandom  # the machines take randomness as an argument; drivers pass os.urandom


def test_records_go_out_under_the_version_delivered(wire: WireFactory) -> None:
    """The primary is used as is (no copy); a non-primary version is delivered from a
    private copy; and if the shared keyset's primary moves mid-session, sending is refused
    rather than sealed under a version the device does not hold."""
    key = device_key()
    code = code_for(acme().device(key=key))
    common = common_keyset()
    v2 = common.add().version  # pending for now

    w = wire(make_controller(code, common=common), make_device(key))
    assert w.controller._common is common
    w.run(w.controller.start())
    assert w.controller.state is ControllerState.PAIRED
    common.promote(v2)  # someone rotates the held keyset while the session runs
    with pytest.raises(LocalProtocolError, match="primary changed"):
        w.controller.send(b"turn on")

    pki = acme()
    policy = DevicePolicy((pki.root.certificate,), tuple(pki.crls()), 1)
    pinned = Controller(expected=code, policy=policy, common=common, version=1, rng=os.urandom)
    assert pinned._common is not common
    w = wire(pinned, make_device(key))
    w.run(pinned.start())
    assert [e.version for e in w.events if isinstance(e, KeyInstalled)] == [1]
    (record,) = pinned.send(b"dim")
    assert isinstance(record, Send)
    assert w.device.receive(record.data, NOW) == [MessageReceived(b"dim")]
    assert common.primary is not None and common.primary.version == v2  # the caller's: as it was
