"""Key operations on in-process keys: every opcode on every key type, verified with cryptography."""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import pickle
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
from asn1crypto.keys import PublicKeyInfo
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa, utils

from keybroker.errors import ConfigurationError, ProtocolError
from keybroker.flows.keyless import operations
from keybroker.flows.keyless.codes import (
    ECDSA_OPS,
    KEY_OPS,
    RSA_PKCS1_OPS,
    RSA_PSS_OPS,
    SIGN_HASH,
    ErrorCode,
    Op,
)
from keybroker.flows.keyless.operations import (
    KeyOperationError,
    LocalKeyStore,
    init_worker,
    perform,
    ski_of,
    worker_perform,
)

MESSAGE = b"TLS 1.3, server CertificateVerify" + bytes(range(64))

HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
MD5SHA1_OPS = frozenset(op for op, name in SIGN_HASH.items() if name == "md5sha1")

# What each kind of key must answer, from codes.py's groups (not from operations.py).
KINDS = ("rsa", "p256", "p384", "ed25519")
SIGN_OPS: dict[str, frozenset[Op]] = {
    "rsa": (RSA_PKCS1_OPS | RSA_PSS_OPS) - MD5SHA1_OPS,
    "p256": ECDSA_OPS - MD5SHA1_OPS,
    "p384": ECDSA_OPS - MD5SHA1_OPS,
    "ed25519": frozenset({Op.ED25519_SIGN}),
}
ALLOWED: dict[str, frozenset[Op]] = {**SIGN_OPS, "rsa": SIGN_OPS["rsa"] | {Op.RSA_DECRYPT}}
SIGN_CASES = [(kind, op) for kind in KINDS for op in sorted(SIGN_OPS[kind])]
MISMATCHED_CASES = [
    (kind, op) for kind in KINDS for op in sorted(KEY_OPS - MD5SHA1_OPS - ALLOWED[kind])
]
DIGEST_OPS = sorted(op for op in SIGN_HASH if op not in MD5SHA1_OPS)


@functools.cache
def make_keys() -> dict[str, Any]:
    """One key of each kind, shared by the keyless tests of this process."""
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


def payload_for(op: Op, message: bytes = MESSAGE) -> bytes:
    """What the edge sends: the message for Ed25519, its digest for every other sign op."""
    if op is Op.ED25519_SIGN:
        return message
    digest = hashes.Hash(HASHES[SIGN_HASH[op]]())
    digest.update(message)
    return digest.finalize()


def verify(public_key: Any, op: Op, signature: bytes, message: bytes = MESSAGE) -> None:
    """Check ``signature`` over the *message* with cryptography, as a TLS client would.

    Verifying the message (not the digest) checks that the payload was taken
    as a digest of the right hash; the PSS salt length is checked exactly.
    """
    if op is Op.ED25519_SIGN:
        public_key.verify(signature, message)
        return
    algorithm = HASHES[SIGN_HASH[op]]()
    if op in ECDSA_OPS:
        public_key.verify(signature, message, ec.ECDSA(algorithm))
    elif op in RSA_PSS_OPS:
        pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
        public_key.verify(signature, message, pss, algorithm)
    else:
        public_key.verify(signature, message, padding.PKCS1v15(), algorithm)


def secrets_of(key: Any) -> list[str]:
    """Spellings of a private key that must never appear in a repr or a message."""
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    spellings = [der.hex(), der[-32:].hex(), repr(der[-32:])]
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        for value in (numbers.d, numbers.p, numbers.q):
            spellings += [str(value), f"{value:x}"]
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        value = key.private_numbers().private_value
        spellings += [str(value), f"{value:x}"]
    else:
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        spellings += [raw.hex(), repr(raw)]
    return spellings


def assert_no_secrets(text: str, key: Any) -> None:
    for spelling in secrets_of(key):
        assert spelling not in text


def error_of(fn: Any, *args: Any) -> KeyOperationError:
    with pytest.raises(KeyOperationError) as info:
        fn(*args)
    return info.value


