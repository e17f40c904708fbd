"""Key operations on private keys inside a PKCS#11 token (an HSM; SoftHSM2 in tests).

:class:`Pkcs11KeyStore` answers the opcodes of :mod:`.codes` with the same
meaning and the same error codes as :mod:`.operations` (read its docstring),
with the key bytes never leaving the token:

* ``RSA_SIGN_<hash>``: CKM_RSA_PKCS over the DER ``DigestInfo`` of the digest;
* ``RSA_PSS_SIGN_<hash>``: CKM_RSA_PKCS_PSS over the digest, MGF1 with the same
  hash, salt as long as the digest;
* ``ECDSA_SIGN_<hash>``: CKM_ECDSA over the digest; the token's ``r || s`` is
  turned into DER with ``cryptography``;
* ``ED25519_SIGN``: CKM_EDDSA (pure Ed25519) over the message;
* ``RSA_DECRYPT``: always refused with ``NOT_AUTHORIZED``. PKCS#11 has no
  mechanism with implicit rejection: CKM_RSA_PKCS decryption reports a bad
  padding as an error, and an error the edge can tell apart from a success
  is exactly Bleichenbacher's padding oracle.

A key is found by its ``CKA_ID``, which must be the key's SKI
(:func:`~.operations.ski_of`); :func:`import_private_key` puts a key in a
token that way. The store looks every key up once, when opened and on
:meth:`Pkcs11KeyStore.reload`, and keeps the object handles.

python-pkcs11 is not thread-safe (two threads in one module crash the
process), so every call into it holds the process-wide PKCS#11 lock of
:mod:`keybroker.keys.root`, and a token's login is shared with the root key
when both live in the same token (a second C_Login on a token fails).
"""

# python-pkcs11 is an optional extra (keybroker[hsm]), imported where used,
# as in keybroker.keys.root.

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NoReturn, Self, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa, utils

from keybroker.errors import ConfigurationError, RootKeyError
from keybroker.flows.keyless.codes import ECDSA_OPS, RSA_PSS_OPS, SIGN_HASH, ErrorCode, Op
from keybroker.flows.keyless.operations import (
    EC,
    ED25519,
    RSA,
    KeyOperationError,
    PrivateKey,
    check_op,
    digest_hash,
    key_kind,
    require_fits,
    ski_of,
)
from keybroker.keys.root import (
    _PKCS11_LOCK,
    _acquire_login,
    _release_login,
    _resolve_module,
    _TokenLogin,
)

if TYPE_CHECKING:
    from pkcs11.types import PrivateKey as P11PrivateKey
    from pkcs11.types import SignMixin

    class _SigningKey(P11PrivateKey, SignMixin):
        """What python-pkcs11 builds at run time for a private key with CKA_SIGN."""


__all__ = ["DIGEST_INFO_PREFIX", "Pkcs11KeyStore", "import_private_key"]

#: The DER ``DigestInfo`` before the digest, per hash: RFC 8017 §9.2, note 1.
#:
#: Written by hand because CKM_RSA_PKCS signs exactly the bytes it is given
#: (the encoded ``DigestInfo``; the token adds only the padding), and
#: ``cryptography`` has no public API that returns this encoding. The table is
#: checked in the tests against what ``cryptography`` signs (recovered from
#: its signatures).
DIGEST_INFO_PREFIX: Final[dict[str, bytes]] = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}

# id-Ed25519 (RFC 8410); CKA_EC_PARAMS holds its DER. PKCS#11 3.0 also allows
# the curve name as a PrintableString ("edwards25519"); keys made that way by
# other tools are not recognised (import_private_key uses the OID).
_ED25519_OID: Final = "1.3.101.112"
_SKI_LENGTH: Final = 20


def _require_pkcs11() -> None:
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "keys in a PKCS#11 token need python-pkcs11; install keybroker[hsm]"
        ) from None


