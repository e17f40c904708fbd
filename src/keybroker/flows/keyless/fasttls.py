"""tlslite-ng's hot primitives on ``cryptography``: an adapter layer, not a fork.

tlslite-ng does TLS in pure Python, and by default its *primitives* are pure Python too:
X25519, AES-GCM (a Python Rijndael and GHASH), ChaCha20-Poly1305, P-256 ECDH (python-ecdsa)
and the TLS 1.3 key schedule (HKDF-Expand-Label built with tlslite's ``Writer``). Profiled
on the edge, those cost about 8 of the 11 ms of CPU a full TLS 1.3 handshake takes
(``docs/benchmarks.md``, section ``keyless``). This module moves them onto ``cryptography``
(OpenSSL) without touching a byte of tlslite's own files:

* :func:`install` replaces a few *leaf functions*: module-level names that tlslite looks up
  at call time. Each replacement keeps the exact contract of the function it replaces
  (arguments, return type, the ``None`` or exception it gives on bad input), so the rest of
  tlslite cannot tell the difference except by the clock. :data:`REBINDS` lists them, and
  ``tests/flows/keyless/test_fasttls.py`` checks each against the saved original
  (:func:`original`) on random inputs.
* :class:`FastTLSConnection` is a subclass of ``TLSConnection`` whose only change is which
  key-exchange object it asks for: :class:`FastECDHKeyExchange` for X25519 and the NIST
  curves, which keeps the private value as a ``cryptography`` key object between the key
  share and the shared secret. It is a subclass rather than a rebind because ``_getKEX`` is
  a method of a class others may use unchanged.
* :func:`lean_settings` is the edge's handshake settings: only what the edge offers, so
  tlslite has less to filter and sort on every ClientHello.

**The rebinds** (module global → replacement; why; the contract kept):

* ``tlslite.utils.python_aesgcm.new(key)`` → :func:`aesgcm_new`, an :class:`AeadAdapter`
  over ``cryptography``'s ``AESGCM``;
* ``tlslite.utils.python_chacha20_poly1305.new(key)`` → :func:`chacha20_poly1305_new`, an
  :class:`AeadAdapter` over ``ChaCha20Poly1305``;
* ``tlslite.keyexchange.x25519(k, u)`` → :func:`x25519` (``X25519PrivateKey``);
* ``tlslite.utils.cryptomath.HKDF_expand_label`` → :func:`hkdf_expand_label`
  (``HKDFExpand``) and ``derive_secret`` → :func:`derive_secret`: in ``cryptomath`` and in
  every tlslite module that imported them by name.

*AEAD.* ``recordlayer`` and ``tlsconnection`` import ``createAESGCM`` and ``createCHACHA20``
by name, so the factories cannot be swapped; the leaf ``new`` functions they end in can.
Without M2Crypto or PyCrypto (never installed here), ``createAESGCM`` ends in
``python_aesgcm.new`` and ``createCHACHA20`` always ends in ``python_chacha20_poly1305.new``.
This covers the record layer in both directions, TLS 1.2 and 1.3, and session-ticket
sealing. The contract: ``isAEAD``, ``isBlockCipher``, ``nonceLength`` 12, ``tagLength`` 16,
``name`` (the record layer builds nonces and TLS 1.2 explicit IVs from it), ``key``,
``implementation``, ``seal(nonce, plaintext, aad)`` → ciphertext‖tag as a ``bytearray``, and
``open(nonce, ciphertext‖tag, aad)`` → the plaintext, or **None** (never an exception) when
the tag is wrong or the input is shorter than a tag; a nonce that is not 12 bytes raises
``ValueError``. AES-CBC, CCM, 3DES and RC4 keep tlslite's code: the edge offers none of
them.

*X25519.* ``ECDHKeyExchange`` looks ``x25519`` up in ``tlslite.keyexchange``'s globals. The
replacement returns the raw public key for the base point and the shared secret otherwise;
where ``cryptography`` refuses an all-zero shared secret (a small-order peer point), it
raises tlslite's own ``TLSIllegalParameterException("Invalid key share")``, which is what
``ECDHKeyExchange`` raises for the zero that the pure-Python ladder returns. Unlike the
original it does not clamp the caller's ``bytearray`` in place (the result is the same).
TLS 1.3 through :class:`FastTLSConnection` does not even call it (the key object is kept);
TLS 1.2 ECDHE over X25519 and any plain ``TLSConnection`` do. X448 is not replaced: the
edge does not offer it.

*Key schedule.* ``HKDF_expand_label`` and ``derive_secret`` are imported by
name into ``tlsconnection``, ``handshakehelpers``, ``recordlayer``, ``mathtls`` … so the
rebind walks every loaded ``tlslite.*`` module and replaces each name that still refers to
the original; modules imported later pick the replacement up from ``cryptomath``. Same
arguments (``bytearray`` or ``bytes``, hash by name), same ``bytearray`` results. A hash
name outside SHA-256/384/512 goes to the original. 26 calls per handshake, 7 µs each in
tlslite (its ``Writer`` and an HMAC object per block), 3.6 µs here.

**Not rebound, and why.** Certificate-verify self-checks are done in
:mod:`.tlskeys` (the remote key classes override ``verify``/``_verify`` with
``cryptography``); SHA-2 transcript hashes and ``secureHMAC`` (Finished, binders) are one
``hashlib``/``hmac`` call into OpenSSL already (a one-shot ``hmac.digest`` measured the
same 2 µs, so it is left alone); tlslite's ClientHello
parsing, extension objects and record framing are its own Python and stay so (rewriting
them would be a fork). ``Rijndael``'s ``deprecated_class_name`` wrapper, which calls
``inspect.getframeinfo`` (reading source files) for every AES object tlslite builds, stops
mattering because no Rijndael object is built any more.

Nothing here is a hand-written primitive: every cipher, curve operation and HKDF goes to
``cryptography`` (or, unchanged, to tlslite's own calls into ``hashlib``/``hmac``). What is
written by hand is only the glue: the HkdfLabel encoding (RFC 8446 §7.1, a few bytes),
point-format checks, and the mapping of errors onto tlslite's exceptions.
"""