def test_case_tables_are_complete() -> None:
    # Guards the parametrisations below against a silently empty or partial table.
    assert len(SIGN_CASES) == 8 + 5 + 5 + 1
    assert {op for _, op in SIGN_CASES} | {Op.RSA_DECRYPT} | MD5SHA1_OPS == KEY_OPS
    assert len(MISMATCHED_CASES) == 6 + 10 + 10 + 14


# ---------------------------------------------------------------------------
# Signing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "op"), SIGN_CASES, ids=[f"{k}-{o.name}" for k, o in SIGN_CASES])
def test_sign_verifies(kind: str, op: Op) -> None:
    key = make_keys()[kind]
    store = LocalKeyStore([key])
    ski = ski_of(key.public_key())
    signature = store.perform(ski, op, payload_for(op))
    verify(key.public_key(), op, signature)
    # The free function does the same.
    verify(key.public_key(), op, perform(key, op, payload_for(op)))
    with pytest.raises(InvalidSignature):
        verify(key.public_key(), op, signature, MESSAGE + b"!")


@pytest.mark.parametrize("op", sorted(RSA_PSS_OPS), ids=lambda op: op.name)
def test_pss_salt_is_as_long_as_the_digest(op: Op) -> None:
    key = make_keys()["rsa"]
    signature = perform(key, op, payload_for(op))
    algorithm = HASHES[SIGN_HASH[op]]()
    for salt_length in (0, algorithm.digest_size - 1, algorithm.digest_size + 1):
        pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=salt_length)
        with pytest.raises(InvalidSignature):
            key.public_key().verify(signature, MESSAGE, pss, algorithm)
    # The MGF uses the same hash as the signature.
    other = hashes.SHA1()
    pss = padding.PSS(mgf=padding.MGF1(other), salt_length=algorithm.digest_size)
    with pytest.raises(InvalidSignature):
        key.public_key().verify(signature, MESSAGE, pss, algorithm)


@pytest.mark.parametrize("kind", ["p256", "p384"])
def test_ecdsa_signature_is_der(kind: str) -> None:
    key = make_keys()[kind]
    signature = perform(key, Op.ECDSA_SIGN_SHA256, payload_for(Op.ECDSA_SIGN_SHA256))
    r, s = utils.decode_dss_signature(signature)
    assert utils.encode_dss_signature(r, s) == signature
    assert signature[0] == 0x30


def test_ed25519_signs_the_whole_message() -> None:
    key = make_keys()["ed25519"]
    for message in (b"", b"x", os.urandom(5000)):
        signature = perform(key, Op.ED25519_SIGN, message)
        key.public_key().verify(signature, message)
    # A digest is just another message: it does not verify as the original.
    signature = perform(key, Op.ED25519_SIGN, hashlib.sha512(MESSAGE).digest())
    with pytest.raises(InvalidSignature):
        key.public_key().verify(signature, MESSAGE)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "code"),
    [
        *[(op, ErrorCode.BAD_OPCODE) for op in sorted(MD5SHA1_OPS)],
        (0x00, ErrorCode.BAD_OPCODE),
        (0x99, ErrorCode.BAD_OPCODE),
        (0x1234, ErrorCode.BAD_OPCODE),
        (Op.PING, ErrorCode.UNEXPECTED_OPCODE),
        (Op.PONG, ErrorCode.UNEXPECTED_OPCODE),
        (Op.RESPONSE, ErrorCode.UNEXPECTED_OPCODE),
        (Op.ERROR, ErrorCode.UNEXPECTED_OPCODE),
    ],
    ids=str,
)
@pytest.mark.parametrize("kind", KINDS)
def test_opcode_that_is_no_supported_key_operation(kind: str, op: int, code: ErrorCode) -> None:
    key = make_keys()[kind]
    store = LocalKeyStore([key])
    payload = bytes(36)  # an MD5-SHA1 digest's length: not a FORMAT error
    assert error_of(perform, key, op, payload).code is code
    assert error_of(store.perform, ski_of(key.public_key()), op, payload).code is code
    # The opcode is judged before the key is looked up.
    assert error_of(store.perform, bytes(20), op, payload).code is code


