"""Path-validation conformance: a table of device chains, each with its expected verdict.

Every case is built with keybroker.pki (a manufacturer root → intermediate →
device) or, for shapes a CA refuses to make, by hand (pairing_kit.raw_device).
The verdict is ``None`` (accepted) or the one RefusalReason the controller must
give. Each case goes through what the controller runs on a DeviceProof's chain:
parse, verify_device_chain, verify_device_identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from keybroker.errors import KeybrokerError
from keybroker.flows.pairing.code import PairingCode
from keybroker.flows.pairing.refusals import RefusalReason as R
from keybroker.flows.pairing.refusals import reason_of
from keybroker.pki import (
    DeviceIdentity,
    certificate_der,
    load_certificate,
    verify_device_chain,
    verify_device_identity,
)

from .pairing_kit import (
    DAY,
    LAMP,
    NOW,
    PLUG,
    SECOND,
    acme,
    ca_key,
    code_for,
    device_key,
    evil,
    name,
    raw_device,
    rsa_public,
    usage,
)


@dataclass
class Case:
    """What the device sends (DER, leaf first) and what the controller is configured with."""

    chain: list[bytes]
    roots: list[x509.Certificate] = field(default_factory=lambda: [acme().root.certificate])
    crls: list[x509.CertificateRevocationList] | None = field(default_factory=lambda: acme().crls())
    code: PairingCode | None = None  # default: the leaf's own code
    now: datetime = NOW
    max_intermediates: int = 1


def verdict(case: Case) -> R | None:
    try:
        certs = [load_certificate(der) for der in case.chain]
        leaf = certs[0]
        verify_device_chain(
            leaf,
            certs[1:],
            case.roots,
            case.now,
            crls=case.crls,
            max_intermediates=case.max_intermediates,
        )
        code = case.code or code_for(leaf)
        verify_device_identity(leaf, code.identity, code.key_sha256)
    except KeybrokerError as exc:
        return reason_of(exc)
    return None


def der(*certs: x509.Certificate) -> list[bytes]:
    return [certificate_der(c) for c in certs]


def inter() -> x509.Certificate:
    return acme().intermediate.certificate


def good(**kw: object) -> list[bytes]:
    return der(acme().device(**kw), inter())  # type: ignore[arg-type]


def _code(identity: DeviceIdentity, key_kind: str = "p256", n: int = 0) -> PairingCode:
    from keybroker.pki import public_key_fingerprint

    return PairingCode(identity, public_key_fingerprint(device_key(key_kind, n).public_key()))


def _chain_of_two() -> list[bytes]:
    pki = acme()
    return der(pki.device(issuer=pki.intermediate2), pki.intermediate2.certificate, inter())


def _forged_intermediate_signature() -> list[bytes]:
    # Same issuer name as Acme's intermediate, signed by another key.
    return der(raw_device(sign_key=ca_key(99)), inter())


def _revoked_leaf() -> Case:
    pki = acme()
    leaf = pki.device()
    return Case(der(leaf, inter()), crls=pki.crls([leaf]))


def _revoked_intermediate() -> Case:
    pki = acme()
    return Case(good(), crls=pki.crls([inter()]))


def _other_device_revoked() -> Case:
    pki = acme()
    other = pki.device(PLUG, key=device_key("p256", 1))
    return Case(good(), crls=pki.crls([other]))


def _stale_crl() -> Case:
    return Case(good(), crls=acme().crls(now=NOW - 10 * DAY, validity=2 * DAY))


def _future_crl() -> Case:
    return Case(good(), crls=acme().crls(now=NOW + DAY))


def _forged_crl() -> Case:
    crls = acme().crls()
    forged = evil().crls()
    # Evil's CRLs carry Evil's names: give them Acme's intermediate name via a raw builder.
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(acme().intermediate.name)
        .last_update(NOW - DAY)
        .next_update(NOW + DAY)
    )
    from cryptography.hazmat.primitives import hashes

    fake = builder.sign(ca_key(99), hashes.SHA256())
    assert forged
    return Case(good(), crls=[crls[0], fake])


def _missing_intermediate_crl() -> Case:
    return Case(good(), crls=acme().crls()[:1])


CASES: dict[str, tuple[Callable[[], Case], R | None]] = {
    # -- accepted -------------------------------------------------------------------------
    "p256-device": (lambda: Case(good()), None),
    "rsa2048-device": (lambda: Case(good(key=device_key("rsa2048"))), None),
    "rsa3072-device": (lambda: Case(good(key=device_key("rsa3072"))), None),
    "revocation-off": (lambda: Case(good(), crls=None), None),
    "at-not-before": (lambda: Case(good(not_before=NOW)), None),
    "at-not-after": (lambda: Case(good(not_before=NOW - 10 * DAY, validity=10 * DAY)), None),
    "second-of-two-roots": (
        lambda: Case(good(), roots=[evil().root.certificate, acme().root.certificate]),
        None,
    ),
    "two-intermediates-allowed": (lambda: Case(_chain_of_two(), max_intermediates=2), None),
    "another-device-revoked": (_other_device_revoked, None),
    "code-with-colon-mac": (
        lambda: Case(good(), code=_code(DeviceIdentity("SN-0001", "00:24:be:80:4f:f1", "lamp-2"))),
        None,
    ),
    "device-of-second-model": (
        lambda: Case(der(acme().device(PLUG, key=device_key("p256", 1)), inter())),
        None,
    ),
    # -- malformed ------------------------------------------------------------------------
    "garbage-der": (lambda: Case([b"\x30\x82\x01\x00garbage"]), R.MALFORMED_CERTIFICATE),
    "truncated-der": (lambda: Case([good()[0][:-40], good()[1]]), R.MALFORMED_CERTIFICATE),
    "empty-der": (lambda: Case([b""]), R.MALFORMED_CERTIFICATE),
    "truncated-intermediate": (lambda: Case([good()[0], good()[1][:100]]), R.MALFORMED_CERTIFICATE),
    # -- validity windows -----------------------------------------------------------------
    "leaf-expired": (
        lambda: Case(good(not_before=NOW - 20 * DAY, validity=10 * DAY)),
        R.EXPIRED,
    ),
    "leaf-expired-by-a-second": (
        lambda: Case(good(not_before=NOW - 10 * DAY, validity=10 * DAY), now=NOW + SECOND),
        R.EXPIRED,
    ),
    "leaf-not-yet-valid": (lambda: Case(good(not_before=NOW + DAY)), R.NOT_YET_VALID),
    "leaf-not-yet-valid-by-a-second": (
        lambda: Case(good(not_before=NOW), now=NOW - SECOND),
        R.NOT_YET_VALID,
    ),
    "intermediate-expired": (lambda: Case(good(), now=NOW + 700 * DAY), R.EXPIRED),
    "everything-not-yet-valid": (lambda: Case(good(), now=NOW - 400 * DAY), R.NOT_YET_VALID),
    "leaf-valid-intermediate-expired": (
        lambda: Case(der(raw_device(not_after=NOW + 4000 * DAY), inter()), now=NOW + 700 * DAY),
        R.EXPIRED,
    ),
    "hand-built-device-like-the-ca-makes": (lambda: Case(der(raw_device(), inter())), None),
    # -- issuer -----------------------------------------------------------------------------
    "other-manufacturer": (
        lambda: Case(der(evil().device(), evil().intermediate.certificate)),
        R.UNTRUSTED_ISSUER,
    ),
    "only-other-root-trusted": (
        lambda: Case(good(), roots=[evil().root.certificate]),
        R.UNTRUSTED_ISSUER,
    ),
    "intermediate-not-sent": (lambda: Case(good()[:1]), R.UNTRUSTED_ISSUER),
    "forged-signature-same-issuer-name": (
        lambda: Case(_forged_intermediate_signature()),
        R.UNTRUSTED_ISSUER,
    ),
    "signed-by-root-key-under-intermediate-name": (
        lambda: Case(der(raw_device(sign_key=ca_key(0)), inter())),
        R.UNTRUSTED_ISSUER,
    ),
    "unknown-issuer-name": (
        lambda: Case(der(raw_device(issuer=name("Nobody")), inter())),
        R.UNTRUSTED_ISSUER,
    ),
    # -- self-signed ----------------------------------------------------------------------
    "self-signed-device": (
        lambda: Case(
            der(
                raw_device(
                    issuer=LAMP.subject(),
                    public_key=ca_key(50).public_key(),
                    sign_key=ca_key(50),
                )
            )
        ),
        R.SELF_SIGNED,
    ),
    "self-signed-with-intermediate": (
        lambda: Case(
            der(
                raw_device(
                    issuer=LAMP.subject(), public_key=ca_key(51).public_key(), sign_key=ca_key(51)
                ),
                inter(),
            )
        ),
        R.SELF_SIGNED,
    ),
    # -- key usage and profile --------------------------------------------------------------
    "no-key-usage": (lambda: Case(der(raw_device(key_usage=None), inter())), R.WRONG_KEY_USAGE),
    "ec-without-key-agreement": (
        lambda: Case(der(raw_device(key_usage=usage(digital_signature=True)), inter())),
        R.WRONG_KEY_USAGE,
    ),
    "without-digital-signature": (
        lambda: Case(der(raw_device(key_usage=usage(key_agreement=True)), inter())),
        R.WRONG_KEY_USAGE,
    ),
    "rsa-with-key-agreement-only": (
        lambda: Case(
            der(
                raw_device(
                    public_key=rsa_public(),
                    key_usage=usage(digital_signature=True, key_agreement=True),
                ),
                inter(),
            )
        ),
        R.WRONG_KEY_USAGE,
    ),
    "device-may-sign-certificates": (
        lambda: Case(
            der(
                raw_device(
                    key_usage=usage(digital_signature=True, key_agreement=True, key_cert_sign=True)
                ),
                inter(),
            )
        ),
        R.WRONG_KEY_USAGE,
    ),
    "device-is-a-ca": (lambda: Case(der(raw_device(ca=True), inter())), R.WRONG_KEY_USAGE),
    "ed25519-device-key": (
        lambda: Case(
            der(
                raw_device(
                    public_key=ed25519.Ed25519PrivateKey.generate().public_key(),
                    key_usage=usage(digital_signature=True, key_agreement=True),
                ),
                inter(),
            )
        ),
        R.CERTIFICATE_INVALID,
    ),
    "p384-device-key": (
        lambda: Case(
            der(
                raw_device(public_key=ec.generate_private_key(ec.SECP384R1()).public_key()), inter()
            )
        ),
        R.CERTIFICATE_INVALID,
    ),
    # -- revocation -------------------------------------------------------------------------
    "leaf-revoked": (_revoked_leaf, R.REVOKED),
    "intermediate-revoked": (_revoked_intermediate, R.REVOKED),
    "crl-stale": (_stale_crl, R.REVOCATION_UNKNOWN),
    "crl-not-yet-current": (_future_crl, R.REVOCATION_UNKNOWN),
    "crl-forged": (_forged_crl, R.REVOCATION_UNKNOWN),
    "crl-of-intermediate-missing": (_missing_intermediate_crl, R.REVOCATION_UNKNOWN),
    "no-crls-at-all": (lambda: Case(good(), crls=[]), R.REVOCATION_UNKNOWN),
    # -- chain length -----------------------------------------------------------------------
    "two-intermediates-max-one": (lambda: Case(_chain_of_two()), R.CHAIN_TOO_LONG),
    "one-intermediate-max-zero": (lambda: Case(good(), max_intermediates=0), R.CHAIN_TOO_LONG),
    "needs-two-sends-one-max-one": (
        lambda: Case(
            der(acme().device(issuer=acme().intermediate2), acme().intermediate2.certificate)
        ),
        R.UNTRUSTED_ISSUER,
    ),
    "padded-with-extra-certificates": (
        lambda: Case(good() + der(evil().intermediate.certificate)),
        R.CHAIN_TOO_LONG,
    ),
    # -- identity against the pairing code ------------------------------------------------
    "code-for-another-device": (lambda: Case(good(), code=_code(PLUG)), R.IDENTITY_MISMATCH),
    "serial-differs": (
        lambda: Case(good(), code=_code(DeviceIdentity("SN-0009", LAMP.hardware_id, LAMP.model))),
        R.IDENTITY_MISMATCH,
    ),
    "mac-differs": (
        lambda: Case(good(), code=_code(DeviceIdentity(LAMP.serial, "0024be804ff9", LAMP.model))),
        R.IDENTITY_MISMATCH,
    ),
    "model-differs": (
        lambda: Case(good(), code=_code(DeviceIdentity(LAMP.serial, LAMP.hardware_id, "lamp-3"))),
        R.IDENTITY_MISMATCH,
    ),
    "no-mac-in-certificate": (
        lambda: Case(der(raw_device(sans=[x509.DNSName("lamp.example")]), inter())),
        R.IDENTITY_MISMATCH,
    ),
    "two-macs-in-certificate": (
        lambda: Case(
            der(
                raw_device(
                    sans=[
                        x509.UniformResourceIdentifier(LAMP.mac_urn),
                        x509.UniformResourceIdentifier(PLUG.mac_urn),
                    ]
                ),
                inter(),
            )
        ),
        R.IDENTITY_MISMATCH,
    ),
    "key-hash-differs": (
        lambda: Case(good(), code=_code(LAMP, "p256", 1)),
        R.PUBLIC_KEY_MISMATCH,
    ),
    "same-identity-reissued-to-other-key": (
        lambda: Case(good(key=device_key("p256", 2)), code=_code(LAMP)),
        R.PUBLIC_KEY_MISMATCH,
    ),
}


def test_the_set_is_large_enough_and_covers_every_certificate_reason() -> None:
    assert len(CASES) >= 40
    expected = {reason for _, reason in CASES.values()}
    certificate_reasons = set(R) - {
        R.REPLAYED_PROOF,
        R.BAD_PROOF,
        R.KEY_CONFIRMATION_FAILED,
        R.PROTOCOL_VIOLATION,
        R.NOT_CONTINUOUS,  # said by a paired device (test_rekey.py)
        R.STALE_VERSION,
    }
    assert certificate_reasons <= expected
    assert None in expected


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_path_validation_verdict(case_id: str) -> None:
    build, expected = CASES[case_id]
    assert verdict(build()) is expected
