"""A principal's local keyring, encrypted at rest.

What it holds: the principal id and broker URL, the broker CA and log public
key pinned at enrolment, the identity certificate, the identity keyset
(Ed25519 or P-256), the HPKE sealing keyset, and every keyset received
through deliveries.

How it is kept: one file, mode 0600, replaced atomically (write a temporary
file, fsync, rename, fsync the directory), so a crash leaves the old or the
new keyring and never half of one. The file is the canonical encoding of::

    {"kdf": <how the KEK is obtained>, "sealed": AEAD(KEK, body, aad=kdf)}

where ``body`` holds the public facts and each keyset serialised with
``Keyset.encrypt_to_bytes`` under the same KEK (bound to its slot by AAD).
The KEK is either derived from a passphrase with scrypt (RFC 7914; salt and
cost stored in ``kdf``, so they are authenticated too) or any
:class:`~keybroker.keys.KeyEncryptionKey` the caller holds, such as a
:class:`~keybroker.keys.root.FileRootKey`. A wrong passphrase, a different
KEK or an edited file all fail with the same :class:`CryptoError`. Nothing is
ever written in clear.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from keybroker.encoding import decode, encode, message_label
from keybroker.errors import (
    ConfigurationError,
    CryptoError,
    DecodeError,
    KeysetError,
)
from keybroker.keys import (
    AES256_GCM,
    SECRET_ACCESS,
    AeadHandle,
    KeyEncryptionKey,
    Keyset,
    KeyState,
    KeyVersionInfo,
    Purpose,
    WrappedVersion,
)
from keybroker.pki import PrincipalId

FILE_LABEL: Final = message_label("keybroker/client/keyring", 1)
BODY_LABEL: Final = message_label("keybroker/client/keyring-body", 1)
AAD_LABEL: Final = message_label("keybroker/client/keyring-aad", 1)

#: scrypt cost: N = 2**15, r = 8, p = 1 (about 32 MiB and 0.1 s), RFC 7914 §2's interactive
#: setting scaled to today's machines. Files asking for more than the bounds below are refused
#: unread, so a planted keyring cannot make us spend gigabytes.
SCRYPT_LOG2_N: Final = 15
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_MAX_LOG2_N: Final = 20
_MAX_R: Final = 16
_MAX_P: Final = 4
_SALT_SIZE: Final = 16
_MAX_FILE: Final = 16 << 20


IDENTITY_SLOT: Final = "keyring/identity"
HPKE_SLOT: Final = "keyring/hpke"


class KekSource:
    """Where a keyring's KEK comes from: a passphrase (scrypt) or a KEK object."""

    def __init__(
        self,
        *,
        passphrase: str | bytes | None = None,
        kek: KeyEncryptionKey | None = None,
        log2_n: int = SCRYPT_LOG2_N,
    ) -> None:
        if (passphrase is None) == (kek is None):
            raise ConfigurationError("give a keyring passphrase or a KEK, not both or neither")
        if isinstance(passphrase, str):
            passphrase = passphrase.encode("utf-8")
        if passphrase is not None and not passphrase:
            raise ConfigurationError("the keyring passphrase is empty")
        self._passphrase = passphrase
        self._kek = kek
        self._log2_n = log2_n
        # scrypt costs ~0.1 s by design; derive once per source and reuse the same salt
        # for later saves (each save still encrypts under a fresh random nonce).
        self._derived: tuple[dict[str, Any], KeyEncryptionKey] | None = None

    def __repr__(self) -> str:
        return "KekSource(passphrase)" if self._kek is None else f"KekSource({self._kek.kek_id})"

    def new_params(self) -> dict[str, Any]:
        if self._kek is not None:
            return {"name": "kek", "kek_id": self._kek.kek_id}
        if self._derived is not None:
            return dict(self._derived[0])
        return {
            "name": "scrypt",
            "salt": os.urandom(_SALT_SIZE),
            "log2_n": self._log2_n,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
        }

    def kek(self, params: dict[str, Any]) -> KeyEncryptionKey:
        """The KEK for a file's ``kdf`` parameters."""
        name = params.get("name")
        if name == "kek":
            if self._kek is None:
                raise ConfigurationError("this keyring is sealed under a KEK, not a passphrase")
            return self._kek
        if name != "scrypt":
            raise DecodeError("unknown keyring KDF")
        if self._passphrase is None:
            raise ConfigurationError("this keyring is sealed under a passphrase")
        salt, log2_n, r, p = (
            params.get("salt"),
            params.get("log2_n"),
            params.get("r"),
            params.get("p"),
        )
        if not (
            isinstance(salt, bytes)
            and len(salt) == _SALT_SIZE
            and isinstance(log2_n, int)
            and 10 <= log2_n <= _MAX_LOG2_N
            and isinstance(r, int)
            and 1 <= r <= _MAX_R
            and isinstance(p, int)
            and 1 <= p <= _MAX_P
        ):
            raise DecodeError("keyring KDF parameters out of range")
        if self._derived is not None and self._derived[0] == params:
            return self._derived[1]
        derived = Scrypt(salt=salt, length=32, n=1 << log2_n, r=r, p=p).derive(self._passphrase)
        kek = _derived_kek(derived)
        self._derived = (dict(params), kek)
        return kek


