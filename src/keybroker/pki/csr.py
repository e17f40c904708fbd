"""Certificate signing requests: the self-signature and the key type.

Parsing lives in :func:`keybroker.pki.formats.load_csr` (garbage → DecodeError,
a RemoteProtocolError, so parser fuzzing sees one type). Checking lives here: a
well-formed CSR whose signature does not verify, or whose key the policy does
not admit, raises :class:`CertificateInvalid` — it parsed, it is just not
acceptable.

The CSR's subject, attributes and requested extensions are never copied into a
certificate: who the certificate speaks for is decided by the caller (after
the enrolment token), not by the requester.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from keybroker.errors import CertificateInvalid
from keybroker.pki.formats import PARSE_ERRORS, load_csr
from keybroker.pki.keypolicy import DEFAULT_KEY_POLICY, KeyPolicy

__all__ = ["csr_public_key", "load_csr", "verify_csr"]


def csr_public_key(
    csr: x509.CertificateSigningRequest, *, key_policy: KeyPolicy = DEFAULT_KEY_POLICY
) -> CertificatePublicKeyTypes:
    """Verify ``csr`` and return its public key."""
    try:
        public_key = csr.public_key()
    except PARSE_ERRORS:
        raise CertificateInvalid("CSR public key is malformed or of an unknown type") from None
    # Key type first: no signature work for a key we would refuse anyway.
    key_policy.verify_key(public_key)
    try:
        valid = csr.is_signature_valid
    except PARSE_ERRORS:
        valid = False
    if not valid:
        raise CertificateInvalid("CSR self-signature does not verify")
    return public_key


def verify_csr(
    csr: x509.CertificateSigningRequest, *, key_policy: KeyPolicy = DEFAULT_KEY_POLICY
) -> None:
    """Return None if ``csr`` is self-signed by a key the policy admits; else raise."""
    csr_public_key(csr, key_policy=key_policy)
