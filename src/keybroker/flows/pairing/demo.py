"""The ``device pairing`` stage of ``keybroker demo``: S9 with real processes, on loopback.

Against the demo's running ``keybroker serve``:

* the controller ``device/hub`` enrols like any principal and is given the common
  keyset ``pairing/home`` (a ``hold`` grant and a delivery it picks up itself with
  ``--sync``);
* a manufacturer ("Acme": root → intermediate → devices) provisions a lamp and a
  plug, and then revokes the plug; the operator publishes both CRLs on the broker
  host (what ``keybroker pair crl-publish`` does, in-process against the home);
* ``keybroker pair device`` runs the lamp; ``keybroker pair controller`` with the
  lamp's label code and ``--crl-from-broker`` checks it (chain to the Acme root,
  CRLs fetched from the broker and verified under that root, identification info
  and key hash against the code, proof of possession), sends the common key and
  exchanges two messages under it;
* before that, a controller holding the *plug's* label code reaches the lamp: the
  lamp's certificate is genuine but names another device, so it is refused
  (identity-mismatch);
* the plug, revoked on the CRL the broker relays, is refused (revoked): both sides
  print the reason, and the plug never receives a key.

Logs are in ``<demo workdir>/pairing`` (kept with ``keybroker demo --keep``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Protocol

from rich.console import Console
from rich.markup import escape

from keybroker.broker.home import open_home
from keybroker.broker.service import Broker
from keybroker.client.principal import PrincipalClient
from keybroker.flows._demo import DemoProcesses
from keybroker.flows.pairing.cli import PASSPHRASE_ENV
from keybroker.flows.pairing.crls import CrlPublisher
from keybroker.flows.pairing.manufacturer import Manufacturer
from keybroker.pki import DeviceIdentity, certificate_pem

__all__ = ["stage_pairing"]

CONTROLLER: Final = "device/hub"
KEYSET: Final = "pairing/home"
PASSPHRASE: Final = "demo pairing keyring passphrase"  # noqa: S105 - a throwaway demo keyring
LAMP: Final = DeviceIdentity("SN-0001", "0024be804ff1", "lamp-2")
PLUG: Final = DeviceIdentity("SN-0002", "0024be804ff2", "plug-1")
RUN_TIMEOUT: Final = 90.0


class DemoContext(Protocol):
    """What the stage needs of ``keybroker.cli.demo.DemoState`` (flows do not import cli)."""

    workdir: Path
    url: str
    console: Console | None


def _controller_setup(s: DemoContext, directory: Path) -> None:
    """Enrol ``device/hub`` over the API and send it the common keyset (it acks with --sync)."""
    with open_home(s.workdir / "home") as home:
        broker = Broker.from_home(home)
        token = broker.create_enrolment_token(CONTROLLER, timedelta(minutes=10)).secret
        ca_pem = certificate_pem(broker.ca_certificate)

    async def enrol() -> None:
        client = await PrincipalClient.enrol(
            s.url, ca_pem, CONTROLLER, token, directory / "hub.keyring", passphrase=PASSPHRASE
        )
        await client.aclose()

    asyncio.run(enrol())
    with open_home(s.workdir / "home") as home:
        broker = Broker.from_home(home)
        broker.create_keyset(KEYSET, "AES256_GCM")
        broker.grant(CONTROLLER, KEYSET, "hold")
        broker.deliver(KEYSET, 1, CONTROLLER, timedelta(minutes=10))


def _run(procs: DemoProcesses, name: str, *args: str) -> tuple[int, str]:
    """Run ``keybroker ARGS`` to its end; its exit status and log."""
    proc = procs.start(name, *args)
    try:
        status = proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise procs.failure(name, f"{name} did not finish") from None
    procs.running.pop(name, None)
    return status, procs.log(name)


def _ended(procs: DemoProcesses, name: str) -> int:
    """The exit status of a device that ends by itself once its sessions are served."""
    try:
        status = procs.running[name].wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise procs.failure(name, f"{name} did not end after its pairings") from None
    procs.running.pop(name)
    return status


def stage_pairing(s: DemoContext) -> str:
    """Registered in ``keybroker demo`` as ``device pairing``."""
    console = s.console or Console()
    directory = s.workdir / "pairing"
    directory.mkdir(exist_ok=True)
    procs = DemoProcesses(
        directory, {**os.environ, PASSPHRASE_ENV: PASSPHRASE, "PYTHONUNBUFFERED": "1"}
    )
    try:
        _controller_setup(s, directory)
        now = datetime.now(UTC).replace(microsecond=0)
        acme = Manufacturer.create("Acme", now - timedelta(days=1))
        lamp = acme.provision(LAMP, now - timedelta(hours=1))
        plug = acme.provision(PLUG, now - timedelta(hours=1))
        lamp.write(directory, "lamp")
        plug.write(directory, "plug")
        (directory / "acme-root.pem").write_bytes(certificate_pem(acme.root.certificate))
        crls = acme.crls(now - timedelta(minutes=1), revoked=[plug.certificate])
        with open_home(s.workdir / "home") as home:  # what `keybroker pair crl-publish` does
            publisher = CrlPublisher(Broker.from_home(home))
            for ca, crl in zip((acme.root, acme.intermediate), crls, strict=True):
                publisher.publish(ca.certificate, crl)

        def controller(name: str, port: int, code: str, *extra: str) -> tuple[int, str]:
            return _run(procs, name, "pair", "controller", "--connect", f"127.0.0.1:{port}",
                        "--code", code, "--trust-root", "acme-root.pem", "--crl-from-broker",
                        "--keyring", "hub.keyring", "--keyset", KEYSET, "--sync",
                        "--name", "hub", *extra)  # fmt: skip

        # The lamp answers twice: first to a controller holding the plug's label code (the
        # lamp's certificate is genuine, but not the device that code names), then its own.
        procs.start("lamp", "pair", "device", "--cert", "lamp.pem", "--key", "lamp.key",
                    "--sessions", "2")  # fmt: skip
        port = procs.listening("lamp")
        status, text = controller("hub-wrong-label", port, plug.code.to_uri())
        if status != 2 or "refused: identity-mismatch:" not in text:
            raise procs.failure("hub-wrong-label", "the lamp passed for the plug's label")
        mismatch = next(ln for ln in text.splitlines() if ln.startswith("refused:"))
        status, text = controller("hub-lamp", port, lamp.code.to_uri(),
                                  "--message", "turn on", "--message", "dim to 40%")  # fmt: skip
        if status != 0 or "received: ack: dim to 40%" not in text:
            raise procs.failure("hub-lamp", f"the lamp did not pair (status {status})")
        if "2 CRL(s) from the broker verified" not in text:
            raise procs.failure("hub-lamp", "the broker's CRLs were not both verified")
        if _ended(procs, "lamp") != 0 or "received: dim to 40%" not in procs.log("lamp"):
            raise procs.failure("lamp", "the lamp did not install the key and answer")
        paired = next(ln for ln in text.splitlines() if ln.startswith("paired with"))

        # The plug, revoked by Acme on the CRL the broker relays: refused, and given nothing.
        procs.start("plug", "pair", "device", "--cert", "plug.pem", "--key", "plug.key")
        port = procs.listening("plug")
        status, text = controller("hub-plug", port, plug.code.to_uri())
        if status != 2 or "refused: revoked:" not in text:
            raise procs.failure("hub-plug", "the revoked plug was not refused as revoked")
        revoked = next(ln for ln in text.splitlines() if ln.startswith("refused:"))
        device_status = _ended(procs, "plug")
        text = procs.log("plug")
        if device_status != 2 or "refused by the peer: revoked:" not in text:
            raise procs.failure("plug", "the plug did not print its refusal")
        if "paired" in text or "received" in text:
            raise procs.failure("plug", "the refused plug reports a key or a message")
        for line in (paired, revoked, f"(wrong label) {mismatch}"):
            console.print(f"    {escape(line.strip()[:120])}", highlight=False)
    finally:
        procs.close()
    return (
        "lamp checked against its label code, the Acme root and the broker's CRLs, then sent "
        f"{KEYSET} and talked under it; plug revoked on the broker's CRL refused, no key; "
        "the lamp under the plug's label refused (identity-mismatch)"
    )
