"""The one exception tree of keybroker.

Every error keybroker raises on purpose is a :class:`KeybrokerError`. Callers
catch the branch they can act on; the HTTP API maps each branch to an RFC 9457
problem type (``type_uri``) so clients can do the same across the wire::

    KeybrokerError
    ├── ProtocolError            .code (wire code)
    │   ├── LocalProtocolError   we were asked to do something the protocol forbids
    │   └── RemoteProtocolError  the peer sent something malformed or out of order
    │       └── DecodeError      bytes that are not a canonical message of the expected type
    ├── CryptoError              one opaque failure: bad tag, bad signature, wrong key
    ├── KeysetError              no primary, unknown or disabled key id
    │   └── KeyStateError        a transition the version lifecycle forbids
    ├── AuthorizationError       not enrolled, not granted, revoked, expired, replayed
    │   └── CertificateError     a certificate that must not be trusted
    │       ├── CertificateInvalid   bad signature, unknown issuer, malformed, wrong usage
    │       │   ├── UntrustedIssuer        no valid path to a trusted root
    │       │   ├── SelfSignedCertificate  a leaf that vouches for itself
    │       │   ├── WrongKeyUsage          keyUsage / basicConstraints wrong for the purpose
    │       │   ├── ChainTooLong           more intermediates than the configured maximum
    │       │   └── RevocationUnknown      no current, valid CRL (revocation fails closed)
    │       ├── CertificateExpired   outside its validity window (either side)
    │       │   └── CertificateNotYetValid  before its notBefore
    │       ├── CertificateRevoked   listed on a valid CRL of its issuer
    │       └── IdentityMismatch     a valid certificate for someone other than expected
    │           └── PublicKeyMismatch  its key is not the one an out-of-band code names
    ├── ConfigurationError
    │   └── RootKeyError         root key missing, unreadable or exposed (e.g. mode 0644)
    ├── StoreError               the database refused or lost a write
    │   ├── NotFound             no such row
    │   └── Conflict             a unique or optimistic-concurrency check failed
    └── TransportError           raised only by drivers

Rules that keep this tree useful:

* A peer's garbage raises :class:`RemoteProtocolError` (usually :class:`DecodeError`)
  and nothing else; fuzzers assert exactly that.
* :class:`CryptoError` never says *which* check failed (tag, padding, key id
  prefix or signature): the difference is an oracle for an attacker, as
  Fernet's single ``InvalidToken`` teaches.
* No message or ``repr`` of any of these carries key material or plaintext.
"""

from __future__ import annotations

_TYPE_BASE = "https://keybroker.dev/problems/"


class KeybrokerError(Exception):
    """Root of every error keybroker raises on purpose."""

    #: Stable RFC 9457 ``type`` suffix; subclasses override.
    problem: str = "error"
    #: HTTP status the API answers with for this branch.
    status: int = 500

    @property
    def type_uri(self) -> str:
        return _TYPE_BASE + self.problem


class ProtocolError(KeybrokerError):
    """A protocol rule was broken. ``code`` is the wire error code, if the protocol has one."""

    problem = "protocol"
    status = 400

    def __init__(self, message: str, *, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids (our bug, not the peer's)."""

    problem = "protocol/local"
    status = 500


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, oversized or out of order."""

    problem = "protocol/remote"


class DecodeError(RemoteProtocolError):
    """Bytes that are not a canonical encoding of the expected message type."""

    problem = "protocol/decode"


class CryptoError(KeybrokerError):
    """Decryption, MAC or signature verification failed. Deliberately says no more."""

    problem = "crypto"
    status = 400

    def __init__(self, message: str = "cryptographic verification failed") -> None:
        super().__init__(message)


class KeysetError(KeybrokerError):
    """No primary, unknown key id, wrong purpose, or a version not usable for this."""

    problem = "keyset"
    status = 409


class KeyStateError(KeysetError):
    """A key-version transition that the lifecycle forbids (e.g. destroyed → primary)."""

    problem = "keyset/state"


class AuthorizationError(KeybrokerError):
    """Not enrolled, not granted, revoked, expired or replayed."""

    problem = "authorization"
    status = 403


class CertificateError(AuthorizationError):
    """A certificate that must not be trusted for the purpose at hand."""

    problem = "certificate"


class CertificateInvalid(CertificateError):
    """Bad signature, unknown issuer, self-signed leaf, malformed DER, wrong usage."""

    problem = "certificate/invalid"


class UntrustedIssuer(CertificateInvalid):
    """No valid path from the certificate to a trusted root (wrong issuer, forged signature)."""

    problem = "certificate/untrusted-issuer"


class SelfSignedCertificate(CertificateInvalid):
    """An end-entity certificate that names itself as its issuer."""

    problem = "certificate/self-signed"


class WrongKeyUsage(CertificateInvalid):
    """keyUsage, extendedKeyUsage or basicConstraints do not allow the use at hand."""

    problem = "certificate/key-usage"


class ChainTooLong(CertificateInvalid):
    """More intermediate certificates than the configured maximum."""

    problem = "certificate/chain-too-long"


class RevocationUnknown(CertificateInvalid):
    """Revocation was asked for and no current, valid CRL answers it: fail closed."""

    problem = "certificate/revocation-unknown"


class CertificateExpired(CertificateError):
    """The certificate (or one in its chain) is outside its validity window."""

    problem = "certificate/expired"


class CertificateNotYetValid(CertificateExpired):
    """The certificate (or one in its chain) is not valid yet (before its notBefore)."""

    problem = "certificate/not-yet-valid"


class CertificateRevoked(CertificateError):
    """The certificate is listed on a valid CRL of its issuer."""

    problem = "certificate/revoked"


class IdentityMismatch(CertificateError):
    """A valid certificate, but not for the principal we expected."""

    problem = "certificate/identity-mismatch"


class PublicKeyMismatch(IdentityMismatch):
    """The certificate's public key is not the one an out-of-band record names."""

    problem = "certificate/public-key-mismatch"


class ConfigurationError(KeybrokerError):
    """keybroker is configured in a way it refuses to run with."""

    problem = "configuration"


class RootKeyError(ConfigurationError):
    """The root key is missing, unreadable, malformed or exposed to other users."""

    problem = "configuration/root-key"


class StoreError(KeybrokerError):
    """The database refused or lost a write."""

    problem = "store"


class NotFound(StoreError):
    problem = "not-found"
    status = 404


class Conflict(StoreError):
    problem = "conflict"
    status = 409


class TransportError(KeybrokerError):
    """A network or I/O failure; raised only by drivers, never by sans-IO code."""

    problem = "transport"
    status = 502
