"""What a key server does to a private key for each opcode of :mod:`.codes`.

The edge sends an opcode and a payload; the key server answers with the
result or with an :class:`~.codes.ErrorCode`. Keys live either in this process
(:class:`LocalKeyStore`, ``cryptography`` keys) or in a PKCS#11 token
(:class:`~.pkcs11keys.Pkcs11KeyStore`); both follow the rules below, and both
name a key by its SKI (:func:`ski_of`).

What each opcode does:

* ``RSA_SIGN_<hash>``: RSASSA-PKCS1-v1_5 over the payload, which is the
  *digest* (its length must be the hash's digest size).
* ``RSA_PSS_SIGN_<hash>``: RSASSA-PSS over the digest, MGF1 with the same hash
  and a salt as long as the digest (the rule of TLS 1.3, RFC 8446 §4.2.3).
* ``ECDSA_SIGN_<hash>``: ECDSA over the digest; the signature is DER
  (``Ecdsa-Sig-Value``), as TLS carries it.
* ``ED25519_SIGN``: Ed25519 over the payload, which is the whole message.
* ``RSA_DECRYPT``: RSAES-PKCS1-v1_5 decryption *with implicit rejection*: a
  ciphertext whose padding is wrong yields a deterministic, random-looking
  message instead of an error, so the key server is no padding oracle
  (Bleichenbacher). In-process this is OpenSSL's (3.2 and later) behaviour,
  checked once per process; where it is missing, and always on PKCS#11 (a
  token reports bad padding as an error), RSA_DECRYPT is refused with
  ``NOT_AUTHORIZED``.

Which error, checked in this order:

* ``BAD_OPCODE``: an opcode number :class:`~.codes.Op` does not know, or an
  MD5-SHA1 opcode: those serve TLS 1.1 and older only, which keybroker does
  not terminate, so it treats them as unsupported.
* ``UNEXPECTED_OPCODE`` (a): a known opcode that is no key operation (PING,
  or a reply code sent as a request; gokeyless answers replies the same way).
* ``KEY_NOT_FOUND``: no key with that SKI (store methods only).
* ``UNEXPECTED_OPCODE`` (b): a key operation that does not fit the key's type
  (ECDSA on an RSA key, RSA on an Ed25519 key...): a valid opcode, just not
  for this key. gokeyless answers ``CRYPTO`` here; keybroker keeps ``CRYPTO``
  for a failing primitive, so an edge can tell a routing mistake (its
  certificate and the key server disagree) from a broken key. The key type is
  public (it is in the certificate), so saying so tells an attacker nothing.
* ``FORMAT``: a digest of the wrong length, or an RSA ciphertext that is not
  exactly as long as the modulus.
* ``CRYPTO``: the primitive itself failed (for instance RSA-PSS with SHA-512
  on a key too small for a 64-byte salt).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, NoReturn, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from keybroker.errors import ConfigurationError, ProtocolError
from keybroker.flows.keyless.codes import (
    ECDSA_OPS,
    KEY_OPS,
    RSA_PKCS1_OPS,
    RSA_PSS_OPS,
    SIGN_HASH,
    ErrorCode,
    Op,
)

__all__ = [
    "EC",
    "ED25519",
    "OPS_BY_KIND",
    "RSA",
    "KeyOperationError",
    "LocalKeyStore",
    "PrivateKey",
    "PublicKey",
    "check_op",
    "digest_hash",
    "init_worker",
    "key_kind",
    "perform",
    "require_fits",
    "ski_of",
    "worker_perform",
]

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

#: Key kinds, as :func:`key_kind` names them.
RSA: Final = "rsa"
EC: Final = "ec"
ED25519: Final = "ed25519"

#: The opcodes each kind of key answers.
OPS_BY_KIND: Final[Mapping[str, frozenset[Op]]] = {
    RSA: frozenset(RSA_PKCS1_OPS | RSA_PSS_OPS | {Op.RSA_DECRYPT}),
    EC: ECDSA_OPS,
    ED25519: frozenset({Op.ED25519_SIGN}),
}

_HASHES: Final[Mapping[str, hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1(),  # noqa: S303 - TLS 1.2 still offers RSA/ECDSA with SHA-1; the edge decides
    "sha224": hashes.SHA224(),
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}
_MD5SHA1: Final = "md5sha1"
_SUPPORTED: Final = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)


class KeyOperationError(ProtocolError):
    """A key operation the key server answers with ``Op.ERROR`` and :attr:`code`.

    A :class:`~keybroker.errors.ProtocolError` because it *is* a protocol
    answer: ``code`` is the wire :class:`~.codes.ErrorCode`, and the
    connection goes on. It is neither a
    :class:`~keybroker.errors.RemoteProtocolError` (which ends a connection
    whose peer sent garbage; a missing key or a failed signature is not
    that) nor a :class:`~keybroker.errors.CryptoError` (which carries no code
    and covers only the ``CRYPTO`` case). Messages name opcodes, lengths and
    key kinds, never key bytes or payload bytes. It survives pickling, so it
    crosses a process pool with its code (see :func:`worker_perform`).
    """

    problem = "protocol/keyless-key-operation"
    code: ErrorCode

    # ``code`` has a default because every class of the tree must be constructible
    # from its message alone (the HTTP client maps problem types back to classes).
    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.INTERNAL) -> None:
        super().__init__(message, code=code)
        self.code = ErrorCode(code)

    def __reduce__(self) -> tuple[object, ...]:
        # Exception pickles as cls(*args), which would drop the keyword ``code``.
        return (_rebuild_error, (str(self), int(self.code)))

    def __repr__(self) -> str:
        return f"KeyOperationError({str(self)!r}, code=ErrorCode.{self.code.name})"


def _rebuild_error(message: str, code: int) -> KeyOperationError:
    return KeyOperationError(message, code=ErrorCode(code))


def _fail(code: ErrorCode, message: str) -> NoReturn:
    raise KeyOperationError(message, code=code)


# ---------------------------------------------------------------------------
# Checks shared by both stores
# ---------------------------------------------------------------------------


def ski_of(public_key: PublicKey) -> bytes:
    """The 20-byte Subject Key Identifier of ``public_key``.

    SHA-1 of the subjectPublicKey BIT STRING, RFC 5280 §4.2.1.2 method 1 (what
    a certificate's SKI extension usually holds, and what the edge sends).
    """
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


def key_kind(private_key: object) -> str | None:
    """``"rsa"``, ``"ec"`` or ``"ed25519"`` for a key this module serves, else ``None``."""
    if isinstance(private_key, rsa.RSAPrivateKey):
        return RSA
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return EC
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return ED25519
    return None


def check_op(op: int) -> Op:
    """``op`` as an :class:`Op` that is a supported key operation.

    ``BAD_OPCODE`` for an unknown or unsupported (MD5-SHA1) opcode,
    ``UNEXPECTED_OPCODE`` for a known opcode that is no key operation.
    """
    try:
        known = Op(op)
    except ValueError:
        _fail(ErrorCode.BAD_OPCODE, f"opcode 0x{int(op):02x} is unknown")
    if known not in KEY_OPS:
        _fail(ErrorCode.UNEXPECTED_OPCODE, f"{known.name} is not a key operation")
    if SIGN_HASH.get(known) == _MD5SHA1:
        _fail(
            ErrorCode.BAD_OPCODE,
            f"{known.name} is not supported: MD5-SHA1 signatures serve TLS 1.1 and older only",
        )
    return known


def require_fits(op: Op, kind: str | None) -> None:
    """``UNEXPECTED_OPCODE`` unless a key of ``kind`` answers ``op``."""
    if kind is None or op not in OPS_BY_KIND[kind]:
        _fail(ErrorCode.UNEXPECTED_OPCODE, f"{op.name} does not apply to a {kind or 'such'} key")


def digest_hash(op: Op, digest: bytes) -> hashes.HashAlgorithm:
    """The hash of digest-signing ``op``; ``FORMAT`` unless ``digest`` is as long as its output."""
    algorithm = _HASHES[SIGN_HASH[op]]
    if len(digest) != algorithm.digest_size:
        _fail(
            ErrorCode.FORMAT,
            f"{op.name} takes a {algorithm.digest_size}-byte digest, not {len(digest)} bytes",
        )
    return algorithm


# ---------------------------------------------------------------------------
# In-process keys
# ---------------------------------------------------------------------------

# Whether this process's OpenSSL does implicit rejection; learnt on first use.
_implicit_rejection: bool | None = None


def _has_implicit_rejection(key: rsa.RSAPrivateKey) -> bool:
    """Ask the library rather than parse its version: decrypt a ciphertext of zero.

    Zero decrypts to zero, whose padding is wrong under every key: with
    implicit rejection that yields a synthetic message, without it an error.
    The answer is the library's, so it is learnt once per process (a race
    only repeats the probe).
    """
    global _implicit_rejection  # noqa: PLW0603 - a per-process fact, cached
    if _implicit_rejection is None:
        try:
            key.decrypt(bytes(_modulus_length(key)), padding.PKCS1v15())
        except ValueError:
            _implicit_rejection = False
        else:
            _implicit_rejection = True
    return _implicit_rejection


def _modulus_length(key: rsa.RSAPrivateKey) -> int:
    return (key.key_size + 7) // 8


def _rsa_decrypt(key: rsa.RSAPrivateKey, ciphertext: bytes) -> bytes:
    size = _modulus_length(key)
    if len(ciphertext) != size:
        _fail(
            ErrorCode.FORMAT,
            f"RSA_DECRYPT takes a {size}-byte ciphertext, not {len(ciphertext)} bytes",
        )
    if not _has_implicit_rejection(key):
        _fail(
            ErrorCode.NOT_AUTHORIZED,
            "RSA_DECRYPT is refused: this OpenSSL lacks implicit rejection (needs 3.2 or later), "
            "so a padding error would make the key server a padding oracle",
        )
    try:
        return key.decrypt(ciphertext, padding.PKCS1v15())
    except ValueError:
        # With implicit rejection only a ciphertext >= the modulus gets here,
        # which anyone can check with the public key: no oracle.
        _fail(ErrorCode.CRYPTO, "RSA_DECRYPT failed")


def perform(private_key: PrivateKey, op: int, payload: bytes) -> bytes:
    """Do ``op`` with ``private_key`` on ``payload`` and return the result.

    See the module docstring for what each opcode does and which
    :class:`KeyOperationError` code each failure raises.
    """
    checked = check_op(op)
    require_fits(checked, key_kind(private_key))
    data = bytes(payload)
    if checked is Op.RSA_DECRYPT:
        assert isinstance(private_key, rsa.RSAPrivateKey)
        return _rsa_decrypt(private_key, data)
    try:
        if checked is Op.ED25519_SIGN:
            assert isinstance(private_key, ed25519.Ed25519PrivateKey)
            return private_key.sign(data)
        algorithm = digest_hash(checked, data)
        prehashed = utils.Prehashed(algorithm)
        if checked in ECDSA_OPS:
            assert isinstance(private_key, ec.EllipticCurvePrivateKey)
            return private_key.sign(data, ec.ECDSA(prehashed))
        assert isinstance(private_key, rsa.RSAPrivateKey)
        if checked in RSA_PSS_OPS:
            pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
            return private_key.sign(data, pss, prehashed)
        return private_key.sign(data, padding.PKCS1v15(), prehashed)
    except (ValueError, UnsupportedAlgorithm):
        _fail(ErrorCode.CRYPTO, f"{checked.name} failed")


def _describe(key: PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ec-{key.curve.name}"
    return "ed25519"


class LocalKeyStore:
    """Private keys held in this process, named by SKI.

    Not picklable (that would copy the keys); to use the keys from a process
    pool, hand their PKCS#8 DER to :func:`init_worker` once per worker. Safe
    to share between threads once filled: :meth:`perform` only reads.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[PrivateKey] = ()) -> None:
        self._keys: dict[bytes, PrivateKey] = {}
        for key in keys:
            self.add(key)

    @classmethod
    def from_pkcs8(cls, keys: Mapping[bytes, bytes]) -> LocalKeyStore:
        """A store of the unencrypted PKCS#8 DER ``keys``, each checked against its SKI."""
        store = cls()
        for ski, der in keys.items():
            try:
                key = serialization.load_der_private_key(der, password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise ConfigurationError(
                    f"key {bytes(ski).hex()} is not an unencrypted PKCS#8 private key"
                ) from None
            if not isinstance(key, _SUPPORTED):
                raise ConfigurationError(
                    f"key {bytes(ski).hex()} is of a type keyless does not serve"
                )
            if store.add(key) != ski:
                raise ConfigurationError(f"key {bytes(ski).hex()} does not have that SKI")
        return store

    def add(self, private_key: PrivateKey) -> bytes:
        """Hold ``private_key`` (RSA, EC or Ed25519) and return its SKI."""
        if key_kind(private_key) is None:
            raise ConfigurationError(
                f"keyless serves RSA, EC and Ed25519 keys, not {type(private_key).__name__}"
            )
        ski = ski_of(private_key.public_key())
        self._keys[ski] = private_key
        return ski

    def skis(self) -> list[bytes]:
        """The SKIs of the keys held, sorted."""
        return sorted(self._keys)

    def __contains__(self, ski: object) -> bool:
        return ski in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def perform(self, ski: bytes, op: int, payload: bytes) -> bytes:
        """:func:`perform` with the key named ``ski``; ``KEY_NOT_FOUND`` if there is none."""
        checked = check_op(op)
        key = self._keys.get(bytes(ski))
        if key is None:
            _fail(ErrorCode.KEY_NOT_FOUND, f"no key with SKI {bytes(ski).hex()}")
        return perform(key, checked, payload)

    def __repr__(self) -> str:
        keys = ", ".join(f"{ski.hex()}:{_describe(self._keys[ski])}" for ski in self.skis())
        return f"<LocalKeyStore keys=[{keys}]>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("LocalKeyStore cannot be pickled; give workers PKCS#8 via init_worker")


# ---------------------------------------------------------------------------
# Process pools
# ---------------------------------------------------------------------------

# The keys of this worker process, set once by init_worker.
_worker_store: LocalKeyStore | None = None


def init_worker(keys: Mapping[bytes, bytes]) -> None:
    """``initializer`` of a process pool: parse ``keys`` (SKI → PKCS#8 DER) once per worker.

    Usage::

        pool = ProcessPoolExecutor(n, initializer=init_worker, initargs=(keys,))
        signature = pool.submit(worker_perform, ski, op, payload).result()

    The keys then live in the worker's module global, so each call sends only
    the SKI, the opcode and the payload.
    """
    global _worker_store  # noqa: PLW0603 - one store per worker process, by design
    _worker_store = LocalKeyStore.from_pkcs8(keys)


def worker_perform(ski: bytes, op: int, payload: bytes) -> bytes:
    """:meth:`LocalKeyStore.perform` on the keys :func:`init_worker` loaded in this process."""
    if _worker_store is None:
        _fail(ErrorCode.INTERNAL, "init_worker has not run in this process")
    return _worker_store.perform(ski, op, payload)