def _login(module: str, token_label: str, pin: str) -> _TokenLogin:
    if not isinstance(pin, str) or not pin:
        raise ConfigurationError("a PKCS#11 key store needs a non-empty user PIN")
    try:
        return _acquire_login(module, token_label, pin)
    except RootKeyError as exc:
        # The login code is shared with the root key; its errors are about the
        # token (module, label, PIN), so they are reported as they are.
        raise ConfigurationError(str(exc)) from None


def _ed25519_params() -> bytes:
    from pkcs11.util.ec import encode_named_curve_parameters

    params: bytes = encode_named_curve_parameters(_ED25519_OID)
    return params


@dataclass(frozen=True, slots=True)
class _Entry:
    kind: str
    key: _SigningKey = field(repr=False)


class Pkcs11KeyStore:
    """The private keys of one PKCS#11 token, by SKI, used inside the token.

    Opens (or shares) one logged-in session, finds the private keys whose
    ``CKA_ID`` is a 20-byte SKI and keeps their handles; :meth:`reload` finds
    them again (after keys were added or removed). Safe to share between
    threads: every PKCS#11 call is serialised. Use as a context manager or
    call :meth:`close`. Not picklable; its ``repr`` shows where it lives and
    the SKIs and kinds of its keys, nothing more.
    """

    __slots__ = ("_entries", "_login", "_module", "_token_label")

    def __init__(
        self, module_path: str | os.PathLike[str] | None, token_label: str, user_pin: str
    ) -> None:
        """Log in to ``token_label`` in the PKCS#11 module at ``module_path`` and find its keys.

        ``module_path=None`` uses :func:`keybroker.keys.root.find_pkcs11_module`.
        A bad module, token or PIN raises :class:`~keybroker.errors.ConfigurationError`.
        """
        _require_pkcs11()
        try:
            module = _resolve_module(module_path)
        except RootKeyError as exc:
            raise ConfigurationError(str(exc)) from None
        self._module = module
        self._token_label = token_label
        self._entries: dict[bytes, _Entry] = {}
        with _PKCS11_LOCK:
            self._login: _TokenLogin | None = _login(module, token_label, user_pin)
            try:
                self.reload()
            except BaseException:
                self.close()
                raise

    def _require_open(self) -> _TokenLogin:
        if self._login is None:
            raise ConfigurationError(f"PKCS#11 key store on {self._token_label!r} is closed")
        return self._login

    def reload(self) -> None:
        """Find the token's keys again and replace the handle cache.

        Raises :class:`~keybroker.errors.ConfigurationError` if two private
        keys share one SKI (which one to use would be a guess).
        """
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11.exceptions import PKCS11Error
        from pkcs11.types import PrivateKey as P11PrivateKey
        from pkcs11.types import SignMixin

        where = f"PKCS#11 token {self._token_label!r}"
        with _PKCS11_LOCK:
            login = self._require_open()
            found: dict[bytes, _Entry] = {}
            try:
                ed25519_params = _ed25519_params()
                for obj in login.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
                    if not (isinstance(obj, P11PrivateKey) and isinstance(obj, SignMixin)):
                        continue  # a key without CKA_SIGN
                    ski = bytes(obj.id or b"")
                    if len(ski) != _SKI_LENGTH:
                        continue
                    key_type = obj.key_type
                    if key_type == KeyType.RSA:
                        kind = RSA
                    elif key_type == KeyType.EC:
                        kind = EC
                    elif (
                        key_type == KeyType.EC_EDWARDS
                        and obj[Attribute.EC_PARAMS] == ed25519_params
                    ):
                        kind = ED25519
                    else:
                        continue  # Ed448 and the like: not a keyless key
                    if ski in found:
                        raise ConfigurationError(
                            f"two private keys in {where} have CKA_ID {ski.hex()}; "
                            "remove one (a key's CKA_ID must be its SKI)"
                        )
                    found[ski] = _Entry(kind, cast("_SigningKey", obj))
            except PKCS11Error as exc:
                raise ConfigurationError(
                    f"cannot list the keys in {where} ({type(exc).__name__})"
                ) from None
            self._entries = found

    def skis(self) -> list[bytes]:
        """The SKIs of the keys found, sorted."""
        with _PKCS11_LOCK:
            return sorted(self._entries)

    def __contains__(self, ski: object) -> bool:
        with _PKCS11_LOCK:
            return ski in self._entries

    def __len__(self) -> int:
        with _PKCS11_LOCK:
            return len(self._entries)

    def perform(self, ski: bytes, op: int, payload: bytes) -> bytes:
        """Do ``op`` with the key named ``ski`` on ``payload``, inside the token.

        Errors as :func:`~.operations.perform`, plus ``KEY_NOT_FOUND`` for an
        unknown SKI and ``NOT_AUTHORIZED`` for ``RSA_DECRYPT``. Any failure
        of the token while signing is ``CRYPTO``.
        """
        from pkcs11.exceptions import PKCS11Error

        checked = check_op(op)
        data = bytes(payload)
        with _PKCS11_LOCK:
            if self._login is None:
                raise KeyOperationError(
                    f"PKCS#11 key store on {self._token_label!r} is closed", code=ErrorCode.INTERNAL
                )
            entry = self._entries.get(bytes(ski))
            if entry is None:
                raise KeyOperationError(
                    f"no key with SKI {bytes(ski).hex()}", code=ErrorCode.KEY_NOT_FOUND
                )
            require_fits(checked, entry.kind)
            mechanism, mechanism_param, message = _mechanism(checked, data)
            try:
                signature = entry.key.sign(
                    message, mechanism=mechanism, mechanism_param=mechanism_param
                )
            except PKCS11Error:
                raise KeyOperationError(
                    f"{checked.name} failed in the token", code=ErrorCode.CRYPTO
                ) from None
        if checked in ECDSA_OPS:
            return _ecdsa_der(bytes(signature), checked)
        return bytes(signature)

    def close(self) -> None:
        """Forget the keys and release the login. Idempotent."""
        with _PKCS11_LOCK:
            login, self._login = self._login, None
            self._entries = {}
            if login is not None:
                _release_login(login)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        with _PKCS11_LOCK:
            keys = ", ".join(
                f"{ski.hex()}:{self._entries[ski].kind}" for ski in sorted(self._entries)
            )
            state = "" if self._login is not None else " closed"
        return (
            f"<Pkcs11KeyStore module={self._module!r} token={self._token_label!r}{state} "
            f"keys=[{keys}]>"
        )

    def __reduce__(self) -> NoReturn:
        raise TypeError("Pkcs11KeyStore cannot be pickled or copied")


