"""In-process site and node agents over the real broker code path (tests, benchmark).

A :class:`SimulatedAgent` does what ``keybroker agent`` does, minus HTTP: it
verifies the broker's signature on each delivery, installs the key version into
its own local keyset (``pending``: accepted for receive), acknowledges with
proof of possession, and mirrors the broker's version states on sync (the
broker's primary becomes its transmit key; disabled versions are forgotten).
Each agent has its own identity and HPKE keys and enrols like a real one; the
broker cannot tell it from a remote agent.

A :class:`Fleet` is a topology's worth of agents around one broker and one
:class:`~.orchestrator.Orchestrator`, with a :meth:`Fleet.pump` that runs one
round (agents receive and ack, the orchestrator steps, agents sync) and knobs
for the faults the property test injects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ed25519

from keybroker.broker import (
    Broker,
    DeliveryEnvelope,
    HpkeKeyBinding,
    make_ack_proof,
    sign_with_identity,
)
from keybroker.errors import KeybrokerError
from keybroker.flows.rotation.orchestrator import Orchestrator
from keybroker.flows.rotation.topology import Link, Topology
from keybroker.keys import X25519_HPKE, Keyset, KeyState
from keybroker.pki import PrincipalId

_AAD: Final = b"keybroker/rotation/simulated-traffic"


def _csr(key: ed25519.Ed25519PrivateKey) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")]))
        .sign(key, None)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


class SimulatedAgent:
    """One site or node agent, in memory."""

    def __init__(self, principal: PrincipalId) -> None:
        self.principal = principal
        self._identity = ed25519.Ed25519PrivateKey.generate()
        self._hpke = Keyset.generate(f"{principal}/hpke", X25519_HPKE)
        #: keyset name → the locally installed versions (what this agent holds).
        self.keys: dict[str, Keyset] = {}

    def __repr__(self) -> str:
        return f"SimulatedAgent({self.principal})"

    def enrol(self, broker: Broker) -> None:
        token = broker.create_enrolment_token(self.principal, timedelta(hours=1))
        binding = HpkeKeyBinding.from_public_keyset(self.principal, self._hpke.public_keyset())
        broker.enrol(
            self.principal,
            token.secret,
            _csr(self._identity),
            hpke_public_key=binding.public_key,
            hpke_key_signature=sign_with_identity(self._identity, binding.encode()),
            hpke_key_id=binding.key_id,
            hpke_template=binding.template,
        )

    def install(self, broker: Broker, envelope: DeliveryEnvelope) -> bytes:
        """Verify and install one delivery (receive side first); return its ack proof."""
        envelope.verify(broker.ca_certificate, recipient=self.principal)
        local = self.keys.get(envelope.keyset)
        if local is None:
            local = self.keys[envelope.keyset] = Keyset(envelope.keyset, "aead")
        local.install_sealed_version(envelope.sealed, self._hpke.hpke(), info=envelope.info)
        return make_ack_proof(local, envelope.version, envelope.challenge, envelope.delivery_id)

    def inbox(self, broker: Broker) -> list[DeliveryEnvelope]:
        return broker.fetch_deliveries(self.principal)

    def sync(self, broker: Broker, keyset: str) -> None:
        """Mirror the broker's states: its primary transmits, disabled versions are forgotten."""
        local = self.keys.get(keyset)
        if local is None:
            return
        summary = broker.show_keyset(keyset)
        states = {v.version: v.state for v in summary.versions}
        for info in local.versions:
            remote = states.get(info.version)
            if remote in (KeyState.DISABLED.value, KeyState.DESTROYED.value) and info.state in (
                KeyState.PENDING,
                KeyState.ENABLED,
            ):
                local.disable(info.version)
        primary = summary.primary
        held = {v.version: v.state for v in local.versions}
        if primary is not None and held.get(primary) in (KeyState.PENDING, KeyState.ENABLED):
            local.promote(primary)

    def transmit_version(self, keyset: str) -> int | None:
        local = self.keys.get(keyset)
        primary = None if local is None else local.primary
        return None if primary is None else primary.version

    def holds(self, keyset: str, version: int) -> bool:
        local = self.keys.get(keyset)
        if local is None:
            return False
        gone = (KeyState.DISABLED, KeyState.DESTROYED)
        return any(v.version == version and v.state not in gone for v in local.versions)

    def seal(self, keyset: str, plaintext: bytes) -> bytes:
        return self.keys[keyset].aead().encrypt(plaintext, _AAD + keyset.encode())

    def open(self, keyset: str, ciphertext: bytes) -> bytes:
        return self.keys[keyset].aead().decrypt(ciphertext, _AAD + keyset.encode())


