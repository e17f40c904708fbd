"""Key material per algorithm: generate, load, dump and the primitive objects.

Private to :mod:`keybroker.keys`. This is the only file that turns key
objects into bytes and back; everything above it holds :class:`Secret` and
:class:`Public` objects, whose ``repr`` names the class and nothing else.

Every primitive comes from ``cryptography``; the objects it builds
(``AESGCM``, the HMAC context, private keys, the HPKE suite) are built once
per key version and reused, so no call re-derives or re-parses a key.

Secret formats (what :meth:`Secret.secret_bytes` returns and
:meth:`Kind.load_secret` accepts):

* AES-GCM, HMAC: the raw key;
* Ed25519 (RFC 8032 §5.1.5) and X25519 (RFC 7748 §5): the 32-byte raw private key;
* ECDSA (P-256, P-384) and RSA: unencrypted PKCS#8 DER.

Public formats: the 32-byte raw key for Ed25519 and X25519,
SubjectPublicKeyInfo DER for ECDSA and RSA.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keybroker.errors import CryptoError, DecodeError, KeysetError

_DER: Final = serialization.Encoding.DER
_PEM: Final = serialization.Encoding.PEM
_SPKI: Final = serialization.PublicFormat.SubjectPublicKeyInfo


PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class Public(ABC):
    """A public key. Not secret: it may be exported, logged and stored freely."""

    __slots__ = ()

    @abstractmethod
    def raw(self) -> bytes:
        """The public key in this kind's public format (see the module docstring)."""

    @abstractmethod
    def pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class Secret(ABC):
    """Secret key material of one key version."""

    __slots__ = ()

    @abstractmethod
    def secret_bytes(self) -> bytes:
        """The raw secret in this kind's secret format.

        Called only to encrypt or seal key material, to derive proof-of-possession
        keys, and by the SECRET_ACCESS export.
        """

    def public(self) -> Public | None:
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def pop_key(self) -> bytes:
        """A MAC key for proofs of possession, derived so it is never the key itself."""
        return HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=None,
            info=b"keybroker/keys/proof-of-possession/v1",
        ).derive(self.secret_bytes())


class Kind(ABC):
    """How one template's keys are made, loaded and checked."""

    #: Human description of the algorithm and parameters, for docs and ``describe``.
    algorithm: str

    @abstractmethod
    def generate(self) -> Secret: ...

    @abstractmethod
    def load_secret(self, raw: bytes) -> Secret:
        """Build a secret from its secret format; :class:`KeysetError` if it does not fit."""

    def load_public(self, raw: bytes) -> Public:
        """Build a public key from its public format; :class:`DecodeError` if malformed."""
        raise DecodeError(f"{self.algorithm} keys have no public part")

    @property
    def asymmetric(self) -> bool:
        return False


# ---------------------------------------------------------------------------
# AEAD: AES-GCM
# ---------------------------------------------------------------------------


class AesGcmSecret(Secret):
    __slots__ = ("_raw", "aead")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self.aead = AESGCM(raw)

    def secret_bytes(self) -> bytes:
        return self._raw


class AesGcmKind(Kind):
    def __init__(self, key_size: int) -> None:
        self.key_size = key_size
        self.algorithm = f"AES-{key_size * 8}-GCM, 96-bit random nonce, 128-bit tag"

    def generate(self) -> Secret:
        return AesGcmSecret(AESGCM.generate_key(self.key_size * 8))

    def load_secret(self, raw: bytes) -> Secret:
        if len(raw) != self.key_size:
            raise KeysetError(f"an {self.algorithm} key is {self.key_size} bytes")
        return AesGcmSecret(bytes(raw))


# ---------------------------------------------------------------------------
# MAC: HMAC-SHA256
# ---------------------------------------------------------------------------


