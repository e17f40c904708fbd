from __future__ import annotations

import pickle
from datetime import timedelta
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from pki_builders import DAY, NOW, SITE_A, World, flip_last_byte, p256, raw_ca

from keybroker.errors import CertificateInvalid, ConfigurationError, DecodeError, LocalProtocolError
from keybroker.pki import (
    CertificateAuthority,
    PrincipalId,
    Revocation,
    load_crl,
    subject_key_identifier,
    verify_chain,
    verify_crl,
    verify_identity,
)
from keybroker.pki.formats import load_csr

DEVICE = PrincipalId.parse("device/dev-0042")


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(kind)


# -- roots and intermediates ------------------------------------------------------


def test_root_profile(world: World) -> None:
    cert = world.root.certificate
    assert cert.issuer == cert.subject == world.root.name
    cert.verify_directly_issued_by(cert)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    assert ext(cert, x509.SubjectKeyIdentifier).value.digest == subject_key_identifier(
        world.root_key.public_key()
    )
    assert cert.not_valid_before_utc == NOW - 10 * DAY
    assert cert.not_valid_after_utc == NOW - 10 * DAY + 3650 * DAY
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"


def test_intermediate_profile(world: World) -> None:
    cert = world.inter.certificate
    cert.verify_directly_issued_by(world.root.certificate)
    assert cert.issuer == world.root.name
    assert ext(cert, x509.BasicConstraints).value.path_length == 0
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == subject_key_identifier(world.root_key.public_key())
    assert world.inter.path_length == 0


def test_intermediate_cannot_exceed_parent_path_length(world: World) -> None:
    with pytest.raises(LocalProtocolError):
        world.root.issue_intermediate("Too Deep", p256().public_key(), NOW, DAY, path_length=1)
    with pytest.raises(LocalProtocolError):
        world.inter.issue_intermediate("Below Zero", p256().public_key(), NOW, DAY)
    with pytest.raises(LocalProtocolError):
        world.root.issue_intermediate("Negative", p256().public_key(), NOW, DAY, path_length=-1)


def test_manufacturer_root_intermediate_device_chain() -> None:
    maker_key, line_key, device_key = p256(), p256(), ed25519.Ed25519PrivateKey.generate()
    maker = CertificateAuthority.create("Maker Root", maker_key, NOW, 3650 * DAY, path_length=1)
    line = CertificateAuthority(
        maker.issue_intermediate("Maker Line 3", line_key.public_key(), NOW, 365 * DAY), line_key
    )
    device = line.issue_identity(
        DEVICE,
        device_key.public_key(),
        NOW,
        30 * DAY,
        serial_number="ABC-123",
        extra_subject=[x509.NameAttribute(NameOID.TITLE, "model-x")],
    )
    chain = verify_chain(device, [line.certificate], [maker.certificate], NOW + DAY)
    assert [c.subject for c in chain] == [device.subject, line.name, maker.name]
    verify_identity(device, DEVICE, serial_number="ABC-123")


def test_ed25519_ca_key_is_refused_with_the_reason() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(ConfigurationError, match="Ed25519"):
        CertificateAuthority.create("Ed Root", key, NOW, DAY)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="Ed25519"):
        CertificateAuthority(raw_ca("Ed Root", key), key)  # type: ignore[arg-type]


def test_other_curves_are_refused_for_cas(world: World) -> None:
    with pytest.raises(ConfigurationError, match="P-256"):
        CertificateAuthority.create("k1", world.secp256k1, NOW, DAY)
    with pytest.raises(ConfigurationError):
        world.root.issue_intermediate("k1", world.secp256k1.public_key(), NOW, DAY)


def test_loading_a_ca_checks_key_and_certificate(world: World) -> None:
    assert CertificateAuthority(world.root.certificate, world.root_key).name == world.root.name
    with pytest.raises(ConfigurationError, match="does not match"):
        CertificateAuthority(world.root.certificate, world.other_key)
    with pytest.raises(ConfigurationError):
        CertificateAuthority(world.leaf, world.leaf_key)  # a leaf is not a CA


def test_repr_and_pickle_do_not_leak_the_key(world: World) -> None:
    text = repr(world.root)
    assert "Test Root" in text
    private = world.root_key.private_numbers().private_value
    assert f"{private:x}" not in text and str(private) not in text
    with pytest.raises(TypeError):
        pickle.dumps(world.root)


# -- identity certificates ----------------------------------------------------------


