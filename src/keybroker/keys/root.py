"""The root of trust: the one key that wraps all key material at rest.

Two sources behind one interface (:class:`RootKey`, a
:class:`~keybroker.keys.kek.KeyEncryptionKey`):

* :class:`FileRootKey` -- 32 random bytes in ``$KEYBROKER_HOME/root.key``, a
  0600 file owned by the user keybroker runs as (the embedded default);
* :class:`Pkcs11RootKey` -- a non-extractable, sensitive AES-256 key inside a
  PKCS#11 token (SoftHSM2 in tests, any HSM in production). The key bytes
  never enter this process.

Both seal with AES-256-GCM and a random 96-bit nonce::

    format (1 byte) || nonce (12 bytes) || ciphertext || tag (16 bytes)

The format byte says which kind of root key sealed it and is authenticated
along with the caller's ``aad`` (keyset name + version), so a blob can neither
be moved between keysets nor be presented to the other kind of root key.
Random nonces are safe here: a root key seals one blob per key version, far
below the 2**32 messages NIST SP 800-38D allows per key with random IVs.

:func:`open_root_key` and :func:`create_root_key` pick the source from a spec
string (see :func:`parse_root_key_spec`).
"""

# python-pkcs11 is an optional extra and takes ~0.1 s to import, so it is
# imported inside the functions that need it, never at module level.

from __future__ import annotations

import abc
import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import stat
import sysconfig
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn, Self, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker.errors import CryptoError, RootKeyError

if TYPE_CHECKING:
    from pkcs11.types import DecryptMixin, EncryptMixin, SecretKey, Session

    class _AesKey(SecretKey, EncryptMixin, DecryptMixin):
        """What python-pkcs11 builds at run time for a key with CKA_ENCRYPT and CKA_DECRYPT."""


__all__ = [
    "DEFAULT_KEY_LABEL",
    "DEFAULT_ROOT_KEY_SPEC",
    "MODULE_ENV",
    "ROOT_KEY_FILENAME",
    "FileRootKey",
    "FileRootKeySpec",
    "Pkcs11RootKey",
    "Pkcs11RootKeySpec",
    "RootKey",
    "create_root_key",
    "find_pkcs11_module",
    "open_root_key",
    "parse_root_key_spec",
]

ROOT_KEY_FILENAME: Final = "root.key"
#: Relative paths in a spec are resolved against the keybroker home.
DEFAULT_ROOT_KEY_SPEC: Final = f"file:{ROOT_KEY_FILENAME}"
DEFAULT_KEY_LABEL: Final = "keybroker-root"
#: Overrides where :func:`find_pkcs11_module` looks for the PKCS#11 module.
MODULE_ENV: Final = "KEYBROKER_PKCS11_MODULE"

_FORMAT_FILE: Final = 0x01
_FORMAT_PKCS11: Final = 0x02
_KEY_LEN: Final = 32
_NONCE_LEN: Final = 12
_TAG_LEN: Final = 16
_HEADER: Final = b"keybroker-root-key-v1\n"
_OTHER_VERSION_RE: Final = re.compile(rb"keybroker-root-key-v[0-9]+\n")
_MAX_FILE_SIZE: Final = 4096
_KEK_ID_LABEL: Final = b"keybroker/root-key/kek-id/v1"


def _sealed_aad(fmt: int, aad: bytes) -> bytes:
    # One fixed-length byte in front keeps the concatenation unambiguous.
    return bytes([fmt]) + bytes(aad)


def _split(ciphertext: bytes, fmt: int) -> tuple[bytes, bytes]:
    data = bytes(ciphertext)
    if len(data) < 1 + _NONCE_LEN + _TAG_LEN or data[0] != fmt:
        raise CryptoError
    return data[1 : 1 + _NONCE_LEN], data[1 + _NONCE_LEN :]


