"""A ``service`` principal's identity certificate is for TLS servers too (a keyless key server
presents it to edges), with the DNS names its token named; every other kind's stays for TLS
clients only, and DNS names come from the operator's token, never from the CSR."""

from __future__ import annotations

from datetime import timedelta

import pytest
from broker_kit import Principal, World
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keybroker.errors import DecodeError, RemoteProtocolError
from keybroker.pki import PrincipalId, verify_principal_certificate

HOUR = timedelta(hours=1)


def _usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _dns(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sans.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize("kind", ["site", "node", "device", "user"])
def test_other_principals_get_client_certificates_only(world: World, kind: str) -> None:
    principal = Principal.named(f"{kind}/p1")
    token = world.broker.create_enrolment_token(principal.pid, HOUR)
    cert = principal.enrol(world.broker, token.secret).certificate
    assert _usages(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _dns(cert) == []


def test_a_service_gets_server_auth_and_the_dns_names_of_its_token(world: World) -> None:
    principal = Principal.named("service/ks1", p256=True)
    token = world.broker.create_enrolment_token(
        principal.pid, HOUR, dns_names=["KS1.Keyless.Example", "ks1.keyless.example", "ks1"]
    )
    assert token.dns_names == ("ks1.keyless.example", "ks1")
    cert = principal.enrol(world.broker, token.secret).certificate
    assert _usages(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    assert _dns(cert) == ["ks1.keyless.example", "ks1"]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["keybroker://service/ks1"]
    # Still a valid identity certificate for the principal, as a client.
    verify_principal_certificate(
        cert, [], [world.broker.ca_certificate], principal.pid, world.clock(), crls=None
    )

    # Without DNS names on its token, a service still serves TLS (identified by its URI).
    plain = Principal.named("service/ks2")
    token = world.broker.create_enrolment_token(plain.pid, HOUR)
    cert = plain.enrol(world.broker, token.secret).certificate
    assert ExtendedKeyUsageOID.SERVER_AUTH in _usages(cert)
    assert _dns(cert) == []


def test_dns_names_come_from_the_token_not_the_csr(world: World) -> None:
    principal = Principal.named("service/ks1")
    token = world.broker.create_enrolment_token(principal.pid, HOUR)
    args = principal.enrol_args()
    key = principal.identity
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bank.example")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bank.example")]), critical=False)
        .sign(key, None)
    )
    args["csr"] = csr.public_bytes(serialization.Encoding.PEM)
    cert = world.broker.enrol(principal.pid, token.secret, **args).certificate
    assert _dns(cert) == []
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "service/ks1"


def test_dns_names_are_checked_and_a_refusal_changes_nothing(world: World) -> None:
    before, size = world.dump(), world.log_size()
    node = PrincipalId.parse("node/edge1")
    with pytest.raises(RemoteProtocolError, match="only service principals"):
        world.broker.create_enrolment_token(node, HOUR, dns_names=["edge1.example"])
    service = PrincipalId.parse("service/ks1")
    for bad in (
        "*.example.net",  # no wildcard: a key server is one host
        "192.0.2.1",  # an IP address is not a DNS name
        "ks1.example.net.",
        "-ks1.example.net",
        "ks1..example.net",
        "ks_1.example.net",
        "a" * 64 + ".example.net",
        "",
    ):
        with pytest.raises(DecodeError):
            world.broker.create_enrolment_token(service, HOUR, dns_names=[bad])
    with pytest.raises(DecodeError, match="at most 4"):
        world.broker.create_enrolment_token(
            service, HOUR, dns_names=[f"n{i}.example.net" for i in range(5)]
        )
    with pytest.raises(DecodeError):
        world.broker.create_enrolment_token(service, HOUR, dns_names="ks1.example.net")  # type: ignore[arg-type]
    assert world.dump() == before and world.log_size() == size
