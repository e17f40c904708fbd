"""Pairs in memory: a Controller and a Device wired together with no sockets."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from cryptography import x509

from keybroker.flows.pairing.code import PairingCode
from keybroker.flows.pairing.protocol import Controller, Device, Event, Send
from keybroker.flows.pairing.verification import DevicePolicy
from keybroker.keys import AES256_GCM, SECRET_ACCESS, CertificateKey, Keyset

from .pairing_kit import NOW, acme, device_key


@dataclass
class Wire:
    """Runs both machines until neither has anything to send; records what A sent."""

    controller: Controller
    device: Device
    sent_by_controller: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def run(self, first: list[Event]) -> list[Event]:
        pending: list[tuple[str, bytes]] = []

        def queue(side: str, events: list[Event]) -> None:
            for event in events:
                if isinstance(event, Send):
                    if side == "controller":
                        self.sent_by_controller.append(event.data)
                    pending.append((side, event.data))
                else:
                    self.events.append(event)

        queue("controller", first)
        while pending:
            side, data = pending.pop(0)
            if side == "controller":
                queue("device", self.device.receive(data, NOW))
            else:
                queue("controller", self.controller.receive(data, NOW))
        return self.events


def common_keyset() -> Keyset:
    return Keyset.generate("pairing/home", AES256_GCM)


def common_material(keyset: Keyset) -> bytes:
    return keyset.export_secret_material(1, SECRET_ACCESS)


def make_controller(
    code: PairingCode,
    *,
    common: Keyset | None = None,
    crls: bool = True,
    max_intermediates: int = 1,
) -> Controller:
    pki = acme()
    policy = DevicePolicy(
        (pki.root.certificate,), tuple(pki.crls()) if crls else None, max_intermediates
    )
    return Controller(
        expected=code, policy=policy, common=common or common_keyset(), version=1, rng=os.urandom
    )


def make_device(
    key: CertificateKey | None = None, chain: list[x509.Certificate] | None = None
) -> Device:
    key = key or device_key()
    pki = acme()
    chain = chain or [pki.device(key=key), pki.intermediate.certificate]
    return Device(key=key, chain=chain, rng=os.urandom)


@pytest.fixture
def wire() -> Callable[..., Wire]:
    def build(controller: Controller, device: Device) -> Wire:
        return Wire(controller, device)

    return build
