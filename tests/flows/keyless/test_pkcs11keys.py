"""Key operations on keys inside a PKCS#11 token (SoftHSM2), verified with cryptography."""

# python-pkcs11 is optional: the tests that need it get it through the
# ``hsm`` fixture, which fails under CI=true and skips otherwise when it is missing.

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from tests.flows.keyless.softhsm import USER_PIN, SoftHSM, start_softhsm
from tests.flows.keyless.test_operations import (
    HASHES,
    KINDS,
    MD5SHA1_OPS,
    MISMATCHED_CASES,
    SIGN_CASES,
    SIGN_OPS,
    assert_no_secrets,
    make_keys,
    payload_for,
    verify,
)

from keybroker.errors import ConfigurationError
from keybroker.flows.keyless.codes import RSA_PKCS1_OPS, SIGN_HASH, ErrorCode, Op
from keybroker.flows.keyless.operations import KeyOperationError, ski_of
from keybroker.flows.keyless.pkcs11keys import (
    DIGEST_INFO_PREFIX,
    Pkcs11KeyStore,
    import_private_key,
)

TOKEN = "kl-keys"  # shared by the module's store; tests add keys with fresh SKIs
TOKEN_DUP = "kl-dup"  # two keys with one CKA_ID
TOKEN_PIN = "kl-pin"  # wrong-PIN attempts only, so no login is shared with them


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHSM:
    return start_softhsm(tmp_path_factory.mktemp("keyless-softhsm"), (TOKEN, TOKEN_DUP, TOKEN_PIN))


@pytest.fixture(scope="module")
def keys(hsm: SoftHSM) -> dict[str, Any]:
    """make_keys()'s keys, imported into TOKEN once."""
    made = make_keys()
    for key in made.values():
        assert import_private_key(hsm.module, TOKEN, USER_PIN, key) == ski_of(key.public_key())
    return made


@pytest.fixture(scope="module")
def store(hsm: SoftHSM, keys: dict[str, Any]) -> Iterator[Pkcs11KeyStore]:
    with Pkcs11KeyStore(hsm.module, TOKEN, USER_PIN) as opened:
        yield opened


def error_of(fn: Any, *args: Any) -> KeyOperationError:
    with pytest.raises(KeyOperationError) as info:
        fn(*args)
    return info.value


# ---------------------------------------------------------------------------
# The DigestInfo table (no token needed)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HASHES))
def test_digest_info_prefix_is_what_cryptography_signs(name: str) -> None:
    key = make_keys()["rsa"]
    algorithm = HASHES[name]()
    digest = os.urandom(algorithm.digest_size)
    signature = key.sign(digest, padding.PKCS1v15(), utils.Prehashed(algorithm))
    # With no algorithm, cryptography hands back the whole encoded DigestInfo.
    recovered = key.public_key().recover_data_from_signature(signature, padding.PKCS1v15(), None)
    assert recovered == DIGEST_INFO_PREFIX[name] + digest


def test_digest_info_table_covers_every_rsa_hash() -> None:
    assert {SIGN_HASH[op] for op in RSA_PKCS1_OPS - MD5SHA1_OPS} == set(DIGEST_INFO_PREFIX)


# ---------------------------------------------------------------------------
# Signing in the token
# ---------------------------------------------------------------------------


@pytest.mark.hsm
def test_store_finds_every_imported_key(store: Pkcs11KeyStore, keys: dict[str, Any]) -> None:
    for kind in KINDS:
        assert ski_of(keys[kind].public_key()) in store
    assert len(store) >= len(KINDS)


@pytest.mark.hsm
@pytest.mark.parametrize(("kind", "op"), SIGN_CASES, ids=[f"{k}-{o.name}" for k, o in SIGN_CASES])
def test_sign_verifies(store: Pkcs11KeyStore, keys: dict[str, Any], kind: str, op: Op) -> None:
    key = keys[kind]
    signature = store.perform(ski_of(key.public_key()), op, payload_for(op))
    verify(key.public_key(), op, signature)
    with pytest.raises(InvalidSignature):
        verify(key.public_key(), op, signature, b"another message")


