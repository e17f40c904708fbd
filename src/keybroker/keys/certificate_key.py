"""Keys certified by an X.509 certificate (a device's key): sign a challenge, receive a key.

A device key is not a keyset: it is made once, by the manufacturer, and named by
a certificate. :class:`CertificateKey` holds it the way a handle holds a keyset
version (no raw bytes out except through :meth:`CertificateKey.private_key_pem`,
which needs :data:`SECRET_ACCESS`; no pickling; ``repr`` names only the key type
and its SubjectPublicKeyInfo hash).

Two operations, each with one fixed algorithm per key type (no choice left to a
peer):

* signatures: ECDSA P-256 with SHA-256 (DER), or RSASSA-PSS with SHA-256,
  MGF1-SHA-256 and a 32-byte salt (RFC 8017 §8.1);
* key transport to the certified key (:func:`seal_to_certificate_key`, used by
  :meth:`keybroker.keys.Keyset.seal_version_to_certificate_key`):
  HPKE base mode DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-128-GCM (RFC 9180
  §A.3, the suite whose known answers we check; 128-bit, like P-256 itself)
  for a P-256 key; RSAES-OAEP with SHA-256 and MGF1-SHA-256 (RFC 8017 §7.1),
  ``info`` as the OAEP label, for an RSA key (CMS KeyTransRecipientInfo's
  choice, RFC 3560). Both bind ``info``: the wrong info does not open.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from keybroker.errors import CryptoError, DecodeError, KeysetError
from keybroker.keys._common import NoPickle
from keybroker.keys.access import SecretAccessToken, require_secret_access

CertificatePublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
CertificatePrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_HPKE_P256: Final = Suite(KEM.P256, KDF.HKDF_SHA256, AEAD.AES_128_GCM)
_MIN_RSA_BITS: Final = 2048


class TransportScheme(StrEnum):
    """How a key travels to a certified public key; named on the wire."""

    HPKE_P256 = "hpke-p256-hkdf-sha256-aes128gcm"
    RSA_OAEP = "rsa-oaep-sha256"


def _oaep(label: bytes) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=label)


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def _check_public(public_key: object) -> CertificatePublicKey:
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
        public_key.curve, ec.SECP256R1
    ):
        return public_key
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= _MIN_RSA_BITS:
        return public_key
    raise KeysetError("only P-256 and RSA-2048+ certified keys sign and receive keys here")


def transport_scheme(public_key: object) -> TransportScheme:
    """The one scheme used to send a key to ``public_key``."""
    if isinstance(_check_public(public_key), rsa.RSAPublicKey):
        return TransportScheme.RSA_OAEP
    return TransportScheme.HPKE_P256


def seal_to_certificate_key(public_key: object, plaintext: bytes, info: bytes) -> bytes:
    """Encrypt ``plaintext`` to a certified key, bound to ``info`` (see the module docstring).

    Keysets call this with a version record; nothing else should.
    """
    key = _check_public(public_key)
    if isinstance(key, rsa.RSAPublicKey):
        try:
            return key.encrypt(plaintext, _oaep(info))
        except ValueError:
            raise KeysetError("too long for RSA-OAEP with this key") from None
    return _HPKE_P256.encrypt(plaintext, key, info=info)


def verify_certificate_signature(public_key: object, signature: bytes, data: bytes) -> None:
    """Check a :meth:`CertificateKey.sign` signature; None, or :class:`CryptoError`."""
    key = _check_public(public_key)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(bytes(signature), data, _pss(), hashes.SHA256())
        else:
            key.verify(bytes(signature), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CryptoError() from None


def _spki_sha256(public_key: CertificatePublicKey) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(
        public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return digest.finalize()


class CertificateKey(NoPickle):
    """A device's private key. Make one with :meth:`generate` or :meth:`from_pem`."""

    __slots__ = ("_key", "_public")

    def __init__(self, key: CertificatePrivateKey) -> None:
        self._public = _check_public(key.public_key())
        self._key = key

    @classmethod
    def generate(cls, kind: Literal["p256", "rsa2048", "rsa3072"] = "p256") -> CertificateKey:
        if kind == "p256":
            return cls(ec.generate_private_key(ec.SECP256R1()))
        bits = 2048 if kind == "rsa2048" else 3072
        return cls(rsa.generate_private_key(65537, bits))

    @classmethod
    def from_pem(cls, data: bytes, password: bytes | None = None) -> CertificateKey:
        """A PKCS#8 (or traditional) PEM private key; :class:`DecodeError` if not one we use."""
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError):
            raise DecodeError("not a readable PEM private key (or wrong password)") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise DecodeError("a device key must be P-256 or RSA")
        try:
            return cls(key)
        except KeysetError as exc:
            raise DecodeError(str(exc)) from None

    def public_key(self) -> CertificatePublicKey:
        return self._public

    @property
    def scheme(self) -> TransportScheme:
        return transport_scheme(self._public)

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return self._key.sign(data, _pss(), hashes.SHA256())
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def open(self, sealed: bytes, info: bytes) -> bytes:
        """Decrypt what :func:`seal_to_certificate_key` made; one opaque CryptoError otherwise."""
        try:
            if isinstance(self._key, rsa.RSAPrivateKey):
                return self._key.decrypt(bytes(sealed), _oaep(info))
            return _HPKE_P256.decrypt(bytes(sealed), self._key, info=info)
        except Exception:  # InvalidTag, ValueError (bad enc, bad padding): one opaque error
            raise CryptoError() from None

    def private_key_pem(self, token: SecretAccessToken) -> bytes:
        """Unencrypted PKCS#8 PEM, to provision a device. Needs :data:`SECRET_ACCESS`."""
        require_secret_access(token)
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        kind = "rsa" if isinstance(self._public, rsa.RSAPublicKey) else "p256"
        return f"CertificateKey({kind}, spki_sha256={_spki_sha256(self._public).hex()[:16]})"
