# ruff: noqa: E501 - the refusal table reads best one case per line
"""Pairing (S9) with real processes: ``pair controller`` and ``pair device`` over TCP.

The controller is a broker principal: a real ``keybroker serve`` enrols it, and it
holds the common keyset ``pairing/home`` through a real delivery (module fixture).
A genuine device pairs and exchanges messages; then every refusal of the issue's
acceptance list happens before any key leaves the controller, each with its own
reason printed by both sides. Attacks a device CLI cannot mount (a replayed proof,
garbage DER) come from an adversarial device in this process, speaking the wire
protocol over a socket to the real controller process.

Until ``pair`` is registered on ``keybroker``, the processes run
``python -m keybroker.flows.pairing.cli``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from tests.flows.pairing.pairing_kit import LAMP, PLUG, Pki, ca_key, make_pki, raw_device, usage

from keybroker.client.keyring import KekSource, Keyring
from keybroker.flows.pairing.code import PairingCode
from keybroker.flows.pairing.framing import frame, read_frame, write_frame
from keybroker.flows.pairing.manufacturer import ProvisionedDevice
from keybroker.flows.pairing.messages import DeviceProof, Hello, Refusal
from keybroker.flows.pairing.protocol import Device, Send
from keybroker.keys import SECRET_ACCESS, CertificateKey
from keybroker.pki import certificate_der, certificate_pem

from .processes import KB, PASSPHRASE, Env, free_port

PAIR = [*KB, "pair"]
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
    env.run("init")
    port = free_port()
    server = env.serve(port)
    url = f"https://127.0.0.1:{port}"
    try:
        token = env.run("principal", "token", CONTROLLER).stdout.strip().splitlines()[-1]
        env.run(
            "enroll", CONTROLLER, "--url", url, "--ca", str(env.home / "ca.pem"),
            "--token", token, "--keyring", "ctl.keyring",
        )  # fmt: skip
        env.run("keyset", "create", KEYSET)
        env.run("grant", "add", CONTROLLER, KEYSET)
        env.run("delivery", "create", KEYSET, CONTROLLER)
        env.run("receive", "--keyring", "ctl.keyring", "--wait", "10", "--url", url)
        now = datetime.now(UTC).replace(microsecond=0)
        yield World(env, base, make_pki("Acme", 20, now - 30 * DAY), now, base / "ctl.keyring", url)
    finally:
        server.terminate()
        server.wait(timeout=20)


def start_device(world: World, directory: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [*PAIR, "device", "--cert", str(directory / "device.pem"), "--key",
         str(directory / "device.key")],
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
    world: World, port: int, code: PairingCode, *extra: str, trust: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PAIR, "controller", "--connect", f"127.0.0.1:{port}", "--code", code.to_uri(),
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
    device, port = start_device(world, world.files("genuine", chain, key))
    done = controller(
        world, port, PairingCode.for_certificate(chain[0]), "--sync",
        "--message", "turn on", "--message", "dim to 40%",
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
    proof_for: callable, captured: list[bytes]
) -> tuple[asyncio.AbstractServer, int]:  # type: ignore[valid-type]
    """A device that answers the Hello with ``proof_for(hello)`` and records every frame."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_frame(reader)
        assert hello is not None
        captured.append(hello)
        await write_frame(writer, proof_for(hello))
        while (data := await read_frame(reader)) is not None:
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
        server, port = await _adversary(honest, [])
        async with server:
            status, _, err = await _controller_async(
                world, port, PairingCode.for_certificate(chain[0]), "--timeout", "5"
            )
            # The adversary never confirms the key: the controller gives up (no confirmation).
            assert status == 2, err

    asyncio.run(run())
    return proofs[0], PairingCode.for_certificate(chain[0])


def _attack(world: World, code: PairingCode, proof_for) -> tuple[int, str, list[bytes]]:  # type: ignore[no-untyped-def]
    captured: list[bytes] = []

    async def run() -> tuple[int, str]:
        server, port = await _adversary(proof_for, captured)
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

    _, _, seen = _attack(world, PairingCode.for_certificate(chain[0]), honest)
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
