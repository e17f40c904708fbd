"""Which subject public keys keybroker certifies.

Principals hold Ed25519 or P-256 keys by default. RSA is off by default and
can be switched on per call for flows that must interoperate with RSA holders
(e.g. keyless TLS for services whose keys are RSA); it then needs at least
``min_rsa_bits`` and the CA/B Forum exponent rule (odd, ≥ 65537).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keybroker.errors import CertificateInvalid

_MIN_RSA_EXPONENT = 65537


class KeyType(enum.StrEnum):
    ED25519 = "ed25519"
    P256 = "p256"
    RSA = "rsa"


def key_type(public_key: object) -> KeyType | None:
    """The :class:`KeyType` of ``public_key``, or None for anything else (e.g. secp256k1)."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return KeyType.ED25519
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
        public_key.curve, ec.SECP256R1
    ):
        return KeyType.P256
    if isinstance(public_key, rsa.RSAPublicKey):
        return KeyType.RSA
    return None


def describe_key(public_key: object) -> str:
    """A short, secret-free description for error messages: ``ec/secp256k1``, ``rsa-1024``."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"ec/{public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa-{public_key.key_size}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return type(public_key).__name__


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    allowed: frozenset[KeyType] = frozenset({KeyType.ED25519, KeyType.P256})
    min_rsa_bits: int = 2048

    def verify_key(self, public_key: object) -> None:
        """Return None if the policy admits ``public_key``; raise CertificateInvalid otherwise."""
        kind = key_type(public_key)
        if kind is None or kind not in self.allowed:
            allowed = ", ".join(sorted(self.allowed))
            raise CertificateInvalid(
                f"key type {describe_key(public_key)} not allowed (allowed: {allowed})"
            )
        if isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < self.min_rsa_bits:
                raise CertificateInvalid(
                    f"RSA key of {public_key.key_size} bits; at least {self.min_rsa_bits} required"
                )
            exponent = public_key.public_numbers().e
            if exponent < _MIN_RSA_EXPONENT or exponent % 2 == 0:
                raise CertificateInvalid("RSA public exponent must be odd and at least 65537")


#: Ed25519 and P-256 only.
DEFAULT_KEY_POLICY = KeyPolicy()
#: Ed25519, P-256 and RSA ≥ 2048.
KEY_POLICY_WITH_RSA = KeyPolicy(allowed=frozenset(KeyType))
