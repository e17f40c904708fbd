"""The principal's SDK: enrol, long-poll for deliveries, open them, acknowledge them.

::

    client = await PrincipalClient.enrol(url, ca_pem, "site/fra1", token,
                                         Path("fra1.keyring"), passphrase=pw)
    for delivery in await client.fetch_deliveries(wait=30):
        client.open_delivery(delivery)       # verify the CA's signature, HPKE-open, save
        await client.ack(delivery)           # proof of possession

Every request after enrolment is signed with the identity key (RFC 9421,
:mod:`keybroker.client.signing`). A delivered key is written to the keyring
(encrypted, atomically) *before* it is acknowledged, so an ack the broker
recorded is never for a key the principal lost in a crash.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal, TypeVar
from urllib.parse import quote

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from pydantic import BaseModel

from keybroker.api import schemas
from keybroker.api.settings import utc_now
from keybroker.broker.messages import (
    DeliveryEnvelope,
    HpkeKeyBinding,
    make_ack_proof,
    sign_with_identity,
)
from keybroker.client._http import DEFAULT_TIMEOUT, Connection
from keybroker.client.keyring import KekSource, Keyring
from keybroker.client.logcheck import LogClient
from keybroker.client.signing import RequestSigner
from keybroker.errors import ConfigurationError, IdentityMismatch, KeybrokerError, KeysetError
from keybroker.keys import (
    ECDSA_P256,
    ED25519,
    SECRET_ACCESS,
    X25519_HPKE,
    KeyEncryptionKey,
    Keyset,
    KeyVersionInfo,
)
from keybroker.pki import PrincipalId, load_certificate, principal_of

IdentityAlgorithm = Literal["ed25519", "p256"]
Clock = Callable[[], datetime]
_M = TypeVar("_M", bound=BaseModel)

#: Extra seconds a long-poll's HTTP timeout allows beyond the wait asked for.
_POLL_SLACK: Final = 30.0


@dataclass(frozen=True)
class Delivery:
    """A delivery as fetched: the CA-signed envelope, and the keyset purpose to hold it under."""

    envelope: DeliveryEnvelope
    purpose: str

    @property
    def delivery_id(self) -> str:
        return self.envelope.delivery_id

    @property
    def keyset(self) -> str:
        return self.envelope.keyset

    @property
    def version(self) -> int:
        return self.envelope.version


def _csr(identity: Keyset) -> bytes:
    # cryptography's CSR builder needs the key object (audited: SECRET_ACCESS); the CSR only
    # proves possession, the broker puts the principal's identity into the certificate.
    key = identity.signer().private_key(SECRET_ACCESS)
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigurationError("identity keys are Ed25519 or P-256")
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keybroker enrolment")]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _binding_signature(identity: Keyset, binding: HpkeKeyBinding) -> bytes:
    key = identity.signer().private_key(SECRET_ACCESS)
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigurationError("identity keys are Ed25519 or P-256")
    return sign_with_identity(key, binding.encode())


class PrincipalClient:
    """A principal talking to its broker. Make one with :meth:`enrol` or :meth:`open`."""

    def __init__(
        self,
        keyring: Keyring,
        keyring_path: Path,
        kek_source: KekSource,
        *,
        url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock = utc_now,
    ) -> None:
        self._keyring = keyring
        self._path = Path(keyring_path)
        self._source = kek_source
        self._clock = clock
        self._conn = Connection(
            url or keyring.broker_url, keyring.ca_pem, transport=transport, timeout=timeout
        )
        self._sign = RequestSigner(str(keyring.principal), keyring.identity, clock)
        self._ca = load_certificate(keyring.ca_pem)
        self.log = LogClient(self._conn, keyring.log_public_key, hook=self._sign)

    def __repr__(self) -> str:
        return f"PrincipalClient({self._keyring.principal}, {self._conn.url!r})"

    async def __aenter__(self) -> PrincipalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._conn.aclose()

    @property
    def principal(self) -> PrincipalId:
        return self._keyring.principal

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    # -- getting started ----------------------------------------------------------------

    @classmethod
    async def enrol(
        cls,
        url: str,
        ca_pem: bytes | str,
        principal: PrincipalId | str,
        token: str,
        keyring_path: Path,
        *,
        passphrase: str | bytes | None = None,
        kek: KeyEncryptionKey | None = None,
        identity_algorithm: IdentityAlgorithm = "ed25519",
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock = utc_now,
    ) -> PrincipalClient:
        """Make the identity and HPKE keys, enrol with ``token``, and save the keyring.

        Refuses to overwrite an existing keyring file. ``ca_pem`` is the broker CA
        the operator handed over with the token: TLS is pinned to it, and so is
        every envelope signature from now on.
        """
        pid = PrincipalId.parse(str(principal))
        source = KekSource(passphrase=passphrase, kek=kek)
        path = Path(keyring_path)
        if path.exists():
            raise ConfigurationError(f"{path} exists; enrolling again would lose its keys")
        ca_bytes = ca_pem.encode("ascii") if isinstance(ca_pem, str) else ca_pem
        template = ED25519 if identity_algorithm == "ed25519" else ECDSA_P256
        identity = Keyset.generate("keyring/identity", template)
        hpke = Keyset.generate("keyring/hpke", X25519_HPKE)
        binding = HpkeKeyBinding.from_public_keyset(pid, hpke.public_keyset())
        body = schemas.EnrolmentCreate(
            principal=str(pid),
            token=token,
            csr_pem=_csr(identity).decode("ascii"),
            hpke=schemas.HpkeKeyIn(
                template=binding.template,
                key_id=binding.key_id,
                public_key=binding.public_key,
                signature=_binding_signature(identity, binding),
            ),
        )
        conn = Connection(url, ca_bytes, transport=transport, timeout=timeout)
        try:
            log_key = await conn.call(schemas.LogPublicKey, "GET", "/v1/log/public-key")
            keyring = Keyring(
                principal=pid,
                broker_url=url,
                ca_pem=ca_bytes,
                log_public_key=log_key.public_key,
                certificate_pem=b"",
                identity=identity,
                hpke=hpke,
            )
            # The keys reach the disk before the broker binds them to us: a crash after
            # the broker's commit must not leave a certificate whose key nobody holds.
            keyring.save(path, source)
            try:
                enrolled = await conn.call(
                    schemas.EnrolmentOut, "POST", "/v1/enrolments", body=body
                )
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        finally:
            await conn.aclose()
        cert = load_certificate(enrolled.certificate_pem.encode("ascii"))
        # The broker we pinned must have issued a certificate for us, with our key.
        if principal_of(cert) != pid:
            raise IdentityMismatch(f"the broker issued a certificate for {principal_of(cert)}")
        if not _same_key(cert, identity):
            raise IdentityMismatch("the issued certificate is not for our identity key")
        keyring.certificate_pem = enrolled.certificate_pem.encode("ascii")
        keyring.save(path, source)
        return cls(
            keyring, path, source, url=url, transport=transport, timeout=timeout, clock=clock
        )

    @classmethod
    def open(
        cls,
        keyring_path: Path,
        *,
        passphrase: str | bytes | None = None,
        kek: KeyEncryptionKey | None = None,
        url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock = utc_now,
    ) -> PrincipalClient:
        """Open an enrolled principal's keyring (``url`` overrides the one recorded)."""
        source = KekSource(passphrase=passphrase, kek=kek)
        keyring = Keyring.load(Path(keyring_path), source)
        return cls(
            keyring,
            Path(keyring_path),
            source,
            url=url,
            transport=transport,
            timeout=timeout,
            clock=clock,
        )

    # -- deliveries ----------------------------------------------------------------------

    async def fetch_deliveries(self, wait: float = 0) -> list[Delivery]:
        """Our outstanding deliveries; waits up to ``wait`` seconds for one if there is none.

        Returned envelopes are decoded strictly but not yet verified: :meth:`open_delivery`
        checks the CA's signature before anything is used.
        """
        seconds = max(0, int(wait))
        inbox = await self._conn.call(
            schemas.Inbox,
            "GET",
            "/v1/deliveries",
            params={"wait": seconds},
            hook=self._sign,
            timeout=seconds + _POLL_SLACK,
        )
        return [
            Delivery(DeliveryEnvelope.decode(item.envelope), item.purpose)
            for item in inbox.deliveries
        ]

    def open_delivery(self, delivery: Delivery) -> KeyVersionInfo:
        """Verify the broker's signature, HPKE-open the key into the keyring, save it.

        Raises :class:`CryptoError` for an envelope the broker CA did not sign for us
        (nothing is installed) and :class:`KeysetError` if it clashes with what we hold.
        """
        envelope = delivery.envelope
        envelope.verify(self._ca, recipient=self.principal)
        held = self._keyring.received.get(envelope.keyset)
        keyset = held if held is not None else Keyset(envelope.keyset, delivery.purpose)
        info = keyset.install_sealed_version(
            envelope.sealed, self._keyring.hpke.hpke(), info=envelope.info, now=self._clock()
        )
        self._keyring.received[envelope.keyset] = keyset
        try:
            self._keyring.save(self._path, self._source)
        except BaseException:
            if held is None:
                del self._keyring.received[envelope.keyset]
            raise
        return info

    async def ack(self, delivery: Delivery) -> schemas.DeliveryOut:
        """Acknowledge an opened delivery with the proof of possession."""
        envelope = delivery.envelope
        keyset = self._keyring.received.get(envelope.keyset)
        if keyset is None:
            raise KeysetError(f"open delivery {envelope.delivery_id} before acknowledging it")
        proof = make_ack_proof(keyset, envelope.version, envelope.challenge, envelope.delivery_id)
        return await self._conn.call(
            schemas.DeliveryOut,
            "POST",
            f"/v1/deliveries/{quote(envelope.delivery_id, safe='')}/ack",
            body=schemas.AckIn(proof=proof),
            hook=self._sign,
        )

    async def receive(self, wait: float = 0) -> list[schemas.DeliveryOut]:
        """Fetch, open and acknowledge everything outstanding; return the acks."""
        acked = []
        for delivery in await self.fetch_deliveries(wait):
            self.open_delivery(delivery)
            acked.append(await self.ack(delivery))
        return acked

    # -- flows' own routes -----------------------------------------------------------------

    async def call(
        self,
        model: type[_M],
        method: str,
        path: str,
        *,
        body: BaseModel | None = None,
        params: Mapping[str, Any] | None = None,
        wait: float = 0,
    ) -> _M:
        """A request signed by this principal to any route principals call (a flow's own,
        such as ``GET /v1/keyless/keys``), answered as ``model``; errors as in every call.

        ``wait``: seconds a long-poll route may hold the request (sent as ``?wait=``);
        the read timeout grows by as much."""
        if wait:
            params = {**(params or {}), "wait": int(wait)}
            return await self._conn.call(
                model,
                method,
                path,
                body=body,
                params=params,
                hook=self._sign,
                timeout=int(wait) + _POLL_SLACK,
            )
        return await self._conn.call(model, method, path, body=body, params=params, hook=self._sign)

    # -- what the broker says we hold -----------------------------------------------------

    async def holdings(self) -> list[schemas.HoldingOut]:
        """The keysets we hold a grant on, with each version's state as the broker sees it."""
        found = await self._conn.call(schemas.Holdings, "GET", "/v1/holdings", hook=self._sign)
        return found.holdings

    def forget_version(self, keyset: str, version: int) -> bool:
        """Drop one received version from the keyring and save it (atomically).

        For versions the broker disabled or destroyed. Returns ``False`` if we did not
        hold it. If the save fails the keyring is read back from disk, so what this
        object holds stays what the file holds.
        """
        if not self._keyring.forget_version(keyset, version):
            return False
        self._save_or_reload()
        return True

    def promote_version(self, keyset: str, version: int) -> bool:
        """Make a received version the local primary (what we transmit under) and save.

        For the version the broker promoted. ``False`` if it already was; the same
        save-or-reload rule as :meth:`forget_version`.
        """
        if not self._keyring.promote_version(keyset, version):
            return False
        self._save_or_reload()
        return True

    def _save_or_reload(self) -> None:
        try:
            self._keyring.save(self._path, self._source)
        except BaseException:
            with contextlib.suppress(KeybrokerError, OSError):
                self._keyring = Keyring.load(self._path, self._source)
            raise

    # -- what we hold --------------------------------------------------------------------

    def received_keysets(self) -> dict[str, tuple[KeyVersionInfo, ...]]:
        """Every keyset received, with its versions (no secrets)."""
        return self._keyring.received_versions()

    def keyset(self, name: str) -> Keyset:
        """A received keyset, to use through its handles (``.aead()``, ``.mac()`` …)."""
        try:
            return self._keyring.received[name]
        except KeyError:
            raise KeysetError(f"no keyset {name!r} has been received") from None


def _same_key(cert: x509.Certificate, identity: Keyset) -> bool:
    ours = identity.signer().public_keyset().public_key_pem()
    theirs = cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return bytes(ours) == theirs
