"""Path validation and identity checks for keybroker identity certificates.

The trust decision is always cryptography's (``x509.verification``): chain
building, signatures, basicConstraints, path length, keyUsage, EKU and
validity. We hand-roll none of it. Around it we add only:

* a precise error *type*: the verifier raises one generic VerificationError, so
  validity windows are checked again here, only to choose between
  CertificateExpired and CertificateInvalid; a chain we raise for is one the
  verifier refused (or would refuse);
* a stricter leaf profile: EKU must be present and list clientAuth
  (the Web PKI default treats a missing EKU as "any");
* revocation by CRL (:mod:`keybroker.pki.revocation`), fail closed;
* the identity check, which path validation does not do for client
  certificates: the one ``keybroker://`` URI SAN and the CN must both name the
  expected principal.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from keybroker.errors import (
    CertificateExpired,
    CertificateInvalid,
    ConfigurationError,
    DecodeError,
    IdentityMismatch,
)
from keybroker.pki._time import as_utc, is_within
from keybroker.pki.formats import PARSE_ERRORS, fingerprint
from keybroker.pki.principal import URI_SCHEME, PrincipalId
from keybroker.pki.revocation import verify_not_revoked

#: Most intermediates allowed between a leaf and its trust root (cryptography's
#: ``max_chain_depth``; self-issued intermediates do not count). Our deepest
#: chain is manufacturer root → intermediate → device.
DEFAULT_MAX_CHAIN_DEPTH = 2


def _require_client_auth(
    _policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage
) -> None:
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise ValueError("leaf EKU does not include clientAuth")


def _ee_policy(require_client_auth: bool) -> ExtensionPolicy:
    policy = ExtensionPolicy.webpki_defaults_ee()
    if require_client_auth:
        policy = policy.require_present(
            x509.ExtendedKeyUsage, Criticality.NON_CRITICAL, _require_client_auth
        )
    return policy


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, *PARSE_ERRORS):
        return False


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return is_within(cert.not_valid_before_utc, cert.not_valid_after_utc, now)


def _out_of_window_issuer(
    leaf: x509.Certificate, pool: Sequence[x509.Certificate], now: datetime
) -> x509.Certificate | None:
    """A certificate outside its window on some name-linked path above ``leaf``, if any.

    Used only to pick the error type after the verifier has said no.
    """
    seen = {fingerprint(leaf)}
    frontier = [leaf]
    while frontier:
        issuers = [
            cand
            for cert in frontier
            for cand in pool
            if cand.subject == cert.issuer and fingerprint(cand) not in seen
        ]
        for cand in issuers:
            if not _valid_at(cand, now):
                return cand
            seen.add(fingerprint(cand))
        frontier = issuers
    return None


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    trust_roots: Sequence[x509.Certificate],
    now: datetime,
    *,
    crls: Sequence[x509.CertificateRevocationList] | None = None,
    max_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
    require_client_auth: bool = True,
) -> list[x509.Certificate]:
    """Validate ``leaf`` up to one of ``trust_roots`` at ``now``; return the chain, leaf first.

    ``crls=None`` skips revocation; a list turns it on for every certificate
    below the root (see :func:`keybroker.pki.verify_not_revoked`).
    ``require_client_auth=False`` accepts a leaf without EKU (a leaf *with* an
    EKU must still list clientAuth).

    Raises CertificateExpired if the leaf, or a certificate that could be its
    issuer, is outside its validity window; CertificateRevoked if listed on a
    valid CRL; CertificateInvalid for everything else (unknown issuer, bad
    signature, self-signed leaf, CA as leaf, wrong usage, too deep, malformed,
    unusable CRL). Does not check whom the certificate names: see
    :func:`verify_identity`.
    """
    now = as_utc(now)
    if not trust_roots:
        raise ConfigurationError("no trust roots")
    for root in trust_roots:
        # cryptography accepts a leaf that is itself in the store, as a one-certificate
        # chain; a pinned end-entity certificate would then vouch for itself.
        if not _is_ca(root):
            raise ConfigurationError(
                f"trust root {root.subject.rfc4514_string()} is not a CA certificate"
            )
    if not _valid_at(leaf, now):
        raise CertificateExpired(
            f"certificate not valid at {now.isoformat()} (valid "
            f"{leaf.not_valid_before_utc.isoformat()} to {leaf.not_valid_after_utc.isoformat()})"
        )
    verifier = (
        PolicyBuilder()
        .store(Store(list(trust_roots)))
        .time(now)
        .max_chain_depth(max_depth)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=_ee_policy(require_client_auth),
        )
        .build_client_verifier()
    )
    try:
        chain = verifier.verify(leaf, list(intermediates))
    except (VerificationError, *PARSE_ERRORS) as exc:
        stale = _out_of_window_issuer(leaf, [*intermediates, *trust_roots], now)
        if stale is not None:
            raise CertificateExpired(
                f"issuer {stale.subject.rfc4514_string()} not valid at {now.isoformat()}"
            ) from None
        raise CertificateInvalid(f"certificate chain rejected: {exc}") from None
    if crls is not None:
        verify_not_revoked(chain.chain, crls, now)
    return chain.chain


def principal_of(cert: x509.Certificate) -> PrincipalId:
    """The principal a keybroker identity certificate names.

    Requires exactly one ``keybroker:`` URI SAN (scheme compared without case, so
    a second one in other case cannot hide), well formed, and exactly one CN
    equal to it. Anything else raises IdentityMismatch.
    """
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except x509.ExtensionNotFound:
        raise IdentityMismatch("certificate has no subjectAltName") from None
    except PARSE_ERRORS:
        raise CertificateInvalid("certificate has a malformed subject or subjectAltName") from None
    uris = [
        uri
        for uri in sans.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.lower().startswith(f"{URI_SCHEME}:")
    ]
    if len(uris) != 1:
        raise IdentityMismatch(f"certificate has {len(uris)} keybroker URIs; exactly one required")
    try:
        principal = PrincipalId.from_uri(uris[0])
    except DecodeError:
        raise IdentityMismatch("certificate has a malformed keybroker URI") from None
    if [attr.value for attr in common_names] != [str(principal)]:
        raise IdentityMismatch("certificate CN does not match its keybroker URI")
    return principal


def verify_identity(
    cert: x509.Certificate, expected: PrincipalId, *, serial_number: str | None = None
) -> None:
    """Return None if ``cert`` names ``expected`` (and carries ``serial_number``, if given).

    Raises IdentityMismatch otherwise. Checks names only: call
    :func:`verify_chain` first.
    """
    actual = principal_of(cert)
    if actual != expected:
        raise IdentityMismatch(f"certificate is for {actual}, expected {expected}")
    if serial_number is not None:
        serials = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        if [attr.value for attr in serials] != [serial_number]:
            raise IdentityMismatch(f"certificate serialNumber does not match for {expected}")


def verify_principal_certificate(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    trust_roots: Sequence[x509.Certificate],
    expected: PrincipalId,
    now: datetime,
    *,
    crls: Sequence[x509.CertificateRevocationList] | None,
    serial_number: str | None = None,
    max_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
) -> list[x509.Certificate]:
    """Chain, revocation and identity in one call; returns the chain, leaf first.

    ``crls`` has no default on purpose: skipping revocation must be written
    down (``crls=None``) by the caller.
    """
    chain = verify_chain(leaf, intermediates, trust_roots, now, crls=crls, max_depth=max_depth)
    verify_identity(leaf, expected, serial_number=serial_number)
    return chain
