"""``fasttls``: tlslite-ng's hot primitives on ``cryptography``, checked against tlslite itself.

* Known answers: every rebound function gives byte-identical results to the tlslite original
  it replaces (saved by ``fasttls``, called through :func:`fasttls.original`) on random
  inputs, and fails where the original fails, the same way.
* The AEAD adapter's contract, as tlslite's record layer relies on it.
* Interop: the edge (``fast_crypto`` on, the default) against ``openssl s_client`` over every
  TLS 1.3 cipher and group the edge offers, and TLS 1.2 ECDHE with AES-GCM, with an HTTP
  request and response through the record layer each way; resumption through a ticket
  sealed and opened by the adapter.
* ``install()``: idempotent, thread-safe, leaves no tlslite module holding an original.
"""

from __future__ import annotations

import random
import re
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from tlslite.constants import GroupName
from tlslite.errors import TLSDecodeError, TLSIllegalParameterException
from tlslite.handshakehashes import HandshakeHashes
from tlslite.keyexchange import ECDHKeyExchange, FFDHKeyExchange
from tlslite.tlsconnection import TLSConnection
from tlslite.utils import cipherfactory
from tlslite.utils.python_rsakey import Python_RSAKey
from tlslite.utils.x25519 import X25519_G

sys.path.insert(0, str(Path(__file__).parent))

from edge_kit import (
    CLIENT_TIMEOUT,
    Site,
    TestOrigin,
    client_context,
    fetch,
    make_mtls,
    write_config,
)
from tests.conftest import missing
from tlskit import Authority, CountingOperator, Leaf, new_key

from keybroker.errors import ConfigurationError
from keybroker.flows.keyless import fasttls
from keybroker.flows.keyless.edge import Edge, EdgeConfig, load_config, parse_config
from keybroker.flows.keyless.fasttls import (
    REBINDS,
    AeadAdapter,
    FastECDHKeyExchange,
    FastTLSConnection,
)
from keybroker.flows.keyless.tlskeys import RemoteRSAKey

AES = "tlslite.utils.python_aesgcm.new"
CHACHA = "tlslite.utils.python_chacha20_poly1305.new"
X25519 = "tlslite.keyexchange.x25519"
HKDF_LABEL = "tlslite.utils.cryptomath.HKDF_expand_label"
DERIVE = "tlslite.utils.cryptomath.derive_secret"
P = 2**255 - 19
#: u-coordinates whose X25519 product is zero for every scalar (RFC 7748 §6.1's check):
#: 0, 1, the order-8 points, and their non-canonical encodings (+ p).
SMALL_ORDER_U = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
    P,
    P + 1,
]
LENGTHS = [0, 1, 15, 16, 17, 64, 700, 2**14]
NEW = {AES: fasttls.aesgcm_new, CHACHA: fasttls.chacha20_poly1305_new}
rng = random.Random(20261129)


def rand(n: int) -> bytearray:
    return bytearray(rng.getrandbits(8) for _ in range(n))


@pytest.fixture(autouse=True, scope="module")
def installed() -> None:
    fasttls.install()


# --- install ----------------------------------------------------------------------------------


def test_install_twice_is_harmless() -> None:
    assert fasttls.install() is False
    assert fasttls.install() is False
    assert fasttls.installed()
    for rebind in REBINDS:
        assert getattr(sys.modules[rebind.module], rebind.name) is rebind.replacement
        assert fasttls.original(rebind.symbol) is not rebind.replacement


def test_no_tlslite_module_keeps_an_original() -> None:
    import tlslite.api  # noqa: F401 - imports every tlslite module that can be loaded

    originals = {id(fasttls.original(r.symbol)): r for r in REBINDS}
    left = [
        (name, attr)
        for name, module in list(sys.modules.items())
        if name.startswith("tlslite") and name != "tlslite.utils.x25519"  # defines x25519
        for attr, value in vars(module).items()
        if id(value) in originals
    ]
    assert left == []


