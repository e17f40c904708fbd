"""The bytes a principal and the broker must agree on: what is signed, sealed and proven.

The client SDK imports this module to produce exactly what the broker checks:

* :class:`HpkeKeyBinding` — the principal's HPKE sealing key, signed by its
  identity key at enrolment (:func:`sign_with_identity`), so the broker never
  seals to a key the identity holder did not choose;
* :func:`delivery_info` — HPKE ``info`` binding recipient, keyset, version and
  delivery id: a sealed version replayed into another delivery does not open;
* :class:`DeliveryEnvelope` — what a principal fetches, signed by the broker CA.
  HPKE base mode does not authenticate the sender, so without this signature
  anyone who knows a principal's public sealing key could push it a key of
  their choosing; :meth:`DeliveryEnvelope.verify` checks it against the CA
  certificate the principal received when it enrolled;
* :func:`make_ack_proof` — the proof of possession that acknowledges a delivery.

The proof is :meth:`Keyset.prove_possession` over a message naming keyset,
version and key id: for signing keysets a signature with the delivered version
(checkable with its public key alone, even while the version is still pending
on the principal), for every other purpose an HMAC-SHA256 under a key
HKDF-derived from the delivered secret, checked by the broker on its own copy.
The challenge proven is bound to the delivery id, so a proof for one delivery
never acknowledges another.
"""

from __future__ import annotations

import functools
import hmac
from dataclasses import dataclass, fields
from typing import ClassVar, Final, Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from keybroker.encoding import MAX_MESSAGE_SIZE, Message, encode, message_label
from keybroker.errors import CryptoError, DecodeError, KeybrokerError, LocalProtocolError
from keybroker.keys import Keyset, PublicKeyset, Purpose, get_template
from keybroker.pki import PrincipalId

HPKE_KEY_LABEL: Final = message_label("keybroker/broker/hpke-key", 1)
DELIVERY_INFO_LABEL: Final = message_label("keybroker/broker/delivery-info", 1)
DELIVERY_TBS_LABEL: Final = message_label("keybroker/broker/delivery-tbs", 1)
DELIVERY_LABEL: Final = message_label("keybroker/broker/delivery", 1)
ACK_CHALLENGE_LABEL: Final = message_label("keybroker/broker/delivery-ack", 1)

CHALLENGE_SIZE: Final = 32
#: Longest delivery id accepted from a peer (ids are UUID strings).
MAX_ID_LENGTH: Final = 36
#: Largest ack proof accepted (the HMAC is 32 bytes); anything bigger is refused unread.
MAX_PROOF_SIZE: Final = 256
#: Largest identity signature over an HPKE key (Ed25519: 64, ECDSA P-256 DER: ≤ 72).
MAX_IDENTITY_SIGNATURE_SIZE: Final = 256

IdentityPrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
IdentityPublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


# -- identity signatures ----------------------------------------------------------


def sign_with_identity(private_key: IdentityPrivateKey, data: bytes) -> bytes:
    """Sign ``data`` with a principal's identity key (Ed25519, or ECDSA-SHA256 on P-256)."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(data)
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
        private_key.curve, ec.SECP256R1
    ):
        return private_key.sign(data, ec.ECDSA(hashes.SHA256()))
    raise LocalProtocolError("identity keys are Ed25519 or P-256")


def verify_identity_signature(public_key: object, signature: bytes, data: bytes) -> None:
    """Return ``None`` if ``signature`` over ``data`` verifies under ``public_key``.

    Raises :class:`CryptoError` for anything else, including a key type that
    is not an identity key type.
    """
    if not isinstance(signature, bytes) or len(signature) > MAX_IDENTITY_SIGNATURE_SIZE:
        raise CryptoError()
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
            return
        if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
            public_key.curve, ec.SECP256R1
        ):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            return
    except InvalidSignature:
        raise CryptoError() from None
    raise CryptoError()


# -- enrolment: the HPKE sealing key ----------------------------------------------


@dataclass(frozen=True)
class HpkeKeyBinding(Message):
    """ "``principal``'s sealing key is ``public_key`` (``template``, ``key_id``)".

    The principal signs :meth:`encode` with its identity key; the broker
    rebuilds the same message from what it was sent and verifies it against
    the CSR's key.
    """

    LABEL: ClassVar[str] = HPKE_KEY_LABEL
    principal: str
    template: str
    key_id: int
    public_key: bytes

    @classmethod
    def from_public_keyset(cls, principal: PrincipalId, keyset: PublicKeyset) -> Self:
        """The binding for the primary version of a principal's own HPKE keyset."""
        primary = keyset.primary
        if keyset.purpose is not Purpose.HPKE or primary is None:
            raise LocalProtocolError("an HPKE keyset with a primary version is needed")
        return cls(str(principal), primary.template.name, primary.key_id, primary.public_key)

    def recipient(self) -> PublicKeyset:
        """The key to seal to; :class:`DecodeError` if it is not a usable HPKE public key."""
        return _recipient(self.template, self.key_id, bytes(self.public_key))