@pytest.mark.parametrize(
    ("kind", "op"), MISMATCHED_CASES, ids=[f"{k}-{o.name}" for k, o in MISMATCHED_CASES]
)
def test_op_that_does_not_fit_the_key_is_unexpected_opcode(kind: str, op: Op) -> None:
    key = make_keys()[kind]
    store = LocalKeyStore([key])
    payload = payload_for(op) if op in SIGN_HASH or op is Op.ED25519_SIGN else bytes(256)
    err = error_of(store.perform, ski_of(key.public_key()), op, payload)
    assert err.code is ErrorCode.UNEXPECTED_OPCODE
    assert op.name in str(err)


@pytest.mark.parametrize(
    "key",
    [
        ed448.Ed448PrivateKey.generate(),
        dsa.generate_private_key(2048),
    ],
    ids=["ed448", "dsa"],
)
def test_key_types_keyless_does_not_serve(key: Any) -> None:
    for op in (Op.ED25519_SIGN, Op.RSA_SIGN_SHA256, Op.ECDSA_SIGN_SHA256):
        assert error_of(perform, key, op, payload_for(op)).code is ErrorCode.UNEXPECTED_OPCODE
    with pytest.raises(ConfigurationError, match=type(key).__name__):
        LocalKeyStore().add(key)


@pytest.mark.parametrize("op", DIGEST_OPS, ids=lambda op: op.name)
def test_wrong_digest_length_is_format(op: Op) -> None:
    kind = "rsa" if op in RSA_PKCS1_OPS | RSA_PSS_OPS else "p256"
    key = make_keys()[kind]
    good = payload_for(op)
    for bad in (b"", good[:-1], good + b"\x00", MESSAGE):
        err = error_of(perform, key, op, bad)
        assert err.code is ErrorCode.FORMAT
        assert str(len(good)) in str(err)
        assert bad.hex() not in str(err) or not bad


def test_crypto_failure_is_crypto() -> None:
    # RSA-PSS with SHA-512 and a 64-byte salt does not fit a 1024-bit modulus.
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    err = error_of(perform, small, Op.RSA_PSS_SIGN_SHA512, payload_for(Op.RSA_PSS_SIGN_SHA512))
    assert err.code is ErrorCode.CRYPTO
    # The same key signs with SHA-256, so it was the size, not the key.
    verify(
        small.public_key(),
        Op.RSA_PSS_SIGN_SHA256,
        perform(small, Op.RSA_PSS_SIGN_SHA256, payload_for(Op.RSA_PSS_SIGN_SHA256)),
    )


def test_unknown_ski_is_key_not_found() -> None:
    keys = make_keys()
    store = LocalKeyStore([keys["p256"]])
    for ski in (ski_of(keys["rsa"].public_key()), bytes(20), b"", b"\x01" * 32):
        err = error_of(store.perform, ski, Op.ECDSA_SIGN_SHA256, payload_for(Op.ECDSA_SIGN_SHA256))
        assert err.code is ErrorCode.KEY_NOT_FOUND


def test_key_operation_error_is_a_protocol_error_and_pickles() -> None:
    err = error_of(perform, make_keys()["p256"], Op.RSA_SIGN_SHA256, bytes(32))
    assert isinstance(err, ProtocolError)
    assert err.code == ErrorCode.UNEXPECTED_OPCODE
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is KeyOperationError
    assert copy.code is ErrorCode.UNEXPECTED_OPCODE
    assert str(copy) == str(err)
    assert "UNEXPECTED_OPCODE" in repr(err)


# ---------------------------------------------------------------------------
# RSA_DECRYPT
# ---------------------------------------------------------------------------


def test_rsa_decrypt_round_trip() -> None:
    key = make_keys()["rsa"]
    for plaintext in (os.urandom(48), b"", b"\x00\x03premaster"):
        ciphertext = key.public_key().encrypt(plaintext, padding.PKCS1v15())
        assert perform(key, Op.RSA_DECRYPT, ciphertext) == plaintext


