from __future__ import annotations

from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from pki_builders import DAY, LEAF_SERIAL, NOW, SITE_A, World, raw_certificate

from keybroker.errors import (
    CertificateExpired,
    CertificateInvalid,
    CertificateRevoked,
    IdentityMismatch,
)
from keybroker.pki import (
    PrincipalId,
    Revocation,
    principal_of,
    verify_identity,
    verify_principal_certificate,
)


def _with_names(
    world: World,
    *,
    cns: Sequence[str] = ("site/a",),
    uris: Sequence[str] = ("keybroker://site/a",),
    serials: Sequence[str] = (),
    other_sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns]
        + [x509.NameAttribute(NameOID.SERIAL_NUMBER, s) for s in serials]
    )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += other_sans
    return raw_certificate(
        subject=subject,
        issuer=world.root.name,
        public_key=world.leaf_key.public_key(),
        signing_key=world.root_key,
        sans=sans or None,
    )


def test_issued_certificate_names_its_principal(world: World) -> None:
    assert principal_of(world.leaf) == SITE_A
    verify_identity(world.leaf, SITE_A)
    verify_identity(world.leaf, SITE_A, serial_number=LEAF_SERIAL)


@pytest.mark.parametrize("presented_as", ["site/b", "node/a", "site/aa", "site/a.", "device/a"])
def test_certificate_for_site_a_presented_as_someone_else(world: World, presented_as: str) -> None:
    with pytest.raises(IdentityMismatch):
        verify_identity(world.leaf, PrincipalId.parse(presented_as))


@pytest.mark.parametrize("serial", ["SN-0002", "sn-0001", "SN-0001 ", ""])
def test_serial_number_mismatch(world: World, serial: str) -> None:
    with pytest.raises(IdentityMismatch):
        verify_identity(world.leaf, SITE_A, serial_number=serial)


CRAFTED = {
    "cn-disagrees-with-uri": {"cns": ["site/b"]},
    "no-cn": {"cns": []},
    "two-cns": {"cns": ["site/a", "site/a"]},
    "no-keybroker-uri": {"uris": [], "other_sans": [x509.DNSName("a.example")]},
    "two-keybroker-uris": {"uris": ["keybroker://site/a", "keybroker://site/b"]},
    "same-uri-twice": {"uris": ["keybroker://site/a", "keybroker://site/a"]},
    "second-uri-in-upper-case": {"uris": ["keybroker://site/a", "KEYBROKER://site/b"]},
    "upper-case-scheme-only": {"uris": ["KEYBROKER://site/a"]},
    "malformed-uri": {"uris": ["keybroker://site/A"]},
    "uri-with-path": {"uris": ["keybroker://site/a/extra"]},
    "uri-kind-unknown": {"uris": ["keybroker://robot/a"], "cns": ["robot/a"]},
}


@pytest.mark.parametrize("shape", list(CRAFTED), ids=list(CRAFTED))
def test_ambiguous_or_malformed_identity_is_a_mismatch(world: World, shape: str) -> None:
    cert = _with_names(world, **CRAFTED[shape])  # type: ignore[arg-type]
    with pytest.raises(IdentityMismatch):
        verify_identity(cert, SITE_A)


def test_no_san_at_all_is_a_mismatch(world: World) -> None:
    cert = _with_names(world, uris=[])
    with pytest.raises(IdentityMismatch):
        principal_of(cert)


def test_other_uris_beside_the_identity_are_fine(world: World) -> None:
    cert = _with_names(world, other_sans=[x509.UniformResourceIdentifier("https://a.example/")])
    verify_identity(cert, SITE_A)


def test_two_serial_numbers_do_not_match_one(world: World) -> None:
    cert = _with_names(world, serials=["S1", "S1"])
    with pytest.raises(IdentityMismatch):
        verify_identity(cert, SITE_A, serial_number="S1")


# -- chain + revocation + identity in one call ---------------------------------------


def test_principal_certificate_all_good(world: World) -> None:
    crls = [
        world.root.issue_crl([], NOW - DAY, NOW + DAY, 1),
        world.inter.issue_crl([], NOW - DAY, NOW + DAY, 1),
    ]
    chain = verify_principal_certificate(
        world.leaf_via_inter,
        [world.inter.certificate],
        [world.root.certificate],
        SITE_A,
        NOW,
        crls=crls,
        serial_number=LEAF_SERIAL,
    )
    assert chain == [world.leaf_via_inter, world.inter.certificate, world.root.certificate]


def test_principal_certificate_each_check_bites(world: World) -> None:
    roots = [world.root.certificate]
    crl = world.root.issue_crl(
        [Revocation(world.leaf.serial_number, NOW - DAY)], NOW - DAY, NOW + DAY, 2
    )
    with pytest.raises(IdentityMismatch):
        verify_principal_certificate(
            world.leaf, [], roots, PrincipalId.parse("site/b"), NOW, crls=None
        )
    with pytest.raises(CertificateRevoked):
        verify_principal_certificate(world.leaf, [], roots, SITE_A, NOW, crls=[crl])
    with pytest.raises(CertificateExpired):
        verify_principal_certificate(world.leaf, [], roots, SITE_A, NOW + 60 * DAY, crls=None)
    with pytest.raises(CertificateInvalid):
        verify_principal_certificate(
            world.leaf, [], [world.other_root.certificate], SITE_A, NOW, crls=None
        )


def test_principal_certificate_checks_trust_before_names(world: World) -> None:
    # A forged certificate with the right names is refused as untrusted.
    forged = raw_certificate(
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site/a")]),
        issuer=world.root.name,
        public_key=world.leaf_key.public_key(),
        signing_key=world.other_key,
    )
    verify_identity(forged, SITE_A)  # the names alone would pass
    with pytest.raises(CertificateInvalid):
        verify_principal_certificate(forged, [], [world.root.certificate], SITE_A, NOW, crls=None)
