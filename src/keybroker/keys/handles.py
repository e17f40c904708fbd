"""Keyset handles: what code that *uses* keys holds.

A handle is a read-only, live view of a :class:`~keybroker.keys.Keyset`:
it encrypts, signs or seals with the primary version and decrypts, verifies
or opens with whichever version the key-id prefix names, as long as that
version is pending, primary or enabled (see :mod:`keybroker.keys.lifecycle`).
State changes made on the keyset take effect on its handles at once, so
disabling a version stops every handle from using it.

Handles cannot change the keyset, cannot be pickled or copied and print only
the keyset name, key ids and states.

Output formats (``prefix`` is 1 format byte ``0x01`` + 4-byte big-endian key id):

* AEAD: ``prefix || nonce (12) || AES-GCM ciphertext || tag (16)``
* MAC: ``prefix || HMAC-SHA256 (32)``
* signature: ``prefix || signature`` (Ed25519 raw, ECDSA DER, RSA)
* HPKE: ``prefix || enc || ciphertext`` (RFC 9180 single-shot, empty AAD)
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, ClassVar, Final, cast

from cryptography.exceptions import InvalidTag

from keybroker.errors import CryptoError, KeysetError
from keybroker.keys import _material
from keybroker.keys._common import PREFIX_SIZE, NoPickle, select, unusable
from keybroker.keys.access import require_secret_access
from keybroker.keys.lifecycle import CONSUMING_STATES
from keybroker.keys.templates import Purpose

if TYPE_CHECKING:
    from keybroker.keys.access import SecretAccessToken
    from keybroker.keys.keyset import Keyset, KeyVersionInfo, VersionEntry
    from keybroker.keys.public import PublicKeyset

_NONCE: Final = 12
_TAG: Final = 16
_AEAD_BODY: Final = PREFIX_SIZE + _NONCE
_MIN_AEAD: Final = _AEAD_BODY + _TAG
_MIN_MAC: Final = PREFIX_SIZE + 1
_MIN_SIGNATURE: Final = PREFIX_SIZE + 1
_MIN_HPKE: Final = PREFIX_SIZE + 1
# Above this size AEAD output is built in place (see AeadHandle.encrypt).
_IN_PLACE_MIN: Final = 32 * 1024


class KeysetHandle(NoPickle):
    """Base of the purpose-specific handles; obtain one from ``Keyset.handle()``."""

    __slots__ = ("_by_prefix", "_keyset", "_name")
    PURPOSE: ClassVar[Purpose]

    def __init__(self, keyset: Keyset) -> None:
        if keyset.purpose is not self.PURPOSE:
            raise KeysetError(
                f"keyset {keyset.name!r} is for {keyset.purpose.value}, not {self.PURPOSE.value}"
            )
        self._keyset = keyset
        self._name = keyset.name
        # The keyset mutates this dict in place and never rebinds it, so the
        # handle sees every state change without asking.
        self._by_prefix: dict[bytes, VersionEntry] = keyset._by_prefix

    @property
    def name(self) -> str:
        return self._name

    @property
    def purpose(self) -> Purpose:
        return self._keyset.purpose

    @property
    def versions(self) -> tuple[KeyVersionInfo, ...]:
        return self._keyset.versions

    @property
    def primary(self) -> KeyVersionInfo | None:
        return self._keyset.primary

    def export_secret_material(self, version: int, token: SecretAccessToken) -> bytes:
        """Raw secret bytes of one version; see :meth:`Keyset.export_secret_material`."""
        return self._keyset.export_secret_material(version, token)

    def _producer(self) -> VersionEntry:
        entry = self._keyset._primary
        if entry is None:
            raise KeysetError(f"keyset {self._name!r} has no primary version")
        return entry

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._keyset._describe()})"


class AeadHandle(KeysetHandle):
    """AES-GCM with a key-id prefix. Also a :class:`~keybroker.keys.kek.KeyEncryptionKey`."""

    __slots__ = ()
    PURPOSE = Purpose.AEAD

    @property
    def kek_id(self) -> str:
        return f"keyset:{self._keyset.name}"

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        """Encrypt with the primary version under a fresh random 96-bit nonce."""
        entry = self._producer()
        nonce = os.urandom(_NONCE)
        aead = cast(_material.AesGcmSecret, entry.secret).aead
        if len(plaintext) < _IN_PLACE_MIN:
            return entry.prefix + nonce + aead.encrypt(nonce, plaintext, associated_data)
        # Large bodies: encrypt straight into the output instead of copying
        # prefix + nonce + ciphertext together afterwards; that copy alone is
        # ~10% of a 64 KiB seal. CPython's BytesIO.getvalue() returns its
        # buffer without copying (a speed detail only, not one we rely on for
        # correctness).
        out = io.BytesIO()
        out.seek(_AEAD_BODY + len(plaintext) + _TAG - 1)
        out.write(b"\0")
        with out.getbuffer() as view:
            view[:PREFIX_SIZE] = entry.prefix
            view[PREFIX_SIZE:_AEAD_BODY] = nonce
            with view[_AEAD_BODY:] as body:
                aead.encrypt_into(nonce, plaintext, associated_data, body)
        return out.getvalue()

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        """Decrypt with the version the prefix names; :class:`CryptoError` on any forgery."""
        # select() inlined: this is the hot path the benchmark measures.
        try:
            entry = self._by_prefix.get(ciphertext[:PREFIX_SIZE])
        except TypeError:  # a memoryview or bytearray: slices are unhashable
            entry = self._by_prefix.get(bytes(ciphertext[:PREFIX_SIZE]))
        if entry is None or len(ciphertext) < _MIN_AEAD:
            raise CryptoError()
        # Secret before state: destroy() changes the state first, so a concurrent
        # destroy makes this raise KeysetError rather than find no secret.
        secret = entry.secret
        if entry.state not in CONSUMING_STATES:
            raise unusable(entry, self._name)
        aead = cast(_material.AesGcmSecret, secret).aead
        try:
            return aead.decrypt(
                ciphertext[PREFIX_SIZE:_AEAD_BODY],
                memoryview(ciphertext)[_AEAD_BODY:],
                associated_data,
            )
        except InvalidTag:
            raise CryptoError() from None


class MacHandle(KeysetHandle):
    """HMAC-SHA256 tags with a key-id prefix."""

    __slots__ = ()
    PURPOSE = Purpose.MAC

    def compute_mac(self, data: bytes) -> bytes:
        entry = self._producer()
        return entry.prefix + cast(_material.HmacSecret, entry.secret).compute(data)

    def verify_mac(self, mac: bytes, data: bytes) -> None:
        """Return ``None`` or raise :class:`CryptoError` (constant-time comparison)."""
        entry = select(self._by_prefix, mac, _MIN_MAC, self._name)
        cast(_material.HmacSecret, entry.secret).verify(data, mac[PREFIX_SIZE:])


class SignerHandle(KeysetHandle):
    """Signatures with a key-id prefix; :meth:`public_keyset` verifies without secrets."""

    __slots__ = ()
    PURPOSE = Purpose.SIGN

    def sign(self, data: bytes) -> bytes:
        entry = self._producer()
        return entry.prefix + cast(_material.SigningSecret, entry.secret).sign(data)

    def sign_unprefixed(self, data: bytes) -> bytes:
        """The primary's signature in the algorithm's own format (raw Ed25519, DER ECDSA,
        RSA), without the key-id prefix: for protocols that name the key themselves
        (an RFC 9421 ``keyid``, an X.509 issuer). :meth:`verify` does not accept it."""
        return cast(_material.SigningSecret, self._producer().secret).sign(data)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return ``None`` or raise :class:`CryptoError`."""
        entry = select(self._by_prefix, signature, _MIN_SIGNATURE, self._name)
        cast(_material.VerifyingKey, entry.public).verify(signature[PREFIX_SIZE:], data)

    def public_keyset(self) -> PublicKeyset:
        return self._keyset.public_keyset()

    def private_key(self, token: SecretAccessToken) -> _material.PrivateKey:
        """The primary's ``cryptography`` private key object, for APIs that need one
        (a CA signing certificates and CRLs, a log signing tree heads). Like an export
        of raw bytes, it needs :data:`SECRET_ACCESS`, so an audit finds every caller."""
        require_secret_access(token)
        return cast(_material.SigningSecret, self._producer().secret).key_object()


class HpkeHandle(KeysetHandle):
    """HPKE (RFC 9180 base mode): :meth:`open` what was sealed to this keyset."""

    __slots__ = ()
    PURPOSE = Purpose.HPKE

    def seal(self, plaintext: bytes, info: bytes) -> bytes:
        """Seal to this keyset's own primary (senders use :meth:`public_keyset`)."""
        entry = self._producer()
        return entry.prefix + cast(_material.HpkePublic, entry.public).seal(plaintext, info)

    def open(self, sealed: bytes, info: bytes) -> bytes:
        """Open ``prefix || enc || ct``; :class:`CryptoError` for wrong ``info`` or tampering."""
        entry = select(self._by_prefix, sealed, _MIN_HPKE, self._name)
        secret = cast(_material.HpkeSecret, entry.secret)
        return secret.open(memoryview(sealed)[PREFIX_SIZE:], info)

    def public_keyset(self) -> PublicKeyset:
        return self._keyset.public_keyset()


HANDLE_TYPES: Final[dict[Purpose, type[KeysetHandle]]] = {
    cls.PURPOSE: cls for cls in (AeadHandle, MacHandle, SignerHandle, HpkeHandle)
}