def _mechanism(op: Op, data: bytes) -> tuple[Any, Any, bytes]:
    """Mechanism, its parameter and the bytes to sign for ``op`` on payload ``data``."""
    from pkcs11 import MGF, Mechanism

    if op is Op.RSA_DECRYPT:
        raise KeyOperationError(
            "RSA_DECRYPT is refused on PKCS#11 keys: the token reports a bad padding "
            "as an error, which would make the key server a padding oracle",
            code=ErrorCode.NOT_AUTHORIZED,
        )
    if op is Op.ED25519_SIGN:
        return Mechanism.EDDSA, None, data  # no CK_EDDSA_PARAMS: pure Ed25519
    algorithm = digest_hash(op, data)
    if op in ECDSA_OPS:
        return Mechanism.ECDSA, None, data
    name = SIGN_HASH[op]
    if op in RSA_PSS_OPS:
        hash_mechanism, mgf = {
            "sha256": (Mechanism.SHA256, MGF.SHA256),
            "sha384": (Mechanism.SHA384, MGF.SHA384),
            "sha512": (Mechanism.SHA512, MGF.SHA512),
        }[name]
        return Mechanism.RSA_PKCS_PSS, (hash_mechanism, mgf, algorithm.digest_size), data
    return Mechanism.RSA_PKCS, None, DIGEST_INFO_PREFIX[name] + data


