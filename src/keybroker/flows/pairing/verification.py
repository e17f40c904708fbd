"""The controller's check of a device, before any key leaves it.

In this order, each failure its own error (and so its own
:class:`~keybroker.flows.pairing.refusals.RefusalReason`):

1. the proof answers *this* session's nonce (ReplayedProof otherwise);
2. every certificate parses (DecodeError: malformed certificate);
3. the chain (:func:`keybroker.pki.verify_device_chain`): at most
   ``max_intermediates`` intermediates, not self-signed, inside every validity
   window, the device profile's keyUsage, a valid path to a trusted manufacturer
   root, and not revoked on a current CRL of each issuer (when CRLs are given);
4. identification info equal to the pairing code's (serial, MAC, model), and
   the SHA-256 of the certificate's key equal to the code's
   (:func:`keybroker.pki.verify_device_identity`);
5. the device's signature over this session's transcript, under the certified
   key (ProofInvalid otherwise): the device holds the key, now.

Only a device that passes all five is sent the common key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from keybroker.errors import ConfigurationError, CryptoError, DecodeError
from keybroker.flows.pairing.code import PairingCode
from keybroker.flows.pairing.messages import DeviceProof, ProofToBeSigned
from keybroker.flows.pairing.refusals import ProofInvalid, ReplayedProof
from keybroker.keys import verify_certificate_signature
from keybroker.pki import (
    DEFAULT_MAX_DEVICE_INTERMEDIATES,
    DeviceIdentity,
    fingerprint,
    load_certificate,
    verify_device_chain,
    verify_device_identity,
)
from keybroker.pki.formats import certificate_der


@dataclass(frozen=True)
class DevicePolicy:
    """What a controller trusts: manufacturer roots, their CRLs, and how deep a chain may be.

    ``crls=None`` turns revocation checking off, and must be written down.
    """

    trust_roots: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] | None
    max_intermediates: int = DEFAULT_MAX_DEVICE_INTERMEDIATES

    def __post_init__(self) -> None:
        if not self.trust_roots:
            raise ConfigurationError("a controller needs at least one manufacturer root")
        if self.max_intermediates < 0:
            raise ConfigurationError("max_intermediates must not be negative")


@dataclass(frozen=True)
class VerifiedDevice:
    """A device that passed every check: its leaf certificate and what it names."""

    leaf: x509.Certificate
    identity: DeviceIdentity
    certificate_sha256: bytes


def chain_sha256(chain: Sequence[bytes]) -> bytes:
    """SHA-256 over the DER certificates, each length-prefixed (no two chains collide)."""
    digest = hashes.Hash(hashes.SHA256())
    for der in chain:
        digest.update(len(der).to_bytes(4, "big"))
        digest.update(der)
    return digest.finalize()


def proof_to_be_signed(hello_sha256: bytes, device_nonce: bytes, chain: Sequence[bytes]) -> bytes:
    return ProofToBeSigned(
        hello_sha256=hello_sha256, device_nonce=device_nonce, chain_sha256=chain_sha256(chain)
    ).encode()


def verify_device(
    proof: DeviceProof,
    *,
    nonce: bytes,
    hello_sha256: bytes,
    expected: PairingCode,
    policy: DevicePolicy,
    now: datetime,
) -> VerifiedDevice:
    """Return the verified device or raise the error of the first check that fails."""
    if proof.controller_nonce != nonce:
        raise ReplayedProof("the device proof answers another session's nonce")
    certs = [load_certificate(der) for der in proof.chain]
    # The DER re-encoding must be what was sent: what is signed and hashed is what was checked.
    if [certificate_der(c) for c in certs] != list(proof.chain):
        raise DecodeError("certificate is not in DER")
    leaf, intermediates = certs[0], certs[1:]
    verify_device_chain(
        leaf,
        intermediates,
        policy.trust_roots,
        now,
        crls=policy.crls,
        max_intermediates=policy.max_intermediates,
    )
    verify_device_identity(leaf, expected.identity, expected.key_sha256)
    tbs = proof_to_be_signed(hello_sha256, proof.device_nonce, proof.chain)
    try:
        verify_certificate_signature(leaf.public_key(), proof.signature, tbs)
    except CryptoError:
        raise ProofInvalid("the device's signature does not verify under its certificate") from None
    return VerifiedDevice(leaf, expected.identity, fingerprint(leaf))