@dataclass
class Faults:
    """What goes wrong in one :meth:`Fleet.pump` round."""

    #: Agents that do nothing this round (process down).
    down: set[PrincipalId] = field(default_factory=set)
    #: Agents that install but whose acks are lost on the way.
    ack_lost: set[PrincipalId] = field(default_factory=set)
    #: Agents that ack with a wrong proof.
    bad_proof: set[PrincipalId] = field(default_factory=set)


class Fleet:
    """Every agent of a topology around one broker and its orchestrator."""

    def __init__(self, broker: Broker, topology: Topology, *, batch_size: int = 200) -> None:
        self.broker = broker
        self.topology = topology
        self.orchestrator = Orchestrator(broker, batch_size=batch_size)
        self.agents: dict[PrincipalId, SimulatedAgent] = {}
        for link in topology.links:
            for pid in (link.upstream, link.downstream):
                self.agents.setdefault(pid, SimulatedAgent(pid))

    def provision(self, *, progress: Callable[[int], None] | None = None) -> None:
        """Enrol every agent, set the links up, and deliver each link's first key."""
        for i, agent in enumerate(self.agents.values()):
            agent.enrol(self.broker)
            if progress is not None:
                progress(i)
        self.orchestrator.setup(self.topology, delivery_ttl=timedelta(hours=1))
        self.receive_all()
        self.sync_all()

    def receive_all(self, faults: Faults | None = None) -> int:
        """Every agent that is up installs its deliveries and acks them. Returns acks sent."""
        faults = faults or Faults()
        acked = 0
        for agent in self.agents.values():
            if agent.principal in faults.down:
                continue
            for envelope in agent.inbox(self.broker):
                proof = agent.install(self.broker, envelope)
                if agent.principal in faults.ack_lost:
                    continue
                if agent.principal in faults.bad_proof:
                    proof = bytes(len(proof))
                try:
                    self.broker.ack(envelope.delivery_id, agent.principal, proof)
                    acked += 1
                except KeybrokerError:
                    continue  # refused (wrong proof, late): the orchestrator sees the outcome
        return acked

    def sync_all(self, faults: Faults | None = None) -> None:
        faults = faults or Faults()
        for link in self.topology.links:
            for pid in (link.upstream, link.downstream):
                if pid not in faults.down:
                    self.agents[pid].sync(self.broker, link.keyset)

    def pump(self, faults: Faults | None = None) -> None:
        """One round: agents receive and ack, the orchestrator steps, agents sync."""
        self.receive_all(faults)
        self.orchestrator.step()
        self.sync_all(faults)

    def ends(self, link: Link) -> tuple[SimulatedAgent, SimulatedAgent]:
        """(upstream node agent, downstream site agent)."""
        return self.agents[link.upstream], self.agents[link.downstream]

    def links(self) -> Iterable[Link]:
        return self.topology.links


def star_topology(name: str, nodes: int, sites: int) -> Topology:
    """``sites`` downstream sites spread round-robin over ``nodes`` upstream nodes."""
    node_names = [f"n{i}" for i in range(nodes)]
    site_names = [f"s{i}" for i in range(sites)]
    return Topology.from_mapping(
        {
            "name": name,
            "upstream": {"site": "up", "nodes": node_names},
            "downstream": {"sites": site_names},
            "links": [
                {"node": node_names[i % nodes], "site": site} for i, site in enumerate(site_names)
            ],
        }
    )