#: Key id of the passphrase-derived KEK: the key is derived again on every open, so its
#: id must not change either, or earlier outputs would name a version that no longer exists.
_DERIVED_KEK_KEY_ID: Final = 1


def _derived_kek(key: bytes) -> KeyEncryptionKey:
    """AES-256-GCM (an ``AeadHandle``) under the scrypt-derived key (audited: SECRET_ACCESS)."""
    holder = Keyset("keyring-kek", "aead")
    version = holder.import_secret_material(
        AES256_GCM, key, SECRET_ACCESS, key_id=_DERIVED_KEK_KEY_ID
    )
    holder.promote(version.version)
    return holder.aead()


def _scratch_kek() -> AeadHandle:
    """A KEK that lives for one call: copies of keysets pass through it, never to disk."""
    return Keyset.generate("keyring-scratch", AES256_GCM).aead()


def _rebuilt(held: Keyset, rows: list[WrappedVersion], kek: AeadHandle) -> Keyset:
    return Keyset.from_wrapped(held.name, held.purpose, rows, kek)


def _slot_aad(slot: str) -> bytes:
    return encode(AAD_LABEL, {"slot": slot})


@dataclass
class Keyring:
    """A principal's keys and what it trusts. Save it with :meth:`save`; it prints no secret."""

    principal: PrincipalId
    broker_url: str
    ca_pem: bytes
    log_public_key: bytes
    certificate_pem: bytes
    identity: Keyset = field(repr=False)
    hpke: Keyset = field(repr=False)
    received: dict[str, Keyset] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return f"Keyring({self.principal}, {len(self.received)} received keysets)"

    def received_versions(self) -> dict[str, tuple[KeyVersionInfo, ...]]:
        return {name: ks.versions for name, ks in sorted(self.received.items())}

    # -- retiring and using received keys --------------------------------------------

    def forget_version(self, keyset: str, version: int) -> bool:
        """Drop ``version`` of a received keyset, material and all; ``False`` if not held.

        For versions the broker disabled or destroyed. The version is removed rather
        than destroyed in place, so should the broker enable it again and deliver it
        anew, it installs like any other. A keyset left with no version is dropped.
        Changes this object only: save the keyring to make it last.
        """
        held = self.received.get(keyset)
        if held is None or version not in {v.version for v in held.versions}:
            return False
        # Rebuilt through the keys module's own at-rest format under a throwaway KEK, so
        # no key bytes are handled here.
        kek = _scratch_kek()
        kept = [row for row in held.wrapped_versions(kek) if row.version != version]
        if kept:
            self.received[keyset] = _rebuilt(held, kept, kek)
        else:
            del self.received[keyset]
        return True

    def promote_version(self, keyset: str, version: int) -> bool:
        """Make ``version`` of a received keyset its primary here; ``False`` if it already is.

        For agents mirroring the broker: the version the broker promoted is the one
        this principal transmits under. :class:`KeysetError` if it is not held.
        Changes this object only: save the keyring to make it last.
        """
        held = self.received.get(keyset)
        if held is None:
            raise KeysetError(f"no keyset {keyset!r} has been received")
        current = held.primary
        if current is not None and current.version == version:
            return False
        held.promote(version)
        return True

    def data_aead(self, keyset: str, *, encrypt_version: int | None = None) -> AeadHandle:
        """An AEAD for a data plane over a private copy of a received ``aead`` keyset.

        It decrypts with any installed version (pending, primary or enabled) chosen by
        the ciphertext's key-id prefix, and, given ``encrypt_version``, encrypts under
        that version (made primary in the copy only; the keyring does not change).
        Without ``encrypt_version`` it encrypts only if the keyset has a primary here.
        :class:`KeysetError` if the keyset or version is not held or cannot be used.
        """
        held = self.received.get(keyset)
        if held is None:
            raise KeysetError(f"no keyset {keyset!r} has been received")
        if held.purpose is not Purpose.AEAD:
            raise KeysetError(f"keyset {keyset!r} is for {held.purpose.value}, not aead")
        kek = _scratch_kek()
        copy = _rebuilt(held, held.wrapped_versions(kek), kek)
        if encrypt_version is not None and copy.version(encrypt_version).state != KeyState.PRIMARY:
            copy.promote(encrypt_version)
        return copy.aead()

    # -- at rest ----------------------------------------------------------------------

    def to_bytes(self, source: KekSource) -> bytes:
        params = source.new_params()
        kek = source.kek(params)
        body = encode(
            BODY_LABEL,
            {
                "principal": str(self.principal),
                "broker_url": self.broker_url,
                "ca_pem": self.ca_pem,
                "log_public_key": self.log_public_key,
                "certificate_pem": self.certificate_pem,
                "identity": self.identity.encrypt_to_bytes(kek, _slot_aad(IDENTITY_SLOT)),
                "hpke": self.hpke.encrypt_to_bytes(kek, _slot_aad(HPKE_SLOT)),
                "received": {
                    name: ks.encrypt_to_bytes(kek, _slot_aad(f"received:{name}"))
                    for name, ks in self.received.items()
                },
            },
        )
        sealed = kek.encrypt(body, encode(AAD_LABEL, {"kdf": params}))
        return encode(FILE_LABEL, {"kdf": params, "sealed": sealed})

    @classmethod
    def from_bytes(cls, data: bytes, source: KekSource) -> Keyring:
        _, outer = decode(FILE_LABEL, data, max_size=_MAX_FILE)
        params, sealed = outer.get("kdf"), outer.get("sealed")
        if not isinstance(params, dict) or not isinstance(sealed, bytes) or len(outer) != 2:
            raise DecodeError("malformed keyring file")
        kek = source.kek(params)
        _, body = decode(
            BODY_LABEL, kek.decrypt(sealed, encode(AAD_LABEL, {"kdf": params})), max_size=_MAX_FILE
        )
        try:
            received = {
                str(name): Keyset.decrypt_from_bytes(blob, kek, _slot_aad(f"received:{name}"))
                for name, blob in body["received"].items()
            }
            return cls(
                principal=PrincipalId.parse(body["principal"]),
                broker_url=str(body["broker_url"]),
                ca_pem=bytes(body["ca_pem"]),
                log_public_key=bytes(body["log_public_key"]),
                certificate_pem=bytes(body["certificate_pem"]),
                identity=Keyset.decrypt_from_bytes(body["identity"], kek, _slot_aad(IDENTITY_SLOT)),
                hpke=Keyset.decrypt_from_bytes(body["hpke"], kek, _slot_aad(HPKE_SLOT)),
                received=received,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            # Authentic (it decrypted) yet not what we write: a newer or broken writer.
            raise KeysetError(f"keyring body is incomplete: {type(exc).__name__}") from None

    def save(self, path: Path, source: KekSource) -> None:
        """Write atomically, mode 0600."""
        data = self.to_bytes(source)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: Path, source: KekSource) -> Keyring:
        """Read a keyring; refuse one other users could read or replace."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ConfigurationError(f"no keyring at {path}; enrol first") from None
        except OSError as exc:
            raise ConfigurationError(f"cannot open keyring {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigurationError(f"{path} is open to other users; run: chmod 600 {path}")
            if st.st_uid != os.geteuid():
                raise ConfigurationError(f"{path} belongs to another user")
            data = fh.read(_MAX_FILE + 1)
        if len(data) > _MAX_FILE:
            raise DecodeError("keyring file too large")
        try:
            return cls.from_bytes(data, source)
        except CryptoError:
            raise CryptoError("the keyring does not open with this passphrase or KEK") from None
