"""keybroker.pki: CA, CSR handling, identity certificates, path validation, CRLs.

Works on ``cryptography`` objects and PEM/DER bytes; knows nothing of the
broker or the store. Time is always an argument (``now``), never read here.

Errors (all from :mod:`keybroker.errors`):

* bytes that do not parse (certificate, CSR, CRL), malformed principal ids and
  serial numbers → :class:`DecodeError` (a RemoteProtocolError: a peer's garbage);
* a well-formed CSR with a bad self-signature or a key type the
  :class:`KeyPolicy` refuses → :class:`CertificateInvalid`;
* path validation → :class:`CertificateExpired` (outside a validity window),
  :class:`CertificateRevoked` (listed on a valid CRL) or
  :class:`CertificateInvalid` (everything else, including a stale, future,
  forged or missing CRL: revocation fails closed);
* the identity check → :class:`IdentityMismatch`;
* device certificates (:mod:`keybroker.pki.device`) → one specific subclass per
  refusal reason (ChainTooLong, SelfSignedCertificate, CertificateNotYetValid,
  WrongKeyUsage, UntrustedIssuer, RevocationUnknown, PublicKeyMismatch …);
* a CA key or certificate we refuse to sign with → :class:`ConfigurationError`;
* a caller asking for something impossible (naive datetime, validity beyond the
  issuer's, path length too long) → :class:`LocalProtocolError`.

CA keys are P-256 only; see :mod:`keybroker.pki.authority` for why not Ed25519.
"""

from keybroker.pki.authority import CertificateAuthority
from keybroker.pki.csr import csr_public_key, verify_csr
from keybroker.pki.device import (
    DEFAULT_MAX_DEVICE_INTERMEDIATES,
    DEVICE_KEY_POLICY,
    DeviceIdentity,
    device_identity_of,
    verify_device_chain,
    verify_device_identity,
)
from keybroker.pki.formats import (
    certificate_der,
    certificate_pem,
    fingerprint,
    load_certificate,
    load_certificates,
    load_crl,
    load_csr,
    public_key_fingerprint,
    subject_key_identifier,
)
from keybroker.pki.keypolicy import (
    DEFAULT_KEY_POLICY,
    KEY_POLICY_WITH_RSA,
    KeyPolicy,
    KeyType,
    key_type,
)
from keybroker.pki.principal import PrincipalId, PrincipalKind
from keybroker.pki.revocation import Revocation, verify_crl, verify_not_revoked
from keybroker.pki.validation import (
    DEFAULT_MAX_CHAIN_DEPTH,
    principal_of,
    verify_chain,
    verify_identity,
    verify_principal_certificate,
)

__all__ = [
    "DEFAULT_KEY_POLICY",
    "DEFAULT_MAX_CHAIN_DEPTH",
    "DEFAULT_MAX_DEVICE_INTERMEDIATES",
    "DEVICE_KEY_POLICY",
    "KEY_POLICY_WITH_RSA",
    "CertificateAuthority",
    "DeviceIdentity",
    "KeyPolicy",
    "KeyType",
    "PrincipalId",
    "PrincipalKind",
    "Revocation",
    "certificate_der",
    "certificate_pem",
    "csr_public_key",
    "device_identity_of",
    "fingerprint",
    "key_type",
    "load_certificate",
    "load_certificates",
    "load_crl",
    "load_csr",
    "principal_of",
    "public_key_fingerprint",
    "subject_key_identifier",
    "verify_chain",
    "verify_crl",
    "verify_csr",
    "verify_device_chain",
    "verify_device_identity",
    "verify_identity",
    "verify_not_revoked",
    "verify_principal_certificate",
]