from __future__ import annotations

import hashlib
import importlib
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tlslite.constants import GroupName  # type: ignore[import-untyped,unused-ignore]
from tlslite.errors import (  # type: ignore[import-untyped,unused-ignore]
    TLSDecodeError,
    TLSIllegalParameterException,
)
from tlslite.handshakesettings import (  # type: ignore[import-untyped,unused-ignore]
    HandshakeSettings,
)
from tlslite.keyexchange import ECDHKeyExchange  # type: ignore[import-untyped,unused-ignore]
from tlslite.tlsconnection import TLSConnection  # type: ignore[import-untyped,unused-ignore]
from tlslite.utils.x25519 import X25519_G  # type: ignore[import-untyped,unused-ignore]

__all__ = [
    "REBINDS",
    "AeadAdapter",
    "FastECDHKeyExchange",
    "FastTLSConnection",
    "Rebind",
    "aesgcm_new",
    "chacha20_poly1305_new",
    "derive_secret",
    "hkdf_expand_label",
    "install",
    "installed",
    "lean_settings",
    "original",
    "x25519",
]

_NONCE_LENGTH: Final = 12
_TAG_LENGTH: Final = 16
_X25519_SIZE: Final = 32
_BASE_POINT: Final = bytes(X25519_G)
_HASHES: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_DIGEST_SIZE: Final = {"sha256": 32, "sha384": 48, "sha512": 64}
_EMPTY_HASH: Final = {name: hashlib.new(name).digest() for name in _DIGEST_SIZE}
_X25519_SYMBOL: Final = "tlslite.keyexchange.x25519"
_HKDF_SYMBOL: Final = "tlslite.utils.cryptomath.HKDF_expand_label"
_DERIVE_SYMBOL: Final = "tlslite.utils.cryptomath.derive_secret"


# --- the AEAD adapter ---------------------------------------------------------------------------


