"""A manufacturer's PKI, built with :mod:`keybroker.pki`: root, intermediate, devices, CRLs.

What a device maker runs at the factory (and what tests, the demo and the
benchmark use): a P-256 root, one intermediate below it (Matter's PAA → PAI),
and for each device a key, a device certificate naming its serial, MAC and
model, and the pairing code printed on its label.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker.flows.pairing.code import PairingCode
from keybroker.keys import SECRET_ACCESS, CertificateKey
from keybroker.pki import CertificateAuthority, DeviceIdentity, Revocation, certificate_pem

DeviceKeyKind = Literal["p256", "rsa2048", "rsa3072"]


@dataclass(frozen=True)
class ProvisionedDevice:
    """A device as it leaves the factory: key, chain (leaf first) and label code."""

    key: CertificateKey
    chain: tuple[x509.Certificate, ...]

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def code(self) -> PairingCode:
        return PairingCode.for_certificate(self.certificate)

    def write(self, directory: Path, stem: str = "device") -> tuple[Path, Path]:
        """``<stem>.key`` (0600, PKCS#8 PEM) and ``<stem>.pem`` (chain); returns both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        key_path = directory / f"{stem}.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(self.key.private_key_pem(SECRET_ACCESS))
        chain_path = directory / f"{stem}.pem"
        chain_path.write_bytes(b"".join(certificate_pem(c) for c in self.chain))
        return key_path, chain_path


class Manufacturer:
    """Root and intermediate CAs of one device maker."""

    def __init__(self, root: CertificateAuthority, intermediate: CertificateAuthority) -> None:
        self.root = root
        self.intermediate = intermediate

    @classmethod
    def create(
        cls, name: str, now: datetime, *, validity: timedelta = timedelta(days=3650)
    ) -> Manufacturer:
        root = CertificateAuthority.create(
            f"{name} root", ec.generate_private_key(ec.SECP256R1()), now, validity, path_length=1
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = root.issue_intermediate(f"{name} devices", key.public_key(), now, validity / 2)
        return cls(root, CertificateAuthority(cert, key))

    def provision(
        self,
        identity: DeviceIdentity,
        now: datetime,
        *,
        validity: timedelta = timedelta(days=365),
        kind: DeviceKeyKind = "p256",
        key: CertificateKey | None = None,
    ) -> ProvisionedDevice:
        key = key or CertificateKey.generate(kind)
        cert = self.intermediate.issue_device(identity, key.public_key(), now, validity)
        return ProvisionedDevice(key, (cert, self.intermediate.certificate))

    def crls(
        self,
        now: datetime,
        *,
        revoked: Iterable[x509.Certificate] = (),
        validity: timedelta = timedelta(days=7),
        number: int = 1,
    ) -> list[x509.CertificateRevocationList]:
        """Current CRLs of root and intermediate; ``revoked`` device certificates listed."""
        serials: Sequence[Revocation] = [
            Revocation(cert.serial_number, now, x509.ReasonFlags.key_compromise) for cert in revoked
        ]
        return [
            self.root.issue_crl([], now, now + validity, number),
            self.intermediate.issue_crl(serials, now, now + validity, number),
        ]
