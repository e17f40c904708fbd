from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from pki_builders import DAY, NOW, World

from keybroker.errors import DecodeError
from keybroker.pki import (
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
from keybroker.pki.formats import MAX_CERTIFICATE_SIZE

Loader = Callable[[bytes], object]
LOADERS: list[Loader] = [load_certificate, load_certificates, load_csr, load_crl]


def _csr_der() -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, None)
    return csr.public_bytes(serialization.Encoding.DER)


def test_certificate_round_trips_through_pem_and_der(world: World) -> None:
    cert = world.leaf
    assert load_certificate(certificate_der(cert)) == cert
    assert load_certificate(certificate_pem(cert)) == cert
    assert load_certificate(b"\n  " + certificate_pem(cert)) == cert


def test_bundle_keeps_order(world: World) -> None:
    bundle = certificate_pem(world.leaf_via_inter) + certificate_pem(world.inter.certificate)
    assert load_certificates(bundle) == [world.leaf_via_inter, world.inter.certificate]
    assert load_certificates(certificate_der(world.leaf)) == [world.leaf]


def test_crl_and_csr_load(world: World) -> None:
    crl = world.root.issue_crl([], NOW, NOW + DAY, 1)
    assert load_crl(crl.public_bytes(serialization.Encoding.DER)) == crl
    assert load_crl(crl.public_bytes(serialization.Encoding.PEM)) == crl
    der = _csr_der()
    assert load_csr(der).public_bytes(serialization.Encoding.DER) == der


@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"garbage",
        b"\x30\x82\xff\xff",
        b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        b"-----BEGIN ",
    ],
    ids=["empty", "nul", "text", "huge-length", "bad-base64", "empty-pem", "pem-prefix-only"],
)
def test_garbage_is_a_decode_error(loader: Loader, data: bytes) -> None:
    with pytest.raises(DecodeError):
        loader(data)


def test_truncated_der_is_a_decode_error(world: World) -> None:
    der = certificate_der(world.leaf)
    for cut in (1, 2, 10, len(der) // 2, len(der) - 1):
        with pytest.raises(DecodeError):
            load_certificate(der[:cut])


def test_trailing_data_is_a_decode_error(world: World) -> None:
    with pytest.raises(DecodeError):
        load_certificate(certificate_der(world.leaf) + b"\x00")


def test_wrong_kind_of_object_is_a_decode_error(world: World) -> None:
    with pytest.raises(DecodeError):
        load_csr(certificate_der(world.leaf))
    with pytest.raises(DecodeError):
        load_certificate(_csr_der())


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError, match="larger than"):
        load_certificate(b"\x30" * (MAX_CERTIFICATE_SIZE + 1))


def test_non_bytes_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        load_certificate("-----BEGIN CERTIFICATE-----")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "new_oid",
    ["0603551d13", "0603551d1e"],
    ids=["duplicate-basic-constraints", "san-bytes-as-name-constraints"],
)
def test_malformed_extensions_surface_at_load_time(world: World, new_oid: str) -> None:
    # Relabel the SAN extension (2.5.29.17): the DER stays well formed, the extension
    # list does not. cryptography parses extensions lazily; the loader refuses now.
    der = certificate_der(world.leaf)
    san_oid = bytes.fromhex("0603551d11")
    assert der.count(san_oid) == 1
    with pytest.raises(DecodeError):
        load_certificate(der.replace(san_oid, bytes.fromhex(new_oid)))


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@pytest.mark.parametrize("serial", [0, -1])
def test_non_positive_serial_is_a_decode_error(world: World, serial: int) -> None:
    cert = (
        x509.CertificateBuilder()
        .subject_name(world.root.name)
        .issuer_name(world.root.name)
        .public_key(world.root_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + DAY)
        .sign(world.root_key, hashes.SHA256())
    )
    # The builder refuses such serials; patch the DER INTEGER 1 (02 01 01) instead.
    der = certificate_der(cert)
    assert der.count(b"\x02\x01\x01") >= 1
    patched = der.replace(b"\x02\x01\x01", b"\x02\x01" + (serial & 0xFF).to_bytes(1, "big"), 1)
    with pytest.raises(DecodeError):
        load_certificate(patched)


def test_fingerprint_is_sha256_of_der(world: World) -> None:
    assert fingerprint(world.leaf) == hashlib.sha256(certificate_der(world.leaf)).digest()


def test_subject_key_identifier_matches_issued_ski(world: World) -> None:
    ski = world.leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert subject_key_identifier(world.leaf_key.public_key()) == ski.digest
    assert len(ski.digest) == 20


def test_public_key_fingerprint_names_the_key_not_the_certificate(world: World) -> None:
    spki = world.leaf_ed_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fp = public_key_fingerprint(world.leaf_ed_key.public_key())
    assert fp == hashlib.sha256(spki).digest()
    assert fp == public_key_fingerprint(world.leaf_via_inter.public_key())


# -- fuzz: a peer's bytes give DecodeError or a parsed object, nothing else ------------


def _only_decode_error(loader: Loader, data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        loader(data)


# Mutated input makes cryptography warn (non-positive serials, odd attribute lengths).
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    for loader in LOADERS:
        _only_decode_error(loader, data)


@pytest.fixture(scope="module")
def seeds(world: World) -> list[tuple[Loader, bytes]]:
    crl = world.root.issue_crl([(7, NOW, None)], NOW, NOW + DAY, 1)
    return [
        (load_certificate, certificate_der(world.leaf_via_inter)),
        (load_crl, crl.public_bytes(serialization.Encoding.DER)),
        (load_csr, _csr_der()),
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_der(seeds: list[tuple[Loader, bytes]], data: st.DataObject) -> None:
    loader, seed = data.draw(st.sampled_from(seeds))
    mutated = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(mutated) - 1))
        mutated[index] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    _only_decode_error(loader, bytes(mutated))
