"""Re-pairing after the common keyset rotates: the continuity rule, the record, the loop."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from cryptography import x509

from keybroker.errors import (
    ConfigurationError,
    DecodeError,
    KeysetError,
    RemoteProtocolError,
    TransportError,
)
from keybroker.flows.pairing.code import PairingCode
from keybroker.flows.pairing.controller import pair_with_device
from keybroker.flows.pairing.device import DeviceSession, serve_device
from keybroker.flows.pairing.messages import KeyDelivery, Refusal
from keybroker.flows.pairing.protocol import (
    Controller,
    ControllerState,
    Device,
    DeviceState,
    KeyInstalled,
    MessageReceived,
    PairingRefused,
    Send,
)
from keybroker.flows.pairing.refusals import RefusalReason
from keybroker.flows.pairing.rekey import (
    PairedDevice,
    PairedDevices,
    default_record_path,
    repair_devices,
    watch,
)
from keybroker.flows.pairing.verification import DevicePolicy
from keybroker.keys import SECRET_ACCESS, CertificateKey, Keyset
from keybroker.pki import DeviceIdentity

from .conftest import Wire, common_keyset
from .pairing_kit import LAMP, NOW, PLUG, acme, code_for, device_key

GONE = DeviceIdentity("SN-0003", "0024be804ff3", "lamp-2")


def policy(revoked: tuple[x509.Certificate, ...] = ()) -> DevicePolicy:
    pki = acme()
    return DevicePolicy((pki.root.certificate,), tuple(pki.crls(list(revoked))), 1)


def controller(
    key: CertificateKey, common: Keyset, version: int, previous: int | None = None
) -> Controller:
    return Controller(
        expected=code_for(acme().device(key=key)),
        policy=policy(),
        common=common,
        version=version,
        rng=os.urandom,
        previous=previous,
    )


def device(key: CertificateKey, held: Keyset | None = None) -> Device:
    pki = acme()
    chain = [pki.device(key=key), pki.intermediate.certificate]
    return Device(key=key, chain=chain, rng=os.urandom, held=held)


def rotated(common: Keyset) -> int:
    version = common.add().version
    common.promote(version)
    return version


def first_pairing(key: CertificateKey, common: Keyset) -> Keyset:
    w = Wire(controller(key, common, 1), device(key))
    w.run(w.controller.start())
    assert w.device.state is DeviceState.PAIRED and w.device.keyset is not None
    return w.device.keyset


# -- the protocol: a paired device takes only a key that continues its own -----------------


def test_rotated_key_replaces_the_old_one_and_records_go_under_it() -> None:
    key, common = device_key(), common_keyset()
    held = first_pairing(key, common)
    v2 = rotated(common)
    w = Wire(controller(key, common, v2, previous=1), device(key, held))
    w.run(w.controller.start())
    assert w.controller.state is ControllerState.PAIRED and w.device.state is DeviceState.PAIRED
    assert [e.version for e in w.events if isinstance(e, KeyInstalled)] == [v2]
    delivery = KeyDelivery.decode(w.sent_by_controller[1])
    assert delivery.previous_version == 1 and delivery.continuity
    assert w.device.keyset is not None
    # One version held: the old key is gone from the device (a revoked peer still has it).
    assert [v.version for v in w.device.keyset.versions] == [v2]
    assert w.device.keyset.versions[0].key_id == common.version(v2).key_id
    (record,) = w.controller.send(b"after rotation")
    assert isinstance(record, Send)
    assert w.device.receive(record.data, NOW) == [MessageReceived(b"after rotation")]
    # And the delivery never carries either version in clear, nor shows it in a repr.
    for version in (1, v2):
        secret = common.export_secret_material(version, SECRET_ACCESS)
        assert not any(secret in data for data in w.sent_by_controller)
        assert secret.hex() not in repr(delivery) + repr(w.device.keyset)


def test_same_version_again_is_a_new_session() -> None:
    key, common = device_key(), common_keyset()
    held = first_pairing(key, common)
    w = Wire(controller(key, common, 1, previous=1), device(key, held))
    w.run(w.controller.start())
    assert w.device.state is DeviceState.PAIRED


def refused_by_device(w: Wire, reason: RefusalReason) -> None:
    w.run(w.controller.start())
    assert w.device.state is DeviceState.REFUSED and w.device.keyset is None
    assert w.controller.state is ControllerState.REFUSED
    said, heard = [e for e in w.events if isinstance(e, PairingRefused)]
    assert said.by_us and said.reason is reason  # the device's own
    assert heard == PairingRefused(reason, said.detail, by_us=False)  # what the controller heard
    assert w.device.refusal == said
    assert w.controller.refusal is not None and w.controller.refusal.reason is reason
    assert not w.controller.refusal.by_us
    assert not any(isinstance(e, KeyInstalled) for e in w.events)


def test_paired_device_refuses_a_key_without_continuity_proof() -> None:
    key, common = device_key(), common_keyset()
    held = first_pairing(key, common)
    rotated(common)
    w = Wire(controller(key, common, 2), device(key, held))
    refused_by_device(w, RefusalReason.NOT_CONTINUOUS)
    assert [v.version for v in held.versions] == [1]  # what it held is untouched


def test_paired_device_refuses_a_controller_of_another_group() -> None:
    """Another controller with a keyset of the same name and version numbers, but other
    key material, cannot move a paired device onto its key."""
    key = device_key()
    held = first_pairing(key, common_keyset())
    other = common_keyset()
    v2 = rotated(other)
    w = Wire(controller(key, other, v2, previous=1), device(key, held))
    refused_by_device(w, RefusalReason.NOT_CONTINUOUS)


def test_paired_device_refuses_a_proof_for_another_version() -> None:
    key, common = device_key(), common_keyset()
    held = first_pairing(key, common)
    v2 = rotated(common)
    w = Wire(controller(key, common, v2, previous=v2), device(key, held))
    refused_by_device(w, RefusalReason.NOT_CONTINUOUS)


def test_paired_device_refuses_an_older_version() -> None:
    key, common = device_key(), common_keyset()
    held = first_pairing(key, common)
    v2 = rotated(common)
    w = Wire(controller(key, common, v2, previous=1), device(key, held))
    w.run(w.controller.start())
    newer = w.device.keyset
    assert newer is not None
    back = Wire(controller(key, common, 1, previous=v2), device(key, newer))
    refused_by_device(back, RefusalReason.STALE_VERSION)


def test_unpaired_device_accepts_a_rekey_as_a_first_pairing() -> None:
    """A device that lost its key (reset) is a new device in pairing mode again."""
    key, common = device_key(), common_keyset()
    v2 = rotated(common)
    w = Wire(controller(key, common, v2, previous=1), device(key))
    w.run(w.controller.start())
    assert w.device.state is DeviceState.PAIRED


def test_controller_must_hold_the_previous_version() -> None:
    key, common = device_key(), common_keyset()
    with pytest.raises(KeysetError):
        controller(key, common, 1, previous=7)


def test_continuity_fields_come_together() -> None:
    half = KeyDelivery(keyset="k", version=2, scheme="s", sealed=b"x", previous_version=1)
    device_ = device(device_key())
    with pytest.raises(DecodeError):
        device_.receive(half.encode(), NOW)
    assert device_.state is DeviceState.ERROR
    assert isinstance(DecodeError("x"), RemoteProtocolError)
    whole = KeyDelivery(
        keyset="k", version=2, scheme="s", sealed=b"", previous_version=1, continuity=b"\x01" * 32
    )
    assert repr(b"\x01" * 32) not in repr(whole) and "previous_version=1" in repr(whole)


# -- the record ---------------------------------------------------------------------------


def test_record_round_trip_holds_nothing_secret(tmp_path: Path) -> None:
    common = common_keyset()
    path = default_record_path(tmp_path / "ctl.keyring")
    assert path.name == "ctl.keyring.devices.json"
    record = PairedDevices.load(path)
    assert list(record) == []
    cert = acme().device(key=device_key())
    record.devices.append(
        PairedDevice(code_for(cert).to_uri(), "127.0.0.1:7400", common.name, 1, "ab" * 32)
    )
    record.save()
    again = PairedDevices.load(path)
    assert again.devices == record.devices
    assert again.devices[0].identity == str(LAMP)
    text = path.read_bytes()
    secret = common.export_secret_material(1, SECRET_ACCESS)
    assert secret not in text and secret.hex().encode() not in text
    assert again.due(common.name, 2) == again.devices and again.due(common.name, 1) == []
    assert again.due("other/keyset", 2) == []


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b'{"format": "other", "devices": []}',
        b'{"format": "keybroker/pairing/paired-devices/v1", "devices": [{"code": "x"}]}',
        json.dumps({
            "format": "keybroker/pairing/paired-devices/v1",
            "devices": [{"code": "DPP:nope", "address": "h:1", "keyset": "k", "version": 1,
                         "certificate_sha256": ""}],
        }).encode(),
    ],
)  # fmt: skip
def test_a_bad_record_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "devices.json"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError):
        PairedDevices.load(path)


# -- the driver: re-pair every recorded device over TCP -------------------------------------


class FakeDevice:
    """A device process in miniature: serves pairings, keeping its key across sessions."""

    def __init__(self, key: CertificateKey, identity=LAMP) -> None:  # type: ignore[no-untyped-def]
        pki = acme()
        self.key = key
        self.chain = [pki.device(identity, key=key), pki.intermediate.certificate]
        self.code = PairingCode.for_certificate(self.chain[0])
        self.sessions: list[DeviceSession] = []
        self.port = 0
        self._listening = asyncio.Event()

    @property
    def held(self) -> Keyset | None:
        done = [s.keyset for s in self.sessions if s.keyset is not None]
        return done[-1] if done else None

    async def serve(self) -> None:
        def listening(_: str, port: int) -> None:
            self.port = port
            self._listening.set()

        await serve_device(
            "127.0.0.1",
            0,
            lambda: Device(key=self.key, chain=self.chain, rng=os.urandom, held=self.held),
            respond=lambda m: b"ack: " + m,
            on_listening=listening,
            on_session=self.sessions.append,
            sessions=None,
            clock=lambda: NOW,
        )

    async def started(self) -> None:
        await self._listening.wait()


async def _pair_first(record: PairedDevices, dev: FakeDevice, common: Keyset) -> None:
    machine = Controller(
        expected=dev.code, policy=policy(), common=common, version=1, rng=os.urandom
    )
    outcome = await pair_with_device("127.0.0.1", dev.port, machine, clock=lambda: NOW)
    assert outcome.paired is not None
    record.paired(dev.code, f"127.0.0.1:{dev.port}", outcome.paired)
    record.save()


def test_repair_devices_rekeys_the_genuine_and_refuses_the_revoked(tmp_path: Path) -> None:
    async def run() -> None:
        common = common_keyset()
        good, revoked = FakeDevice(device_key("p256", 0)), FakeDevice(device_key("p256", 1), PLUG)
        tasks = [asyncio.create_task(d.serve()) for d in (good, revoked)]
        try:
            for d in (good, revoked):
                await d.started()
            record = PairedDevices.load(tmp_path / "devices.json")
            for d in (good, revoked):
                await _pair_first(record, d, common)
            # Gone from the network: reported, and tried again next time.
            record.devices.append(
                PairedDevice(
                    FakeDevice(device_key("p256", 2), GONE).code.to_uri(),
                    "127.0.0.1:1",
                    common.name,
                    1,
                    "00" * 32,
                )
            )
            record.save()
            v2 = rotated(common)
            results = await repair_devices(
                PairedDevices.load(record.path),
                common=common,
                version=v2,
                policy=policy((revoked.chain[0],)),
                rng=os.urandom,
                messages=[b"hello v2"],
                clock=lambda: NOW,
                timeout=10,
            )
            by = {r.device.identity: r for r in results}
            ok = by[str(LAMP)]
            assert ok.ok and ok.paired is not None and ok.paired.version == v2
            assert ok.replies == [b"ack: hello v2"]
            assert good.held is not None and [v.version for v in good.held.versions] == [v2]
            assert good.sessions[-1].received == [b"hello v2"]
            no = by[str(PLUG)]
            assert not no.ok and no.refusal is not None
            assert no.refusal.reason is RefusalReason.REVOKED and no.refusal.by_us
            # The revoked device was told why and got nothing new: it still holds v1.
            assert revoked.sessions[-1].refusal is not None
            assert revoked.sessions[-1].installed is None
            assert revoked.held is not None and [v.version for v in revoked.held.versions] == [1]
            (gone,) = [r for r in results if r.device.address == "127.0.0.1:1"]
            assert gone.error and not gone.ok

            saved = {d.address: d for d in PairedDevices.load(record.path)}
            assert saved[f"127.0.0.1:{good.port}"].version == v2
            assert saved[f"127.0.0.1:{good.port}"].refused is None
            refused = saved[f"127.0.0.1:{revoked.port}"]
            assert (refused.version, refused.refused, refused.refused_version) == (1, "revoked", v2)
            # Next round: nothing to do for this version but the unreachable device.
            due = PairedDevices.load(record.path).due(common.name, v2)
            assert [d.address for d in due] == ["127.0.0.1:1"]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


def test_refused_device_is_sent_no_key_material(tmp_path: Path) -> None:
    """Every frame the re-pairing controller sends to a revoked device, captured."""
    common = common_keyset()
    v2 = rotated(common)
    key = device_key("p256", 1)
    cert = acme().device(PLUG, key=key)
    captured: list[bytes] = []

    async def fake_pair(host: str, port: int, machine: Controller, **_: object):  # type: ignore[no-untyped-def]
        from keybroker.flows.pairing.controller import ControllerOutcome

        dev = Device(key=key, chain=[cert, acme().intermediate.certificate], rng=os.urandom)
        (hello,) = machine.start()
        assert isinstance(hello, Send)
        captured.append(hello.data)
        (proof,) = dev.receive(hello.data, NOW)
        assert isinstance(proof, Send)
        events = machine.receive(proof.data, NOW)
        captured.extend(e.data for e in events if isinstance(e, Send))
        refusal = next(e for e in events if isinstance(e, PairingRefused))
        return ControllerOutcome(refusal=refusal)

    record = PairedDevices(tmp_path / "d.json")
    record.devices.append(PairedDevice(code_for(cert).to_uri(), "127.0.0.1:9", common.name, 1, ""))
    (result,) = asyncio.run(
        repair_devices(
            record,
            common=common,
            version=v2,
            policy=policy((cert,)),
            rng=os.urandom,
            clock=lambda: NOW,
            pair=fake_pair,
        )
    )
    assert result.refusal is not None and result.refusal.reason is RefusalReason.REVOKED
    assert [Refusal.decode(captured[-1]).reason] == ["revoked"] and len(captured) == 2
    everything = b"".join(captured)
    for version in (1, v2):
        assert common.export_secret_material(version, SECRET_ACCESS) not in everything
    assert b"key-delivery" not in everything


# -- watch ----------------------------------------------------------------------------------


def test_watch_runs_rounds_until_stopped_and_survives_a_failed_round() -> None:
    async def run() -> tuple[int, list[BaseException], int]:
        stop = asyncio.Event()
        calls = 0
        errors: list[BaseException] = []

        async def round_() -> None:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise TransportError("broker unreachable")
            if calls == 3:
                stop.set()

        rounds = await watch(round_, interval=0.001, stop=stop, on_error=errors.append)
        return rounds, errors, calls

    rounds, errors, calls = asyncio.run(run())
    assert calls == rounds == 3
    assert [str(e) for e in errors] == ["broker unreachable"]
    with pytest.raises(ValueError):
        asyncio.run(watch(lambda: asyncio.sleep(0), interval=0, stop=asyncio.Event()))