class RootKey(abc.ABC):
    """A root of trust: a :class:`KeyEncryptionKey` that holds a resource.

    Use it as a context manager or call :meth:`close`. It cannot be pickled or
    copied, and its ``repr`` names where it lives and its ``kek_id``, nothing more.
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def kek_id(self) -> str:
        """A stable, non-secret name for this key."""

    @abc.abstractmethod
    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """Seal ``plaintext`` bound to ``aad``."""

    @abc.abstractmethod
    def decrypt(self, ciphertext: bytes, aad: bytes) -> bytes:
        """Open what :meth:`encrypt` sealed; :class:`CryptoError` on any failure."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the key; further use raises :class:`RootKeyError`. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")


# ---------------------------------------------------------------------------
# File root key
# ---------------------------------------------------------------------------


def _read_private_file(path: Path, what: str) -> bytes:
    """Read a small secret file, refusing anything another user could read or swap.

    Symlinks are refused: the owner and mode checks would apply to the target,
    so the file an operator audits (``root.key``, 0600) and the file read could
    differ, and a link pointing into a directory others can write is the
    classic way to substitute a key. The checks run on the opened descriptor
    (``fstat``), so nothing can be swapped between check and read.
    """
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise RootKeyError(
                f"{what} {path} is a symbolic link, which keybroker refuses; "
                f"put the file itself at {path}"
            )
        # O_NONBLOCK so that a FIFO planted at the path cannot hang us before fstat.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RootKeyError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise RootKeyError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RootKeyError(f"{what} {path} is not a regular file")
        euid = os.geteuid()
        if st.st_uid != euid:
            raise RootKeyError(
                f"{what} {path} is owned by uid {st.st_uid}, not by uid {euid} that keybroker "
                f"runs as; run `chown {euid} {path}` if this file is really meant for it"
            )
        if st.st_mode & 0o077:
            raise RootKeyError(
                f"{what} {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`"
            )
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, _MAX_FILE_SIZE + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_FILE_SIZE:
                raise RootKeyError(f"{what} {path} is larger than {_MAX_FILE_SIZE} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise RootKeyError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _parse_root_key_file(path: Path, data: bytes) -> bytes:
    if not data.startswith(_HEADER):
        if _OTHER_VERSION_RE.match(data):
            raise RootKeyError(
                f"root key file {path} has a format version this keybroker does not support "
                f"(expected {_HEADER.decode().strip()!r})"
            )
        raise RootKeyError(
            f"root key file {path} is not a keybroker root key "
            f"(expected a {_HEADER.decode().strip()!r} header line)"
        )
    body = data[len(_HEADER) :]
    body = body.removesuffix(b"\n")
    try:
        key = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != _KEY_LEN:
        raise RootKeyError(
            f"root key file {path} is corrupt: expected the base64 of {_KEY_LEN} bytes "
            "after the header"
        )
    return key


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileRootKey(RootKey):
    """The root key as a 0600 file under the keybroker home.

    File format (text, two lines)::

        keybroker-root-key-v1
        <base64 of 32 random bytes>

    Construct with :meth:`create` (``keybroker init``) or :meth:`load`.
    """

    __slots__ = ("_aead", "_kek_id", "_path")

    def __init__(self, path: Path, key: bytes) -> None:
        if len(key) != _KEY_LEN:
            raise RootKeyError(f"a root key is {_KEY_LEN} bytes")
        self._path = path
        self._aead: AESGCM | None = AESGCM(key)
        # A PRF of the key, not the key: names it in logs without revealing it.
        tag = hmac.new(key, _KEK_ID_LABEL, hashlib.sha256).digest()
        self._kek_id = "file:" + tag[:8].hex()

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> FileRootKey:
        """Generate a new root key and write it to ``path``, which must not exist.

        The file is created with ``O_CREAT | O_EXCL`` and mode 0600 in one
        step, so it is never visible with a wider mode and never replaces an
        existing key (doing so would make everything sealed under it unreadable).
        """
        target = Path(path)
        key = AESGCM.generate_key(bit_length=256)
        data = _HEADER + base64.b64encode(key) + b"\n"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(target, flags, 0o600)
        except FileExistsError:
            raise RootKeyError(
                f"{target} already exists; refusing to overwrite a root key "
                "(everything sealed under it would become unreadable)"
            ) from None
        except FileNotFoundError:
            raise RootKeyError(f"directory {target.parent} does not exist") from None
        except OSError as exc:
            raise RootKeyError(f"cannot create root key file {target}: {exc.strerror}") from None
        try:
            # The umask can only narrow 0600; pin it exactly (even a umask of 0777
            # must not leave a file its owner cannot load). No byte is written yet.
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            target.unlink(missing_ok=True)
            raise RootKeyError(f"cannot write root key file {target}: {exc.strerror}") from None
        os.close(fd)
        # Losing the root key after a crash loses every key it wraps.
        # Some filesystems cannot fsync a directory; the file itself is synced.
        with contextlib.suppress(OSError):
            _fsync_dir(target.parent)
        return cls(target, key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FileRootKey:
        """Read the root key at ``path``.

        Raises :class:`RootKeyError` (saying what to do) when the file is missing,
        a symlink, not a regular file, owned by another user, accessible by group
        or others, or not a keybroker root key.
        """
        target = Path(path)
        data = _read_private_file(target, "root key file")
        return cls(target, _parse_root_key_file(target, data))

    @property
    def path(self) -> Path:
        return self._path

    @property
    def kek_id(self) -> str:
        return self._kek_id

    def _require_open(self) -> AESGCM:
        if self._aead is None:
            raise RootKeyError(f"root key {self._kek_id} has been closed")
        return self._aead

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        aead = self._require_open()
        nonce = os.urandom(_NONCE_LEN)
        body = aead.encrypt(nonce, plaintext, _sealed_aad(_FORMAT_FILE, aad))
        return bytes([_FORMAT_FILE]) + nonce + body

    def decrypt(self, ciphertext: bytes, aad: bytes) -> bytes:
        aead = self._require_open()
        nonce, body = _split(ciphertext, _FORMAT_FILE)
        try:
            return aead.decrypt(nonce, body, _sealed_aad(_FORMAT_FILE, aad))
        except InvalidTag:
            raise CryptoError from None

    def close(self) -> None:
        self._aead = None

    def __repr__(self) -> str:
        return f"<FileRootKey path={str(self._path)!r} kek_id={self._kek_id!r}>"


# ---------------------------------------------------------------------------
# PKCS#11 root key
# ---------------------------------------------------------------------------

# python-pkcs11 is not thread-safe and initialises modules with C_Initialize(NULL),
# which lets the module assume a single thread; so every PKCS#11 call in this
# process goes through this one lock.
_PKCS11_LOCK: Final = threading.RLock()

# A PKCS#11 login belongs to the application, not the session: a second C_Login
# on the same token fails with USER_ALREADY_LOGGED_IN, and C_Logout from any
# session logs every session out. So each (module, token) has one logged-in
# session here, shared by all root keys on that token and closed with the last.
# A later opener's PIN is checked against a keyed hash of the first one's.
_PIN_TAG_KEY: Final = os.urandom(32)


@dataclass(eq=False)
class _TokenLogin:
    module: str
    token_label: str
    session: Session = field(repr=False)
    pin_tag: bytes = field(repr=False)
    users: int = 0


_LOGINS: dict[tuple[str, str], _TokenLogin] = {}


def _pin_tag(pin: str) -> bytes:
    return hmac.new(_PIN_TAG_KEY, pin.encode(), hashlib.sha256).digest()


def _bad_pin(token_label: str) -> RootKeyError:
    return RootKeyError(f"PKCS#11 login to token {token_label!r} failed: the PIN is incorrect")


def _acquire_login(module: str, token_label: str, pin: str) -> _TokenLogin:
    try:
        import pkcs11
    except ImportError:
        raise RootKeyError(
            "a PKCS#11 root key needs python-pkcs11; install keybroker[hsm]"
        ) from None
    from pkcs11 import exceptions as p11e

    if not isinstance(pin, str) or not pin:
        raise RootKeyError("a PKCS#11 root key needs a non-empty PIN")
    with _PKCS11_LOCK:
        login = _LOGINS.get((module, token_label))
        if login is not None:
            if not hmac.compare_digest(login.pin_tag, _pin_tag(pin)):
                raise _bad_pin(token_label)
            login.users += 1
            return login
        try:
            lib = pkcs11.lib(module)
        except p11e.PKCS11Error as exc:
            raise RootKeyError(f"cannot load PKCS#11 module {module}: {exc}") from None
        try:
            token = lib.get_token(token_label=token_label)
        except p11e.NoSuchToken:
            raise RootKeyError(f"no PKCS#11 token labelled {token_label!r} in {module}") from None
        except p11e.MultipleTokensReturned:
            raise RootKeyError(
                f"several PKCS#11 tokens are labelled {token_label!r} in {module}"
            ) from None
        except p11e.PKCS11Error as exc:
            raise RootKeyError(
                f"cannot list PKCS#11 tokens in {module} ({type(exc).__name__})"
            ) from None
        try:
            session = token.open(user_pin=pin)
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
            raise _bad_pin(token_label) from None
        except p11e.PKCS11Error as exc:
            raise RootKeyError(
                f"PKCS#11 login to token {token_label!r} failed ({type(exc).__name__})"
            ) from None
        login = _TokenLogin(module, token_label, session, _pin_tag(pin), users=1)
        _LOGINS[(module, token_label)] = login
        return login


def _release_login(login: _TokenLogin) -> None:
    from pkcs11.exceptions import PKCS11Error

    with _PKCS11_LOCK:
        login.users -= 1
        if login.users > 0:
            return
        del _LOGINS[(login.module, login.token_label)]
        # A token that is gone has logged us out already.
        with contextlib.suppress(PKCS11Error):
            login.session.close()


def _find_root_key(login: _TokenLogin, key_label: str) -> _AesKey:
    """The one usable root key labelled ``key_label``, checked to be what we promise."""
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.exceptions import PKCS11Error
    from pkcs11.types import DecryptMixin, EncryptMixin, SecretKey

    where = f"PKCS#11 token {login.token_label!r}"
    try:
        found = list(
            login.session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: key_label}
            )
        )
    except PKCS11Error as exc:
        raise RootKeyError(f"cannot search {where} ({type(exc).__name__})") from None
    if not found:
        raise RootKeyError(f"no root key labelled {key_label!r} in {where}; create it first")
    if len(found) > 1:
        raise RootKeyError(f"several keys are labelled {key_label!r} in {where}")
    key = found[0]
    if not isinstance(key, SecretKey):
        raise RootKeyError(f"object {key_label!r} in {where} is not a secret key")
    try:
        attrs = key.get_attributes(
            [
                Attribute.KEY_TYPE,
                Attribute.VALUE_LEN,
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.ENCRYPT,
                Attribute.DECRYPT,
            ]
        )
    except PKCS11Error as exc:
        raise RootKeyError(
            f"cannot read attributes of {key_label!r} ({type(exc).__name__})"
        ) from None
    if attrs[Attribute.KEY_TYPE] != KeyType.AES or attrs[Attribute.VALUE_LEN] != _KEY_LEN:
        raise RootKeyError(f"key {key_label!r} in {where} is not an AES-256 key")
    # A root key that can be read out of the token is no better than a file.
    if not attrs[Attribute.SENSITIVE] or attrs[Attribute.EXTRACTABLE]:
        raise RootKeyError(
            f"key {key_label!r} in {where} is extractable or not sensitive; "
            "a root key must be CKA_SENSITIVE and not CKA_EXTRACTABLE"
        )
    usable = isinstance(key, EncryptMixin) and isinstance(key, DecryptMixin)
    if not (usable and attrs[Attribute.ENCRYPT] and attrs[Attribute.DECRYPT]):
        raise RootKeyError(f"key {key_label!r} in {where} may not encrypt and decrypt")
    return cast("_AesKey", key)


