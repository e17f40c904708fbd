"""Pairing (S9): controller-side pairings per second vs chain verification alone.

A pairing here is the whole controller and device work of one session, in
memory (sans-IO, no sockets): Hello, the device's proof (one signature),
the controller's checks (chain + CRLs + identification info + key hash +
proof, :mod:`keybroker.flows.pairing.verification`), the seal of the common key
(HPKE DHKEM(P-256) or RSA-OAEP), the device's open and key confirmation, and the
controller's MAC check. The floor is the part no implementation can skip:
cryptography's ``x509.verification`` client verifier on the same 3-certificate
chain, alone. Figures are pairings/s and the ratio pairing/floor, for P-256 and
RSA-2048 device certificates.

Run: ``python bench/pairing.py [--quick]`` (``--quick``: 1-s slices, under a minute).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.x509.verification import ClientVerifier, ExtensionPolicy, PolicyBuilder, Store

from keybroker.flows.pairing.code import PairingCode
from keybroker.flows.pairing.manufacturer import Manufacturer, ProvisionedDevice
from keybroker.flows.pairing.protocol import Controller, ControllerState, Device, Send
from keybroker.flows.pairing.verification import DevicePolicy
from keybroker.keys import AES256_GCM, Keyset
from keybroker.pki import DeviceIdentity

sys.path.insert(0, os.path.dirname(__file__))
from benchkit import Broken, Figure, cpu_model, load


def rate(fn: Callable[[], None], seconds: float) -> float:
    fn()
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        done += 1
    return done / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1-s slices")
    args = parser.parse_args(argv)
    seconds = 1.0 if args.quick else 5.0
    now = datetime.now(UTC)
    maker = Manufacturer.create("Bench", now - timedelta(days=1))
    crls = tuple(maker.crls(now - timedelta(hours=1)))
    policy = DevicePolicy((maker.root.certificate,), crls)
    common = Keyset.generate("pairing/bench", AES256_GCM)
    print(f"cpu: {cpu_model()}, load: {load()}, {seconds:.0f}-s slices")
    figures: list[Figure] = []
    for kind, label in (("p256", "p256"), ("rsa2048", "rsa2048")):
        device = maker.provision(
            DeviceIdentity("SN-B", "0024be000001", "bench"),
            now,
            kind=kind,  # type: ignore[arg-type]
        )

        code = device.code  # read once from the label, as a controller does

        def pairing(
            device: ProvisionedDevice = device, kind: str = kind, code: PairingCode = code
        ) -> None:
            controller = Controller(
                expected=code, policy=policy, common=common, version=1, rng=os.urandom
            )
            peer = Device(key=device.key, chain=device.chain, rng=os.urandom)
            pending = controller.start()
            to_device = True
            while pending:
                frames = [e.data for e in pending if isinstance(e, Send)]
                pending = []
                for data in frames:
                    got = peer.receive(data, now) if to_device else controller.receive(data, now)
                    pending.extend(got)
                to_device = not to_device
            if controller.state is not ControllerState.PAIRED:
                raise Broken(f"{kind}: pairing ended in {controller.state}")

        verifier = (
            PolicyBuilder()
            .store(Store([maker.root.certificate]))
            .time(now)
            .max_chain_depth(1)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.webpki_defaults_ee(),
            )
            .build_client_verifier()
        )
        leaf, inter = device.chain

        def floor(
            verifier: ClientVerifier = verifier,
            leaf: x509.Certificate = leaf,
            inter: x509.Certificate = inter,
        ) -> None:
            verifier.verify(leaf, [inter])

        paired = rate(pairing, seconds)
        chain_only = rate(floor, seconds)
        print(f"{label}: {paired:,.0f} pairings/s, chain verification alone {chain_only:,.0f}/s")
        figures += [
            Figure(f"pairings_per_s_{label}", paired, "pairings/s", 0, None, "whole session"),
            Figure(f"chain_verify_per_s_{label}", chain_only, "verifications/s", 0, None, "floor"),
            Figure(
                f"pairing_vs_chain_{label}_ratio", paired / chain_only, "ratio", 3, None, "ratio"
            ),
        ]
    print(f"load after: {load()}")
    for figure in figures:
        print(figure.bench_line("pairing"))


if __name__ == "__main__":
    main()