class AeadAdapter:
    """tlslite's AEAD object (``AESGCM`` / ``CHACHA20_POLY1305`` interface) over ``cryptography``.

    Attribute names are tlslite's (camelCase), since tlslite reads them.
    """

    __slots__ = (
        "_aead",
        "implementation",
        "isAEAD",
        "isBlockCipher",
        "key",
        "name",
        "nonceLength",
        "tagLength",
    )

    def __init__(self, aead: AESGCM | ChaCha20Poly1305, name: str, key: bytes | bytearray) -> None:
        self._aead = aead
        self.name = name
        self.key = key
        self.implementation = "cryptography"
        self.isAEAD = True
        self.isBlockCipher = False
        self.nonceLength = _NONCE_LENGTH
        self.tagLength = _TAG_LENGTH

    def seal(
        self, nonce: bytes | bytearray, plaintext: bytes | bytearray, data: bytes | bytearray
    ) -> bytearray:
        """``plaintext`` encrypted, followed by the 16-byte tag over it and ``data``."""
        if len(nonce) != _NONCE_LENGTH:
            raise ValueError("Bad nonce length")
        return bytearray(self._aead.encrypt(bytes(nonce), bytes(plaintext), bytes(data)))

    def open(
        self, nonce: bytes | bytearray, ciphertext: bytes | bytearray, data: bytes | bytearray
    ) -> bytearray | None:
        """The plaintext, or ``None`` if the tag does not match (never an exception)."""
        if len(nonce) != _NONCE_LENGTH:
            raise ValueError("Bad nonce length")
        if len(ciphertext) < _TAG_LENGTH:
            return None
        try:
            return bytearray(self._aead.decrypt(bytes(nonce), bytes(ciphertext), bytes(data)))
        except InvalidTag:
            return None

    def __repr__(self) -> str:
        return f"<AeadAdapter {self.name}>"  # never the key


def aesgcm_new(key: bytes | bytearray) -> AeadAdapter:
    """Replaces ``tlslite.utils.python_aesgcm.new``: AES-128/256-GCM (tlslite has no AES-192)."""
    if len(key) == 16:
        name = "aes128gcm"
    elif len(key) == 32:
        name = "aes256gcm"
    else:
        raise AssertionError("AES-GCM keys are 16 or 32 bytes")  # what tlslite raises
    return AeadAdapter(AESGCM(bytes(key)), name, key)


def chacha20_poly1305_new(key: bytes | bytearray) -> AeadAdapter:
    """Replaces ``tlslite.utils.python_chacha20_poly1305.new``."""
    if len(key) != 32:
        raise ValueError("Key must be 256 bit long")  # tlslite's words
    return AeadAdapter(ChaCha20Poly1305(bytes(key)), "chacha20-poly1305", key)


# --- X25519 -------------------------------------------------------------------------------------


def x25519(k: bytes | bytearray, u: bytes | bytearray) -> bytearray:
    """Replaces ``tlslite.keyexchange.x25519``: the X25519 function of RFC 7748.

    ``u`` the base point: the public key of scalar ``k``; otherwise the shared secret.
    An all-zero shared secret raises ``TLSIllegalParameterException``, as tlslite does
    right after its own ``x25519`` returns one.
    """
    if len(k) != _X25519_SIZE or len(u) != _X25519_SIZE:
        return bytearray(_ORIGINALS[_X25519_SYMBOL](k, u))  # not TLS: tlslite's behaviour
    private = X25519PrivateKey.from_private_bytes(bytes(k))
    if u == _BASE_POINT:
        return bytearray(private.public_key().public_bytes_raw())
    try:
        return bytearray(private.exchange(X25519PublicKey.from_public_bytes(bytes(u))))
    except ValueError as exc:  # cryptography refuses the all-zero result
        raise TLSIllegalParameterException("Invalid key share") from exc


# --- the TLS 1.3 key schedule -------------------------------------------------------------------


