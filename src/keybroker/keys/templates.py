"""Named key templates: what a key version is (algorithm and parameters) and what it is for.

Like Tink's key templates (``aead.aead_key_templates.AES256_GCM``): callers
pick a template by name and never choose a nonce size, padding or curve.
Each template serves one or more :class:`Purpose`; a keyset has one purpose
and accepts versions of any template that serves it, so a keyset can move
from one algorithm to another by rotation.

To add a key type (an EMV issuer key, say): add a :class:`Purpose` member if
it needs a new one, a ``Kind`` in ``_material.py`` and a template here.

**TLS server keys** (``TLS_*``, keyless TLS, S5) hold a service's existing
private key, imported with :meth:`~keybroker.keys.Keyset.import_secret_material`.
They serve ``sign``: the keyset's own signatures (proofs of possession) are
RSASSA-PSS with SHA-256, ECDSA with the curve's hash, or Ed25519, while the key
server that receives one uses the key for every TLS handshake signature its
type allows (an RSA key: RSASSA-PSS *and* PKCS#1 v1.5). The template also
carries the key's policy: only an RSA key under a ``*_DECRYPT`` template may
be used for RSA decryption (TLS 1.2 static-RSA key exchange). The policy is
in the template because the template is part of every version's wrapped and
sealed record, so it is authenticated wherever the key goes and cannot be
changed without changing the version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from cryptography.hazmat.primitives.hpke import AEAD

from keybroker.errors import KeysetError
from keybroker.keys import _material


class Purpose(StrEnum):
    AEAD = "aead"
    MAC = "mac"
    SIGN = "sign"
    HPKE = "hpke"
    #: Private-key decryption (RSA for keyless TLS 1.2); no primitive yet.
    DECRYPT = "decrypt"


@dataclass(frozen=True, eq=False)
class KeyTemplate:
    """A named algorithm with fixed parameters. Compared and hashed by name."""

    name: str
    purposes: frozenset[Purpose]
    kind: _material.Kind = field(repr=False)

    @property
    def algorithm(self) -> str:
        return self.kind.algorithm

    @property
    def asymmetric(self) -> bool:
        return self.kind.asymmetric

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyTemplate) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"KeyTemplate({self.name})"


def _t(name: str, purposes: set[Purpose], kind: _material.Kind) -> KeyTemplate:
    return KeyTemplate(name, frozenset(purposes), kind)


AES256_GCM: Final = _t("AES256_GCM", {Purpose.AEAD}, _material.AesGcmKind(32))
HMAC_SHA256: Final = _t("HMAC_SHA256", {Purpose.MAC}, _material.HmacKind(32))
ED25519: Final = _t("ED25519", {Purpose.SIGN}, _material.Ed25519Kind())
ECDSA_P256: Final = _t("ECDSA_P256", {Purpose.SIGN}, _material.EcdsaP256Kind())
RSA2048_PSS: Final = _t("RSA2048_PSS", {Purpose.SIGN}, _material.RsaKind(2048, "pss"))
RSA3072_PSS: Final = _t("RSA3072_PSS", {Purpose.SIGN}, _material.RsaKind(3072, "pss"))
RSA2048_PKCS1: Final = _t("RSA2048_PKCS1", {Purpose.SIGN}, _material.RsaKind(2048, "pkcs1"))
RSA3072_PKCS1: Final = _t("RSA3072_PKCS1", {Purpose.SIGN}, _material.RsaKind(3072, "pkcs1"))
#: The default HPKE suite: RFC 9180 Appendix A.1 (AES-128-GCM) has its test vectors.
X25519_HPKE: Final = _t(
    "X25519_HPKE", {Purpose.HPKE}, _material.X25519HpkeKind(AEAD.AES_128_GCM, "AES-128-GCM")
)
#: For devices without AES instructions; RFC 9180 Appendix A.2.
X25519_HPKE_CHACHA20: Final = _t(
    "X25519_HPKE_CHACHA20",
    {Purpose.HPKE},
    _material.X25519HpkeKind(AEAD.CHACHA20_POLY1305, "ChaCha20-Poly1305"),
)


def _tls_rsa(bits: int, *, decrypt: bool) -> _material.Kind:
    kind = _material.RsaKind(bits, "pss")
    uses = "signatures (PSS and PKCS#1 v1.5)" + (" and PKCS#1 v1.5 decryption" if decrypt else "")
    kind.algorithm = f"RSA-{bits} TLS server key: {uses}; proofs of possession PSS with SHA-256"
    return kind


#: A service's TLS server keys (keyless TLS); see the module docstring.
TLS_RSA2048: Final = _t("TLS_RSA2048", {Purpose.SIGN}, _tls_rsa(2048, decrypt=False))
TLS_RSA3072: Final = _t("TLS_RSA3072", {Purpose.SIGN}, _tls_rsa(3072, decrypt=False))
#: As ``TLS_RSA2048``/``TLS_RSA3072``, and the key server may also decrypt with the key.
TLS_RSA2048_DECRYPT: Final = _t("TLS_RSA2048_DECRYPT", {Purpose.SIGN}, _tls_rsa(2048, decrypt=True))
TLS_RSA3072_DECRYPT: Final = _t("TLS_RSA3072_DECRYPT", {Purpose.SIGN}, _tls_rsa(3072, decrypt=True))
TLS_ECDSA_P256: Final = _t("TLS_ECDSA_P256", {Purpose.SIGN}, _material.EcdsaP256Kind())
TLS_ECDSA_P384: Final = _t("TLS_ECDSA_P384", {Purpose.SIGN}, _material.EcdsaP384Kind())
TLS_ED25519: Final = _t("TLS_ED25519", {Purpose.SIGN}, _material.Ed25519Kind())

TEMPLATES: Final[Mapping[str, KeyTemplate]] = MappingProxyType(
    {
        t.name: t
        for t in (
            AES256_GCM,
            HMAC_SHA256,
            ED25519,
            ECDSA_P256,
            RSA2048_PSS,
            RSA3072_PSS,
            RSA2048_PKCS1,
            RSA3072_PKCS1,
            X25519_HPKE,
            X25519_HPKE_CHACHA20,
            TLS_RSA2048,
            TLS_RSA3072,
            TLS_RSA2048_DECRYPT,
            TLS_RSA3072_DECRYPT,
            TLS_ECDSA_P256,
            TLS_ECDSA_P384,
            TLS_ED25519,
        )
    }
)


def get_template(name: str | KeyTemplate) -> KeyTemplate:
    """The template called ``name``; :class:`KeysetError` if there is none."""
    if isinstance(name, KeyTemplate):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeysetError(f"unknown key template {name!r}") from None


def as_purpose(value: str | Purpose) -> Purpose:
    """``value`` as a :class:`Purpose`; :class:`KeysetError` if it is not one."""
    try:
        return Purpose(value)
    except ValueError:
        raise KeysetError(f"unknown keyset purpose {value!r}") from None
