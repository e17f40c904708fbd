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
for the faults the property test injects. A round does what the bus would do
(wake-ups, an ack consumer, keyset-change notices) in memory, so that ten
thousand agents cost what their work costs (see :class:`Fleet`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from keybroker.broker import (
    Broker,
    DeliveryEnvelope,
    HpkeKeyBinding,
    make_ack_proof,
    sign_with_identity,
)
from keybroker.broker.deliveries import AckRequest, DeliveryInfo, ack_many
from keybroker.errors import KeybrokerError
from keybroker.flows.rotation.orchestrator import Orchestrator, StepReport
from keybroker.flows.rotation.topology import Link, Topology
from keybroker.keys import X25519_HPKE, Keyset, KeyState
from keybroker.pki import PrincipalId
from keybroker.store.schema import deliveries, key_versions, keysets, principals

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
        self._opener = self._hpke.hpke()
        #: The CA key this agent checks envelopes against (pinned at enrolment).
        self._ca: ec.EllipticCurvePublicKey | None = None
        #: keyset name → the locally installed versions (what this agent holds).
        self.keys: dict[str, Keyset] = {}
        #: Keysets installed into since the fleet last mirrored them.
        self.touched: set[str] = set()

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
        self._ca = _ca_key(broker)

    def install(self, broker: Broker, envelope: DeliveryEnvelope) -> bytes:
        """Verify and install one delivery (receive side first); return its ack proof."""
        envelope.verify(self._ca or _ca_key(broker), recipient=self.principal)
        local = self.keys.get(envelope.keyset)
        if local is None:
            local = self.keys[envelope.keyset] = Keyset(envelope.keyset, "aead")
        local.install_sealed_version(envelope.sealed, self._opener, info=envelope.info)
        self.touched.add(envelope.keyset)
        return make_ack_proof(local, envelope.version, envelope.challenge, envelope.delivery_id)

    def inbox(self, broker: Broker) -> list[DeliveryEnvelope]:
        return broker.fetch_deliveries(self.principal)

    def sync(self, broker: Broker, keyset: str) -> None:
        """Mirror the broker's states: its primary transmits, disabled versions are forgotten."""
        if keyset not in self.keys:
            return
        summary = broker.show_keyset(keyset)
        self.mirror(keyset, {v.version: v.state for v in summary.versions})

    def mirror(self, keyset: str, states: Mapping[int, str]) -> None:
        """:meth:`sync` with the broker's version states already read (``version → state``)."""
        local = self.keys.get(keyset)
        if local is None:
            return
        for info in local.versions:
            remote = states.get(info.version)
            if remote in (KeyState.DISABLED.value, KeyState.DESTROYED.value) and info.state in (
                KeyState.PENDING,
                KeyState.ENABLED,
            ):
                local.disable(info.version)
        primary = next((v for v, state in states.items() if state == KeyState.PRIMARY.value), None)
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


def _ca_key(broker: Broker) -> ec.EllipticCurvePublicKey:
    key = broker.ca_certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeybrokerError("the broker CA key is not an EC key")
    return key


@dataclass
class Faults:
    """What goes wrong in one :meth:`Fleet.pump` round."""

    #: Agents that do nothing this round (process down).
    down: set[PrincipalId] = field(default_factory=set)
    #: Agents that install but whose acks are lost on the way.
    ack_lost: set[PrincipalId] = field(default_factory=set)
    #: Agents that ack with a wrong proof.
    bad_proof: set[PrincipalId] = field(default_factory=set)


#: Acks settled per transaction (what a bus consumer drains at once).
ACK_BATCH: Final = 500


class Fleet:
    """Every agent of a topology around one broker and its orchestrator.

    What the bus would do is done here in memory, so that a round costs what the
    agents and the broker do, not what polling ten thousand idle agents would:

    * **wake-ups**: :meth:`pump` fetches the inbox of every agent that has a
      delivery waiting (``sent`` and before its deadline, found in one query):
      exactly the agents whose fetch would return something, so this is
      :meth:`receive_all` without the empty fetches;
    * **acks**: the acks of one round reach the broker together and are settled
      by :func:`~keybroker.broker.deliveries.ack_many`, what a bus consumer of
      acks does (one transaction per :data:`ACK_BATCH`, each ack checked exactly
      as :meth:`Broker.ack` checks it);
    * **keyset changes**: each round reads every link keyset's revision in one
      query; an agent mirrors the version states of the keysets that changed
      since it last synced, or that it installed into. Syncing a keyset where
      neither side changed is a no-op, so this is :meth:`sync_all` without the
      no-ops.
    """

    def __init__(self, broker: Broker, topology: Topology, *, batch_size: int = 200) -> None:
        self.broker = broker
        self.topology = topology
        self.orchestrator = Orchestrator(broker, batch_size=batch_size)
        self.agents: dict[PrincipalId, SimulatedAgent] = {}
        #: keyset → the principals that hold it (both ends of its links).
        self._holders: dict[str, set[PrincipalId]] = {}
        for link in topology.links:
            for pid in (link.upstream, link.downstream):
                self.agents.setdefault(pid, SimulatedAgent(pid))
                self._holders.setdefault(link.keyset, set()).add(pid)
        #: (agent, keyset) pairs whose states the agent has not mirrored since they changed.
        self._stale: set[tuple[PrincipalId, str]] = set()
        #: keyset → the revision last seen.
        self._revisions: dict[str, int] = {}

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
        return self._receive(self.agents, faults or Faults())

    def sync_all(self, faults: Faults | None = None) -> None:
        """Every agent that is up mirrors the broker's states of every keyset it holds."""
        self._stale.update(
            (pid, keyset) for keyset, holders in self._holders.items() for pid in holders
        )
        self._sync(faults or Faults())

    def pump(self, faults: Faults | None = None) -> StepReport:
        """One round: woken agents receive and ack, the orchestrator steps, agents sync."""
        faults = faults or Faults()
        self._receive(self._waiting(), faults)
        report = self.orchestrator.step()
        self._sync(faults)
        return report

    def ends(self, link: Link) -> tuple[SimulatedAgent, SimulatedAgent]:
        """(upstream node agent, downstream site agent)."""
        return self.agents[link.upstream], self.agents[link.downstream]

    def links(self) -> Iterable[Link]:
        return self.topology.links

    # -- what the bus does ----------------------------------------------------------

    def _receive(self, principals: Iterable[PrincipalId], faults: Faults) -> int:
        acks: list[AckRequest] = []
        for pid in principals:
            if pid in faults.down:
                continue
            agent = self.agents[pid]
            for envelope in agent.inbox(self.broker):
                proof = agent.install(self.broker, envelope)
                if pid in faults.ack_lost:
                    continue
                if pid in faults.bad_proof:
                    proof = bytes(len(proof))
                acks.append((envelope.delivery_id, pid, proof))
        acked = 0
        for start in range(0, len(acks), ACK_BATCH):
            results = ack_many(self.broker.context, acks[start : start + ACK_BATCH])
            # Refused (wrong proof, late): the orchestrator sees the outcome.
            acked += sum(1 for r in results if isinstance(r, DeliveryInfo))
        return acked

    def _waiting(self) -> list[PrincipalId]:
        """The fleet's agents with a delivery to fetch (``sent``, not past its deadline)."""
        now = self.broker.context.now()
        with self.broker.context.store.snapshot() as conn:
            rows = conn.execute(
                sa.select(principals.c.kind, principals.c.name)
                .join(deliveries, deliveries.c.principal_id == principals.c.id)
                .where(deliveries.c.state == "sent", deliveries.c.expires_at > now)
                .distinct()
            ).all()
        waiting = {f"{kind}/{name}" for kind, name in rows}
        return [pid for pid in self.agents if str(pid) in waiting]

    def _sync(self, faults: Faults) -> None:
        for keyset in self._changed_keysets():
            self._stale.update((pid, keyset) for pid in self._holders[keyset])
        for pid, agent in self.agents.items():
            if agent.touched:
                self._stale.update((pid, keyset) for keyset in agent.touched)
                agent.touched.clear()
        todo = sorted(
            ((pid, keyset) for pid, keyset in self._stale if pid not in faults.down),
            key=lambda item: (str(item[0]), item[1]),
        )
        if not todo:
            return
        states = self._version_states(sorted({keyset for _, keyset in todo}))
        for pid, keyset in todo:
            self.agents[pid].mirror(keyset, states.get(keyset, {}))
            self._stale.discard((pid, keyset))

    def _changed_keysets(self) -> list[str]:
        with self.broker.context.store.snapshot() as conn:
            rows = conn.execute(sa.select(keysets.c.name, keysets.c.revision)).all()
        changed = []
        for name, revision in rows:
            if name in self._holders and self._revisions.get(name) != revision:
                self._revisions[name] = revision
                changed.append(name)
        return changed

    def _version_states(self, names: list[str]) -> dict[str, dict[int, str]]:
        states: dict[str, dict[int, str]] = {}
        with self.broker.context.store.snapshot() as conn:
            for start in range(0, len(names), 500):
                rows = conn.execute(
                    sa.select(keysets.c.name, key_versions.c.version, key_versions.c.state)
                    .join(key_versions, key_versions.c.keyset_id == keysets.c.id)
                    .where(keysets.c.name.in_(names[start : start + 500]))
                )
                for name, version, state in rows:
                    states.setdefault(name, {})[version] = state
        return states


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