def hkdf_expand_label(
    secret: bytes | bytearray,
    label: bytes | bytearray,
    hashValue: bytes | bytearray,  # tlslite's parameter name: callers may pass it by keyword
    length: int,
    algorithm: str,
) -> bytearray:
    """Replaces ``HKDF_expand_label`` (RFC 8446 §7.1) with ``cryptography``'s ``HKDFExpand``."""
    hash_class = _HASHES.get(algorithm)
    if hash_class is None or not 0 < length <= 255 * _DIGEST_SIZE[algorithm]:
        return bytearray(_ORIGINALS[_HKDF_SYMBOL](secret, label, hashValue, length, algorithm))
    # The HkdfLabel structure, encoded by hand (a length, two length-prefixed byte strings):
    # no library builds it, and tlslite's own Writer is what made this function slow.
    full = b"tls13 " + bytes(label)
    info = struct.pack(">HB", length, len(full)) + full + bytes((len(hashValue),)) + hashValue
    return bytearray(HKDFExpand(hash_class(), length, info).derive(bytes(secret)))


def derive_secret(
    secret: bytes | bytearray, label: bytes | bytearray, handshake_hashes: Any, algorithm: str
) -> bytearray:
    """Replaces ``derive_secret``: HKDF-Expand-Label of the transcript hash (or of "")."""
    if algorithm not in _HASHES:
        return bytearray(_ORIGINALS[_DERIVE_SYMBOL](secret, label, handshake_hashes, algorithm))
    if handshake_hashes is None:
        transcript: bytes | bytearray = _EMPTY_HASH[algorithm]
    else:
        transcript = handshake_hashes.digest(algorithm)
    return hkdf_expand_label(secret, label, transcript, _DIGEST_SIZE[algorithm], algorithm)


# --- ECDH key exchange objects ------------------------------------------------------------------

_NIST_CURVES: Final[dict[int, ec.EllipticCurve]] = {
    GroupName.secp256r1: ec.SECP256R1(),
    GroupName.secp384r1: ec.SECP384R1(),
    GroupName.secp521r1: ec.SECP521R1(),
}
_FAST_GROUPS: Final = frozenset({GroupName.x25519, *_NIST_CURVES})
_POINT_PREFIX: Final = {"uncompressed": (4,), "compressed": (2, 3)}


class FastECDHKeyExchange(ECDHKeyExchange):  # type: ignore[misc]
    """``ECDHKeyExchange`` with X25519 and the NIST curves on ``cryptography``.

    The private value is a ``cryptography`` key object, made once, so the key share and the
    shared secret cost one scalar multiplication each (the global :func:`x25519` has to load
    the private bytes again for the second: another). The public value and the shared secret
    are the bytes tlslite gives for the same scalar: X25519's 32 bytes; for the NIST curves
    the uncompressed point and the x coordinate of the product, zero-padded.

    Failures are tlslite's: an X25519 share that is not 32 bytes, or gives the all-zero
    secret, raises ``TLSIllegalParameterException("Invalid key share")``; a NIST share in an
    encoding the caller did not allow, or not on the curve, raises
    ``TLSIllegalParameterException("Invalid ECC point")``, and no allowed encoding at all
    ``TLSDecodeError``. Anything else (another group, a private value from elsewhere, the
    hybrid encoding) is tlslite's own code.
    """

    def get_random_private_key(self) -> Any:
        if self.group == GroupName.x25519:
            return X25519PrivateKey.generate()
        curve = _NIST_CURVES.get(self.group)
        if curve is None:
            return super().get_random_private_key()
        return ec.generate_private_key(curve)

    def calc_public_value(self, private: Any, point_format: str = "uncompressed") -> Any:
        if isinstance(private, X25519PrivateKey):
            return bytearray(private.public_key().public_bytes_raw())
        if isinstance(private, ec.EllipticCurvePrivateKey) and point_format in _POINT_PREFIX:
            encoding = (
                PublicFormat.UncompressedPoint
                if point_format == "uncompressed"
                else PublicFormat.CompressedPoint
            )
            return bytearray(private.public_key().public_bytes(Encoding.X962, encoding))
        if isinstance(private, ec.EllipticCurvePrivateKey):
            private = private.private_numbers().private_value
        return super().calc_public_value(private, point_format)

    def calc_shared_key(
        self,
        private: Any,
        peer_share: bytes | bytearray,
        valid_point_formats: Sequence[str] = ("uncompressed",),
    ) -> bytearray:
        if isinstance(private, X25519PrivateKey):
            if len(peer_share) != _X25519_SIZE:
                raise TLSIllegalParameterException("Invalid key share")
            try:
                peer_key = X25519PublicKey.from_public_bytes(bytes(peer_share))
                return bytearray(private.exchange(peer_key))
            except ValueError as exc:  # the all-zero shared secret
                raise TLSIllegalParameterException("Invalid key share") from exc
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            return bytearray(super().calc_shared_key(private, peer_share, valid_point_formats))
        if not valid_point_formats:
            raise TLSDecodeError("Empty point formats extension")
        share = bytes(peer_share)
        curve = private.curve
        size = (curve.key_size + 7) // 8
        kind = {4: "uncompressed", 2: "compressed", 3: "compressed"}.get(share[0] if share else -1)
        if kind is None or kind not in valid_point_formats:
            if share and share[0] in (6, 7) and "hybrid" in valid_point_formats:
                scalar = private.private_numbers().private_value
                return bytearray(super().calc_shared_key(scalar, peer_share, valid_point_formats))
            raise TLSIllegalParameterException("Invalid ECC point")
        if len(share) != (1 + 2 * size if kind == "uncompressed" else 1 + size):
            raise TLSIllegalParameterException("Invalid ECC point")
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(curve, share)
            return bytearray(private.exchange(ec.ECDH(), peer))
        except ValueError as exc:  # not on the curve, or the point at infinity
            raise TLSIllegalParameterException("Invalid ECC point") from exc


