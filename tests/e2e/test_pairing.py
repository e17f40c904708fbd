# ruff: noqa: E501 - the refusal table reads best one case per line
"""Pairing (S9) with real processes: ``pair controller`` and ``pair device`` over TCP.

The controller is a broker principal: a real ``keybroker serve`` enrols it, and it
holds the common keyset ``pairing/home`` through a real delivery (module fixture).
A genuine device pairs and exchanges messages; then every refusal of the issue's
acceptance list happens before any key leaves the controller, each with its own
reason printed by both sides. Attacks a device CLI cannot mount (a replayed proof,
garbage DER) come from an adversarial device in this process, speaking the wire
protocol over a socket to the real controller process.

The genuine pairings run ``keybroker pair``; the refusal cases run the same Typer
app as ``python -m keybroker.flows.pairing.cli`` (a second less of imports per
process: ``keybroker.cli.main`` loads every command group). The broker side of the
fixture (token, keyset, grant, delivery) is set up in-process against the home;
the controller enrols and receives over the running ``keybroker serve``.
Adversaries close the connection as soon as they have what they came for, so no
case waits for a controller's timeout.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tests.flows.pairing.pairing_kit import LAMP, PLUG, Pki, ca_key, make_pki, raw_device, usage

from keybroker.broker.home import init_home, open_home
from keybroker.broker.service import Broker
from keybroker.client.keyring import KekSource, Keyring
from keybroker.client.principal import PrincipalClient
from keybroker.flows.pairing.code import PairingCode
from keybroker.flows.pairing.crls import CrlPublisher
from keybroker.flows.pairing.framing import frame, read_frame, write_frame
from keybroker.flows.pairing.manufacturer import ProvisionedDevice
from keybroker.flows.pairing.messages import DeviceProof, Hello, Refusal
from keybroker.flows.pairing.protocol import Device, Send
from keybroker.flows.pairing.rekey import PairedDevices
from keybroker.keys import SECRET_ACCESS, CertificateKey
from keybroker.pki import (
    DeviceIdentity,
    certificate_der,
    certificate_pem,
    public_key_fingerprint,
)

from .processes import KB, PASSPHRASE, Env, free_port

PAIR = [sys.executable, "-m", "keybroker.flows.pairing.cli"]
KB_PAIR = [*KB, "pair"]
KEYSET = "pairing/home"
CONTROLLER = "device/ctl1"
DAY = timedelta(days=1)
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


@dataclass
class World:
    env: Env
    dir: Path
    pki: Pki
    now: datetime
    keyring: Path
    url: str

    def common_key(self) -> bytes:
        ring = Keyring.load(self.keyring, KekSource(passphrase=PASSPHRASE))
        return ring.received[KEYSET].export_secret_material(1, SECRET_ACCESS)

    def files(self, name: str, chain: list[x509.Certificate], key: CertificateKey) -> Path:
        directory = self.dir / name
        ProvisionedDevice(key, tuple(chain)).write(directory)
        return directory

    def trust_args(self, crls: list[x509.CertificateRevocationList] | None = None) -> list[str]:
        crls = crls if crls is not None else self.pki.crls(now=self.now - DAY)
        paths = []
        for i, crl in enumerate(crls):
            path = self.dir / f"crl-{time.monotonic_ns()}-{i}.pem"
            from cryptography.hazmat.primitives import serialization

            path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
            paths.append(path)
        root = self.dir / "root.pem"
        root.write_bytes(certificate_pem(self.pki.root.certificate))
        return ["--trust-root", str(root), *[a for p in paths for a in ("--crl", str(p))]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("pairing")
    env = Env(base / "home", base)
    init_home(env.home).close()
    port = free_port()
    server = env.serve(port)
    url = f"https://127.0.0.1:{port}"
    try:
        with open_home(env.home) as home:
            broker = Broker.from_home(home)
            token = broker.create_enrolment_token(CONTROLLER, timedelta(minutes=10)).secret
            ca_pem = certificate_pem(broker.ca_certificate)

        async def enrol() -> None:
            client = await PrincipalClient.enrol(
                url, ca_pem, CONTROLLER, token, base / "ctl.keyring", passphrase=PASSPHRASE
            )
            await client.aclose()

        asyncio.run(enrol())
        with open_home(env.home) as home:
            broker = Broker.from_home(home)
            broker.create_keyset(KEYSET, "AES256_GCM")
            broker.grant(CONTROLLER, KEYSET, "hold")
            broker.deliver(KEYSET, 1, CONTROLLER, timedelta(minutes=10))

        async def receive() -> None:
            async with PrincipalClient.open(base / "ctl.keyring", passphrase=PASSPHRASE) as ctl:
                assert [d.state for d in await ctl.receive(wait=10)] == ["acked"]

        asyncio.run(receive())
        now = datetime.now(UTC).replace(microsecond=0)
        yield World(env, base, make_pki("Acme", 20, now - 30 * DAY), now, base / "ctl.keyring", url)
    finally:
        server.terminate()
        server.wait(timeout=20)


def start_device(
    world: World, directory: Path, cli: list[str] = PAIR, sessions: int = 1
) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [*cli, "device", "--cert", str(directory / "device.pem"), "--key",
         str(directory / "device.key"), "--sessions", str(sessions)],
        cwd=world.dir, env=world.env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"device exited: {proc.stderr.read() if proc.stderr else ''}")
        found = _LISTENING.search(line)
        if found:
            return proc, int(found.group(1))
    raise AssertionError("device did not listen")


def controller(
    world: World,
    port: int,
    code: PairingCode,
    *extra: str,
    trust: list[str] | None = None,
    cli: list[str] = PAIR,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli, "controller", "--connect", f"127.0.0.1:{port}", "--code", code.to_uri(),
         "--keyring", str(world.keyring), "--keyset", KEYSET,
         *(trust if trust is not None else world.trust_args()), *extra],
        cwd=world.dir, env=world.env.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def genuine(
    world: World, identity=LAMP, n: int = 0
) -> tuple[list[x509.Certificate], CertificateKey]:  # type: ignore[no-untyped-def]
    key = CertificateKey.generate("p256")
    cert = world.pki.intermediate.issue_device(
        identity, key.public_key(), world.now - DAY, 90 * DAY
    )
    return [cert, world.pki.intermediate.certificate], key


# -- the genuine device ------------------------------------------------------------------------


def test_genuine_device_pairs_through_the_broker_and_exchanges_messages(world: World) -> None:
    chain, key = genuine(world)
    device, port = start_device(world, world.files("genuine", chain, key), KB_PAIR)
    done = controller(
        world, port, PairingCode.for_certificate(chain[0]), "--sync",
        "--message", "turn on", "--message", "dim to 40%", cli=KB_PAIR,
    )  # fmt: skip
    status, out, err = finish(device)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{KEYSET} v1 sent and confirmed" in done.stdout
    assert "received: ack: turn on" in done.stdout and "received: ack: dim to 40%" in done.stdout
    assert status == 0, err
    assert f"paired: received {KEYSET} v1" in out
    assert "received: turn on" in out and "received: dim to 40%" in out


def test_rsa_device_pairs(world: World) -> None:
    key = CertificateKey.generate("rsa2048")
    cert = world.pki.intermediate.issue_device(PLUG, key.public_key(), world.now - DAY, 90 * DAY)
    device, port = start_device(
        world, world.files("rsa", [cert, world.pki.intermediate.certificate], key)
    )
    done = controller(world, port, PairingCode.for_certificate(cert), "--message", "hi")
    status, _, _ = finish(device)
    assert done.returncode == 0 and status == 0, done.stderr
    assert "received: ack: hi" in done.stdout


# -- refusals with a device process presenting a bad certificate --------------------------------


def _refused_cases(
    world: World,
) -> dict[
    str, tuple[list[x509.Certificate], CertificateKey, PairingCode | None, list[str] | None, str]
]:
    pki, now = world.pki, world.now
    inter = pki.intermediate.certificate
    key = CertificateKey.generate("p256")
    pub = key.public_key()

    def raw(**kw: object) -> x509.Certificate:
        base: dict[str, object] = {
            "public_key": pub, "pki": pki, "issuer_key": 21,
            "not_before": now - DAY, "not_after": now + 90 * DAY,
        }  # fmt: skip
        base.update(kw)
        return raw_device(**base)  # type: ignore[arg-type]

    other = make_pki("Evil", 30, now - 30 * DAY)
    revoked = pki.intermediate.issue_device(LAMP, pub, now - DAY, 90 * DAY)
    two_deep = pki.intermediate2.issue_device(LAMP, pub, now - DAY, 60 * DAY)
    plug_key = CertificateKey.generate("p256")
    plug_code = PairingCode.for_certificate(
        pki.intermediate.issue_device(PLUG, plug_key.public_key(), now - DAY, 90 * DAY)
    )
    from keybroker.pki import public_key_fingerprint

    wrong_hash = PairingCode(LAMP, public_key_fingerprint(plug_key.public_key()))
    revoked_crls = pki.crls([revoked], now=now - DAY)
    return {
        "expired": ([raw(not_before=now - 40 * DAY, not_after=now - DAY), inter], key, None, None, "expired"),
        "not-yet-valid": ([raw(not_before=now + DAY), inter], key, None, None, "not-yet-valid"),
        "wrong-issuer": (
            [other.intermediate.issue_device(LAMP, pub, now - DAY, 90 * DAY), other.intermediate.certificate],
            key, None, None, "untrusted-issuer",
        ),
        "self-signed": (
            [raw(issuer=LAMP.subject(), sign_key=None, issuer_key=21, public_key=pub)], key, None, None, "self-signed",
        ),
        "revoked": ([revoked, inter], key, None, world.trust_args(revoked_crls), "revoked"),
        "wrong-key-usage": ([raw(key_usage=usage(digital_signature=True)), inter], key, None, None, "wrong-key-usage"),
        "identity-not-the-code": ([pki.intermediate.issue_device(LAMP, pub, now - DAY, 90 * DAY), inter], key, plug_code, None, "identity-mismatch"),
        "key-hash-not-the-code": ([pki.intermediate.issue_device(LAMP, pub, now - DAY, 90 * DAY), inter], key, wrong_hash, None, "public-key-mismatch"),
        "chain-too-long": ([two_deep, pki.intermediate2.certificate, inter], key, None, None, "chain-too-long"),
    }  # fmt: skip


REFUSALS = [
    "expired", "not-yet-valid", "wrong-issuer", "self-signed", "revoked", "wrong-key-usage",
    "identity-not-the-code", "key-hash-not-the-code", "chain-too-long",
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_device_is_refused_before_any_key_leaves(world: World, case: str) -> None:
    chain, key, code, trust, reason = _refused_cases(world)[case]
    if case == "self-signed":
        # A self-signed certificate must be signed by its own key.
        chain = [raw_device(
            issuer=LAMP.subject(), public_key=key.public_key(), sign_key=key._key, pki=world.pki,
            not_before=world.now - DAY, not_after=world.now + 90 * DAY, issuer_key=21,
        )]  # fmt: skip
    device, port = start_device(world, world.files(case, chain, key))
    done = controller(world, port, code or PairingCode.for_certificate(chain[0]), trust=trust)
    status, out, err = finish(device)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"refused: {reason}:" in done.stderr
    assert status == 2
    assert f"refused by the peer: {reason}:" in err
    assert "paired" not in out


# -- attacks from a device in this process --------------------------------------------------


async def _adversary(
    proof_for: callable,  # type: ignore[valid-type]
    captured: list[bytes],
    frames: int | None = None,
) -> tuple[asyncio.AbstractServer, int]:
    """A device that answers the Hello with ``proof_for(hello)`` and records every frame;
    it hangs up after ``frames`` more frames (None: when the controller does). A device
    that is sent the key never confirms it, so it hangs up after the KeyDelivery
    (``frames=1``) rather than make the controller wait for its timeout."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_frame(reader)
        assert hello is not None
        captured.append(hello)
        await write_frame(writer, proof_for(hello))
        while (frames is None or len(captured) <= frames) and (
            data := await read_frame(reader)
        ) is not None:
            captured.append(data)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def _controller_async(
    world: World, port: int, code: PairingCode, *extra: str
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *PAIR, "controller", "--connect", f"127.0.0.1:{port}", "--code", code.to_uri(),
        "--keyring", str(world.keyring), "--keyset", KEYSET, *world.trust_args(), *extra,
        cwd=world.dir, env=world.env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


def _record_genuine_proof(world: World) -> tuple[bytes, PairingCode]:
    """One genuine session against the controller process; returns the device's proof bytes."""
    chain, key = genuine(world)
    proofs: list[bytes] = []

    def honest(hello: bytes) -> bytes:
        device = Device(key=key, chain=chain, rng=os.urandom)
        (proof,) = device.receive(hello, datetime.now(UTC))
        assert isinstance(proof, Send)
        proofs.append(proof.data)
        return proof.data

    async def run() -> None:
        server, port = await _adversary(honest, [], frames=1)
        async with server:
            status, _, err = await _controller_async(
                world, port, PairingCode.for_certificate(chain[0])
            )
            # The adversary hangs up instead of confirming the key: the controller fails.
            assert status == 2 and "closed the connection" in err, err

    asyncio.run(run())
    return proofs[0], PairingCode.for_certificate(chain[0])


def _attack(
    world: World, code: PairingCode, proof_for, frames: int | None = None
) -> tuple[int, str, list[bytes]]:  # type: ignore[no-untyped-def]
    captured: list[bytes] = []

    async def run() -> tuple[int, str]:
        server, port = await _adversary(proof_for, captured, frames)
        async with server:
            status, _, err = await _controller_async(world, port, code)
        return status, err

    status, err = asyncio.run(run())
    return status, err, captured


def test_replayed_signature_from_an_earlier_session_is_refused(world: World) -> None:
    old_proof, code = _record_genuine_proof(world)
    status, err, captured = _attack(world, code, lambda hello: old_proof)
    assert status == 2 and "refused: replayed-proof:" in err
    assert Refusal.decode(captured[-1]).reason == "replayed-proof"


@pytest.mark.parametrize("mangle", ["garbage", "truncated"])
def test_truncated_or_garbage_der_is_refused(world: World, mangle: str) -> None:
    chain, _ = genuine(world)

    def proof_for(hello: bytes) -> bytes:
        leaf = certificate_der(chain[0])
        bad = (
            b"\x30\x82\x02\x00" + os.urandom(60) if mangle == "garbage" else leaf[: len(leaf) // 2]
        )
        return DeviceProof(
            controller_nonce=Hello.decode(hello).nonce, device_nonce=os.urandom(32),
            chain=[bad, certificate_der(chain[1])], signature=b"\x30" * 70,
        ).encode()  # fmt: skip

    status, err, captured = _attack(world, PairingCode.for_certificate(chain[0]), proof_for)
    assert status == 2 and "refused: malformed-certificate:" in err
    assert Refusal.decode(captured[-1]).reason == "malformed-certificate"


def test_refused_device_receives_no_key_material(world: World) -> None:
    """Every byte A sends to a refused device, captured; the common key is in none of them."""
    secret = world.common_key()
    plug_key = CertificateKey.generate("p256")
    plug = world.pki.intermediate.issue_device(
        PLUG, plug_key.public_key(), world.now - DAY, 9 * DAY
    )
    x_chain, x_key = genuine(world)

    def x_pretending(hello: bytes) -> bytes:  # device X's genuine proof, against Y's code
        (proof,) = Device(key=x_key, chain=x_chain, rng=os.urandom).receive(
            hello, datetime.now(UTC)
        )
        assert isinstance(proof, Send)
        return proof.data

    status, err, captured = _attack(world, PairingCode.for_certificate(plug), x_pretending)
    assert status == 2 and "refused: identity-mismatch:" in err
    everything = b"".join(frame(c) for c in captured)
    assert captured and secret not in everything and secret.hex().encode() not in everything
    assert b"keybroker/pairing/key-delivery" not in everything
    assert [Hello.LABEL in c.decode("latin-1") for c in captured] == [True, False]
    # The same capture on a genuine device does see a delivery (so the check above can fail).
    chain, key = genuine(world)

    def honest(hello: bytes) -> bytes:
        (proof,) = Device(key=key, chain=chain, rng=os.urandom).receive(hello, datetime.now(UTC))
        assert isinstance(proof, Send)
        return proof.data

    _, _, seen = _attack(world, PairingCode.for_certificate(chain[0]), honest, frames=1)
    assert any(b"keybroker/pairing/key-delivery" in c for c in seen)
    assert not any(secret in c for c in seen)  # sealed, never in clear


def test_certificate_for_device_x_cannot_pair_as_device_y(world: World) -> None:
    x_chain, x_key = genuine(world)
    y_key = CertificateKey.generate("p256")
    y_cert = world.pki.intermediate.issue_device(PLUG, y_key.public_key(), world.now - DAY, 9 * DAY)
    device, port = start_device(world, world.files("x-as-y", x_chain, x_key))
    done = controller(world, port, PairingCode.for_certificate(y_cert))
    finish(device)
    assert done.returncode == 2 and "refused: identity-mismatch:" in done.stderr

    # Y's certificate copied onto X (X has no Y key): the device CLI refuses to start, and a
    # hand-made proof with Y's chain and X's signature is a bad proof.
    def y_chain_x_signature(hello: bytes) -> bytes:
        (proof,) = Device(key=x_key, chain=x_chain, rng=os.urandom).receive(
            hello, datetime.now(UTC)
        )
        assert isinstance(proof, Send)
        genuine_proof = DeviceProof.decode(proof.data)
        return DeviceProof(
            controller_nonce=genuine_proof.controller_nonce,
            device_nonce=genuine_proof.device_nonce,
            chain=[certificate_der(y_cert), certificate_der(world.pki.intermediate.certificate)],
            signature=genuine_proof.signature,
        ).encode()

    status, err, _ = _attack(world, PairingCode.for_certificate(y_cert), y_chain_x_signature)
    assert status == 2 and "refused: bad-proof:" in err
    assert ca_key  # the kit's CA keys are what the world's PKI is built from


# -- CRLs published by the broker -------------------------------------------------------------


def test_controller_takes_the_manufacturer_crls_from_the_broker(world: World) -> None:
    """The operator publishes Acme's CRLs on the broker host; a controller given no CRL file
    fetches them (``--crl-from-broker``), verifies them under its Acme root, and refuses the
    device the intermediate's CRL revokes while a genuine one pairs."""
    chain, key = genuine(world)
    revoked_chain, revoked_key = genuine(world, PLUG)
    root_crl, devices_crl, _ = world.pki.crls([revoked_chain[0]], now=world.now - DAY)
    with open_home(world.env.home) as home:  # the root's CRL as `crl-publish` would store it
        CrlPublisher(Broker.from_home(home)).publish(world.pki.root.certificate, root_crl)
    (world.dir / "acme-devices.pem").write_bytes(
        certificate_pem(world.pki.intermediate.certificate)
    )
    (world.dir / "acme-devices.crl").write_bytes(devices_crl.public_bytes(Encoding.PEM))
    published = world.env.run(
        "pair", "crl-publish", "--ca", "acme-devices.pem", "--crl", "acme-devices.crl"
    )
    assert "published CRL number 1 of CN=Acme devices (1 revoked" in published.stdout

    root = world.dir / "root.pem"
    root.write_bytes(certificate_pem(world.pki.root.certificate))
    from_broker = ["--trust-root", str(root), "--crl-from-broker"]
    device, port = start_device(
        world, world.files("broker-crl-revoked", revoked_chain, revoked_key)
    )
    done = controller(world, port, PairingCode.for_certificate(revoked_chain[0]), trust=from_broker)
    status, out, err = finish(device)
    assert "2 CRL(s) from the broker verified" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 2 and "refused: revoked:" in done.stderr
    assert status == 2 and "refused by the peer: revoked:" in err and "paired" not in out

    device, port = start_device(world, world.files("broker-crl-genuine", chain, key), KB_PAIR)
    done = controller(
        world, port, PairingCode.for_certificate(chain[0]), "--message", "hi",
        trust=from_broker, cli=KB_PAIR,
    )  # fmt: skip
    status, _, err = finish(device)
    assert done.returncode == 0 and status == 0, done.stdout + done.stderr + err
    assert "received: ack: hi" in done.stdout


# -- the broker's inventory instead of a pairing code ------------------------------------------


def _pair_from_inventory(
    world: World, port: int, serial: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PAIR, "controller", "--connect", f"127.0.0.1:{port}", "--from-inventory", serial,
         "--keyring", str(world.keyring), "--keyset", KEYSET, *world.trust_args(), *extra],
        cwd=world.dir, env=world.env.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_controller_pairs_from_the_brokers_inventory(world: World) -> None:
    """The operator records two devices at the broker (one from its code, one field by
    field); the controller takes the identity to check from the broker's record: the
    genuine device pairs, a device whose certificate's key is not the recorded one is
    refused before any key leaves, and a removed record is a clear error."""
    lamp = DeviceIdentity("SN-INV-1", "0024be00a001", "lamp-2")
    plug = DeviceIdentity("SN-INV-2", "0024be00a002", "plug-1")
    chain, key = genuine(world, lamp)
    impostor_chain, impostor_key = genuine(world, plug)  # a genuine Acme plug, not the recorded
    recorded_key = CertificateKey.generate("p256")
    code = PairingCode.for_certificate(chain[0])
    broker_side = [*PAIR, "inventory-add", "--operator", "alice"]
    for args in (
        ["--code", code.to_uri()],
        ["--serial", plug.serial, "--hardware-id", "00:24:BE:00:A0:02", "--model", plug.model,
         "--key-sha256", public_key_fingerprint(recorded_key.public_key()).hex()],
    ):  # fmt: skip
        added = subprocess.run(
            [*broker_side, *args], cwd=world.dir, env=world.env.env, capture_output=True,
            text=True, timeout=60, check=False,
        )  # fmt: skip
        assert added.returncode == 0 and "recorded " in added.stdout, added.stdout + added.stderr

    device, port = start_device(world, world.files("inventory-genuine", chain, key))
    done = _pair_from_inventory(world, port, lamp.serial, "--message", "hi")
    status, out, err = finish(device)
    assert done.returncode == 0 and status == 0, done.stdout + done.stderr + err
    assert f"inventory record at the broker: {code.to_uri()}" in done.stdout
    assert f"paired with {lamp}: {KEYSET} v1 sent and confirmed" in done.stdout
    assert "received: ack: hi" in done.stdout

    device, port = start_device(
        world, world.files("inventory-impostor", impostor_chain, impostor_key)
    )
    done = _pair_from_inventory(world, port, plug.serial)
    status, out, err = finish(device)
    assert done.returncode == 2 and "refused: public-key-mismatch:" in done.stderr, done.stderr
    assert status == 2 and "refused by the peer: public-key-mismatch:" in err
    assert "paired" not in out

    removed = subprocess.run(
        [*PAIR, "inventory-remove", "--serial", lamp.serial, "--operator", "bob"],
        cwd=world.dir, env=world.env.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert removed.returncode == 0 and f"removed {lamp}" in removed.stdout, removed.stderr
    done = _pair_from_inventory(world, free_port(), lamp.serial)
    assert done.returncode == 2
    assert f"no inventory record for device serial {lamp.serial}" in done.stderr


# -- rotating the common keyset re-pairs devices ------------------------------------------------

REKEYED = "pairing/rekeyed"  # its own keyset: rotating it leaves the other tests' v1 alone


def test_rotating_the_common_keyset_re_pairs_devices(world: World) -> None:
    """Two devices pair under v1 and are recorded; the operator rotates the keyset and
    delivers v2 to the controller; ``pair rekey`` re-runs the whole pairing with both: the
    genuine device switches to v2 and talks under it, the one revoked meanwhile is refused
    and keeps nothing new."""
    with open_home(world.env.home) as home:
        broker = Broker.from_home(home)
        broker.create_keyset(REKEYED, "AES256_GCM")
        broker.grant(CONTROLLER, REKEYED, "hold")
        broker.deliver(REKEYED, 1, CONTROLLER, timedelta(minutes=10))
    record = world.dir / "rekey-devices.json"
    keep_chain, keep_key = genuine(world)
    gone_chain, gone_key = genuine(world, PLUG)
    devices = []
    for label, chain, key in (("keep", keep_chain, keep_key), ("gone", gone_chain, gone_key)):
        proc, port = start_device(world, world.files(f"rekey-{label}", chain, key), sessions=2)
        devices.append((proc, port))
        done = subprocess.run(
            [*PAIR, "controller", "--connect", f"127.0.0.1:{port}",
             "--code", PairingCode.for_certificate(chain[0]).to_uri(),
             "--keyring", str(world.keyring), "--keyset", REKEYED, "--sync",
             "--devices", str(record), *world.trust_args()],
            cwd=world.dir, env=world.env.env, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0 and f"{REKEYED} v1 sent and confirmed" in done.stdout, (
            done.stdout + done.stderr
        )
    with open_home(world.env.home) as home:  # rotate, deliver the new version, promote it
        broker = Broker.from_home(home)
        assert broker.rotate_keyset(REKEYED).version == 2
        broker.deliver(REKEYED, 2, CONTROLLER, timedelta(minutes=10))
        broker.promote_version(REKEYED, 2)
    revoking = world.pki.crls([gone_chain[0]], now=world.now - DAY)
    rekey = subprocess.run(
        [*PAIR, "rekey", "--keyring", str(world.keyring), "--keyset", REKEYED,
         "--devices", str(record), "--message", "after rotation", *world.trust_args(revoking)],
        cwd=world.dir, env=world.env.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    (keep, _), (gone, _) = devices
    keep_status, keep_out, keep_err = finish(keep)
    gone_status, gone_out, gone_err = finish(gone)
    assert rekey.returncode == 2, rekey.stdout + rekey.stderr  # one device refused
    assert f"{REKEYED} v2: re-pairing 2 device(s)" in rekey.stdout
    assert f"re-paired {LAMP} at" in rekey.stdout and f"{REKEYED} v1 → v2" in rekey.stdout
    assert "received: ack: after rotation" in rekey.stdout
    assert f"refused: {PLUG} at" in rekey.stderr and ": revoked:" in rekey.stderr
    assert "it keeps v1" in rekey.stderr
    # The genuine device took v2 and decrypted the message sent under it.
    assert keep_status == 0, keep_err
    assert f"paired: received {REKEYED} v1" in keep_out
    assert f"paired: received {REKEYED} v2" in keep_out
    assert keep_out.index(f"{REKEYED} v2") < keep_out.index("received: after rotation")
    # The revoked one heard why and received nothing new.
    assert gone_status == 2 and "refused by the peer: revoked:" in gone_err
    assert f"{REKEYED} v2" not in gone_out and "after rotation" not in gone_out
    saved = {d.identity: d for d in PairedDevices.load(record)}
    assert saved[str(LAMP)].version == 2
    assert (saved[str(PLUG)].version, saved[str(PLUG)].refused) == (1, "revoked")