def test_rsa_decrypt_bad_padding_is_implicitly_rejected() -> None:
    key = make_keys()["rsa"]
    good = key.public_key().encrypt(os.urandom(48), padding.PKCS1v15())
    # Below the modulus (top byte zero), so only the padding can be wrong.
    bad_ciphertexts = [b"\x00" + os.urandom(255) for _ in range(3)]
    bad_ciphertexts.append(good[:-1] + bytes([good[-1] ^ 1]))
    results = []
    for ciphertext in bad_ciphertexts:
        first = perform(key, Op.RSA_DECRYPT, ciphertext)
        assert isinstance(first, bytes)
        assert perform(key, Op.RSA_DECRYPT, ciphertext) == first  # deterministic
        results.append(first)
    assert len(set(results)) == len(results)  # and different for different inputs
    assert operations._implicit_rejection is True


def test_rsa_decrypt_refused_without_implicit_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    key = make_keys()["rsa"]
    ciphertext = key.public_key().encrypt(b"m", padding.PKCS1v15())
    monkeypatch.setattr(operations, "_implicit_rejection", False)
    assert error_of(perform, key, Op.RSA_DECRYPT, ciphertext).code is ErrorCode.NOT_AUTHORIZED


def test_rsa_decrypt_probe_detects_a_library_that_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    class OldOpenSSL:
        key_size = 2048

        def decrypt(self, ciphertext: bytes, pad: Any) -> bytes:
            raise ValueError("Decryption failed")

    monkeypatch.setattr(operations, "_implicit_rejection", None)
    assert operations._has_implicit_rejection(OldOpenSSL()) is False  # type: ignore[arg-type]
    monkeypatch.setattr(operations, "_implicit_rejection", None)
    assert operations._has_implicit_rejection(make_keys()["rsa"]) is True


def test_rsa_decrypt_format_and_crypto() -> None:
    key = make_keys()["rsa"]
    for wrong_length in (b"", bytes(255), bytes(257)):
        assert error_of(perform, key, Op.RSA_DECRYPT, wrong_length).code is ErrorCode.FORMAT
    # At or above the modulus: anyone can tell with the public key, so no oracle.
    assert error_of(perform, key, Op.RSA_DECRYPT, b"\xff" * 256).code is ErrorCode.CRYPTO


# ---------------------------------------------------------------------------
# SKI and the store
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_ski_is_rfc5280_method_1(kind: str) -> None:
    public = make_keys()[kind].public_key()
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # asn1crypto's own reading of method 1: SHA-1 of the subjectPublicKey bits.
    assert ski_of(public) == PublicKeyInfo.load(spki).sha1
    assert len(ski_of(public)) == 20


def test_store_add_skis_and_lookup() -> None:
    keys = make_keys()
    store = LocalKeyStore()
    assert len(store) == 0
    skis = [store.add(keys[kind]) for kind in KINDS]
    assert skis == [ski_of(keys[kind].public_key()) for kind in KINDS]
    assert store.skis() == sorted(skis)
    assert all(ski in store for ski in skis)
    assert bytes(20) not in store
    assert len(store) == 4
    assert store.add(keys["rsa"]) == skis[0]  # adding again changes nothing
    assert len(store) == 4


def test_store_repr_and_errors_hold_no_key_bytes() -> None:
    keys = make_keys()
    store = LocalKeyStore(keys.values())
    text = repr(store) + str(store)
    for kind in KINDS:
        assert ski_of(keys[kind].public_key()).hex() in text
        assert_no_secrets(text, keys[kind])
    assert "rsa-2048" in text
    assert "ec-secp384r1" in text
    assert "ed25519" in text
    payload = b"\x5a\xa5" * 20  # a distinctive payload of a wrong length
    for kind in KINDS:
        for op in (Op.RSA_SIGN_SHA256, Op.ECDSA_SIGN_SHA384, Op.RSA_DECRYPT, Op.ED25519_SIGN):
            try:
                store.perform(ski_of(keys[kind].public_key()), op, payload)
            except KeyOperationError as err:
                text = str(err) + repr(err)
                assert payload.hex() not in text
                assert repr(payload)[2:20] not in text
                assert_no_secrets(text, keys[kind])
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(store)