class FastTLSConnection(TLSConnection):  # type: ignore[misc]
    """``TLSConnection`` whose TLS 1.3 ECDHE uses :class:`FastECDHKeyExchange`.

    Overrides only the static ``_getKEX`` tlslite uses to pick a key-exchange object for a
    TLS 1.3 key share (``_genKeyShareEntry`` and the server's handshake call it through the
    class). TLS 1.2 ECDHE is built elsewhere in tlslite, with ``ECDHKeyExchange`` itself: over
    X25519 it uses the rebound :func:`x25519`; over P-256 or P-384 it stays python-ecdsa.
    """

    @staticmethod
    def _getKEX(group: int, version: tuple[int, int]) -> Any:
        if group in _FAST_GROUPS:
            return FastECDHKeyExchange(group, version)
        return TLSConnection._getKEX(group, version)


# --- settings -----------------------------------------------------------------------------------


def lean_settings(
    *, min_version: tuple[int, int] = (3, 4), rsa: bool = True, ecdsa: bool = True
) -> HandshakeSettings:
    """Handshake settings with only what a modern server needs (validated, a fresh object).

    TLS ``min_version`` (``(3, 3)`` for 1.2, ``(3, 4)`` for 1.3) to 1.3; AES-GCM and
    ChaCha20-Poly1305; AEAD only; ECDHE only (no FFDHE groups, no static RSA) over X25519,
    P-256 and P-384, with X25519 the key share tlslite prefers; no heartbeat. ``rsa`` /
    ``ecdsa``: the TLS 1.2 key-exchange families to keep (TLS 1.3 does not use them). The
    caller adds what is specific to it (tickets, PSK modes, ALPN).
    """
    if min_version not in ((3, 3), (3, 4)):
        raise ValueError("min_version is (3, 3) or (3, 4)")
    settings = HandshakeSettings()
    settings.minVersion = min_version
    settings.maxVersion = (3, 4)
    settings.cipherNames = ["aes256gcm", "aes128gcm", "chacha20-poly1305"]
    settings.macNames = ["aead"]
    settings.keyExchangeNames = [
        name for name, wanted in (("ecdhe_ecdsa", ecdsa), ("ecdhe_rsa", rsa)) if wanted
    ] or ["ecdhe_ecdsa"]
    settings.eccCurves = ["x25519", "secp256r1", "secp384r1"]
    settings.keyShares = ["x25519", "secp256r1"]
    settings.dhGroups = []
    settings.use_heartbeat_extension = False
    return settings.validate()


