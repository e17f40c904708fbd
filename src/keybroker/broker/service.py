"""The :class:`Broker`: one object the API and the CLI call for everything the trusted party does.

It holds the store, the keyset repository, the log, the CA and the clock, and
delegates to one small module per concern (:mod:`.enrolment`,
:mod:`.principals`, :mod:`.keysets`, :mod:`.grants`, :mod:`.deliveries`,
:mod:`.audit`). Nothing here does I/O other than the database; nothing keeps
state between calls, so any number of brokers (replicas) can share one
database.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.engine import Connection

from keybroker.broker import audit, deliveries, enrolment, grants, keysets, principals
from keybroker.broker._context import BrokerContext, Clock, EnvelopeSigner, Policy, Random
from keybroker.broker.deliveries import DeliveryInfo
from keybroker.broker.enrolment import EnrolmentResult, EnrolmentToken
from keybroker.broker.grants import GrantInfo, GrantMode
from keybroker.broker.holdings import Holding, holdings
from keybroker.broker.home import CA_KEYSET, Home
from keybroker.broker.keysets import KeysetSummary
from keybroker.broker.messages import DeliveryEnvelope
from keybroker.broker.principals import PrincipalCredentials, PrincipalInfo
from keybroker.errors import ConfigurationError
from keybroker.keys import SECRET_ACCESS, X25519_HPKE, KeyTemplate, KeyVersionInfo
from keybroker.log.sth import SignedTreeHead
from keybroker.log.store_log import TransparencyLog
from keybroker.pki import CertificateAuthority, PrincipalId, public_key_fingerprint
from keybroker.store.engine import Store
from keybroker.store.keysets import KeysetRepository


class Broker:
    """The trusted party's domain logic. See the package docstring for the whole picture."""

    def __init__(
        self,
        *,
        store: Store,
        keysets: KeysetRepository,
        log: TransparencyLog,
        log_public_key: Ed25519PublicKey,
        ca: CertificateAuthority,
        envelope_key: ec.EllipticCurvePrivateKey,
        clock: Clock,
        rng: Random = os.urandom,
        policy: Policy | None = None,
    ) -> None:
        signer = EnvelopeSigner(envelope_key)
        # Principals verify envelopes with the CA certificate they got at enrolment.
        ca_key = ca.certificate.public_key()
        if public_key_fingerprint(signer.public_key()) != public_key_fingerprint(ca_key):
            raise ConfigurationError("the envelope key is not the CA certificate's key")
        self._ctx = BrokerContext(
            store=store,
            keysets=keysets,
            log=log,
            ca=ca,
            signer=signer,
            clock=clock,
            rng=rng,
            policy=policy or Policy(),
        )
        self._log_public_key = log_public_key

    @classmethod
    def from_home(
        cls, home: Home, *, rng: Random = os.urandom, policy: Policy | None = None
    ) -> Broker:
        """The broker for an opened home (which stays the owner of the store and keys)."""
        # The CA key signs delivery envelopes as well as certificates (audited: SECRET_ACCESS).
        ca_key = home.keysets.load(CA_KEYSET).keyset.signer().private_key(SECRET_ACCESS)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError("the CA key is not a P-256 key")
        return cls(
            store=home.store,
            keysets=home.keysets,
            log=home.log,
            log_public_key=home.log_public_key,
            ca=home.ca,
            envelope_key=ca_key,
            clock=home.clock,
            rng=rng,
            policy=policy,
        )

    def __repr__(self) -> str:
        return f"Broker({self._ctx.store!r})"

    # -- what principals need to trust us ------------------------------------------

    @property
    def ca_certificate(self) -> x509.Certificate:
        return self._ctx.ca.certificate

    @property
    def log_public_key(self) -> Ed25519PublicKey:
        return self._log_public_key

    @property
    def log(self) -> TransparencyLog:
        return self._ctx.log

    @property
    def context(self) -> BrokerContext:
        """The broker's internals, for flows that extend it inside its own transactions."""
        return self._ctx

    @property
    def store(self) -> Store:
        """The database (the HTTP API keeps its admin credentials and nonce cache there)."""
        return self._ctx.store

    # -- enrolment and principals --------------------------------------------------

    def create_enrolment_token(
        self, principal: PrincipalId | str, ttl: timedelta, *, dns_names: Iterable[str] = ()
    ) -> EnrolmentToken:
        """A one-time enrolment token; a ``service``'s may name DNS names for its certificate."""
        return enrolment.create_enrolment_token(self._ctx, principal, ttl, dns_names=dns_names)

    def enrol(
        self,
        principal: PrincipalId | str,
        token: str,
        csr: bytes,
        *,
        hpke_public_key: bytes,
        hpke_key_signature: bytes,
        hpke_key_id: int,
        hpke_template: str = X25519_HPKE.name,
    ) -> EnrolmentResult:
        return enrolment.enrol(
            self._ctx,
            principal,
            token,
            csr,
            hpke_public_key=hpke_public_key,
            hpke_key_signature=hpke_key_signature,
            hpke_key_id=hpke_key_id,
            hpke_template=hpke_template,
        )

    def list_principals(self, *, status: str | None = None) -> list[PrincipalInfo]:
        return principals.list_principals(self._ctx, status=status)

    def show_principal(self, principal: PrincipalId | str) -> PrincipalInfo:
        return principals.show_principal(self._ctx, principal)

    def principal_certificate(self, principal: PrincipalId | str) -> x509.Certificate:
        return principals.principal_certificate(self._ctx, principal)

    def principal_credentials(
        self, principal: PrincipalId | str, *, conn: Connection | None = None
    ) -> PrincipalCredentials:
        """Status, current certificate (DER) and HPKE key of a principal, in one read
        (inside the caller's transaction with ``conn``)."""
        return principals.principal_credentials(self._ctx, principal, conn=conn)

    def revoke_principal(
        self, principal: PrincipalId | str, *, reason: str = "unspecified"
    ) -> PrincipalInfo:
        return principals.revoke_principal(self._ctx, principal, reason=reason)

    # -- keysets -------------------------------------------------------------------

    def create_keyset(self, name: str, template: KeyTemplate | str) -> KeyVersionInfo:
        return keysets.create_keyset(self._ctx, name, template)

    def rotate_keyset(
        self, name: str, *, template: KeyTemplate | str | None = None
    ) -> KeyVersionInfo:
        return keysets.rotate_keyset(self._ctx, name, template=template)

    def promote_version(self, name: str, version: int) -> KeyVersionInfo:
        return keysets.promote_version(self._ctx, name, version)

    def enable_version(self, name: str, version: int) -> KeyVersionInfo:
        return keysets.enable_version(self._ctx, name, version)

    def disable_version(self, name: str, version: int) -> KeyVersionInfo:
        return keysets.disable_version(self._ctx, name, version)

    def destroy_version(self, name: str, version: int) -> KeyVersionInfo:
        return keysets.destroy_version(self._ctx, name, version)

    def list_keysets(self) -> list[KeysetSummary]:
        return keysets.list_keysets(self._ctx)

    def show_keyset(self, name: str) -> KeysetSummary:
        return keysets.show_keyset(self._ctx, name)

    # -- grants --------------------------------------------------------------------

    def grant(self, principal: PrincipalId | str, keyset: str, mode: GrantMode | str) -> GrantInfo:
        return grants.grant(self._ctx, principal, keyset, mode)

    def revoke_grant(
        self, principal: PrincipalId | str, keyset: str, mode: GrantMode | str
    ) -> GrantInfo:
        return grants.revoke_grant(self._ctx, principal, keyset, mode)

    def list_grants(
        self,
        *,
        principal: PrincipalId | str | None = None,
        keyset: str | None = None,
        include_revoked: bool = False,
    ) -> list[GrantInfo]:
        return grants.list_grants(
            self._ctx, principal=principal, keyset=keyset, include_revoked=include_revoked
        )

    def holdings(self, principal: PrincipalId | str) -> list[Holding]:
        """The keysets ``principal`` holds, with their versions' states (no key material)."""
        return holdings(self._ctx, principal)

    # -- deliveries ----------------------------------------------------------------

    def deliver(
        self, keyset: str, version: int, principal: PrincipalId | str, ttl: timedelta
    ) -> DeliveryEnvelope:
        return deliveries.deliver(self._ctx, keyset, version, principal, ttl)

    def fetch_deliveries(self, principal: PrincipalId | str) -> list[DeliveryEnvelope]:
        return deliveries.fetch_deliveries(self._ctx, principal)

    def ack(self, delivery_id: str, principal: PrincipalId | str, proof: bytes) -> DeliveryInfo:
        return deliveries.ack(self._ctx, delivery_id, principal, proof)

    def expire_overdue(self, now: datetime | None = None) -> list[str]:
        return deliveries.expire_overdue(self._ctx, now)

    def show_delivery(self, delivery_id: str) -> DeliveryInfo:
        return deliveries.show_delivery(self._ctx, delivery_id)

    def list_deliveries(
        self,
        *,
        principal: PrincipalId | str | None = None,
        keyset: str | None = None,
        state: str | None = None,
    ) -> list[DeliveryInfo]:
        return deliveries.list_deliveries(
            self._ctx, principal=principal, keyset=keyset, state=state
        )

    # -- the log -------------------------------------------------------------------

    def verify_log(
        self, *, previous: SignedTreeHead | None = None, full: bool = False
    ) -> SignedTreeHead:
        return audit.verify_log(self._ctx.log, self._log_public_key, previous=previous, full=full)