@functools.lru_cache(maxsize=16_384)
def _recipient(template_name: str, key_id: int, public_key: bytes) -> PublicKeyset:
    """:meth:`HpkeKeyBinding.recipient`, remembered per (template, key id, public key).

    A broker seals to the same few recipients over and over (a node takes one delivery
    per link behind it); parsing the key and its X25519 low-order check cost as much as
    a third of the seal. Public keys only, and a :class:`PublicKeyset` has no method
    that changes it, so sharing one is safe; a refusal raises and is not remembered.
    16,384 recipients (a few KiB each) cover a fleet of that many agents: a smaller
    cache that a rotation walks in order would evict each key before its next use.
    """
    try:
        template = get_template(template_name)
    except KeybrokerError:
        raise DecodeError("unknown HPKE key template") from None
    if Purpose.HPKE not in template.purposes:
        raise DecodeError("not an HPKE key template")
    try:
        return PublicKeyset.from_public_key(template, public_key, key_id=key_id)
    except DecodeError:
        raise
    except KeybrokerError:
        raise DecodeError("malformed HPKE public key") from None


# -- deliveries ---------------------------------------------------------------------


def delivery_info(delivery_id: str, recipient: str, keyset: str, version: int) -> bytes:
    """The HPKE ``info`` a delivery is sealed under (RFC 9180 §5.1 key schedule context)."""
    return encode(
        DELIVERY_INFO_LABEL,
        {"delivery": delivery_id, "recipient": recipient, "keyset": keyset, "version": version},
    )


@dataclass(frozen=True)
class DeliveryEnvelope(Message):
    """One key version sealed to one principal, signed by the broker CA.

    ``signature`` is ECDSA-SHA256 (DER) by the CA key over :meth:`signed_bytes`.
    A principal verifies it (:meth:`verify`), then opens ``sealed`` with
    ``Keyset.install_sealed_version(sealed, own_hpke_handle, info=envelope.info)``
    and acknowledges with :func:`make_ack_proof`.
    """

    LABEL: ClassVar[str] = DELIVERY_LABEL
    delivery_id: str
    recipient: str
    keyset: str
    version: int
    challenge: bytes
    expires_at_ms: int
    sealed: bytes
    signature: bytes

    @property
    def info(self) -> bytes:
        return delivery_info(self.delivery_id, self.recipient, self.keyset, self.version)

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers: every field but the signature."""
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "signature"}
        return encode(DELIVERY_TBS_LABEL, body)

    def verify(
        self,
        ca: x509.Certificate | ec.EllipticCurvePublicKey,
        *,
        recipient: PrincipalId | None = None,
    ) -> None:
        """Return ``None`` if the broker CA signed this envelope (for ``recipient``, if given).

        Raises :class:`CryptoError` otherwise and says no more.
        """
        key = ca.public_key() if isinstance(ca, x509.Certificate) else ca
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise CryptoError()
        if recipient is not None and not hmac.compare_digest(
            self.recipient.encode(), str(recipient).encode()
        ):
            raise CryptoError()
        try:
            key.verify(self.signature, self.signed_bytes(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CryptoError() from None

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Self:
        envelope = super().decode(data, max_size=max_size)
        if not (
            0 < len(envelope.delivery_id) <= MAX_ID_LENGTH
            and len(envelope.challenge) == CHALLENGE_SIZE
            and envelope.version >= 1
            and envelope.expires_at_ms >= 0
            and 0 < len(envelope.signature) <= MAX_IDENTITY_SIGNATURE_SIZE
        ):
            raise DecodeError(f"{cls.LABEL}: field out of range")
        try:
            PrincipalId.parse(envelope.recipient)
        except DecodeError:
            raise DecodeError(f"{cls.LABEL}: malformed recipient") from None
        return envelope


# -- acknowledgement: proof of possession -------------------------------------------


def ack_challenge(delivery_id: str, challenge: bytes) -> bytes:
    """What a proof of possession is made over: the broker's challenge bound to the delivery."""
    return encode(ACK_CHALLENGE_LABEL, {"delivery": delivery_id, "challenge": bytes(challenge)})


def make_ack_proof(keyset: Keyset, version: int, challenge: bytes, delivery_id: str) -> bytes:
    """The proof a principal acks delivery ``delivery_id`` with, from its local copy.

    ``keyset`` must hold the delivered ``version`` (pending, as installed, is fine).
    """
    return keyset.prove_possession(version, ack_challenge(delivery_id, challenge))


def verify_ack_proof(
    keyset: Keyset, version: int, challenge: bytes, delivery_id: str, proof: bytes
) -> None:
    """Return ``None`` or raise :class:`CryptoError` (constant-time comparison)."""
    keyset.verify_possession(version, ack_challenge(delivery_id, challenge), proof)
