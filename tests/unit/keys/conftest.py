"""Fixtures for the keys tests: keysets are generated once per session (RSA is slow)."""

from __future__ import annotations

import pytest

from keybroker.keys import (
    AES256_GCM,
    ECDSA_P256,
    ED25519,
    RSA2048_PKCS1,
    RSA2048_PSS,
    RSA3072_PKCS1,
    RSA3072_PSS,
    AeadHandle,
    Keyset,
)

SIGNING_TEMPLATES = [ED25519, ECDSA_P256, RSA2048_PSS, RSA3072_PSS, RSA2048_PKCS1, RSA3072_PKCS1]

_signing_cache: dict[str, Keyset] = {}


@pytest.fixture(params=[t.name for t in SIGNING_TEMPLATES])
def signing_template_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def signing_keyset(signing_template_name: str) -> Keyset:
    """One keyset per signing template for the whole session. Tests must not change it."""
    name = signing_template_name
    if name not in _signing_cache:
        _signing_cache[name] = Keyset.generate(f"sign/{name}", name)
    return _signing_cache[name]


@pytest.fixture
def kek() -> AeadHandle:
    """A key-encryption key: an AEAD keyset handle satisfies the KeyEncryptionKey protocol."""
    return Keyset.generate("root/test-kek", AES256_GCM).aead()