def _ecdsa_der(raw: bytes, op: Op) -> bytes:
    """CKM_ECDSA's ``r || s`` (two halves of equal length, PKCS#11 §2.3.1) as DER."""
    half = len(raw) // 2
    if not raw or len(raw) != 2 * half:
        raise KeyOperationError(f"{op.name} gave a malformed signature", code=ErrorCode.CRYPTO)
    r = int.from_bytes(raw[:half], "big")
    s = int.from_bytes(raw[half:], "big")
    return utils.encode_dss_signature(r, s)


# ---------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------


def _template(private_key: PrivateKey) -> dict[Any, Any]:
    """The key's attributes for C_CreateObject, from python-pkcs11's own decoders."""
    from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass
    from pkcs11.util.ec import decode_ec_private_key
    from pkcs11.util.rsa import decode_rsa_private_key

    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        # python-pkcs11 has no Ed25519 decoder; PKCS#11 3.0 §2.3.5 defines the
        # key as CKA_EC_PARAMS (the curve) and CKA_VALUE (the 32-byte seed).
        return {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
            Attribute.EC_PARAMS: _ed25519_params(),
            Attribute.VALUE: private_key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            ),
        }
    # PKCS#1 for RSA, SEC 1 (with the curve) for EC: what the decoders read.
    der = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    if isinstance(private_key, rsa.RSAPrivateKey):
        return cast("dict[Any, Any]", decode_rsa_private_key(der, MechanismFlag.SIGN))
    return cast("dict[Any, Any]", decode_ec_private_key(der))


def import_private_key(
    module_path: str | os.PathLike[str] | None,
    token_label: str,
    user_pin: str,
    private_key: PrivateKey,
    *,
    label: str | None = None,
) -> bytes:
    """Put ``private_key`` into the token as a sensitive, non-extractable key; return its SKI.

    The object is a token object with ``CKA_ID`` = the SKI, may only sign
    (no decrypt, unwrap or derive) and cannot be modified, so
    :class:`Pkcs11KeyStore` finds it and nobody can read it back. It needs
    the *user* PIN: the security officer may not create private objects.
    Refuses (:class:`~keybroker.errors.ConfigurationError`) a key already in
    the token. For tests, the CLI and the demo; a production key is better
    generated in the HSM.
    """
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.exceptions import PKCS11Error

    if key_kind(private_key) is None:
        raise ConfigurationError(
            f"keyless serves RSA, EC and Ed25519 keys, not {type(private_key).__name__}"
        )
    _require_pkcs11()
    try:
        module = _resolve_module(module_path)
    except RootKeyError as exc:
        raise ConfigurationError(str(exc)) from None
    ski = ski_of(private_key.public_key())
    template = _template(private_key)
    template.update(
        {
            Attribute.ID: ski,
            Attribute.LABEL: label if label is not None else "keyless-" + ski.hex(),
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.MODIFIABLE: False,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        }
    )
    where = f"PKCS#11 token {token_label!r}"
    with _PKCS11_LOCK:
        login = _login(module, token_label, user_pin)
        try:
            # The login is per token, so a fresh read-write session needs no PIN.
            rw = login.session.token.open(rw=True)
            try:
                query = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: ski}
                if any(True for _ in rw.get_objects(query)):
                    raise ConfigurationError(
                        f"a private key with SKI {ski.hex()} is already in {where}"
                    )
                rw.create_object(template)
            finally:
                rw.close()
        except PKCS11Error as exc:
            raise ConfigurationError(
                f"cannot import a key into {where} ({type(exc).__name__})"
            ) from None
        finally:
            _release_login(login)
    return ski