@pytest.mark.hsm
def test_softhsm_does_ed25519(store: Pkcs11KeyStore, keys: dict[str, Any]) -> None:
    key = keys["ed25519"]
    for message in (b"", os.urandom(3000)):
        signature = store.perform(ski_of(key.public_key()), Op.ED25519_SIGN, message)
        assert len(signature) == 64
        key.public_key().verify(signature, message)
        # Ed25519 is deterministic: the token and cryptography agree bit for bit.
        assert signature == key.sign(message)


@pytest.mark.hsm
def test_ecdsa_signature_is_der(store: Pkcs11KeyStore, keys: dict[str, Any]) -> None:
    for kind in ("p256", "p384"):
        signature = store.perform(
            ski_of(keys[kind].public_key()),
            Op.ECDSA_SIGN_SHA384,
            payload_for(Op.ECDSA_SIGN_SHA384),
        )
        r, s = utils.decode_dss_signature(signature)
        assert utils.encode_dss_signature(r, s) == signature


@pytest.mark.hsm
def test_rsa_pkcs1_matches_cryptography(store: Pkcs11KeyStore, keys: dict[str, Any]) -> None:
    # PKCS#1 v1.5 signatures are deterministic: the DigestInfo must be byte-exact.
    key = keys["rsa"]
    for op in sorted(SIGN_OPS["rsa"] & RSA_PKCS1_OPS):
        digest = payload_for(op)
        expected = key.sign(digest, padding.PKCS1v15(), utils.Prehashed(HASHES[SIGN_HASH[op]]()))
        assert store.perform(ski_of(key.public_key()), op, digest) == expected


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.hsm
def test_rsa_decrypt_is_not_authorized(store: Pkcs11KeyStore, keys: dict[str, Any]) -> None:
    key = keys["rsa"]
    ciphertext = key.public_key().encrypt(b"premaster", padding.PKCS1v15())
    err = error_of(store.perform, ski_of(key.public_key()), Op.RSA_DECRYPT, ciphertext)
    assert err.code is ErrorCode.NOT_AUTHORIZED
    assert "padding oracle" in str(err)


@pytest.mark.hsm
@pytest.mark.parametrize(
    ("kind", "op"), MISMATCHED_CASES, ids=[f"{k}-{o.name}" for k, o in MISMATCHED_CASES]
)
def test_op_that_does_not_fit_the_key_is_unexpected_opcode(
    store: Pkcs11KeyStore, keys: dict[str, Any], kind: str, op: Op
) -> None:
    payload = payload_for(op) if op in SIGN_HASH or op is Op.ED25519_SIGN else bytes(256)
    err = error_of(store.perform, ski_of(keys[kind].public_key()), op, payload)
    assert err.code is ErrorCode.UNEXPECTED_OPCODE


@pytest.mark.hsm
def test_bad_opcode_format_and_key_not_found(store: Pkcs11KeyStore, keys: dict[str, Any]) -> None:
    rsa_ski = ski_of(keys["rsa"].public_key())
    p256_ski = ski_of(keys["p256"].public_key())
    for op in (*sorted(MD5SHA1_OPS), 0x99):
        assert error_of(store.perform, rsa_ski, op, bytes(36)).code is ErrorCode.BAD_OPCODE
        assert error_of(store.perform, bytes(20), op, bytes(36)).code is ErrorCode.BAD_OPCODE
    for op in (Op.PING, Op.RESPONSE):
        assert error_of(store.perform, rsa_ski, op, b"").code is ErrorCode.UNEXPECTED_OPCODE
    for ski, op in ((rsa_ski, Op.RSA_SIGN_SHA256), (rsa_ski, Op.RSA_PSS_SIGN_SHA384)):
        good = payload_for(op)
        for bad in (b"", good[:-1], good + b"\x00"):
            assert error_of(store.perform, ski, op, bad).code is ErrorCode.FORMAT
    good = payload_for(Op.ECDSA_SIGN_SHA256)
    assert error_of(store.perform, p256_ski, Op.ECDSA_SIGN_SHA256, good[:-1]).code is (
        ErrorCode.FORMAT
    )
    for ski in (bytes(20), b"", ski_of(ec.generate_private_key(ec.SECP256R1()).public_key())):
        err = error_of(store.perform, ski, Op.ECDSA_SIGN_SHA256, good)
        assert err.code is ErrorCode.KEY_NOT_FOUND