def test_identity_certificate_profile(world: World) -> None:
    cert = world.leaf_ed
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site/a"
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0001"
    san = ext(cert, x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == ["keybroker://site/a"]
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(world.root.certificate, x509.SubjectKeyIdentifier).value.digest
    assert ext(cert, x509.SubjectKeyIdentifier).value.digest == subject_key_identifier(
        world.leaf_ed_key.public_key()
    )
    assert cert.public_key() == world.leaf_ed_key.public_key()
    assert cert.not_valid_before_utc == NOW - DAY
    assert cert.not_valid_after_utc == NOW + 29 * DAY
    cert.verify_directly_issued_by(world.root.certificate)


def test_serials_are_random_positive_and_large(world: World) -> None:
    serials = {
        world.root.issue_identity(
            SITE_A, world.leaf_key.public_key(), NOW, DAY, serial_number="S"
        ).serial_number
        for _ in range(16)
    }
    assert len(serials) == 16
    assert all(0 < s < 1 << 160 for s in serials)
    # 16 random 159-bit serials all below 2**128 would be a one-in-2**496 event.
    assert max(serials).bit_length() > 128


def test_server_auth_and_extra_names(world: World) -> None:
    cert = world.root.issue_identity(
        PrincipalId.parse("service/keys"),
        world.leaf_key.public_key(),
        NOW,
        DAY,
        serial_number="svc-1",
        server_auth=True,
        extra_subject=[x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "edge")],
        extra_sans=[x509.DNSName("keys.example")],
    )
    assert set(ext(cert, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.SERVER_AUTH,
    }
    sans = ext(cert, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["keys.example"]
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "edge"


def test_device_hardware_id_as_custom_subject_attribute(world: World) -> None:
    hardware_id = ObjectIdentifier("1.3.6.1.4.1.55555.7.1")
    cert = world.root.issue_identity(
        DEVICE,
        world.leaf_ed_key.public_key(),
        NOW,
        DAY,
        serial_number="ABC-123",
        extra_subject=[x509.NameAttribute(hardware_id, "hw:00:11:22")],
    )
    assert cert.subject.get_attributes_for_oid(hardware_id)[0].value == "hw:00:11:22"


@pytest.mark.parametrize(
    "oid",
    [NameOID.COMMON_NAME, NameOID.SERIAL_NUMBER],
    ids=["cn", "serialNumber"],
)
def test_extra_subject_cannot_shadow_identity(world: World, oid: ObjectIdentifier) -> None:
    with pytest.raises(LocalProtocolError):
        world.root.issue_identity(
            SITE_A,
            world.leaf_key.public_key(),
            NOW,
            DAY,
            serial_number="S",
            extra_subject=[x509.NameAttribute(oid, "site/b")],
        )


@pytest.mark.parametrize("uri", ["keybroker://site/b", "KeyBroker://site/b", "keybroker:site/b"])
def test_extra_sans_cannot_add_a_keybroker_uri(world: World, uri: str) -> None:
    with pytest.raises(LocalProtocolError):
        world.root.issue_identity(
            SITE_A,
            world.leaf_key.public_key(),
            NOW,
            DAY,
            serial_number="S",
            extra_sans=[x509.UniformResourceIdentifier(uri)],
        )


@pytest.mark.parametrize("serial", ["", "a b", "ü", "x" * 65, "id_1", "a\n"])
def test_malformed_serial_number_is_decode_error(world: World, serial: str) -> None:
    with pytest.raises(DecodeError):
        world.root.issue_identity(
            SITE_A, world.leaf_key.public_key(), NOW, DAY, serial_number=serial
        )


def test_identity_key_policy_applies_to_bare_public_keys(world: World) -> None:
    with pytest.raises(CertificateInvalid):
        world.root.issue_identity(SITE_A, world.secp256k1.public_key(), NOW, DAY, serial_number="S")
    with pytest.raises(CertificateInvalid):
        world.root.issue_identity(SITE_A, world.rsa_2048.public_key(), NOW, DAY, serial_number="S")


def test_from_csr_takes_only_the_key(world: World) -> None:
    # The requester asks for another identity and for CA powers; it gets neither.
    key = p256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site/root")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("keybroker://site/b")]),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert = world.root.issue_identity_from_csr(csr, SITE_A, NOW, DAY, serial_number="S")
    assert cert.public_key() == key.public_key()
    verify_identity(cert, SITE_A)
    assert not ext(cert, x509.BasicConstraints).value.ca
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == ["keybroker://site/a"]


def test_from_csr_refuses_a_bad_signature(world: World) -> None:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(p256(), hashes.SHA256())
    )
    tampered = load_csr(flip_last_byte(csr.public_bytes(serialization.Encoding.DER)))
    with pytest.raises(CertificateInvalid):
        world.root.issue_identity_from_csr(tampered, SITE_A, NOW, DAY, serial_number="S")


# -- validity windows -------------------------------------------------------------


def test_validity_cannot_outlive_the_issuer(world: World) -> None:
    remaining = world.inter.certificate.not_valid_after_utc - NOW
    world.inter.issue_identity(
        SITE_A, world.leaf_key.public_key(), NOW, remaining, serial_number="S"
    )
    with pytest.raises(LocalProtocolError):
        world.inter.issue_identity(
            SITE_A,
            world.leaf_key.public_key(),
            NOW,
            remaining + timedelta(seconds=1),
            serial_number="S",
        )


def test_issuer_must_be_valid_now(world: World) -> None:
    with pytest.raises(LocalProtocolError):
        world.root.issue_identity(
            SITE_A, world.leaf_key.public_key(), NOW - 11 * DAY, DAY, serial_number="S"
        )


@pytest.mark.parametrize("validity", [timedelta(0), timedelta(seconds=-1)])
def test_validity_must_be_positive(world: World, validity: timedelta) -> None:
    with pytest.raises(LocalProtocolError):
        world.root.issue_identity(
            SITE_A, world.leaf_key.public_key(), NOW, validity, serial_number="S"
        )
    with pytest.raises(LocalProtocolError):
        CertificateAuthority.create("R", p256(), NOW, validity)


def test_naive_now_is_refused(world: World) -> None:
    with pytest.raises(LocalProtocolError):
        world.root.issue_identity(
            SITE_A, world.leaf_key.public_key(), NOW.replace(tzinfo=None), DAY, serial_number="S"
        )


def test_microseconds_do_not_push_past_the_issuer(world: World) -> None:
    # Certificate times are whole seconds; `now` with microseconds must not make an
    # exactly-fitting request look one fraction of a second too long.
    key = p256()
    ca = CertificateAuthority.create("R", key, NOW.replace(microsecond=999_999), 10 * DAY)
    ca.issue_intermediate("I", p256().public_key(), NOW.replace(microsecond=999_999), 10 * DAY)


# -- CRLs -------------------------------------------------------------------------


def test_crl_profile(world: World) -> None:
    revoked = [
        Revocation(11, NOW - DAY, x509.ReasonFlags.key_compromise),
        Revocation(12, NOW - DAY),
        (13, NOW - DAY, x509.ReasonFlags.unspecified),
    ]
    crl = world.root.issue_crl(revoked, NOW, NOW + 7 * DAY, crl_number=42)
    crl = load_crl(crl.public_bytes(serialization.Encoding.DER))
    assert crl.issuer == world.root.name
    assert crl.is_signature_valid(world.root_key.public_key())
    assert crl.last_update_utc == NOW and crl.next_update_utc == NOW + 7 * DAY
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 42
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == subject_key_identifier(world.root_key.public_key())
    entry = crl.get_revoked_certificate_by_serial_number(11)
    assert entry is not None
    assert (
        entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        == x509.ReasonFlags.key_compromise
    )
    for serial in (12, 13):
        entry = crl.get_revoked_certificate_by_serial_number(serial)
        assert entry is not None and len(entry.extensions) == 0
    assert crl.get_revoked_certificate_by_serial_number(14) is None
    verify_crl(crl, world.root.certificate, NOW)


def test_crl_arguments_are_checked(world: World) -> None:
    with pytest.raises(LocalProtocolError):
        world.root.issue_crl([], NOW, NOW, crl_number=1)
    with pytest.raises(LocalProtocolError):
        world.root.issue_crl([], NOW, NOW + DAY, crl_number=-1)


def test_verify_crl_refuses_crl_of_another_issuer(world: World) -> None:
    crl = world.other_root.issue_crl([], NOW, NOW + DAY, 1)
    with pytest.raises(CertificateInvalid):
        verify_crl(crl, world.root.certificate, NOW)


def test_verify_crl_refuses_issuer_without_crl_sign(world: World) -> None:
    key = p256()
    usage = x509.KeyUsage(False, False, False, False, False, True, False, False, False)
    cert = raw_ca("No CRL Sign", key, usage=usage)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(cert.subject)
        .last_update(NOW)
        .next_update(NOW + DAY)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CertificateInvalid, match="cRLSign"):
        verify_crl(crl, cert, NOW)


def test_tampered_crl_is_refused(world: World) -> None:
    crl = world.root.issue_crl([(5, NOW, None)], NOW, NOW + DAY, 1)
    tampered = load_crl(flip_last_byte(crl.public_bytes(serialization.Encoding.DER)))
    with pytest.raises(CertificateInvalid):
        verify_crl(tampered, world.root.certificate, NOW)