# --- installing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rebind:
    """One leaf function of tlslite replaced by :func:`install`."""

    #: The module that defines the name (other tlslite modules that imported it follow).
    module: str
    name: str
    replacement: Callable[..., Any]
    why: str
    #: Whether every loaded ``tlslite.*`` module holding the original is updated too.
    everywhere: bool = False

    @property
    def symbol(self) -> str:
        return f"{self.module}.{self.name}"


REBINDS: Final[tuple[Rebind, ...]] = (
    Rebind(
        "tlslite.utils.python_aesgcm",
        "new",
        aesgcm_new,
        "pure-Python AES-GCM: ~0.15 ms per key, ~1.6 ms per 700-byte flight; 6 keys/handshake",
    ),
    Rebind(
        "tlslite.utils.python_chacha20_poly1305",
        "new",
        chacha20_poly1305_new,
        "pure-Python ChaCha20-Poly1305",
    ),
    Rebind(
        "tlslite.keyexchange",
        "x25519",
        x25519,
        "pure-Python Montgomery ladder, ~1 ms per call: TLS 1.2 ECDHE over X25519, and any "
        "plain TLSConnection (FastTLSConnection keeps TLS 1.3 X25519 keys as objects)",
    ),
    Rebind(
        "tlslite.utils.cryptomath",
        "HKDF_expand_label",
        hkdf_expand_label,
        "the TLS 1.3 key schedule: 26 calls per handshake, 7 µs each (Writer, hmac objects)",
        everywhere=True,
    ),
    Rebind(
        "tlslite.utils.cryptomath",
        "derive_secret",
        derive_secret,
        "12 calls per handshake, each making a hash object to learn the digest size",
        everywhere=True,
    ),
)

#: tlslite modules that import the rebound names by name: loaded before the originals are
#: captured, so that install() finds and updates them.
_LOAD_FIRST: Final = (
    "tlslite.utils.cryptomath",
    "tlslite.utils.python_aesgcm",
    "tlslite.utils.python_chacha20_poly1305",
    "tlslite.mathtls",
    "tlslite.keyexchange",
    "tlslite.handshakehelpers",
    "tlslite.recordlayer",
    "tlslite.tlsrecordlayer",
    "tlslite.tlsconnection",
)
_ORIGINALS: dict[str, Callable[..., Any]] = {}
_lock = threading.Lock()
_done = False


def _capture() -> None:
    """Remember tlslite's originals (once, before anything is replaced)."""
    for name in _LOAD_FIRST:
        importlib.import_module(name)
    for rebind in REBINDS:
        if rebind.symbol not in _ORIGINALS:
            current = getattr(sys.modules[rebind.module], rebind.name)
            if current is not rebind.replacement:
                _ORIGINALS[rebind.symbol] = current


_capture()


def original(symbol: str) -> Callable[..., Any]:
    """tlslite's own function for ``symbol`` (``"module.name"`` of a :class:`Rebind`)."""
    return _ORIGINALS[symbol]


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return _done


def install() -> bool:
    """Rebind :data:`REBINDS` (thread-safe, idempotent); whether this call did it.

    Affects the whole process (every ``TLSConnection`` in it, client or server). Safe to
    call before or after ``fork``; a forked child inherits the rebinds.
    """
    global _done  # noqa: PLW0603 - one process-wide switch, guarded by _lock
    with _lock:
        if _done:
            return False
        for rebind in REBINDS:
            before = _ORIGINALS[rebind.symbol]
            setattr(sys.modules[rebind.module], rebind.name, rebind.replacement)
            if rebind.everywhere:
                for name, module in list(sys.modules.items()):
                    if (name == "tlslite" or name.startswith("tlslite.")) and (
                        getattr(module, rebind.name, None) is before
                    ):
                        setattr(module, rebind.name, rebind.replacement)
        _done = True
        return True