def _pkcs11_kek_id(key: SecretKey, token_label: str, key_label: str) -> str:
    key_id = key.id
    if key_id:
        return "pkcs11:" + key_id.hex()
    # A key made by another tool may have no CKA_ID; name it by where it lives.
    digest = hashlib.sha256(f"{token_label}\0{key_label}".encode()).digest()
    return "pkcs11:" + digest[:8].hex()


def find_pkcs11_module() -> str:
    """Path of the PKCS#11 module to load: ``$KEYBROKER_PKCS11_MODULE`` or SoftHSM2's.

    Production deployments set the environment variable (or ``module=`` in the
    spec) to their HSM vendor's module; without it the usual SoftHSM2 locations
    are tried.
    """
    override = os.environ.get(MODULE_ENV)
    if override:
        if not os.path.isfile(override):
            raise RootKeyError(f"{MODULE_ENV} names {override}, which is not a file")
        return override
    candidates = ["/usr/lib/softhsm/libsofthsm2.so"]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        candidates.append(f"/usr/lib/{multiarch}/softhsm/libsofthsm2.so")
    candidates += [
        "/usr/lib64/pkcs11/libsofthsm2.so",
        "/usr/lib64/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
        "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    ]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise RootKeyError(
        f"no PKCS#11 module found (SoftHSM2 is not installed in a usual place); "
        f"set {MODULE_ENV} to the module's path"
    )


