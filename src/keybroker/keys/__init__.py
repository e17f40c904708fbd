"""keybroker.keys: keysets, templates and primitives — the only home of raw key bytes.

Modelled on Tink. Pick a template, make a keyset, use it through a handle::

    from keybroker.keys import AES256_GCM, Keyset

    keyset = Keyset.generate("site/fra1/restore", AES256_GCM)
    aead = keyset.aead()
    ct = aead.encrypt(b"payload", associated_data=b"device-42")
    assert aead.decrypt(ct, b"device-42") == b"payload"

    v2 = keyset.add()             # pending: decrypts, does not encrypt yet
    keyset.promote(v2.version)    # primary; version 1 becomes enabled

Every output carries a 5-byte key-id prefix, so the right version is found
by lookup. Key material leaves only encrypted under a
:class:`KeyEncryptionKey` (:meth:`Keyset.encrypt_to_bytes`,
:meth:`Keyset.wrapped_versions`), HPKE-sealed to one principal
(:meth:`Keyset.seal_version`), sealed to a certified device key
(:meth:`Keyset.seal_version_to_certificate_key`) or through
:meth:`Keyset.export_secret_material`, which needs :data:`SECRET_ACCESS`.
"""

from keybroker.keys.access import SECRET_ACCESS, SecretAccessToken
from keybroker.keys.certificate_key import (
    CertificateKey,
    TransportScheme,
    transport_scheme,
    verify_certificate_signature,
)
from keybroker.keys.handles import AeadHandle, HpkeHandle, KeysetHandle, MacHandle, SignerHandle
from keybroker.keys.kek import KeyEncryptionKey
from keybroker.keys.keyset import Keyset, KeyVersionInfo, WrappedVersion, version_aad
from keybroker.keys.lifecycle import CONSUMING_STATES, TRANSITIONS, KeyOp, KeyState
from keybroker.keys.public import PublicKeyset, PublicVersion
from keybroker.keys.templates import (
    AES256_GCM,
    ECDSA_P256,
    ED25519,
    HMAC_SHA256,
    RSA2048_PKCS1,
    RSA2048_PSS,
    RSA3072_PKCS1,
    RSA3072_PSS,
    TEMPLATES,
    TLS_ECDSA_P256,
    TLS_ECDSA_P384,
    TLS_ED25519,
    TLS_RSA2048,
    TLS_RSA2048_DECRYPT,
    TLS_RSA3072,
    TLS_RSA3072_DECRYPT,
    X25519_HPKE,
    X25519_HPKE_CHACHA20,
    KeyTemplate,
    Purpose,
    get_template,
)

__all__ = [
    "AES256_GCM",
    "CONSUMING_STATES",
    "ECDSA_P256",
    "ED25519",
    "HMAC_SHA256",
    "RSA2048_PKCS1",
    "RSA2048_PSS",
    "RSA3072_PKCS1",
    "RSA3072_PSS",
    "SECRET_ACCESS",
    "TEMPLATES",
    "TLS_ECDSA_P256",
    "TLS_ECDSA_P384",
    "TLS_ED25519",
    "TLS_RSA2048",
    "TLS_RSA2048_DECRYPT",
    "TLS_RSA3072",
    "TLS_RSA3072_DECRYPT",
    "TRANSITIONS",
    "X25519_HPKE",
    "X25519_HPKE_CHACHA20",
    "AeadHandle",
    "CertificateKey",
    "HpkeHandle",
    "KeyEncryptionKey",
    "KeyOp",
    "KeyState",
    "KeyTemplate",
    "KeyVersionInfo",
    "Keyset",
    "KeysetHandle",
    "MacHandle",
    "PublicKeyset",
    "PublicVersion",
    "Purpose",
    "SecretAccessToken",
    "SignerHandle",
    "TransportScheme",
    "WrappedVersion",
    "get_template",
    "transport_scheme",
    "verify_certificate_signature",
    "version_aad",
]
