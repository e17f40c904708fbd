"""Each primitive round-trips, and every forgery or unusable version fails with its typed error."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings

from keybroker.errors import CryptoError, DecodeError, KeysetError
from keybroker.keys import (
    AES256_GCM,
    ED25519,
    HMAC_SHA256,
    SECRET_ACCESS,
    X25519_HPKE,
    X25519_HPKE_CHACHA20,
    AeadHandle,
    HpkeHandle,
    KeyEncryptionKey,
    Keyset,
    MacHandle,
    PublicKeyset,
    Purpose,
    SignerHandle,
)

#: The X25519 public values whose shared secret is all zeros with any private key: the
#: points of small order (RFC 7748 §6.1 and libsodium's list) and the non-canonical
#: encodings that reduce to them (p - 1, p, p + 1).
X25519_LOW_ORDER = (
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
)


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def with_key_id(blob: bytes, key_id: int) -> bytes:
    return blob[:1] + struct.pack(">I", key_id) + blob[5:]


def rotated(template: str) -> Keyset:
    """Version 1 enabled, version 2 primary, version 3 pending."""
    ks = Keyset.generate("test/rotated", template)
    ks.promote(ks.add().version)
    ks.add()
    return ks


# -- AEAD -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 32 * 1024 - 1, 32 * 1024, 64 * 1024, 300_000])
def test_aead_round_trip_and_format(size: int) -> None:
    ks = Keyset.generate("test/aead", AES256_GCM)
    aead = ks.aead()
    plaintext = os.urandom(size)
    ct = aead.encrypt(plaintext, b"ad")
    assert type(ct) is bytes
    assert len(ct) == 5 + 12 + size + 16
    assert ct[0] == 0x01
    assert int.from_bytes(ct[1:5], "big") == ks.primary.key_id  # type: ignore[union-attr]
    assert aead.decrypt(ct, b"ad") == plaintext
    # The body after prefix and nonce is plain AES-256-GCM under the exported key.
    raw = AESGCM(ks.export_secret_material(1, SECRET_ACCESS))
    assert raw.decrypt(ct[5:17], ct[17:], b"ad") == plaintext


def test_aead_nonces_differ() -> None:
    aead = Keyset.generate("test/aead", AES256_GCM).aead()
    assert aead.encrypt(b"same", b"") != aead.encrypt(b"same", b"")


@pytest.mark.parametrize("index", [0, 1, 4, 5, 16, 17, -1])
def test_aead_tampering_raises_crypto_error(index: int) -> None:
    aead = Keyset.generate("test/aead", AES256_GCM).aead()
    ct = aead.encrypt(b"attack at dawn", b"ad")
    with pytest.raises(CryptoError):
        aead.decrypt(flip(ct, index), b"ad")


def test_aead_wrong_associated_data_and_truncation() -> None:
    aead = Keyset.generate("test/aead", AES256_GCM).aead()
    ct = aead.encrypt(b"attack at dawn", b"ad")
    with pytest.raises(CryptoError):
        aead.decrypt(ct, b"other")
    for cut in (0, 4, 5, 16, 17, 32, len(ct) - 1):
        with pytest.raises(CryptoError):
            aead.decrypt(ct[:cut], b"ad")


def test_aead_unknown_key_id_is_crypto_error_and_other_keyset_fails() -> None:
    a = Keyset.generate("test/a", AES256_GCM)
    b = Keyset.generate("test/b", AES256_GCM)
    ct = a.aead().encrypt(b"x", b"")
    with pytest.raises(CryptoError):
        b.aead().decrypt(ct, b"")
    # Pointing the prefix at a version that exists but holds another key fails on the tag.
    with pytest.raises(CryptoError):
        b.aead().decrypt(with_key_id(ct, b.primary.key_id), b"")  # type: ignore[union-attr]


def test_aead_decrypts_with_pending_enabled_and_primary_but_encrypts_with_primary() -> None:
    ks = rotated("AES256_GCM")
    aead = ks.aead()
    ct_primary = aead.encrypt(b"p", b"")
    assert int.from_bytes(ct_primary[1:5], "big") == ks.version(2).key_id
    assert aead.decrypt(ct_primary, b"") == b"p"
    # Make ciphertexts under versions 1 and 3 with raw AES-GCM and the right prefix.
    for v in (1, 3):
        key = AESGCM(ks.export_secret_material(v, SECRET_ACCESS))
        nonce = os.urandom(12)
        ct = b"\x01" + struct.pack(">I", ks.version(v).key_id) + nonce
        ct += key.encrypt(nonce, b"m", b"ad")
        assert aead.decrypt(ct, b"ad") == b"m"


def test_aead_disabled_and_destroyed_versions_raise_keyset_error() -> None:
    ks = Keyset.generate("test/aead", AES256_GCM)
    aead = ks.aead()
    ct = aead.encrypt(b"old", b"")
    ks.promote(ks.add().version)
    assert aead.decrypt(ct, b"") == b"old"
    ks.disable(1)
    with pytest.raises(KeysetError) as err:
        aead.decrypt(ct, b"")
    assert not isinstance(err.value, CryptoError)
    assert "disabled" in str(err.value)
    ks.enable(1)
    assert aead.decrypt(ct, b"") == b"old"
    ks.disable(1)
    ks.destroy(1)
    with pytest.raises(KeysetError, match="destroyed"):
        aead.decrypt(ct, b"")


def test_aead_without_primary_cannot_encrypt_but_pending_decrypts() -> None:
    ks = Keyset("test/empty", Purpose.AEAD)
    with pytest.raises(KeysetError, match="no primary"):
        ks.aead().encrypt(b"x", b"")
    v1 = ks.add(AES256_GCM)
    with pytest.raises(KeysetError, match="no primary"):
        ks.aead().encrypt(b"x", b"")
    ks.promote(v1.version)
    ct = ks.aead().encrypt(b"x", b"")
    assert ks.aead().decrypt(ct, b"") == b"x"


def test_aead_handle_is_a_key_encryption_key_and_wraps_another_keyset() -> None:
    outer = Keyset.generate("test/outer", AES256_GCM)
    handle = outer.aead()
    assert isinstance(handle, KeyEncryptionKey)
    assert handle.kek_id == "keyset:test/outer"
    inner = Keyset.generate("test/inner", HMAC_SHA256)
    blob = inner.encrypt_to_bytes(handle, b"inner")
    again = Keyset.decrypt_from_bytes(blob, handle, b"inner")
    tag = inner.mac().compute_mac(b"data")
    again.mac().verify_mac(tag, b"data")


def test_handles_follow_keyset_changes_live() -> None:
    ks = Keyset.generate("test/live", AES256_GCM)
    aead = ks.aead()
    v2 = ks.add()
    ks.promote(v2.version)
    assert int.from_bytes(aead.encrypt(b"", b"")[1:5], "big") == v2.key_id


# -- MAC ------------------------------------------------------------------------


def test_mac_round_trip_and_format() -> None:
    ks = Keyset.generate("test/mac", HMAC_SHA256)
    mac = ks.mac()
    tag = mac.compute_mac(b"data")
    assert len(tag) == 5 + 32
    assert int.from_bytes(tag[1:5], "big") == ks.primary.key_id  # type: ignore[union-attr]
    assert mac.compute_mac(b"data") == tag
    mac.verify_mac(tag, b"data")


@pytest.mark.parametrize("index", [0, 1, 4, 5, 36])
def test_mac_forgeries_raise_crypto_error(index: int) -> None:
    mac = Keyset.generate("test/mac", HMAC_SHA256).mac()
    tag = mac.compute_mac(b"data")
    with pytest.raises(CryptoError):
        mac.verify_mac(flip(tag, index), b"data")
    with pytest.raises(CryptoError):
        mac.verify_mac(tag, b"datA")
    with pytest.raises(CryptoError):
        mac.verify_mac(tag[:-1], b"data")
    with pytest.raises(CryptoError):
        mac.verify_mac(tag + b"\x00", b"data")


def test_mac_disabled_version() -> None:
    ks = Keyset.generate("test/mac", HMAC_SHA256)
    tag = ks.mac().compute_mac(b"d")
    ks.promote(ks.add().version)
    ks.mac().verify_mac(tag, b"d")
    ks.disable(1)
    with pytest.raises(KeysetError):
        ks.mac().verify_mac(tag, b"d")


# -- signatures -------------------------------------------------------------------


def test_sign_and_verify_round_trip(signing_keyset: Keyset) -> None:
    signer = signing_keyset.signer()
    signature = signer.sign(b"message")
    assert int.from_bytes(signature[1:5], "big") == signing_keyset.primary.key_id  # type: ignore[union-attr]
    signer.verify(signature, b"message")
    public = signer.public_keyset()
    public.verify(signature, b"message")
    with pytest.raises(CryptoError):
        public.verify(signature, b"massage")
    with pytest.raises(CryptoError):
        public.verify(flip(signature, len(signature) - 1), b"message")
    with pytest.raises(CryptoError):
        public.verify(flip(signature, 2), b"message")
    with pytest.raises(CryptoError):
        public.verify(signature[:5], b"message")


def test_public_keyset_travels_and_cannot_sign_or_open(signing_keyset: Keyset) -> None:
    public = PublicKeyset.from_bytes(signing_keyset.public_keyset().to_bytes())
    signature = signing_keyset.signer().sign(b"m")
    public.verify(signature, b"m")
    assert not hasattr(public, "sign")
    with pytest.raises(KeysetError):
        public.seal(b"m", b"info")
    pem = public.public_key_pem()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")


def test_rsa_pss_uses_digest_length_salt_and_pkcs1_is_deterministic() -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    pss = Keyset.generate("test/pss", "RSA2048_PSS")
    sig = pss.signer().sign(b"m")[5:]
    public = serialization.load_der_public_key(pss.public_keyset().public_key_bytes())
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(
        sig, b"m", padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256()
    )
    pkcs1 = Keyset.generate("test/pkcs1", "RSA2048_PKCS1").signer()
    assert pkcs1.sign(b"m") == pkcs1.sign(b"m")


def test_signature_from_disabled_version_raises_keyset_error() -> None:
    ks = Keyset.generate("test/sig", ED25519)
    old = ks.signer().sign(b"m")
    ks.promote(ks.add().version)
    public_before = ks.public_keyset()
    ks.disable(1)
    with pytest.raises(KeysetError):
        ks.signer().verify(old, b"m")
    with pytest.raises(KeysetError):
        ks.public_keyset().verify(old, b"m")
    # A public snapshot taken earlier still reflects the states at that time.
    public_before.verify(old, b"m")


def test_from_public_key_verifies_raw_ed25519() -> None:
    ks = Keyset.generate("test/sig", ED25519)
    info = ks.primary
    assert info is not None and info.public_key is not None
    public = PublicKeyset.from_public_key(ED25519, info.public_key, key_id=info.key_id)
    public.verify(ks.signer().sign(b"m"), b"m")
    with pytest.raises(DecodeError):
        PublicKeyset.from_public_key(ED25519, info.public_key[:31], key_id=1)


# -- HPKE -----------------------------------------------------------------------


@pytest.mark.parametrize("template", [X25519_HPKE, X25519_HPKE_CHACHA20])
def test_hpke_seal_to_public_keyset_and_open(template: object) -> None:
    ks = Keyset.generate("principal/site/fra1/sealing", template)  # type: ignore[arg-type]
    recipient = PublicKeyset.from_bytes(ks.public_keyset().to_bytes())
    sealed = recipient.seal(b"secret", b"recipient=site/fra1")
    assert int.from_bytes(sealed[1:5], "big") == ks.primary.key_id  # type: ignore[union-attr]
    assert len(sealed) == 5 + 32 + len(b"secret") + 16
    assert ks.hpke().open(sealed, b"recipient=site/fra1") == b"secret"
    assert ks.hpke().open(ks.hpke().seal(b"self", b""), b"") == b"self"


def test_hpke_wrong_info_tampering_and_wrong_recipient() -> None:
    ks = Keyset.generate("test/hpke", X25519_HPKE)
    opener = ks.hpke()
    sealed = ks.public_keyset().seal(b"secret", b"info")
    with pytest.raises(CryptoError):
        opener.open(sealed, b"other info")
    for index in (0, 3, 5, 36, 37, len(sealed) - 1):
        with pytest.raises(CryptoError):
            opener.open(flip(sealed, index), b"info")
    for cut in (0, 5, 36, len(sealed) - 1):
        with pytest.raises(CryptoError):
            opener.open(sealed[:cut], b"info")
    other = Keyset.generate("test/other", X25519_HPKE)
    with pytest.raises(CryptoError):
        other.hpke().open(with_key_id(sealed, other.primary.key_id), b"info")  # type: ignore[union-attr]


def test_hpke_recipient_from_raw_public_bytes() -> None:
    ks = Keyset.generate("test/hpke", X25519_HPKE)
    raw = ks.public_keyset().public_key_bytes()
    assert len(raw) == 32
    recipient = PublicKeyset.from_public_key(
        X25519_HPKE,
        raw,
        key_id=ks.primary.key_id,  # type: ignore[union-attr]
    )
    assert ks.hpke().open(recipient.seal(b"m", b"i"), b"i") == b"m"
    for point in X25519_LOW_ORDER:  # every one, checked with the same probe key each time
        with pytest.raises(DecodeError):
            PublicKeyset.from_public_key(X25519_HPKE, bytes.fromhex(point), key_id=1)
    with pytest.raises(DecodeError):
        PublicKeyset.from_public_key(X25519_HPKE, raw + b"\x00", key_id=1)
    with pytest.raises(KeysetError):
        PublicKeyset.from_public_key(AES256_GCM, raw, key_id=1)


def test_hpke_pending_version_opens_before_promotion() -> None:
    ks = Keyset.generate("test/hpke", X25519_HPKE)
    v2 = ks.add()
    public = ks.public_keyset()
    assert public.primary is not None and public.primary.version == 1
    sealed = public.seal(b"m", b"")
    assert ks.hpke().open(sealed, b"") == b"m"
    ks.promote(v2.version)
    sealed2 = ks.public_keyset().seal(b"n", b"")
    assert int.from_bytes(sealed2[1:5], "big") == v2.key_id
    assert ks.hpke().open(sealed2, b"") == b"n"
    assert ks.hpke().open(sealed, b"") == b"m"


# -- handles and purposes ----------------------------------------------------------


def test_handle_types_match_purposes() -> None:
    expected = {
        "AES256_GCM": AeadHandle,
        "HMAC_SHA256": MacHandle,
        "ED25519": SignerHandle,
        "X25519_HPKE": HpkeHandle,
    }
    for template, handle_type in expected.items():
        ks = Keyset.generate(f"test/{template.lower()}", template)
        assert type(ks.handle()) is handle_type
    aead_keyset = Keyset.generate("test/aead", AES256_GCM)
    for wrong in (aead_keyset.mac, aead_keyset.signer, aead_keyset.hpke):
        with pytest.raises(KeysetError):
            wrong()
    with pytest.raises(KeysetError):
        aead_keyset.public_keyset()
    with pytest.raises(KeysetError):
        Keyset("test/decrypt", Purpose.DECRYPT).handle()


def test_templates_must_serve_the_keyset_purpose() -> None:
    ks = Keyset.generate("test/aead", AES256_GCM)
    before = ks.versions
    with pytest.raises(KeysetError):
        ks.add(HMAC_SHA256)
    assert ks.versions == before
    with pytest.raises(KeysetError):
        ks.add("NO_SUCH_TEMPLATE")
    with pytest.raises(KeysetError):
        Keyset("test/x", "no-such-purpose")
    with pytest.raises(KeysetError):
        Keyset("bad name with spaces", Purpose.AEAD)


# -- garbage from peers ---------------------------------------------------------------

FUZZ_KEYSETS = {
    name: Keyset.generate(f"fuzz/{name.lower()}", name)
    for name in ("AES256_GCM", "HMAC_SHA256", "ED25519", "ECDSA_P256", "RSA2048_PSS", "X25519_HPKE")
}


@settings(max_examples=300, deadline=None)
@given(
    template=st.sampled_from(sorted(FUZZ_KEYSETS)),
    known_prefix=st.booleans(),
    tail=st.binary(max_size=300),
)
def test_garbage_raises_crypto_error_and_nothing_else(
    template: str, known_prefix: bool, tail: bytes
) -> None:
    ks = FUZZ_KEYSETS[template]
    blob = (b"\x01" + struct.pack(">I", ks.version(1).key_id) if known_prefix else b"") + tail
    consume: Callable[[], object] = {
        "aead": lambda: ks.aead().decrypt(blob, b""),
        "mac": lambda: ks.mac().verify_mac(blob, b""),
        "sign": lambda: ks.public_keyset().verify(blob, b""),
        "hpke": lambda: ks.hpke().open(blob, b""),
    }[ks.purpose.value]
    with pytest.raises(CryptoError):
        consume()


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_consumers_accept_bytes_like_input(wrap: Callable[[bytes], Any]) -> None:
    # Database drivers may hand back bytearray or memoryview instead of bytes.
    aead = FUZZ_KEYSETS["AES256_GCM"].aead()
    assert aead.decrypt(wrap(aead.encrypt(b"m", b"")), b"") == b"m"
    mac = FUZZ_KEYSETS["HMAC_SHA256"].mac()
    mac.verify_mac(wrap(mac.compute_mac(b"m")), b"m")
    for name in ("ED25519", "ECDSA_P256", "RSA2048_PSS"):
        signer = FUZZ_KEYSETS[name].signer()
        signer.public_keyset().verify(wrap(signer.sign(b"m")), b"m")
    hpke = FUZZ_KEYSETS["X25519_HPKE"].hpke()
    assert hpke.open(wrap(hpke.seal(b"m", b"i")), b"i") == b"m"
