"""The key-encryption-key interface: what wraps key material at rest.

Both the root of trust (a 0600 file or a PKCS#11 token, :mod:`keybroker.keys.root`)
and an AEAD keyset handle satisfy it, so a keyset can be serialised under either.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class KeyEncryptionKey(Protocol):
    """Authenticated encryption of key material, bound to ``aad``.

    ``decrypt`` raises :class:`keybroker.errors.CryptoError` on any failure
    (wrong key, tampered bytes, different ``aad``) and says no more.
    """

    @property
    def kek_id(self) -> str:
        """A stable, non-secret name for this key (logged, stored next to what it wraps)."""
        ...

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes: ...

    def decrypt(self, ciphertext: bytes, aad: bytes) -> bytes: ...
