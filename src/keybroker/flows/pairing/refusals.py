"""Why a controller refuses a device: one reason code per check, and the errors behind them.

Each reason is sent to the device in a ``Refusal`` message and printed by both
sides, so an installer sees *which* check failed. This is not the oracle
Fernet avoids: the checks are on public data (a certificate, a signature over
public nonces), and nothing secret has been used when one fails.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from keybroker.errors import (
    AuthorizationError,
    CertificateExpired,
    CertificateInvalid,
    CertificateNotYetValid,
    CertificateRevoked,
    ChainTooLong,
    CryptoError,
    DecodeError,
    IdentityMismatch,
    KeybrokerError,
    PublicKeyMismatch,
    RemoteProtocolError,
    RevocationUnknown,
    SelfSignedCertificate,
    UntrustedIssuer,
    WrongKeyUsage,
)


class RefusalReason(StrEnum):
    MALFORMED_CERTIFICATE = "malformed-certificate"
    CHAIN_TOO_LONG = "chain-too-long"
    SELF_SIGNED = "self-signed"
    NOT_YET_VALID = "not-yet-valid"
    EXPIRED = "expired"
    WRONG_KEY_USAGE = "wrong-key-usage"
    UNTRUSTED_ISSUER = "untrusted-issuer"
    CERTIFICATE_INVALID = "certificate-invalid"
    REVOKED = "revoked"
    REVOCATION_UNKNOWN = "revocation-unknown"
    IDENTITY_MISMATCH = "identity-mismatch"
    PUBLIC_KEY_MISMATCH = "public-key-mismatch"
    REPLAYED_PROOF = "replayed-proof"
    BAD_PROOF = "bad-proof"
    KEY_CONFIRMATION_FAILED = "key-confirmation-failed"
    PROTOCOL_VIOLATION = "protocol-violation"
    #: (said by a paired device) the key does not continue the one it holds
    NOT_CONTINUOUS = "not-continuous"
    STALE_VERSION = "stale-version"


#: What an installer reads for each reason.
EXPLANATIONS: Final[dict[RefusalReason, str]] = {
    RefusalReason.MALFORMED_CERTIFICATE: "the device sent bytes that are not a certificate",
    RefusalReason.CHAIN_TOO_LONG: "the certificate chain is longer than allowed",
    RefusalReason.SELF_SIGNED: "the device certificate is self-signed",
    RefusalReason.NOT_YET_VALID: "a certificate in the chain is not valid yet",
    RefusalReason.EXPIRED: "a certificate in the chain has expired",
    RefusalReason.WRONG_KEY_USAGE: "the device certificate's key usage does not allow pairing",
    RefusalReason.UNTRUSTED_ISSUER: "the certificate was not issued by a trusted manufacturer",
    RefusalReason.CERTIFICATE_INVALID: "the device certificate is not acceptable",
    RefusalReason.REVOKED: "the certificate has been revoked",
    RefusalReason.REVOCATION_UNKNOWN: "no current revocation list answers for the certificate",
    RefusalReason.IDENTITY_MISMATCH: "the certificate is for another device than the code names",
    RefusalReason.PUBLIC_KEY_MISMATCH: "the certificate's key is not the key the code names",
    RefusalReason.REPLAYED_PROOF: "the device replayed a proof from an earlier session",
    RefusalReason.BAD_PROOF: "the device could not prove it holds the certified key",
    RefusalReason.KEY_CONFIRMATION_FAILED: "the device did not confirm the common key",
    RefusalReason.PROTOCOL_VIOLATION: "the peer broke the pairing protocol",
    RefusalReason.NOT_CONTINUOUS: (
        "the device is paired and the controller did not prove it holds the device's key"
    ),
    RefusalReason.STALE_VERSION: "the key offered is older than the one the device holds",
}


class ReplayedProof(AuthorizationError):
    """A device proof signed for another session's challenge (its nonce is not ours)."""

    problem = "pairing/replayed-proof"


class ProofInvalid(AuthorizationError):
    """The device proof's signature does not verify under the certified key."""

    problem = "pairing/bad-proof"


class KeyConfirmationFailed(AuthorizationError):
    """The device's key confirmation MAC does not verify."""

    problem = "pairing/key-confirmation-failed"


class NotContinuous(AuthorizationError):
    """A paired device was offered a key without proof of the version it holds."""

    problem = "pairing/not-continuous"


class StaleVersion(AuthorizationError):
    """A paired device was offered an older version than the one it holds."""

    problem = "pairing/stale-version"


# Most specific first: the first class an error is an instance of gives its reason.
_BY_ERROR: Final[tuple[tuple[type[KeybrokerError], RefusalReason], ...]] = (
    (ReplayedProof, RefusalReason.REPLAYED_PROOF),
    (ProofInvalid, RefusalReason.BAD_PROOF),
    (KeyConfirmationFailed, RefusalReason.KEY_CONFIRMATION_FAILED),
    (NotContinuous, RefusalReason.NOT_CONTINUOUS),
    (StaleVersion, RefusalReason.STALE_VERSION),
    (ChainTooLong, RefusalReason.CHAIN_TOO_LONG),
    (SelfSignedCertificate, RefusalReason.SELF_SIGNED),
    (CertificateNotYetValid, RefusalReason.NOT_YET_VALID),
    (CertificateExpired, RefusalReason.EXPIRED),
    (WrongKeyUsage, RefusalReason.WRONG_KEY_USAGE),
    (UntrustedIssuer, RefusalReason.UNTRUSTED_ISSUER),
    (RevocationUnknown, RefusalReason.REVOCATION_UNKNOWN),
    (CertificateRevoked, RefusalReason.REVOKED),
    (CertificateInvalid, RefusalReason.CERTIFICATE_INVALID),
    (PublicKeyMismatch, RefusalReason.PUBLIC_KEY_MISMATCH),
    (IdentityMismatch, RefusalReason.IDENTITY_MISMATCH),
    (CryptoError, RefusalReason.BAD_PROOF),
    (DecodeError, RefusalReason.MALFORMED_CERTIFICATE),
    (RemoteProtocolError, RefusalReason.PROTOCOL_VIOLATION),
)


def reason_of(error: KeybrokerError) -> RefusalReason:
    """The refusal reason for an error a device check raised."""
    for cls, reason in _BY_ERROR:
        if isinstance(error, cls):
            return reason
    return RefusalReason.PROTOCOL_VIOLATION


def parse_reason(text: str) -> RefusalReason:
    """A reason a peer sent; an unknown one is a protocol violation (DecodeError)."""
    try:
        return RefusalReason(text)
    except ValueError:
        raise DecodeError("unknown refusal reason") from None