def _resolve_module(module_path: str | os.PathLike[str] | None) -> str:
    path = find_pkcs11_module() if module_path is None else os.fspath(module_path)
    # python-pkcs11 caches modules by path string; two spellings of one module
    # would C_Initialize it twice.
    return os.path.realpath(path)


class Pkcs11RootKey(RootKey):
    """The root key as a non-extractable AES-256 key inside a PKCS#11 token.

    Encryption and decryption happen in the token (CKM_AES_GCM). One
    logged-in session per token is kept open and every call is serialised,
    so an instance may be shared between threads. Construct with
    :meth:`create` or :meth:`open`; :meth:`close` when done.
    """

    __slots__ = ("_kek_id", "_key", "_key_label", "_login", "_module", "_token_label")

    def __init__(self, login: _TokenLogin, key: _AesKey, key_label: str) -> None:
        self._login: _TokenLogin | None = login
        self._key: _AesKey | None = key
        self._module = login.module
        self._token_label = login.token_label
        self._key_label = key_label
        self._kek_id = _pkcs11_kek_id(key, login.token_label, key_label)

    @classmethod
    def create(
        cls,
        module_path: str | os.PathLike[str] | None,
        token_label: str,
        pin: str,
        key_label: str = DEFAULT_KEY_LABEL,
    ) -> Pkcs11RootKey:
        """Generate the root key in the token; refuse if ``key_label`` is taken.

        ``module_path=None`` uses :func:`find_pkcs11_module`.
        """
        from pkcs11 import Attribute, KeyType, MechanismFlag
        from pkcs11.exceptions import PKCS11Error

        module = _resolve_module(module_path)
        with _PKCS11_LOCK:
            login = _acquire_login(module, token_label, pin)
            try:
                # Login is per token, so a fresh read-write session needs no PIN.
                rw = login.session.token.open(rw=True)
                try:
                    if any(True for _ in rw.get_objects({Attribute.LABEL: key_label})):
                        raise RootKeyError(
                            f"an object labelled {key_label!r} already exists in PKCS#11 token "
                            f"{token_label!r}; refusing to create another root key"
                        )
                    rw.generate_key(
                        KeyType.AES,
                        256,
                        id=os.urandom(8),
                        label=key_label,
                        store=True,
                        capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                        template={
                            Attribute.TOKEN: True,
                            Attribute.PRIVATE: True,
                            Attribute.SENSITIVE: True,
                            Attribute.EXTRACTABLE: False,
                            # Nobody may later grant it WRAP, DERIVE or SIGN.
                            Attribute.MODIFIABLE: False,
                            Attribute.ENCRYPT: True,
                            Attribute.DECRYPT: True,
                            Attribute.WRAP: False,
                            Attribute.UNWRAP: False,
                            Attribute.SIGN: False,
                            Attribute.VERIFY: False,
                            Attribute.DERIVE: False,
                        },
                    )
                finally:
                    rw.close()
                return cls(login, _find_root_key(login, key_label), key_label)
            except PKCS11Error as exc:
                _release_login(login)
                raise RootKeyError(
                    f"cannot create a root key in PKCS#11 token {token_label!r} "
                    f"({type(exc).__name__})"
                ) from None
            except BaseException:
                _release_login(login)
                raise

    @classmethod
    def open(
        cls,
        module_path: str | os.PathLike[str] | None,
        token_label: str,
        pin: str,
        key_label: str = DEFAULT_KEY_LABEL,
    ) -> Pkcs11RootKey:
        """Log in to the token and find the root key labelled ``key_label``.

        Refuses (:class:`RootKeyError`) a key that is not AES-256, is
        extractable or not sensitive, or may not encrypt and decrypt.
        """
        module = _resolve_module(module_path)
        with _PKCS11_LOCK:
            login = _acquire_login(module, token_label, pin)
            try:
                return cls(login, _find_root_key(login, key_label), key_label)
            except BaseException:
                _release_login(login)
                raise

    @property
    def kek_id(self) -> str:
        return self._kek_id

    def _require_open(self) -> _AesKey:
        if self._key is None:
            raise RootKeyError(f"root key {self._kek_id} has been closed")
        return self._key

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        from pkcs11 import GCMParams, Mechanism
        from pkcs11.exceptions import PKCS11Error

        nonce = os.urandom(_NONCE_LEN)
        params = GCMParams(nonce, _sealed_aad(_FORMAT_PKCS11, aad), _TAG_LEN * 8)
        with _PKCS11_LOCK:
            key = self._require_open()
            try:
                body = key.encrypt(
                    bytes(plaintext), mechanism=Mechanism.AES_GCM, mechanism_param=params
                )
            except PKCS11Error as exc:
                raise RootKeyError(
                    f"PKCS#11 token {self._token_label!r} failed to encrypt ({type(exc).__name__})"
                ) from None
        assert isinstance(body, bytes)  # bytes in, bytes out (not the streaming form)
        return bytes([_FORMAT_PKCS11]) + nonce + body

    def decrypt(self, ciphertext: bytes, aad: bytes) -> bytes:
        from pkcs11 import GCMParams, Mechanism
        from pkcs11.exceptions import PKCS11Error

        nonce, body = _split(ciphertext, _FORMAT_PKCS11)
        params = GCMParams(nonce, _sealed_aad(_FORMAT_PKCS11, aad), _TAG_LEN * 8)
        with _PKCS11_LOCK:
            key = self._require_open()
            try:
                plaintext = key.decrypt(body, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            except PKCS11Error:
                # SoftHSM2 reports a bad tag as CKR_GENERAL_ERROR; the exact code
                # is an oracle anyway, so every failure is the same CryptoError.
                raise CryptoError from None
        assert isinstance(plaintext, bytes)
        return plaintext

    def close(self) -> None:
        with _PKCS11_LOCK:
            login, self._login, self._key = self._login, None, None
            if login is not None:
                _release_login(login)

    def __repr__(self) -> str:
        return (
            f"<Pkcs11RootKey module={self._module!r} token={self._token_label!r} "
            f"key={self._key_label!r} kek_id={self._kek_id!r}>"
        )


# ---------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRootKeySpec:
    """``file:<path>``; a relative path is relative to the keybroker home."""

    path: Path

    def open(self) -> FileRootKey:
        return FileRootKey.load(self.path)

    def create(self) -> FileRootKey:
        return FileRootKey.create(self.path)


@dataclass(frozen=True)
class Pkcs11RootKeySpec:
    """``pkcs11:token=…;key=…;pin-env=VAR`` (or ``pin-file=PATH``), optional ``module=…``.

    The PIN is never part of the spec, which ends up in config files, process
    listings and logs; it comes from an environment variable or a 0600 file,
    read only when the key is opened.
    """

    token: str
    key: str = DEFAULT_KEY_LABEL
    module: str | None = None
    pin_env: str | None = None
    pin_file: Path | None = None

    def read_pin(self) -> str:
        if self.pin_env is not None:
            pin = os.environ.get(self.pin_env, "")
            if not pin:
                raise RootKeyError(
                    f"the PKCS#11 PIN environment variable {self.pin_env} is not set or empty"
                )
            return pin
        if self.pin_file is None:
            raise RootKeyError("a pkcs11 root key spec needs pin-env=VAR or pin-file=PATH")
        data = _read_private_file(self.pin_file, "PIN file")
        try:
            pin = data.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise RootKeyError(f"PIN file {self.pin_file} is not UTF-8 text") from None
        if not pin:
            raise RootKeyError(f"PIN file {self.pin_file} is empty")
        return pin

    def open(self) -> Pkcs11RootKey:
        return Pkcs11RootKey.open(self.module, self.token, self.read_pin(), self.key)

    def create(self) -> Pkcs11RootKey:
        return Pkcs11RootKey.create(self.module, self.token, self.read_pin(), self.key)


_PKCS11_FIELDS: Final = ("module", "token", "key", "pin-env", "pin-file")


def parse_root_key_spec(spec: str | None, home: Path) -> FileRootKeySpec | Pkcs11RootKeySpec:
    """Parse a root key spec; ``None`` or ``""`` means ``file:root.key`` under ``home``.

    * ``file:<path>`` -- a :class:`FileRootKey`;
    * ``pkcs11:token=<label>;key=<label>;pin-env=<VAR>`` -- a :class:`Pkcs11RootKey`.
      ``key`` defaults to ``keybroker-root``; ``module=<path>`` defaults to
      :func:`find_pkcs11_module`; ``pin-file=<path>`` may replace ``pin-env``.
      Values may be percent-encoded (``%3B`` for ``;``).

    Errors never echo values from the spec, in case a PIN was put there by mistake.
    """
    if not spec:
        spec = DEFAULT_ROOT_KEY_SPEC
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in ("file", "pkcs11"):
        raise RootKeyError("a root key spec starts with 'file:' or 'pkcs11:'")
    if scheme == "file":
        if not rest:
            raise RootKeyError("a file: root key spec needs a path, e.g. file:root.key")
        return FileRootKeySpec(home / Path(rest).expanduser())

    values: dict[str, str] = {}
    for item in rest.split(";"):
        name, eq, raw = item.partition("=")
        name = name.strip()
        if name in ("pin", "pin-value"):
            raise RootKeyError(
                "a root key spec must not contain the PIN; use pin-env=VAR or pin-file=PATH"
            )
        if not eq:
            raise RootKeyError("each part of a pkcs11: root key spec is name=value, split by ';'")
        if name not in _PKCS11_FIELDS:
            raise RootKeyError(
                f"unknown field {name!r} in pkcs11: root key spec "
                f"(known: {', '.join(_PKCS11_FIELDS)})"
            )
        if name in values:
            raise RootKeyError(f"field {name!r} appears twice in pkcs11: root key spec")
        try:
            value = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise RootKeyError(f"field {name!r} in pkcs11: root key spec is not UTF-8") from None
        if not value:
            raise RootKeyError(f"field {name!r} in pkcs11: root key spec is empty")
        values[name] = value
    if "token" not in values:
        raise RootKeyError("a pkcs11: root key spec needs token=<label>")
    if ("pin-env" in values) == ("pin-file" in values):
        raise RootKeyError(
            "a pkcs11: root key spec needs exactly one of pin-env=VAR or pin-file=PATH"
        )
    pin_file = values.get("pin-file")
    return Pkcs11RootKeySpec(
        token=values["token"],
        key=values.get("key", DEFAULT_KEY_LABEL),
        module=values.get("module"),
        pin_env=values.get("pin-env"),
        pin_file=None if pin_file is None else home / Path(pin_file).expanduser(),
    )


def open_root_key(spec: str | None, home: Path) -> RootKey:
    """Open the root key that ``spec`` names (see :func:`parse_root_key_spec`)."""
    return parse_root_key_spec(spec, home).open()


def create_root_key(spec: str | None, home: Path) -> RootKey:
    """Create the root key that ``spec`` names; refuses to replace an existing one."""
    return parse_root_key_spec(spec, home).create()
