"""tlslite-ng key objects whose private half stays on the key server.

The edge terminates TLS with tlslite-ng but never holds a service's private key. It passes
``handshakeServer(privateKey=remote_key(certificate, operator, sni=...))``: a subclass of
tlslite's own pure-Python key class built from the certificate's public key only, which reports
``hasPrivateKey() is True`` and forwards each private-key operation of the handshake to a
:class:`KeyOperator` (the key-server client) as one opcode of :mod:`.codes`:

* TLS 1.3 CertificateVerify and TLS 1.2 ServerKeyExchange with RSA: ``RemoteRSAKey.sign``
  → ``RSA_PSS_SIGN_SHA256/384/512`` (RSASSA-PSS, salt as long as the hash) or
  ``RSA_SIGN_*`` (PKCS#1 v1.5, TLS 1.2 only), the payload being the digest;
* the same with ECDSA: ``RemoteECDSAKey._sign`` → ``ECDSA_SIGN_*`` over the digest;
* the same with Ed25519: ``RemoteEd25519Key._hashAndSign`` → ``ED25519_SIGN`` over the whole
  signed content;
* TLS 1.2 static-RSA key exchange: ``RemoteRSAKey.decrypt`` (the high-level PKCS#1 v1.5
  decryption, not the raw RSA operation) → ``RSA_DECRYPT``, whose keybroker meaning includes
  the implicit rejection of a bad padding, done by the key server. So tlslite's own
  implicit-rejection secret (``_key_hash``, derived from ``d``) is neither needed nor present.

Every other path to a private operation raises :class:`~keybroker.errors.LocalProtocolError`
instead of computing: ``_rawPrivateKeyOp`` for RSA (so tlslite's own PKCS#1/PSS padding and its
implicit-rejection decrypt can never run), and the ECDSA stand-in for python-ecdsa's signing key
has no signing method at all. No object here holds a private number: ``d``, ``p``, ``q`` … of
the RSA class stay 0, the ECDSA ``private_key`` is a :class:`_CurveOnly` that carries the public
curve tlslite reads ``.curve.baselen`` from, and the Ed25519 ``private_key`` is ``None``.

**Checking the key server.** tlslite verifies every signature it made with the public key
before sending it; that check stays (done here with ``cryptography`` for ECDSA, Ed25519 and
RSA with a SHA-2 hash; tlslite's own Python for the rest: PKCS#1 v1.5 over SHA-1 or MD5‖SHA-1), so
a key server answering with garbage ends the handshake with an ``internal_error`` alert instead
of sending the client a bad signature.

**When the key server fails** (the operator raises :class:`KeyOperationFailed`), a signing
method logs the failure and returns an *empty* signature. tlslite turns that into a fatal
``internal_error`` alert in every version (TLS 1.3: its self-check fails; TLS 1.2: "Empty
signature"), whereas an exception escaping from ``sign`` would make tlslite drop the TCP
connection without any alert. ``decrypt`` returns ``None`` instead, which tlslite answers like
a bad padding (a random premaster secret), so the handshake fails at the client's Finished with
a ``bad_record_mac`` alert. Code that calls these methods outside tlslite must verify what they
return, as tlslite does. The operator itself sees every failure first-hand.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Protocol, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding
from tlslite.utils.cryptomath import (  # type: ignore[import-untyped,unused-ignore]
    bytesToNumber,
    numBytes,
)
from tlslite.utils.python_ecdsakey import (  # type: ignore[import-untyped,unused-ignore]
    Python_ECDSAKey,
)
from tlslite.utils.python_eddsakey import (  # type: ignore[import-untyped,unused-ignore]
    Python_EdDSAKey,
)
from tlslite.utils.python_rsakey import (  # type: ignore[import-untyped,unused-ignore]
    Python_RSAKey,
)
from tlslite.x509 import X509  # type: ignore[import-untyped,unused-ignore]
from tlslite.x509certchain import X509CertChain  # type: ignore[import-untyped,unused-ignore]

from keybroker.errors import ConfigurationError, LocalProtocolError, TransportError
from keybroker.flows.keyless.codes import (
    ECDSA_OPS,
    RSA_PKCS1_OPS,
    RSA_PSS_OPS,
    SIGN_HASH,
    ErrorCode,
    Op,
)

__all__ = [
    "KeyOperationFailed",
    "KeyOperator",
    "RemoteECDSAKey",
    "RemoteEd25519Key",
    "RemoteKey",
    "RemoteRSAKey",
    "certificate_chain",
    "remote_key",
]

_log = logging.getLogger("keybroker.keyless.tlskeys")


class KeyOperationFailed(TransportError):
    """The key server did not perform the operation: it refused, is unreachable or timed out.

    A :class:`~keybroker.errors.TransportError`, not a
    :class:`~keybroker.errors.CryptoError`: it reports the failure of an upstream service the
    edge depends on (answered like any bad gateway: alert the TLS client, try another key
    server, page someone), not a verdict on bytes the TLS peer sent. A ``CryptoError`` would
    make a key-server outage look like a client's bad input. ``code`` is the key server's
    :class:`~keybroker.flows.keyless.codes.ErrorCode` when it answered with one, else ``None``.
    """

    def __init__(
        self, message: str = "the key operation failed", *, code: ErrorCode | None = None
    ) -> None:
        super().__init__(message)
        self.code = code


class KeyOperator(Protocol):
    """Performs one private-key operation on the key server; the edge's key-server client.

    ``ski`` names the key (SHA-1 of the certificate's subjectPublicKey), ``payload`` is a digest
    for the ``*_SIGN_*`` opcodes, the whole message for ``ED25519_SIGN`` and the ciphertext for
    ``RSA_DECRYPT``; ``sni`` is the name the client asked for, if any. Returns the signature
    (DER for ECDSA) or the decrypted message; raises :class:`KeyOperationFailed` when the key
    server refuses, is down or times out. Called from tlslite's handshake, so it blocks one
    handshake (thread) for a round trip.
    """

    def operate(self, op: Op, ski: bytes, payload: bytes, *, sni: str | None) -> bytes: ...


def _ops_by_hash(ops: frozenset[Op]) -> dict[str, Op]:
    return {SIGN_HASH[op]: op for op in ops}


_PKCS1_OPS = _ops_by_hash(RSA_PKCS1_OPS)
_PSS_OPS = _ops_by_hash(RSA_PSS_OPS)
_ECDSA_OPS = _ops_by_hash(ECDSA_OPS)
_DIGEST_SIZE = {"md5sha1": 36, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64}
_HASH_BY_SIZE = {size: name for name, size in _DIGEST_SIZE.items() if name != "md5sha1"}
_SHA2 = frozenset({"sha224", "sha256", "sha384", "sha512"})
_PREHASHED: dict[int, hashes.HashAlgorithm] = {
    20: hashes.SHA1(),  # noqa: S303 — verifies the SHA-1 signatures TLS 1.2 still allows
    28: hashes.SHA224(),
    32: hashes.SHA256(),
    48: hashes.SHA384(),
    64: hashes.SHA512(),
}


class _Forwarder:
    """What the three key classes share: the SKI, the SNI, the operator, and forwarding."""

    _ski: bytes
    _sni: str | None
    _operator: KeyOperator

    @property
    def ski(self) -> bytes:
        """The key's SKI on the key server: SHA-1 of the certificate's subjectPublicKey."""
        return self._ski

    @property
    def sni(self) -> str | None:
        """The server name sent with every operation (the client's SNI), if any."""
        return self._sni

    def _forward(self, op: Op, payload: bytes | bytearray) -> bytearray | None:
        """The operator's answer, or ``None`` (logged) when the key server failed."""
        try:
            result = self._operator.operate(op, self._ski, bytes(payload), sni=self._sni)
        except KeyOperationFailed as exc:
            _log.warning(
                "keyless: %s for key %s (SNI %r) failed: %s",
                op.name,
                self._ski.hex(),
                self._sni,
                exc,
            )
            return None
        return bytearray(result)

    def _signature(self, op: Op, payload: bytes | bytearray) -> bytearray:
        # An empty signature on failure: see the module docstring for why not an exception.
        result = self._forward(op, payload)
        return bytearray() if result is None else result

    def __repr__(self) -> str:
        return f"<{type(self).__name__} ski={self._ski.hex()} sni={self._sni!r}>"


class RemoteRSAKey(_Forwarder, Python_RSAKey):  # type: ignore[misc]
    """An RSA key (``rsaEncryption`` or RSASSA-PSS) whose private operations run remotely."""

    def __init__(
        self,
        n: int,
        e: int,
        *,
        key_type: str,
        operator: KeyOperator,
        ski: bytes,
        sni: str | None,
    ) -> None:
        Python_RSAKey.__init__(self, n, e, key_type=key_type)
        self._public = rsa.RSAPublicNumbers(e, n).public_key()
        self._operator = operator
        self._ski = ski
        self._sni = sni

    def hasPrivateKey(self) -> bool:
        return True

    def sign(
        self,
        data: bytes | bytearray,
        padding: str = "pkcs1",
        hashAlg: str | None = None,
        saltLen: int | None = None,
    ) -> bytearray:
        """RSASSA-PSS or PKCS#1 v1.5 over the digest ``data`` (what tlslite's ``sign`` takes)."""
        return self._signature(*self._sign_op(data, padding, hashAlg, saltLen))

    def _sign_op(
        self, data: bytes | bytearray, padding: str, hash_alg: str | None, salt_len: int | None
    ) -> tuple[Op, bytes | bytearray]:
        padding = padding.lower()
        name = hash_alg.lower() if hash_alg is not None else None
        if padding == "pss":
            if name not in _PSS_OPS or salt_len != _DIGEST_SIZE[name]:
                raise LocalProtocolError(f"no keyless RSA-PSS with {name} and salt {salt_len}")
            op = _PSS_OPS[name]
        elif padding == "pkcs1":
            if self.key_type != "rsa":
                raise LocalProtocolError("an RSASSA-PSS key makes no PKCS#1 v1.5 signature")
            if name is None:
                # tlslite passes the DigestInfo already prefixed (TLS 1.2 CertificateVerify) or
                # the bare MD5||SHA-1 of TLS 1.0/1.1.
                name, data = _strip_digest_info(data)
            if name not in _PKCS1_OPS:
                raise LocalProtocolError(f"no keyless PKCS#1 v1.5 signature with {name}")
            op = _PKCS1_OPS[name]
        else:
            raise LocalProtocolError(f"no keyless RSA signature with padding {padding!r}")
        if len(data) != _DIGEST_SIZE[name]:
            raise LocalProtocolError(f"a {name} digest is {_DIGEST_SIZE[name]} bytes")
        return op, data

    def verify(
        self,
        sigBytes: bytes | bytearray,
        data: bytes | bytearray,
        padding: str = "pkcs1",
        hashAlg: str | None = None,
        saltLen: int | None = None,
    ) -> bool:
        """tlslite's ``verify`` (the self-check of every signature), with ``cryptography``.

        RSASSA-PSS with an exact salt length, and PKCS#1 v1.5 over a SHA-2 digest, are
        checked by OpenSSL; anything else (PKCS#1 v1.5 with SHA-1, whose encoding tlslite
        accepts with and without the NULL parameter, or a prefixed DigestInfo) by tlslite.
        """
        digest = data
        name = hashAlg.lower() if hashAlg is not None else None
        algorithm = _PREHASHED.get(len(digest)) if name in _SHA2 else None
        if algorithm is None or algorithm.name != name:
            return bool(Python_RSAKey.verify(self, sigBytes, digest, padding, hashAlg, saltLen))
        scheme: rsa_padding.AsymmetricPadding
        if padding == "pss" and saltLen is not None and saltLen >= 0:
            scheme = rsa_padding.PSS(rsa_padding.MGF1(algorithm), saltLen)
        elif padding == "pkcs1":
            if self.key_type == "rsa-pss":
                return False  # as tlslite: an RSASSA-PSS key makes no PKCS#1 v1.5 signature
            scheme = rsa_padding.PKCS1v15()
        else:
            return bool(Python_RSAKey.verify(self, sigBytes, digest, padding, hashAlg, saltLen))
        try:
            self._public.verify(bytes(sigBytes), bytes(digest), scheme, Prehashed(algorithm))
        except (InvalidSignature, ValueError):
            return False
        return True

    def decrypt(self, encBytes: bytes | bytearray) -> bytearray | None:
        """PKCS#1 v1.5 decryption with implicit rejection, done by the key server.

        ``None`` (tlslite then uses a random premaster secret) for a ciphertext that is publicly
        invalid (wrong length, not below the modulus), exactly as tlslite's own ``decrypt``, and
        when the key server failed. A bad padding is the key server's business: it answers with
        a deterministic pseudo-random message, never an error.
        """
        if self.key_type != "rsa":
            raise LocalProtocolError("an RSASSA-PSS key decrypts nothing")
        if len(encBytes) != numBytes(self.n) or bytesToNumber(bytearray(encBytes)) >= self.n:
            return None
        return self._forward(Op.RSA_DECRYPT, encBytes)

    def _rawPrivateKeyOp(self, message: int) -> int:
        raise LocalProtocolError("a remote RSA key performs no raw private-key operation")


class _CurveOnly:
    """Stands where python-ecdsa's ``SigningKey`` would: tlslite reads ``private_key.curve``.

    (``keyexchange`` truncates the TLS 1.2 digest to ``private_key.curve.baselen``.) It holds
    the public curve parameters and nothing else: no secret, no signing method.
    """

    __slots__ = ("curve",)

    def __init__(self, curve: object) -> None:
        self.curve = curve

    def __repr__(self) -> str:
        return "<remote ECDSA private key>"


class RemoteECDSAKey(_Forwarder, Python_ECDSAKey):  # type: ignore[misc]
    """An ECDSA key whose signatures are made remotely (DER-encoded, as TLS sends them)."""

    def __init__(
        self,
        public: ec.EllipticCurvePublicKey,
        curve_name: str,
        *,
        operator: KeyOperator,
        ski: bytes,
        sni: str | None,
    ) -> None:
        numbers = public.public_numbers()
        Python_ECDSAKey.__init__(self, numbers.x, numbers.y, curve_name)
        self.private_key = _CurveOnly(self.public_key.curve)
        self._baselen = int(self.public_key.curve.baselen)
        self._public = public
        self._operator = operator
        self._ski = ski
        self._sni = sni

    def hasPrivateKey(self) -> bool:
        return True

    def _sign(self, data: bytes | bytearray, hAlg: str) -> bytearray:
        """ECDSA over the digest ``data`` made with ``hAlg``.

        In TLS 1.2 tlslite truncates a digest longer than the curve (SHA-512 on P-256) to the
        curve's length before signing. ECDSA uses only that many leftmost bits of any digest, so
        the truncated digest is signed as the digest of its own length (``ECDSA_SIGN_SHA256``
        for 32 bytes): the same signature, which the client verifies against the full hash.
        """
        name = hAlg.lower()
        if len(data) < _DIGEST_SIZE.get(name, 0) and len(data) == self._baselen:
            name = _HASH_BY_SIZE.get(len(data), name)  # truncated by tlslite to the curve
        if name not in _ECDSA_OPS or _DIGEST_SIZE[name] != len(data):
            raise LocalProtocolError(f"no keyless ECDSA signature over {len(data)} bytes")
        return self._signature(_ECDSA_OPS[name], data)

    def _hashAndSign(self, data: bytes | bytearray, hAlg: str) -> bytearray:
        return self._sign(hashlib.new(hAlg.lower(), bytes(data)).digest(), hAlg)

    def _verify(self, signature: bytes | bytearray, hash_bytes: bytes | bytearray) -> bool:
        algorithm = _PREHASHED.get(len(hash_bytes))
        if algorithm is None:
            return bool(Python_ECDSAKey._verify(self, signature, hash_bytes))
        try:
            self._public.verify(bytes(signature), bytes(hash_bytes), ec.ECDSA(Prehashed(algorithm)))
        except (InvalidSignature, ValueError):
            return False
        return True


class RemoteEd25519Key(_Forwarder, Python_EdDSAKey):  # type: ignore[misc]
    """An Ed25519 key whose (pure EdDSA, whole-message) signatures are made remotely."""

    def __init__(
        self,
        public: ed25519.Ed25519PublicKey,
        verifying_key: object,
        *,
        operator: KeyOperator,
        ski: bytes,
        sni: str | None,
    ) -> None:
        Python_EdDSAKey.__init__(self, verifying_key)
        self._public = public
        self._operator = operator
        self._ski = ski
        self._sni = sni

    def hasPrivateKey(self) -> bool:
        return True

    def _hashAndSign(self, data: bytes | bytearray) -> bytearray:
        return self._signature(Op.ED25519_SIGN, data)

    def _hashAndVerify(self, signature: bytes | bytearray, data: bytes | bytearray) -> bool:
        try:
            self._public.verify(bytes(signature), bytes(data))
        except (InvalidSignature, ValueError):
            return False
        return True


RemoteKey: TypeAlias = RemoteRSAKey | RemoteECDSAKey | RemoteEd25519Key


def remote_key(
    certificate: x509.Certificate, operator: KeyOperator, *, sni: str | None
) -> RemoteKey:
    """The tlslite key for ``certificate`` whose private operations ``operator`` performs.

    The key server finds the key by its SKI, computed here from the certificate's public key
    (``x509.SubjectKeyIdentifier.from_public_key``), whatever the certificate's own SKI
    extension says. ``sni`` goes with every operation. Supports RSA (``rsaEncryption`` and
    RSASSA-PSS), ECDSA on the curves tlslite knows, and Ed25519; anything else raises
    :class:`~keybroker.errors.ConfigurationError`.
    """
    public = certificate.public_key()
    if not isinstance(
        public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    ):
        raise ConfigurationError(
            f"keyless TLS cannot serve a certificate with a {type(public).__name__}"
        )
    ski = x509.SubjectKeyIdentifier.from_public_key(public).digest
    # tlslite's own view of the key (key type, curve name), as it will send it in Certificate.
    parsed = X509()
    try:
        parsed.parseBinary(bytearray(certificate.public_bytes(Encoding.DER)))
    except (SyntaxError, ValueError, IndexError) as exc:  # tlslite's parser and python-ecdsa's
        raise ConfigurationError(f"tlslite cannot read the certificate: {exc}") from exc
    seen = parsed.publicKey
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return RemoteRSAKey(
            numbers.n, numbers.e, key_type=seen.key_type, operator=operator, ski=ski, sni=sni
        )
    if isinstance(public, ec.EllipticCurvePublicKey):
        return RemoteECDSAKey(public, seen.curve_name, operator=operator, ski=ski, sni=sni)
    return RemoteEd25519Key(public, seen.public_key, operator=operator, ski=ski, sni=sni)


def certificate_chain(pem: bytes) -> X509CertChain:
    """tlslite's chain from PEM certificates, leaf first; ``ConfigurationError`` if unreadable."""
    chain = X509CertChain()
    try:
        chain.parsePemList(pem.decode("ascii"))
    except Exception as exc:  # UnicodeDecodeError, tlslite's SyntaxError and friends
        raise ConfigurationError(f"not a PEM certificate chain: {type(exc).__name__}") from exc
    if not chain.getNumCerts():
        raise ConfigurationError("the PEM holds no certificate")
    return chain


def _strip_digest_info(data: bytes | bytearray) -> tuple[str, bytes | bytearray]:
    """The hash name and digest inside a PKCS#1 DigestInfo (or a bare MD5||SHA-1)."""
    if len(data) == _DIGEST_SIZE["md5sha1"]:
        return "md5sha1", data
    for name, prefix in Python_RSAKey._pkcs1Prefixes.items():
        if name in _PKCS1_OPS and bytes(data).startswith(bytes(prefix)):
            return name, data[len(prefix) :]
    raise LocalProtocolError("no keyless PKCS#1 v1.5 signature over that DigestInfo")
