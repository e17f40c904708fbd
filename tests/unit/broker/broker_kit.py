"""Test helpers: a settable clock, a principal with its own keys, and a whole-store snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from keybroker.broker import (
    Broker,
    DeliveryEnvelope,
    EnrolmentResult,
    HpkeKeyBinding,
    make_ack_proof,
    sign_with_identity,
)
from keybroker.broker.events import Event, decode_event
from keybroker.broker.home import Home
from keybroker.broker.messages import IdentityPrivateKey
from keybroker.keys import X25519_HPKE, Keyset
from keybroker.pki import PrincipalId
from keybroker.store.engine import Store
from keybroker.store.schema import metadata


class Clock:
    """Returns ``now`` until a test moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def csr_for(key: IdentityPrivateKey, cn: str = "ignored") -> bytes:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass
class Principal:
    """A principal's side: identity key, HPKE keyset, and what it needs to enrol."""

    pid: PrincipalId
    identity: IdentityPrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)
    hpke: Keyset = field(init=False)

    def __post_init__(self) -> None:
        self.hpke = Keyset.generate(f"{self.pid}/hpke", X25519_HPKE)

    @classmethod
    def named(cls, text: str, *, p256: bool = False) -> Principal:
        if p256:
            return cls(PrincipalId.parse(text), ec.generate_private_key(ec.SECP256R1()))
        return cls(PrincipalId.parse(text))

    def binding(self) -> HpkeKeyBinding:
        return HpkeKeyBinding.from_public_keyset(self.pid, self.hpke.public_keyset())

    def enrol_args(self) -> dict[str, Any]:
        binding = self.binding()
        return {
            "csr": csr_for(self.identity),
            "hpke_public_key": binding.public_key,
            "hpke_key_signature": sign_with_identity(self.identity, binding.encode()),
            "hpke_key_id": binding.key_id,
            "hpke_template": binding.template,
        }

    def enrol(self, broker: Broker, token: str) -> EnrolmentResult:
        return broker.enrol(self.pid, token, **self.enrol_args())

    def receive(
        self, envelope: DeliveryEnvelope, ca: x509.Certificate, purpose: str
    ) -> tuple[Keyset, bytes]:
        """What the SDK does: check the CA's signature, open, install; return the ack proof."""
        envelope.verify(ca, recipient=self.pid)
        local = Keyset(envelope.keyset, purpose)
        local.install_sealed_version(envelope.sealed, self.hpke.hpke(), info=envelope.info)
        proof = make_ack_proof(local, envelope.version, envelope.challenge, envelope.delivery_id)
        return local, proof


@dataclass
class World:
    home: Home
    broker: Broker
    clock: Clock

    def enrolled(self, text: str, *, p256: bool = False) -> Principal:
        principal = Principal.named(text, p256=p256)
        token = self.broker.create_enrolment_token(principal.pid, timedelta(hours=1))
        principal.enrol(self.broker, token.secret)
        return principal

    def log_size(self) -> int:
        return self.home.log.size()

    def events_since(self, size: int) -> list[Event]:
        end = self.log_size()
        return [decode_event(e) for e in self.home.log.entries(size, end)]

    def dump(self) -> dict[str, list[str]]:
        return dump(self.home.store)


def dump(store: Store) -> dict[str, list[str]]:
    """Every row of every table, as sorted reprs: equal dumps mean nothing changed."""
    out: dict[str, list[str]] = {}
    with store.snapshot() as conn:
        for name, table in metadata.tables.items():
            out[name] = sorted(repr(tuple(row)) for row in conn.execute(sa.select(table)))
    return out