def test_install_is_thread_safe_in_a_fresh_process() -> None:
    code = textwrap.dedent(
        """
        import threading
        from keybroker.flows.keyless import fasttls
        from tlslite.utils import python_aesgcm
        before = python_aesgcm.new
        barrier = threading.Barrier(8)
        results = []
        def run():
            barrier.wait()
            results.append(fasttls.install())
        threads = [threading.Thread(target=run) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert sorted(results) == [False] * 7 + [True], results
        assert python_aesgcm.new is fasttls.aesgcm_new
        assert fasttls.original("tlslite.utils.python_aesgcm.new") is before
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_each_rebind_says_why() -> None:
    assert len({r.symbol for r in REBINDS}) == len(REBINDS) == 5
    assert all(r.why and callable(r.replacement) for r in REBINDS)


# --- the AEAD adapter -------------------------------------------------------------------------

AEADS = [
    pytest.param(AES, 16, "aes128gcm", id="aes128gcm"),
    pytest.param(AES, 32, "aes256gcm", id="aes256gcm"),
    pytest.param(CHACHA, 32, "chacha20-poly1305", id="chacha20"),
]


@pytest.mark.parametrize(("symbol", "size", "name"), AEADS)
def test_aead_adapter_attributes(symbol: str, size: int, name: str) -> None:
    key = rand(size)
    new = NEW[symbol]
    adapter = new(key)
    stock = fasttls.original(symbol)(key)
    assert isinstance(adapter, AeadAdapter)
    for attribute in ("name", "nonceLength", "tagLength", "isAEAD", "isBlockCipher", "key"):
        assert getattr(adapter, attribute) == getattr(stock, attribute), attribute
    assert (adapter.name, adapter.nonceLength, adapter.tagLength) == (name, 12, 16)
    assert adapter.isAEAD is True and adapter.isBlockCipher is False
    assert adapter.implementation == "cryptography"
    assert key.hex() not in repr(adapter)


@pytest.mark.parametrize(("symbol", "size", "name"), AEADS)
def test_aead_seal_and_open_match_tlslite(symbol: str, size: int, name: str) -> None:
    new = NEW[symbol]
    for length in LENGTHS:
        key, nonce, data, aad = rand(size), rand(12), rand(length), rand(rng.choice([0, 5, 13]))
        adapter, stock = new(key), fasttls.original(symbol)(key)
        sealed = adapter.seal(nonce, data, aad)
        assert isinstance(sealed, bytearray)
        assert sealed == stock.seal(nonce, data, aad)
        assert len(sealed) == length + 16
        opened = adapter.open(nonce, sealed, aad)
        assert isinstance(opened, bytearray) and opened == data == stock.open(nonce, sealed, aad)


@pytest.mark.parametrize(("symbol", "size", "name"), AEADS)
def test_aead_open_gives_none_on_a_bad_tag(symbol: str, size: int, name: str) -> None:
    new = NEW[symbol]
    key, nonce, aad = rand(size), rand(12), rand(13)
    adapter, stock = new(key), fasttls.original(symbol)(key)
    sealed = adapter.seal(nonce, b"record", aad)
    bad_tag = bytearray(sealed)
    bad_tag[-1] ^= 1
    bad_body = bytearray(sealed)
    bad_body[0] ^= 0x80
    other_nonce = bytearray(nonce)
    other_nonce[0] ^= 1
    cases = [
        (nonce, bad_tag, aad),
        (nonce, bad_body, aad),
        (nonce, sealed, aad + b"x"),
        (other_nonce, sealed, aad),
        (nonce, sealed[:15], aad),  # shorter than a tag
        (nonce, bytearray(), aad),
    ]
    for case in cases:
        assert adapter.open(*case) is None
        assert stock.open(*case) is None


@pytest.mark.parametrize(("symbol", "size", "name"), AEADS)
def test_aead_refuses_a_wrong_nonce_length_like_tlslite(symbol: str, size: int, name: str) -> None:
    new = NEW[symbol]
    key = rand(size)
    for nonce in (rand(8), rand(16)):
        for make in (new, fasttls.original(symbol)):
            with pytest.raises(ValueError):
                make(key).seal(nonce, b"x", b"")
            with pytest.raises(ValueError):
                make(key).open(nonce, rand(32), b"")


def test_aead_key_sizes_like_tlslite() -> None:
    with pytest.raises(AssertionError):
        fasttls.aesgcm_new(rand(24))
    with pytest.raises(AssertionError):
        fasttls.original(AES)(rand(24))
    with pytest.raises(ValueError):
        fasttls.chacha20_poly1305_new(rand(16))
    with pytest.raises(ValueError):
        fasttls.original(CHACHA)(rand(16))


def test_tlslite_factories_now_give_the_adapter() -> None:
    assert isinstance(cipherfactory.createAESGCM(rand(16)), AeadAdapter)
    assert isinstance(cipherfactory.createAESGCM(rand(32)), AeadAdapter)
    assert isinstance(cipherfactory.createCHACHA20(rand(32)), AeadAdapter)


# --- X25519 -----------------------------------------------------------------------------------


def test_x25519_matches_tlslite_on_random_inputs() -> None:
    original = fasttls.original(X25519)
    for _ in range(100):
        k, u = rand(32), rand(32)  # half of them with u's top bit set, which both ignore
        expected = original(bytearray(k), bytearray(u))
        if not any(expected):
            continue  # a small-order point by chance: see the next test
        assert fasttls.x25519(k, u) == expected
        assert fasttls.x25519(k, bytearray(X25519_G)) == original(bytearray(k), bytearray(X25519_G))


def test_x25519_lengths_outside_tls_are_tlslites_business() -> None:
    original = fasttls.original(X25519)
    k, u = rand(32), rand(33)
    assert fasttls.x25519(k, u) == original(bytearray(k), bytearray(u))
    with pytest.raises(IndexError):
        original(rand(31), rand(32))
    with pytest.raises(IndexError):
        fasttls.x25519(rand(31), rand(32))


def test_x25519_non_canonical_u_like_tlslite() -> None:
    original = fasttls.original(X25519)
    for value in (P + 2, P + 9, 2**255 - 1, 2**256 - 1):
        k, u = rand(32), bytearray(value.to_bytes(32, "little"))
        assert fasttls.x25519(k, u) == original(bytearray(k), bytearray(u))


@pytest.mark.parametrize("value", SMALL_ORDER_U)
def test_x25519_zero_shared_secret_is_an_illegal_parameter(value: int) -> None:
    share = bytearray(value.to_bytes(32, "little"))
    # tlslite's own function gives zero, which ECDHKeyExchange turns into this alert.
    assert not any(fasttls.original(X25519)(rand(32), bytearray(share)))
    with pytest.raises(TLSIllegalParameterException):
        fasttls.x25519(rand(32), share)
    kex = ECDHKeyExchange(GroupName.x25519, (3, 4))
    with pytest.raises(TLSIllegalParameterException):
        kex.calc_shared_key(kex.get_random_private_key(), share)


def test_x25519_key_exchange_agrees_end_to_end() -> None:
    kex = ECDHKeyExchange(GroupName.x25519, (3, 4))
    a, b = kex.get_random_private_key(), kex.get_random_private_key()
    pub_a, pub_b = kex.calc_public_value(a), kex.calc_public_value(b)
    assert kex.calc_shared_key(a, pub_b) == kex.calc_shared_key(b, pub_a)
    assert fasttls.original(X25519)(bytearray(a), bytearray(pub_b)) == kex.calc_shared_key(a, pub_b)


# --- the key schedule ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512", "sha1"])
def test_hkdf_expand_label_matches_tlslite(algorithm: str) -> None:
    original = fasttls.original(HKDF_LABEL)
    for _ in range(50):
        secret = rand(rng.choice([32, 48, 7]))
        label = rand(rng.randrange(0, 40))
        context = rand(rng.choice([0, 32, 48]))
        length = rng.choice([1, 12, 16, 32, 48, 100, 255])
        expected = original(secret, label, context, length, algorithm)
        got = fasttls.hkdf_expand_label(secret, label, context, length, algorithm)
        assert isinstance(got, bytearray) and got == expected
    assert fasttls.hkdf_expand_label(b"s" * 32, b"finished", b"", 32, "sha256") == original(
        b"s" * 32, b"finished", b"", 32, "sha256"
    )


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha1"])
def test_derive_secret_matches_tlslite(algorithm: str) -> None:
    original = fasttls.original(DERIVE)
    transcript = HandshakeHashes()
    for _ in range(20):
        transcript.update(rand(rng.randrange(1, 300)))
        secret, label = rand(32), rand(rng.randrange(1, 20))
        assert fasttls.derive_secret(secret, label, transcript, algorithm) == original(
            secret, label, transcript, algorithm
        )
        assert fasttls.derive_secret(secret, label, None, algorithm) == original(
            secret, label, None, algorithm
        )


# --- ECDH key exchange objects ---------------------------------------------------------------


def test_fast_x25519_exchange_matches_tlslite() -> None:
    fast = FastECDHKeyExchange(GroupName.x25519, (3, 4))
    original = fasttls.original(X25519)
    for _ in range(20):
        private = fast.get_random_private_key()
        assert isinstance(private, X25519PrivateKey)
        raw = bytearray(private.private_bytes_raw())
        public = fast.calc_public_value(private)
        assert isinstance(public, bytearray)
        assert public == original(bytearray(raw), bytearray(X25519_G))
        peer = rand(32)
        expected = original(bytearray(raw), bytearray(peer))
        if any(expected):
            assert fast.calc_shared_key(private, peer) == expected
    # A private value made elsewhere (bytes, as tlslite makes them) still works.
    raw = rand(32)
    peer = fast.calc_public_value(fast.get_random_private_key())
    assert fast.calc_shared_key(raw, peer) == original(bytearray(raw), bytearray(peer))


@pytest.mark.parametrize("value", SMALL_ORDER_U)
def test_fast_x25519_exchange_refuses_small_order_shares(value: int) -> None:
    fast = FastECDHKeyExchange(GroupName.x25519, (3, 4))
    with pytest.raises(TLSIllegalParameterException, match="Invalid key share"):
        fast.calc_shared_key(fast.get_random_private_key(), bytearray(value.to_bytes(32, "little")))


def test_fast_x25519_exchange_refuses_wrong_lengths_like_tlslite() -> None:
    fast, stock = (
        FastECDHKeyExchange(GroupName.x25519, (3, 4)),
        ECDHKeyExchange(GroupName.x25519, (3, 4)),
    )
    for share in (rand(31), rand(33), bytearray()):
        with pytest.raises(TLSIllegalParameterException):
            fast.calc_shared_key(fast.get_random_private_key(), share)
        with pytest.raises(TLSIllegalParameterException):
            stock.calc_shared_key(stock.get_random_private_key(), share)


NIST = [
    pytest.param(GroupName.secp256r1, ec.SECP256R1(), id="P-256"),
    pytest.param(GroupName.secp384r1, ec.SECP384R1(), id="P-384"),
    pytest.param(GroupName.secp521r1, ec.SECP521R1(), id="P-521"),
]


@pytest.mark.parametrize(("group", "curve"), NIST)
def test_nist_ecdh_matches_tlslite(group: int, curve: ec.EllipticCurve) -> None:
    fast, stock = FastECDHKeyExchange(group, (3, 4)), ECDHKeyExchange(group, (3, 4))
    for _ in range(5):
        private = fast.get_random_private_key()
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        scalar = private.private_numbers().private_value
        public = fast.calc_public_value(private)
        assert public == stock.calc_public_value(scalar)
        peer = ec.generate_private_key(curve)
        share = bytearray(
            peer.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        )
        shared = fast.calc_shared_key(private, share)
        assert isinstance(shared, bytearray)
        assert shared == stock.calc_shared_key(scalar, share)
        assert shared == peer.exchange(ec.ECDH(), private.public_key())
        compressed = bytearray(
            peer.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
            )
        )
        formats = ("uncompressed", "compressed")
        assert fast.calc_shared_key(private, compressed, formats) == shared
        assert fast.calc_public_value(private, "compressed") == stock.calc_public_value(
            scalar, "compressed"
        )


@pytest.mark.parametrize(("group", "curve"), NIST)
def test_nist_ecdh_refuses_bad_shares_like_tlslite(group: int, curve: ec.EllipticCurve) -> None:
    fast, stock = FastECDHKeyExchange(group, (3, 4)), ECDHKeyExchange(group, (3, 4))
    private = fast.get_random_private_key()
    scalar = private.private_numbers().private_value
    good = bytearray(fast.calc_public_value(fast.get_random_private_key()))
    off_curve = bytearray(good)
    off_curve[-1] ^= 1
    compressed = bytearray(
        private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
    )
    for share in (off_curve, good[:-1], good + b"\x00", bytearray(b"\x04"), compressed):
        with pytest.raises(TLSIllegalParameterException):
            fast.calc_shared_key(private, share)
        with pytest.raises((TLSIllegalParameterException, TLSDecodeError)):
            stock.calc_shared_key(scalar, share)
    with pytest.raises(TLSDecodeError):
        fast.calc_shared_key(private, good, ())


def test_fast_connection_picks_the_fast_exchange_for_ecdhe_only() -> None:
    for group in (GroupName.x25519, GroupName.secp256r1, GroupName.secp384r1):
        assert type(FastTLSConnection._getKEX(group, (3, 4))) is FastECDHKeyExchange
    assert type(FastTLSConnection._getKEX(GroupName.x448, (3, 4))) is ECDHKeyExchange
    assert type(FastTLSConnection._getKEX(GroupName.ffdhe2048, (3, 4))) is FFDHKeyExchange
    assert type(TLSConnection._getKEX(GroupName.secp256r1, (3, 4))) is ECDHKeyExchange


# --- the RSA self-check on OpenSSL (tlskeys) --------------------------------------------------


def test_remote_rsa_verify_agrees_with_tlslite() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.public_key().public_numbers()
    remote = RemoteRSAKey(
        numbers.n, numbers.e, key_type="rsa", operator=CountingOperator(), ski=b"s", sni=None
    )
    stock = Python_RSAKey(numbers.n, numbers.e)
    algorithms = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384()}
    for name, algorithm in algorithms.items():
        digest = bytes(rand(algorithm.digest_size))
        pss = padding.PSS(padding.MGF1(algorithm), algorithm.digest_size)
        signatures = {
            "pss": key.sign(digest, pss, Prehashed(algorithm)),
            "pkcs1": key.sign(digest, padding.PKCS1v15(), Prehashed(algorithm)),
        }
        for scheme, signature in signatures.items():
            salt = algorithm.digest_size if scheme == "pss" else None
            bad = bytearray(signature)
            bad[10] ^= 1
            other_digest = bytes(rand(algorithm.digest_size))
            for sig, data, salt_len, expected in [
                (signature, digest, salt, True),
                (bad, digest, salt, False),
                (signature, other_digest, salt, False),
                (signature[:-1], digest, salt, False),
            ] + ([(signature, digest, 0, False)] if scheme == "pss" else []):
                args = (bytearray(sig), bytearray(data), scheme, name, salt_len)
                assert remote.verify(*args) is expected, (name, scheme, expected)
                assert stock.verify(*args) is expected


# --- interop through the edge -----------------------------------------------------------------


def openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        missing("the openssl command")
        raise AssertionError("unreachable")
    return path


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority.create(tmp_path_factory.mktemp("fasttls-ca"))


@pytest.fixture(scope="module")
def leaves(ca: Authority) -> dict[str, Leaf]:
    return {kind: ca.issue(f"{kind}.fast.test", new_key(kind)) for kind in ("ecdsa", "rsa")}


@pytest.fixture(scope="module")
def operator(leaves: dict[str, Leaf]) -> CountingOperator:
    return CountingOperator(*(leaf.key for leaf in leaves.values()))


@pytest.fixture(scope="module")
def edge_config(
    tmp_path_factory: pytest.TempPathFactory, leaves: dict[str, Leaf]
) -> Iterator[EdgeConfig]:
    directory = tmp_path_factory.mktemp("fasttls-edge")
    mtls = make_mtls(directory / "mtls")  # the key server is the in-process operator here
    with TestOrigin() as origin:
        sites = [Site(leaf, origin.url) for leaf in leaves.values()]
        # default_service: for openssl s_time, which sends no SNI
        path = write_config(
            directory / "conf",
            sites,
            "127.0.0.1:9",
            mtls,
            default_service=leaves["ecdsa"].name,
        )
        yield load_config(path)


@pytest.fixture(scope="module")
def edge(edge_config: EdgeConfig, operator: CountingOperator) -> Iterator[Edge]:
    assert edge_config.edge.fast_crypto is True  # the default
    with Edge(edge_config, operator) as running:
        yield running


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts calls into the fast paths while a test runs."""
    counts = {"seal": 0, "open": 0, "ecdh": 0, "x25519": 0}

    def counting(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(AeadAdapter, "seal", counting("seal", AeadAdapter.seal))
    monkeypatch.setattr(AeadAdapter, "open", counting("open", AeadAdapter.open))
    monkeypatch.setattr(
        FastECDHKeyExchange,
        "calc_shared_key",
        counting("ecdh", FastECDHKeyExchange.calc_shared_key),
    )
    monkeypatch.setattr(
        sys.modules["tlslite.keyexchange"], "x25519", counting("x25519", fasttls.x25519)
    )
    return counts


def s_client(port: int, leaf: Leaf, ca: Authority, *args: str) -> str:
    request = f"GET /fast HTTP/1.1\r\nHost: {leaf.name}\r\nConnection: close\r\n\r\n"
    done = subprocess.run(
        [
            openssl(),
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            leaf.name,
            "-verify_return_error",
            "-CAfile",
            str(ca.path),
            "-verify_hostname",
            leaf.name,
            "-brief",
            "-ign_eof",
            *args,
        ],
        input=request,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Verification: OK" in output, output
    assert "HTTP/1.1 200" in output and '"path": "/fast"' in output, output
    return output


TLS13_SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
GROUPS = ["X25519", "P-256", "P-384"]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("suite", TLS13_SUITES)
def test_openssl_tls13_every_suite_and_group(
    suite: str,
    group: str,
    edge: Edge,
    ca: Authority,
    leaves: dict[str, Leaf],
    spy: dict[str, int],
) -> None:
    output = s_client(
        edge.address[1], leaves["ecdsa"], ca, "-tls1_3", "-ciphersuites", suite, "-groups", group
    )
    assert "Protocol version: TLSv1.3" in output, output
    assert f"Ciphersuite: {suite}" in output, output
    assert spy["ecdh"] == 1  # the server's shared secret, by FastECDHKeyExchange
    assert spy["x25519"] == 0  # ... which keeps X25519 keys as objects
    assert spy["seal"] >= 3 and spy["open"] >= 2  # flight, tickets, response; Finished, request


#: TLS 1.2 with an ECDSA certificate needs the certificate's curve among the client's groups
#: (RFC 8422 §5.1), so those clients offer P-256 too; the edge prefers X25519 for ECDHE.
TLS12 = [
    pytest.param(
        "ecdsa", "ECDHE-ECDSA-AES128-GCM-SHA256", "X25519:P-256", id="ecdsa-aes128-x25519"
    ),
    pytest.param(
        "ecdsa", "ECDHE-ECDSA-AES256-GCM-SHA384", "X25519:P-256", id="ecdsa-aes256-x25519"
    ),
    pytest.param("ecdsa", "ECDHE-ECDSA-AES128-GCM-SHA256", "P-256", id="ecdsa-aes128-p256"),
    pytest.param("rsa", "ECDHE-RSA-AES128-GCM-SHA256", "X25519", id="rsa-aes128-x25519"),
    pytest.param("rsa", "ECDHE-RSA-AES256-GCM-SHA384", "P-384", id="rsa-aes256-p384"),
]


@pytest.mark.parametrize(("kind", "cipher", "group"), TLS12)
def test_openssl_tls12_ecdhe_aes_gcm(
    kind: str,
    cipher: str,
    group: str,
    edge: Edge,
    ca: Authority,
    leaves: dict[str, Leaf],
    spy: dict[str, int],
) -> None:
    output = s_client(
        edge.address[1], leaves[kind], ca, "-tls1_2", "-cipher", cipher, "-groups", group
    )
    assert "Protocol version: TLSv1.2" in output, output
    assert f"Ciphersuite: {cipher}" in output, output
    assert spy["seal"] >= 2 and spy["open"] >= 2  # tickets, Finished, response; Finished, request
    assert spy["x25519"] == (2 if group.startswith("X25519") else 0)  # the global rebind
    assert spy["ecdh"] == 0  # TLS 1.2 builds tlslite's own ECDHKeyExchange


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_resumption_through_tickets_the_adapter_sealed(
    version: ssl.TLSVersion,
    edge: Edge,
    ca: Authority,
    leaves: dict[str, Leaf],
    operator: CountingOperator,
    spy: dict[str, int],
) -> None:
    leaf = leaves["ecdsa"]
    context = client_context(ca.path, version)
    first = fetch(edge.address[1], leaf.name, context)
    assert first.status == 200 and not first.reused
    calls = len(operator.calls)
    opened = spy["open"]
    again = fetch(edge.address[1], leaf.name, context, session=first.session)
    assert again.reused and again.status == 200
    assert len(operator.calls) == calls  # no key operation: the ticket was opened
    assert spy["open"] > opened


# --- edge configuration and accounting --------------------------------------------------------


def test_fast_crypto_can_be_turned_off(edge_config: EdgeConfig, tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "keyserver": {"address": "127.0.0.1:9", "ca": "a", "cert": "b", "key": "c"},
        "service": [
            {
                "hostname": service.hostname,
                "chain": str(service.chain_path),
                "origin": str(service.origin),
            }
            for service in edge_config.services
        ],
    }
    listen = {"listen": "127.0.0.1:0"}
    assert parse_config({**base, "edge": listen}, base=tmp_path).edge.fast_crypto is True
    off = parse_config({**base, "edge": {**listen, "fast_crypto": False}}, base=tmp_path)
    assert off.edge.fast_crypto is False
    with Edge(off, CountingOperator()) as stock:
        assert stock._tls_class is TLSConnection
    with Edge(parse_config({**base, "edge": listen}, base=tmp_path), CountingOperator()) as fast:
        assert fast._tls_class is FastTLSConnection
    with pytest.raises(ConfigurationError, match="fast_crypto"):
        parse_config({**base, "edge": {**listen, "fast_crypto": "yes"}}, base=tmp_path)


def test_a_client_leaving_right_after_its_finished_counts_as_a_handshake(
    edge_config: EdgeConfig, leaves: dict[str, Leaf]
) -> None:
    """openssl s_time closes as soon as it has sent its Finished, before tlslite writes the
    TLS 1.3 tickets: a complete handshake for the client, so one for the edge too (it is the
    load generator of ``bench/keyless.py``)."""
    operator = CountingOperator(*(leaf.key for leaf in leaves.values()))
    config = load_config(edge_config_path(edge_config))
    with Edge(config, operator) as edge:
        done = subprocess.run(
            [
                *(openssl(), "s_time", "-connect", f"127.0.0.1:{edge.address[1]}"),
                *("-new", "-tls1_3", "-time", "1"),
            ],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
            check=False,
        )
        match = re.search(r"(\d+) connections in [\d.]+s", done.stdout)
        assert done.returncode == 0 and match, done.stdout + done.stderr
        count = int(match.group(1))
        assert count > 0
        # A client that leaves before its Finished is still a failure.
        with socket.create_connection(edge.address, timeout=CLIENT_TIMEOUT) as raw:
            raw.sendall(client_hello(leaves["ecdsa"].name))
        wait_until(lambda: edge.counters["connections"] == count + 1)
        wait_until(
            lambda: edge.counters["handshakes"] + edge.counters["handshake_failures"] == count + 1
        )
        assert edge.counters["full_handshakes"] == count
        assert edge.counters["handshake_failures"] == 1
        assert len(operator.calls) >= count


def edge_config_path(config: EdgeConfig) -> Path:
    return config.services[0].chain_path.parent / "edge.toml"


def client_hello(name: str) -> bytes:
    """The first flight of a Python ``ssl`` TLS 1.3 client, from memory BIOs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)