def test_from_pkcs8_checks_the_ski() -> None:
    keys = make_keys()
    ders = {
        ski_of(key.public_key()): key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for key in keys.values()
    }
    store = LocalKeyStore.from_pkcs8(ders)
    assert store.skis() == sorted(ders)
    p256 = ski_of(keys["p256"].public_key())
    verify(
        keys["p256"].public_key(),
        Op.ECDSA_SIGN_SHA256,
        store.perform(p256, Op.ECDSA_SIGN_SHA256, payload_for(Op.ECDSA_SIGN_SHA256)),
    )
    with pytest.raises(ConfigurationError, match="does not have that SKI") as info:
        LocalKeyStore.from_pkcs8({bytes(20): ders[p256]})
    assert ders[p256].hex() not in str(info.value)
    with pytest.raises(ConfigurationError, match="not an unencrypted PKCS#8"):
        LocalKeyStore.from_pkcs8({p256: b"\x30\x03\x02\x01\x00"})
    dsa_der = dsa.generate_private_key(2048).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigurationError, match="type keyless does not serve"):
        LocalKeyStore.from_pkcs8({bytes(20): dsa_der})


def test_store_shared_between_threads() -> None:
    keys = make_keys()
    store = LocalKeyStore(keys.values())
    failures: list[BaseException] = []

    def work(kind: str) -> None:
        try:
            for op in sorted(SIGN_OPS[kind]) * 3:
                signature = store.perform(ski_of(keys[kind].public_key()), op, payload_for(op))
                verify(keys[kind].public_key(), op, signature)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(kind,)) for kind in KINDS * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# ---------------------------------------------------------------------------
# Process pool
# ---------------------------------------------------------------------------


def test_worker_perform_without_init_is_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operations, "_worker_store", None)
    err = error_of(worker_perform, bytes(20), Op.ECDSA_SIGN_SHA256, bytes(32))
    assert err.code is ErrorCode.INTERNAL


def test_process_pool_with_init_worker() -> None:
    keys = make_keys()
    ders = {
        ski_of(key.public_key()): key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for key in keys.values()
    }
    # spawn: nothing is inherited, so the keys reach the workers only through initargs.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        2, mp_context=context, initializer=init_worker, initargs=(ders,)
    ) as pool:
        jobs = [
            (
                kind,
                op,
                pool.submit(worker_perform, ski_of(keys[kind].public_key()), op, payload_for(op)),
            )
            for kind, op in SIGN_CASES
        ]
        for kind, op, job in jobs:
            verify(keys[kind].public_key(), op, job.result())
        missing = pool.submit(worker_perform, bytes(20), Op.ECDSA_SIGN_SHA256, bytes(32))
        with pytest.raises(KeyOperationError) as info:
            missing.result()
        assert info.value.code is ErrorCode.KEY_NOT_FOUND
        wrong = pool.submit(worker_perform, ski_of(keys["rsa"].public_key()), Op.ED25519_SIGN, b"m")
        with pytest.raises(KeyOperationError) as info:
            wrong.result()
        assert info.value.code is ErrorCode.UNEXPECTED_OPCODE


def test_every_keyless_error_is_constructible_from_its_message_alone() -> None:
    # The HTTP client builds each class of the error tree from a message alone to map
    # problem types back to classes; a keyless error must not break that.
    import importlib

    from keybroker.flows.keyless.tlskeys import KeyOperationFailed

    http = importlib.reload(importlib.import_module("keybroker.client._http"))
    for cls in (KeyOperationError, KeyOperationFailed):
        error = cls("refused")
        assert str(error) == "refused"
        assert issubclass(cls, http._PROBLEMS[error.type_uri])