@pytest.mark.hsm
def test_token_failure_is_crypto(hsm: SoftHSM, store: Pkcs11KeyStore) -> None:
    # RSA-PSS with SHA-512 and a 64-byte salt does not fit a 1024-bit modulus.
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    ski = import_private_key(hsm.module, TOKEN, USER_PIN, small)
    store.reload()
    op = Op.RSA_PSS_SIGN_SHA512
    assert error_of(store.perform, ski, op, payload_for(op)).code is ErrorCode.CRYPTO
    # The key itself works.
    op = Op.RSA_PSS_SIGN_SHA256
    verify(small.public_key(), op, store.perform(ski, op, payload_for(op)))


# ---------------------------------------------------------------------------
# The store: handles, secrets, threads, lifecycle
# ---------------------------------------------------------------------------


class CountingSession:
    """Forwards to a python-pkcs11 session, counting object searches."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.searches = 0

    def get_objects(self, *args: Any, **kwargs: Any) -> Any:
        self.searches += 1
        return self._session.get_objects(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


@pytest.mark.hsm
def test_handles_are_cached(
    store: Pkcs11KeyStore, keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    login = store._login
    assert login is not None
    counting = CountingSession(login.session)
    monkeypatch.setattr(login, "session", counting)
    for kind, op in SIGN_CASES:
        verify(
            keys[kind].public_key(),
            op,
            store.perform(ski_of(keys[kind].public_key()), op, payload_for(op)),
        )
    assert counting.searches == 0
    store.reload()  # the one place that searches (and it does go through the counter)
    assert counting.searches == 1


@pytest.mark.hsm
def test_new_key_is_found_on_reload(hsm: SoftHSM, store: Pkcs11KeyStore) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ski = import_private_key(hsm.module, TOKEN, USER_PIN, key, label="kl-reload")
    op = Op.ECDSA_SIGN_SHA256
    assert ski not in store
    assert error_of(store.perform, ski, op, payload_for(op)).code is ErrorCode.KEY_NOT_FOUND
    store.reload()
    assert ski in store
    verify(key.public_key(), op, store.perform(ski, op, payload_for(op)))


@pytest.mark.hsm
def test_imported_key_is_sensitive_and_refused_twice(
    hsm: SoftHSM, store: Pkcs11KeyStore, keys: dict[str, Any]
) -> None:
    from pkcs11 import Attribute
    from pkcs11.exceptions import AttributeSensitive

    entry = store._entries[ski_of(keys["rsa"].public_key())]
    assert entry.key[Attribute.SENSITIVE] is True
    assert entry.key[Attribute.EXTRACTABLE] is False
    assert entry.key[Attribute.DECRYPT] is False
    assert entry.key[Attribute.TOKEN] is True
    with pytest.raises(AttributeSensitive):
        entry.key[Attribute.PRIVATE_EXPONENT]
    with pytest.raises(ConfigurationError, match="already in"):
        import_private_key(hsm.module, TOKEN, USER_PIN, keys["rsa"])
    with pytest.raises(ConfigurationError, match="keyless serves"):
        import_private_key(hsm.module, TOKEN, USER_PIN, object())  # type: ignore[arg-type]


@pytest.mark.hsm
def test_repr_and_errors_hold_no_key_bytes(store: Pkcs11KeyStore, keys: dict[str, Any]) -> None:
    text = repr(store) + str(store)
    assert TOKEN in text
    for kind in KINDS:
        assert ski_of(keys[kind].public_key()).hex() in text
        assert_no_secrets(text, keys[kind])
    assert USER_PIN not in text
    payload = b"\x5a\xa5" * 20
    for kind in KINDS:
        for op in (Op.RSA_SIGN_SHA256, Op.ECDSA_SIGN_SHA384, Op.RSA_DECRYPT, Op.ED25519_SIGN):
            try:
                store.perform(ski_of(keys[kind].public_key()), op, payload)
            except KeyOperationError as err:
                message = str(err) + repr(err)
                assert payload.hex() not in message
                assert_no_secrets(message, keys[kind])
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(store)


@pytest.mark.hsm
def test_threads_share_the_store(store: Pkcs11KeyStore, keys: dict[str, Any]) -> None:
    failures: list[BaseException] = []
    done = [0]
    count_lock = threading.Lock()
    start = threading.Barrier(8)

    def work(offset: int) -> None:
        try:
            start.wait()
            for i in range(len(SIGN_CASES)):
                kind, op = SIGN_CASES[(i + offset) % len(SIGN_CASES)]
                message = os.urandom(40)
                signature = store.perform(
                    ski_of(keys[kind].public_key()), op, payload_for(op, message)
                )
                verify(keys[kind].public_key(), op, signature, message)
                with count_lock:
                    done[0] += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n * 3,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert done[0] == 8 * len(SIGN_CASES)


@pytest.mark.hsm
def test_close_and_context_manager(hsm: SoftHSM, keys: dict[str, Any]) -> None:
    ski = ski_of(keys["p256"].public_key())
    op = Op.ECDSA_SIGN_SHA256
    with Pkcs11KeyStore(hsm.module, TOKEN, USER_PIN) as second:
        verify(keys["p256"].public_key(), op, second.perform(ski, op, payload_for(op)))
    assert "closed" in repr(second)
    assert error_of(second.perform, ski, op, payload_for(op)).code is ErrorCode.INTERNAL
    second.close()  # idempotent
    with pytest.raises(ConfigurationError, match="closed"):
        second.reload()


@pytest.mark.hsm
def test_two_keys_with_one_ski_are_refused(hsm: SoftHSM) -> None:
    import pkcs11
    from pkcs11 import Attribute

    from keybroker.flows.keyless.pkcs11keys import _template

    key = ec.generate_private_key(ec.SECP256R1())
    ski = ski_of(key.public_key())
    import_private_key(hsm.module, TOKEN_DUP, USER_PIN, key)
    with Pkcs11KeyStore(hsm.module, TOKEN_DUP, USER_PIN) as dup:
        assert ski in dup
        # A second object with the same CKA_ID, as another tool could make it
        # (the login is the store's; a fresh session needs no PIN).
        token = pkcs11.lib(hsm.module).get_token(token_label=TOKEN_DUP)
        with token.open(rw=True) as session:
            other = ed25519.Ed25519PrivateKey.generate()
            session.create_object(
                {**_template(other), Attribute.ID: ski, Attribute.TOKEN: True, Attribute.SIGN: True}
            )
        with pytest.raises(ConfigurationError, match=ski.hex()):
            dup.reload()


@pytest.mark.hsm
def test_bad_token_or_pin_is_configuration_error(hsm: SoftHSM) -> None:
    with pytest.raises(ConfigurationError, match="PIN is incorrect") as info:
        Pkcs11KeyStore(hsm.module, TOKEN_PIN, "not-the-pin")
    assert "not-the-pin" not in str(info.value)
    with pytest.raises(ConfigurationError, match="no PKCS#11 token"):
        Pkcs11KeyStore(hsm.module, "kl-no-such-token", USER_PIN)
    with pytest.raises(ConfigurationError, match="non-empty"):
        Pkcs11KeyStore(hsm.module, TOKEN_PIN, "")


@pytest.mark.hsm
def test_keys_without_a_ski_id_are_ignored(hsm: SoftHSM, store: Pkcs11KeyStore) -> None:
    import pkcs11
    from pkcs11 import Attribute

    from keybroker.flows.keyless.pkcs11keys import _template

    key = ec.generate_private_key(ec.SECP384R1())
    token = pkcs11.lib(hsm.module).get_token(token_label=TOKEN)
    with token.open(rw=True) as session:
        session.create_object(
            {**_template(key), Attribute.ID: b"short", Attribute.TOKEN: True, Attribute.SIGN: True}
        )
    before = store.skis()
    store.reload()
    assert store.skis() == before
    assert b"short" not in store
