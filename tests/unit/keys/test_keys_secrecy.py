"""Secret bytes do not leak: no pickling, no copies, nothing in reprs or error messages."""

from __future__ import annotations

import base64
import copy
import os
import pickle
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker.errors import KeybrokerError
from keybroker.keys import (
    AES256_GCM,
    SECRET_ACCESS,
    TEMPLATES,
    X25519_HPKE,
    Keyset,
    SecretAccessToken,
)
from keybroker.keys.access import require_secret_access


def leaked_forms(secret: bytes) -> list[str]:
    """Ways a secret could show up in text."""
    forms = [
        secret.hex(),
        secret.hex().upper(),
        repr(secret)[2:-1],
        base64.b64encode(secret).decode(),
    ]
    # Also any 12-byte window, hex-encoded, catches partial dumps of long DER keys.
    forms += [secret[i : i + 12].hex() for i in range(0, max(1, len(secret) - 12), 12)]
    return forms


def assert_no_secret(text: str, secrets: list[bytes]) -> None:
    for secret in secrets:
        for form in leaked_forms(secret):
            assert form not in text


def all_secrets(ks: Keyset) -> list[bytes]:
    return [
        ks.export_secret_material(v.version, SECRET_ACCESS)
        for v in ks.versions
        if v.state.value != "destroyed"
    ]


def keyset_for(template: str) -> Keyset:
    ks = Keyset.generate(f"test/{template.lower()}", template)
    ks.add()
    return ks


FAST_TEMPLATES = [t for t in TEMPLATES if not t.startswith("RSA3072")]


@pytest.mark.parametrize("template", FAST_TEMPLATES)
def test_reprs_show_names_ids_and_states_only(template: str) -> None:
    ks = keyset_for(template)
    secrets = all_secrets(ks)
    texts = [repr(ks), str(ks), repr(ks.handle()), repr(ks.versions), repr(ks.primary)]
    texts += [repr(w) for w in ks.wrapped_versions(Keyset.generate("k", AES256_GCM).aead())]
    if ks.primary is not None and ks.primary.public_key is not None:
        texts.append(repr(ks.public_keyset()))
    for text in texts:
        assert_no_secret(text, secrets)
    assert ks.name in repr(ks)
    assert f"{ks.version(1).key_id:#010x}" in repr(ks)
    assert "primary" in repr(ks) and "pending" in repr(ks)


def test_error_messages_carry_no_secrets() -> None:
    ks = keyset_for("AES256_GCM")
    secrets = all_secrets(ks)
    aead = ks.aead()
    ct = aead.encrypt(b"plaintext-marker", b"")
    attempts: list[Callable[[], object]] = [
        lambda: aead.decrypt(ct[:-1] + bytes([ct[-1] ^ 1]), b""),
        lambda: aead.decrypt(ct, b"wrong"),
        lambda: ks.disable(1),
        lambda: ks.add("HMAC_SHA256"),
        lambda: ks.import_secret_material(AES256_GCM, secrets[0][:31], SECRET_ACCESS),
        lambda: Keyset.decrypt_from_bytes(b"junk", aead, b""),
    ]
    for attempt in attempts:
        with pytest.raises(KeybrokerError) as err:
            attempt()
        assert_no_secret(str(err.value) + repr(err.value), secrets)
        assert "plaintext-marker" not in str(err.value)


@pytest.mark.parametrize("template", ["AES256_GCM", "ED25519", "X25519_HPKE"])
def test_keysets_handles_and_public_keysets_refuse_pickle_and_copy(template: str) -> None:
    ks = keyset_for(template)
    objects: list[object] = [ks, ks.handle()]
    if template != "AES256_GCM":
        objects.append(ks.public_keyset())
    for obj in objects:
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            with pytest.raises(TypeError):
                pickle.dumps(obj, protocol=protocol)
        with pytest.raises(TypeError):
            copy.copy(obj)
        with pytest.raises(TypeError):
            copy.deepcopy(obj)
        with pytest.raises(TypeError):
            obj.__getstate__()


def test_secret_export_needs_the_token() -> None:
    ks = Keyset.generate("test/aead", AES256_GCM)
    for fake in (None, object(), "SECRET_ACCESS", True):
        with pytest.raises(TypeError):
            ks.export_secret_material(1, fake)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            ks.aead().export_secret_material(1, fake)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            ks.import_secret_material(AES256_GCM, bytes(32), fake)  # type: ignore[arg-type]
    assert SecretAccessToken() is SECRET_ACCESS
    assert repr(SECRET_ACCESS) == "keybroker.keys.SECRET_ACCESS"
    require_secret_access(SECRET_ACCESS)
    raw = ks.export_secret_material(1, SECRET_ACCESS)
    assert raw == ks.aead().export_secret_material(1, SECRET_ACCESS)
    assert len(raw) == 32


def test_imported_material_is_used() -> None:
    raw = AESGCM.generate_key(256)
    ks = Keyset("test/imported", "aead")
    info = ks.import_secret_material(AES256_GCM, raw, SECRET_ACCESS)
    assert info.state.value == "pending"
    ks.promote(info.version)
    ct = ks.aead().encrypt(b"m", b"ad")
    assert AESGCM(raw).decrypt(ct[5:17], ct[17:], b"ad") == b"m"
    hpke = Keyset("test/imported-hpke", "hpke")
    sk = os.urandom(32)
    hpke.import_secret_material(X25519_HPKE, sk, SECRET_ACCESS)
    assert hpke.export_secret_material(1, SECRET_ACCESS) == sk


@pytest.mark.parametrize(
    ("template", "bad"),
    [
        ("AES256_GCM", bytes(16)),
        ("HMAC_SHA256", bytes(31)),
        ("ED25519", bytes(31)),
        ("X25519_HPKE", bytes(33)),
        ("ECDSA_P256", b"not der"),
        ("RSA2048_PSS", b"\x30\x03\x02\x01\x00"),
    ],
)
def test_import_rejects_material_that_does_not_fit(template: str, bad: bytes) -> None:
    from keybroker.errors import KeysetError

    ks = Keyset.generate(f"test/{template.lower()}", template)
    before = ks.versions
    with pytest.raises(KeysetError):
        ks.import_secret_material(template, bad, SECRET_ACCESS)
    assert ks.versions == before


def test_import_rejects_a_p256_key_for_rsa_and_wrong_rsa_size() -> None:
    from keybroker.errors import KeysetError

    p256 = Keyset.generate("test/p256", "ECDSA_P256")
    der = p256.export_secret_material(1, SECRET_ACCESS)
    rsa = Keyset.generate("test/rsa", "RSA2048_PSS")
    with pytest.raises(KeysetError):
        rsa.import_secret_material("RSA2048_PSS", der, SECRET_ACCESS)
    with pytest.raises(KeysetError):
        rsa.import_secret_material(
            "RSA3072_PSS", rsa.export_secret_material(1, SECRET_ACCESS), SECRET_ACCESS
        )
    same = Keyset("test/p256-copy", "sign")
    same.import_secret_material("ECDSA_P256", der, SECRET_ACCESS)
    assert same.version(1).public_key == p256.version(1).public_key