class HmacSecret(Secret):
    __slots__ = ("_ctx", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        # A keyed context we copy per call: HMAC keying is done once, here.
        self._ctx = crypto_hmac.HMAC(raw, hashes.SHA256())

    def secret_bytes(self) -> bytes:
        return self._raw

    def compute(self, data: bytes) -> bytes:
        ctx = self._ctx.copy()
        ctx.update(data)
        return ctx.finalize()

    def verify(self, data: bytes, tag: bytes) -> None:
        """Constant-time check (cryptography's ``HMAC.verify``); :class:`CryptoError` if wrong."""
        ctx = self._ctx.copy()
        ctx.update(data)
        try:
            ctx.verify(bytes(tag))
        except InvalidSignature:
            raise CryptoError() from None


class HmacKind(Kind):
    def __init__(self, key_size: int) -> None:
        self.key_size = key_size
        self.algorithm = f"HMAC-SHA256, {key_size * 8}-bit key, 256-bit tag"

    def generate(self) -> Secret:
        return HmacSecret(os.urandom(self.key_size))

    def load_secret(self, raw: bytes) -> Secret:
        if len(raw) != self.key_size:
            raise KeysetError(f"an {self.algorithm} key is {self.key_size} bytes")
        return HmacSecret(bytes(raw))


# ---------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------


class VerifyingKey(Public):
    __slots__ = ()

    @abstractmethod
    def verify(self, signature: bytes, data: bytes) -> None:
        """Return ``None`` or raise :class:`CryptoError`."""


class SigningSecret(Secret):
    __slots__ = ()

    @abstractmethod
    def sign(self, data: bytes) -> bytes: ...

    @abstractmethod
    def public(self) -> VerifyingKey: ...

    @abstractmethod
    def key_object(self) -> PrivateKey:
        """The ``cryptography`` private key, for APIs that must hold one (x509 builders)."""


class Ed25519Public(VerifyingKey):
    __slots__ = ("_key",)

    def __init__(self, key: ed25519.Ed25519PublicKey) -> None:
        self._key = key

    def raw(self) -> bytes:
        return self._key.public_bytes_raw()

    def pem(self) -> bytes:
        return self._key.public_bytes(_PEM, _SPKI)

    def verify(self, signature: bytes, data: bytes) -> None:
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            raise CryptoError() from None


class Ed25519Secret(SigningSecret):
    __slots__ = ("_key", "_public")

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        self._public = Ed25519Public(key.public_key())

    def secret_bytes(self) -> bytes:
        return self._key.private_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def public(self) -> VerifyingKey:
        return self._public

    def key_object(self) -> PrivateKey:
        return self._key


class Ed25519Kind(Kind):
    algorithm = "Ed25519 (RFC 8032)"

    def generate(self) -> Secret:
        return Ed25519Secret(ed25519.Ed25519PrivateKey.generate())

    def load_secret(self, raw: bytes) -> Secret:
        try:
            return Ed25519Secret(ed25519.Ed25519PrivateKey.from_private_bytes(raw))
        except ValueError:
            raise KeysetError("an Ed25519 private key is 32 raw bytes") from None

    def load_public(self, raw: bytes) -> Public:
        try:
            return Ed25519Public(ed25519.Ed25519PublicKey.from_public_bytes(raw))
        except ValueError:
            raise DecodeError("malformed Ed25519 public key") from None

    @property
    def asymmetric(self) -> bool:
        return True


class _DerPublic(VerifyingKey):
    """ECDSA or RSA public key (SubjectPublicKeyInfo DER)."""

    __slots__ = ("_key", "_scheme")

    def __init__(self, key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, scheme: _Scheme) -> None:
        self._key = key
        self._scheme = scheme

    def raw(self) -> bytes:
        return self._key.public_bytes(_DER, _SPKI)

    def pem(self) -> bytes:
        return self._key.public_bytes(_PEM, _SPKI)

    def verify(self, signature: bytes, data: bytes) -> None:
        try:
            if isinstance(self._key, rsa.RSAPublicKey):
                self._key.verify(signature, data, _rsa_padding(self._scheme), hashes.SHA256())
            else:
                self._key.verify(signature, data, ec.ECDSA(_ecdsa_hash(self._scheme)))
        except InvalidSignature:
            raise CryptoError() from None


_Scheme = Literal["ecdsa", "ecdsa-sha384", "pss", "pkcs1"]


def _ecdsa_hash(scheme: _Scheme) -> hashes.HashAlgorithm:
    # P-384 keys sign with SHA-384 (the pairing TLS 1.3 names ecdsa_secp384r1_sha384).
    return hashes.SHA384() if scheme == "ecdsa-sha384" else hashes.SHA256()


def _rsa_padding(scheme: _Scheme) -> padding.AsymmetricPadding:
    if scheme == "pss":
        # RFC 8017 §9.1 with SHA-256 and MGF1-SHA-256; salt = digest length
        # (RFC 8446 §4.2.3 requires exactly that for rsa_pss_rsae_sha256).
        return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    return padding.PKCS1v15()


class _DerSecret(SigningSecret):
    __slots__ = ("_key", "_public", "_scheme")

    def __init__(
        self, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, scheme: _Scheme
    ) -> None:
        self._key = key
        self._scheme = scheme
        self._public = _DerPublic(key.public_key(), scheme)

    def secret_bytes(self) -> bytes:
        return self._key.private_bytes(
            _DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return self._key.sign(data, _rsa_padding(self._scheme), hashes.SHA256())
        return self._key.sign(data, ec.ECDSA(_ecdsa_hash(self._scheme)))

    def public(self) -> VerifyingKey:
        return self._public

    def key_object(self) -> PrivateKey:
        return self._key


class EcdsaP256Kind(Kind):
    algorithm = "ECDSA P-256 with SHA-256, DER signatures"

    def generate(self) -> Secret:
        return _DerSecret(ec.generate_private_key(ec.SECP256R1()), "ecdsa")

    def load_secret(self, raw: bytes) -> Secret:
        key = _load_pkcs8(raw)
        if not (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"):
            raise KeysetError("not a P-256 private key")
        return _DerSecret(key, "ecdsa")

    def load_public(self, raw: bytes) -> Public:
        key = _load_spki(raw)
        if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"):
            raise DecodeError("not a P-256 public key")
        return _DerPublic(key, "ecdsa")

    @property
    def asymmetric(self) -> bool:
        return True


class EcdsaP384Kind(Kind):
    algorithm = "ECDSA P-384 with SHA-384, DER signatures"

    def generate(self) -> Secret:
        return _DerSecret(ec.generate_private_key(ec.SECP384R1()), "ecdsa-sha384")

    def load_secret(self, raw: bytes) -> Secret:
        key = _load_pkcs8(raw)
        if not (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"):
            raise KeysetError("not a P-384 private key")
        return _DerSecret(key, "ecdsa-sha384")

    def load_public(self, raw: bytes) -> Public:
        key = _load_spki(raw)
        if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"):
            raise DecodeError("not a P-384 public key")
        return _DerPublic(key, "ecdsa-sha384")

    @property
    def asymmetric(self) -> bool:
        return True


class RsaKind(Kind):
    def __init__(self, bits: int, scheme: Literal["pss", "pkcs1"]) -> None:
        self.bits = bits
        self.scheme: _Scheme = scheme
        name = "PSS (MGF1-SHA-256, 32-byte salt)" if scheme == "pss" else "PKCS#1 v1.5"
        self.algorithm = f"RSA-{bits} {name} with SHA-256, e = 65537"

    def generate(self) -> Secret:
        return _DerSecret(rsa.generate_private_key(65537, self.bits), self.scheme)

    def load_secret(self, raw: bytes) -> Secret:
        key = _load_pkcs8(raw)
        if not (isinstance(key, rsa.RSAPrivateKey) and key.key_size == self.bits):
            raise KeysetError(f"not an RSA-{self.bits} private key")
        return _DerSecret(key, self.scheme)

    def load_public(self, raw: bytes) -> Public:
        key = _load_spki(raw)
        if not (isinstance(key, rsa.RSAPublicKey) and key.key_size == self.bits):
            raise DecodeError(f"not an RSA-{self.bits} public key")
        return _DerPublic(key, self.scheme)

    @property
    def asymmetric(self) -> bool:
        return True


def _load_pkcs8(raw: bytes) -> object:
    try:
        return serialization.load_der_private_key(raw, password=None)
    except (ValueError, TypeError):
        raise KeysetError("not an unencrypted PKCS#8 private key") from None


def _load_spki(raw: bytes) -> object:
    try:
        return serialization.load_der_public_key(raw)
    except ValueError:
        raise DecodeError("not a SubjectPublicKeyInfo public key") from None


# ---------------------------------------------------------------------------
# HPKE (RFC 9180), base mode, single shot
# ---------------------------------------------------------------------------


class HpkePublic(Public):
    __slots__ = ("_key", "_suite")

    def __init__(self, key: x25519.X25519PublicKey, suite: Suite) -> None:
        self._key = key
        self._suite = suite

    def raw(self) -> bytes:
        return self._key.public_bytes_raw()

    def pem(self) -> bytes:
        return self._key.public_bytes(_PEM, _SPKI)

    def seal(self, plaintext: bytes, info: bytes) -> bytes:
        """``enc || ct`` (RFC 9180 §6.1 single-shot Seal, empty AAD)."""
        return self._suite.encrypt(plaintext, self._key, info=info)


class HpkeSecret(Secret):
    __slots__ = ("_key", "_public", "_suite")

    def __init__(self, key: x25519.X25519PrivateKey, suite: Suite) -> None:
        self._key = key
        self._suite = suite
        self._public = HpkePublic(key.public_key(), suite)

    def secret_bytes(self) -> bytes:
        return self._key.private_bytes_raw()

    def public(self) -> HpkePublic:
        return self._public

    def open(self, sealed: bytes | memoryview, info: bytes) -> bytes:
        try:
            return self._suite.decrypt(sealed, self._key, info=info)
        except Exception:  # InvalidTag, or ValueError for a malformed enc: one opaque error.
            raise CryptoError() from None


#: The private key of the low-order check in :meth:`X25519HpkeKind.load_public`. Any
#: key serves (X25519 clamps every scalar to a multiple of the cofactor, so a low-order
#: point gives the all-zero secret whatever the scalar); its results are thrown away.
#: One for the process: a fresh key per check cost a key generation per delivery.
_LOW_ORDER_PROBE: Final = x25519.X25519PrivateKey.generate()


class X25519HpkeKind(Kind):
    def __init__(self, aead: AEAD, aead_name: str) -> None:
        self.suite = Suite(KEM.X25519, KDF.HKDF_SHA256, aead)
        self.algorithm = f"HPKE base mode: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, {aead_name}"

    def generate(self) -> Secret:
        return HpkeSecret(x25519.X25519PrivateKey.generate(), self.suite)

    def load_secret(self, raw: bytes) -> Secret:
        try:
            return HpkeSecret(x25519.X25519PrivateKey.from_private_bytes(raw), self.suite)
        except ValueError:
            raise KeysetError("an X25519 private key is 32 raw bytes") from None

    def load_public(self, raw: bytes) -> Public:
        try:
            key = x25519.X25519PublicKey.from_public_bytes(raw)
            # RFC 9180 §7.1.4: a low-order point gives an all-zero shared secret,
            # which OpenSSL rejects; reject it here, when the key arrives.
            _LOW_ORDER_PROBE.exchange(key)
        except ValueError:
            raise DecodeError("malformed or low-order X25519 public key") from None
        return HpkePublic(key, self.suite)

    @property
    def asymmetric(self) -> bool:
        return True
