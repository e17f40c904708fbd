"""Remote tlslite-ng keys against real, unmodified TLS clients.

A tlslite-ng server in a thread on a loopback socket terminates TLS with
:func:`~keybroker.flows.keyless.tlskeys.remote_key` objects; every private-key operation goes
to a test operator that holds the ``cryptography`` private key and counts its calls. The
clients are ``openssl s_client``, Python's ``ssl`` and ``curl``, each verifying the chain
against the test CA. The server object never holds a private number.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from tlslite.constants import AlertDescription
from tlslite.errors import TLSLocalAlert
from tlslite.utils.python_rsakey import Python_RSAKey

sys.path.insert(0, str(Path(__file__).parent))

from tests.conftest import missing
from tlskit import (
    HTTP_BODY,
    Authority,
    CountingOperator,
    Leaf,
    Outcome,
    PrivateKey,
    TlsTestServer,
    new_key,
    serving,
)

from keybroker.errors import (
    ConfigurationError,
    CryptoError,
    LocalProtocolError,
    TransportError,
)
from keybroker.flows.keyless.codes import ECDSA_OPS, RSA_PSS_OPS, ErrorCode, Op
from keybroker.flows.keyless.tlskeys import (
    KeyOperationFailed,
    RemoteECDSAKey,
    RemoteEd25519Key,
    RemoteRSAKey,
    certificate_chain,
    remote_key,
)

KINDS = ["rsa", "ecdsa", "ed25519"]
VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_3, id="tls13"),
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls12"),
]
#: A client that has not finished within this long is taken to hang.
CLIENT_TIMEOUT = 15.0
#: A failed handshake must be over well before that.
FAIL_FAST = 5.0


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority.create(tmp_path_factory.mktemp("keyless-ca"))


@pytest.fixture(scope="module")
def leaves(ca: Authority) -> dict[str, Leaf]:
    made = {kind: ca.issue(f"{kind}.keyless.test", new_key(kind)) for kind in KINDS}
    made["ecdsa384"] = ca.issue("p384.keyless.test", ec.generate_private_key(ec.SECP384R1()))
    return made


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"the {name} command")
        raise AssertionError("unreachable")  # missing() skips or fails
    return path


def s_client(
    port: int, servername: str, ca: Authority, *args: str, verify_name: str | None = None
) -> tuple[int, str]:
    """Run ``openssl s_client`` (verifying the chain and the name); its exit code and output."""
    command = [
        tool("openssl"),
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        servername,
        "-verify_return_error",
        "-CAfile",
        str(ca.path),
        "-verify_hostname",
        verify_name or servername,
        "-brief",
        *args,
    ]
    done = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def python_get(
    port: int,
    name: str,
    ca: Authority,
    version: ssl.TLSVersion,
    *,
    ciphers: str | None = None,
) -> tuple[str | None, bytes]:
    """A verified HTTPS GET with Python's ``ssl``: the negotiated version and the response."""
    context = ssl.create_default_context(cafile=str(ca.path))
    context.minimum_version = context.maximum_version = version
    if ciphers:
        context.set_ciphers(ciphers)
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
            response = b""
            while chunk := tls.recv(4096):
                response += chunk
            return tls.version(), response


def private_values(key: PrivateKey) -> tuple[set[int], set[bytes]]:
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        return {n.d, n.p, n.q, n.dmp1, n.dmq1, n.iqmp}, set()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {key.private_numbers().private_value}, set()
    return set(), {key.private_bytes_raw()}


def reachable(obj: object, depth: int = 4) -> tuple[set[int], list[bytes]]:
    """Every int and byte string reachable from ``obj``'s attributes, a few levels deep."""
    ints: set[int] = set()
    raws: list[bytes] = []
    seen: set[int] = set()

    def walk(value: object, level: int) -> None:
        if id(value) in seen or level > depth:
            return
        seen.add(id(value))
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            ints.add(value)
        elif type(value).__name__ == "mpz":
            ints.add(int(value))
        elif isinstance(value, bytes | bytearray):
            raws.append(bytes(value))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item, level + 1)
        elif isinstance(value, list | tuple | set | frozenset):
            for item in value:
                walk(item, level + 1)
        else:
            for name in getattr(type(value), "__slots__", ()):
                walk(getattr(value, name, None), level + 1)
            for item in getattr(value, "__dict__", {}).values():
                walk(item, level + 1)

    walk(obj, 0)
    return ints, raws


def assert_no_private_key(server_key: object, key: PrivateKey) -> None:
    secret_ints, secret_raws = private_values(key)
    ints, raws = reachable(server_key)
    assert not secret_ints & ints, "a private number is reachable from the server's key"
    assert not any(secret in raw for secret in secret_raws for raw in raws)
    text = repr(server_key)
    assert not any(format(value, "x") in text for value in secret_ints)
    assert not any(secret.hex() in text for secret in secret_raws)
    if isinstance(server_key, RemoteRSAKey):
        assert (server_key.d, server_key.p, server_key.q) == (0, 0, 0)
        assert (server_key.dP, server_key.dQ, server_key.qInv) == (0, 0, 0)
    if isinstance(server_key, RemoteEd25519Key):
        assert server_key.private_key is None


def only_outcome(server: TlsTestServer) -> Outcome:
    (outcome,) = server.wait_outcomes(1)
    return outcome


def assert_remote(outcome: Outcome, operator: CountingOperator, leaf: Leaf, ops: set[Op]) -> None:
    """The handshake succeeded and its private operations really went to the operator."""
    assert outcome.error is None, repr(outcome.error)
    calls = operator.calls
    assert calls, "the operator was never called: the key was not remote"
    assert {call.op for call in calls} <= ops, operator.ops()
    assert {(call.ski, call.sni) for call in calls} == {(leaf.ski, leaf.name)}
    assert outcome.key is not None
    assert outcome.key.hasPrivateKey() is True
    assert_no_private_key(outcome.key, leaf.key)


def one_server(
    leaf: Leaf, operator: CountingOperator
) -> contextlib.AbstractContextManager[TlsTestServer]:
    return serving(lambda sni: leaf if sni == leaf.name else None, operator)


SIGN_OPS = {
    "rsa": RSA_PSS_OPS,
    "ecdsa": frozenset({Op.ECDSA_SIGN_SHA256}),
    "ed25519": frozenset({Op.ED25519_SIGN}),
}
TLS12_CIPHER = {
    "rsa": "ECDHE-RSA-AES128-GCM-SHA256",
    "ecdsa": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ed25519": "ECDHE-ECDSA-AES128-GCM-SHA256",
}


# --- real clients, every key type -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_openssl_tls13(kind: str, ca: Authority, leaves: dict[str, Leaf]) -> None:
    leaf = leaves[kind]
    operator = CountingOperator(leaf.key)
    with one_server(leaf, operator) as server:
        code, output = s_client(server.port, leaf.name, ca, "-tls1_3")
        outcome = only_outcome(server)
    assert code == 0, output
    assert "Protocol version: TLSv1.3" in output
    assert "Verification: OK" in output
    assert outcome.version == (3, 4)
    assert_remote(outcome, operator, leaf, set(SIGN_OPS[kind]))


@pytest.mark.parametrize("kind", KINDS)
def test_openssl_tls12_ecdhe(kind: str, ca: Authority, leaves: dict[str, Leaf]) -> None:
    leaf = leaves[kind]
    operator = CountingOperator(leaf.key)
    with one_server(leaf, operator) as server:
        code, output = s_client(
            server.port, leaf.name, ca, "-tls1_2", "-cipher", TLS12_CIPHER[kind]
        )
        outcome = only_outcome(server)
    assert code == 0, output
    assert "Protocol version: TLSv1.2" in output
    assert f"Ciphersuite: {TLS12_CIPHER[kind]}" in output
    assert "Verification: OK" in output
    expected = {"rsa": RSA_PSS_OPS, "ecdsa": ECDSA_OPS, "ed25519": SIGN_OPS["ed25519"]}[kind]
    assert_remote(outcome, operator, leaf, set(expected))


@pytest.mark.parametrize(
    ("kind", "version", "sigalgs", "op"),
    [
        ("rsa", "-tls1_2", "RSA+SHA256", Op.RSA_SIGN_SHA256),
        ("rsa", "-tls1_2", "RSA+SHA384", Op.RSA_SIGN_SHA384),
        ("rsa", "-tls1_2", "RSA+SHA512", Op.RSA_SIGN_SHA512),
        ("rsa", "-tls1_2", "rsa_pss_rsae_sha384", Op.RSA_PSS_SIGN_SHA384),
        ("rsa", "-tls1_3", "rsa_pss_rsae_sha256", Op.RSA_PSS_SIGN_SHA256),
        ("rsa", "-tls1_3", "rsa_pss_rsae_sha512", Op.RSA_PSS_SIGN_SHA512),
        ("ecdsa", "-tls1_2", "ECDSA+SHA256", Op.ECDSA_SIGN_SHA256),
        # tlslite truncates a SHA-384/512 digest to P-256's 32 bytes: signed as a 32-byte digest,
        # verified by the client against the full hash.
        ("ecdsa", "-tls1_2", "ECDSA+SHA512", Op.ECDSA_SIGN_SHA256),
        ("ecdsa384", "-tls1_3", "ecdsa_secp384r1_sha384", Op.ECDSA_SIGN_SHA384),
        ("ecdsa384", "-tls1_2", "ECDSA+SHA512", Op.ECDSA_SIGN_SHA384),
    ],
)
def test_openssl_signature_algorithms(
    kind: str, version: str, sigalgs: str, op: Op, ca: Authority, leaves: dict[str, Leaf]
) -> None:
    leaf = leaves[kind]
    operator = CountingOperator(leaf.key)
    with one_server(leaf, operator) as server:
        code, output = s_client(server.port, leaf.name, ca, version, "-sigalgs", sigalgs)
        outcome = only_outcome(server)
    assert code == 0, output
    assert "Verification: OK" in output
    assert_remote(outcome, operator, leaf, {op})


def test_openssl_tls12_static_rsa_forwards_decrypt(ca: Authority, leaves: dict[str, Leaf]) -> None:
    leaf = leaves["rsa"]
    operator = CountingOperator(leaf.key)
    with one_server(leaf, operator) as server:
        code, output = s_client(server.port, leaf.name, ca, "-tls1_2", "-cipher", "AES128-SHA256")
        outcome = only_outcome(server)
    assert code == 0, output
    assert "Ciphersuite: AES128-SHA256" in output
    assert "Verification: OK" in output
    assert_remote(outcome, operator, leaf, {Op.RSA_DECRYPT})
    (call,) = operator.calls
    assert call.payload_length == 256  # the client's encrypted premaster secret


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_python_ssl(
    kind: str, version: ssl.TLSVersion, ca: Authority, leaves: dict[str, Leaf]
) -> None:
    leaf = leaves[kind]
    operator = CountingOperator(leaf.key)
    with one_server(leaf, operator) as server:
        negotiated, response = python_get(server.port, leaf.name, ca, version)
        outcome = only_outcome(server)
    assert (
        negotiated
        == {ssl.TLSVersion.TLSv1_3: "TLSv1.3", ssl.TLSVersion.TLSv1_2: "TLSv1.2"}[version]
    )
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(HTTP_BODY)
    assert outcome.request.startswith(b"GET / HTTP/1.1\r\n")
    expected = {"rsa": RSA_PSS_OPS, "ecdsa": ECDSA_OPS, "ed25519": SIGN_OPS["ed25519"]}[kind]
    assert_remote(outcome, operator, leaf, set(expected))


def test_python_ssl_static_rsa(ca: Authority, leaves: dict[str, Leaf]) -> None:
    leaf = leaves["rsa"]
    operator = CountingOperator(leaf.key)
    with one_server(leaf, operator) as server:
        _, response = python_get(
            server.port, leaf.name, ca, ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA256"
        )
        outcome = only_outcome(server)
    assert response.endswith(HTTP_BODY)
    assert outcome.cipher is not None and "aes128" in outcome.cipher
    assert_remote(outcome, operator, leaf, {Op.RSA_DECRYPT})


@pytest.mark.parametrize("kind", KINDS)
def test_curl(kind: str, ca: Authority, leaves: dict[str, Leaf]) -> None:
    curl = tool("curl")
    leaf = leaves[kind]
    operator = CountingOperator(leaf.key)
    with one_server(leaf, operator) as server:
        done = subprocess.run(
            [
                curl,
                "--silent",
                "--show-error",
                "--fail",
                "--max-time",
                str(CLIENT_TIMEOUT),
                "--cacert",
                str(ca.path),
                "--resolve",
                f"{leaf.name}:{server.port}:127.0.0.1",
                f"https://{leaf.name}:{server.port}/",
            ],
            capture_output=True,
            timeout=CLIENT_TIMEOUT + 5,
            check=False,
        )
        outcome = only_outcome(server)
    assert done.returncode == 0, done.stderr
    assert done.stdout == HTTP_BODY
    assert outcome.request.startswith(b"GET / HTTP/1.1\r\n")
    assert_remote(outcome, operator, leaf, set(SIGN_OPS[kind]))


# --- the key server fails or lies -------------------------------------------------------------


def expect_alert(
    leaf: Leaf, ca: Authority, operator: CountingOperator, version: ssl.TLSVersion, **kw: str
) -> tuple[ssl.SSLError, Outcome]:
    """A Python ``ssl`` handshake that must fail with an alert, fast, and the server's view."""
    with one_server(leaf, operator) as server:
        started = time.monotonic()
        with pytest.raises(ssl.SSLError) as failed:
            python_get(server.port, leaf.name, ca, version, **kw)
        elapsed = time.monotonic() - started
        outcome = only_outcome(server)
    assert elapsed < FAIL_FAST, f"the failed handshake took {elapsed:.1f} s"
    assert operator.calls, "the operator was never called"
    return failed.value, outcome


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_key_server_down_ends_with_internal_error_alert(
    kind: str,
    version: ssl.TLSVersion,
    ca: Authority,
    leaves: dict[str, Leaf],
    caplog: pytest.LogCaptureFixture,
) -> None:
    leaf = leaves[kind]
    operator = CountingOperator(leaf.key, mode="fail")
    with caplog.at_level(logging.WARNING, logger="keybroker.keyless.tlskeys"):
        error, outcome = expect_alert(leaf, ca, operator, version)
    assert "alert internal error" in str(error)
    assert isinstance(outcome.error, TLSLocalAlert)
    assert outcome.error.description == AlertDescription.internal_error
    assert any("the test key server is down" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_wrong_signature_from_key_server_ends_with_alert(
    kind: str, version: ssl.TLSVersion, ca: Authority, leaves: dict[str, Leaf]
) -> None:
    leaf = leaves[kind]
    operator = CountingOperator(leaf.key, mode="garbage")
    error, outcome = expect_alert(leaf, ca, operator, version)
    assert "alert internal error" in str(error)
    assert isinstance(outcome.error, TLSLocalAlert)
    assert outcome.error.description == AlertDescription.internal_error


@pytest.mark.parametrize("mode", ["fail", "garbage"])
def test_static_rsa_decrypt_failure_ends_with_alert(
    mode: str, ca: Authority, leaves: dict[str, Leaf]
) -> None:
    leaf = leaves["rsa"]
    operator = CountingOperator(leaf.key, mode=mode)
    error, outcome = expect_alert(
        leaf, ca, operator, ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA256"
    )
    # a wrong premaster secret is caught at the client's Finished, like a bad padding
    assert "alert bad record mac" in str(error)
    assert isinstance(outcome.error, TLSLocalAlert)
    assert operator.ops() == {Op.RSA_DECRYPT}


def test_openssl_sees_the_alert_when_the_key_server_is_down(
    ca: Authority, leaves: dict[str, Leaf]
) -> None:
    leaf = leaves["ecdsa"]
    operator = CountingOperator(leaf.key, mode="fail")
    with one_server(leaf, operator) as server:
        started = time.monotonic()
        code, output = s_client(server.port, leaf.name, ca, "-tls1_3")
        elapsed = time.monotonic() - started
        only_outcome(server)
    assert code != 0
    assert "alert internal error" in output
    assert elapsed < FAIL_FAST


# --- SNI picks the certificate ----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_names(ca: Authority) -> dict[str, Leaf]:
    return {
        "alpha.keyless.test": ca.issue("alpha.keyless.test", new_key("rsa")),
        "beta.keyless.test": ca.issue("beta.keyless.test", new_key("ecdsa")),
    }


@pytest.mark.parametrize(
    ("sent", "name"),
    [
        ("alpha.keyless.test", "alpha.keyless.test"),
        ("beta.keyless.test", "beta.keyless.test"),
        ("BETA.Keyless.Test", "beta.keyless.test"),  # normalised before the lookup
    ],
)
def test_sni_picks_the_certificate(
    sent: str, name: str, ca: Authority, two_names: dict[str, Leaf]
) -> None:
    operator = CountingOperator(*(leaf.key for leaf in two_names.values()))
    with serving(two_names.get, operator) as server:
        code, output = s_client(server.port, sent, ca, "-tls1_3", verify_name=name)
        outcome = only_outcome(server)
    assert code == 0, output
    assert f"Peer certificate: CN = {name}" in output
    assert "Verification: OK" in output
    assert outcome.sni == name
    assert_remote(outcome, operator, two_names[name], set(RSA_PSS_OPS | ECDSA_OPS))


def test_both_names_on_one_server(ca: Authority, two_names: dict[str, Leaf]) -> None:
    operator = CountingOperator(*(leaf.key for leaf in two_names.values()))
    with serving(two_names.get, operator) as server:
        for name in two_names:
            code, output = s_client(server.port, name, ca, "-tls1_2")
            assert code == 0, output
            assert f"Peer certificate: CN = {name}" in output
        outcomes = server.wait_outcomes(2)
    assert [o.sni for o in outcomes] == list(two_names)
    assert {(call.ski, call.sni) for call in operator.calls} == {
        (leaf.ski, name) for name, leaf in two_names.items()
    }


def test_unknown_sni_gets_no_certificate(ca: Authority, two_names: dict[str, Leaf]) -> None:
    operator = CountingOperator(*(leaf.key for leaf in two_names.values()))
    with serving(two_names.get, operator) as server:
        code, output = s_client(server.port, "gamma.keyless.test", ca, "-tls1_3")
        outcome = only_outcome(server)
    assert code != 0
    assert "Peer certificate" not in output
    assert outcome.sni == "gamma.keyless.test"
    assert isinstance(outcome.error, LookupError)
    assert operator.calls == []


# --- the key objects without a network ----------------------------------------------------------


def operator_and_key(leaf: Leaf) -> tuple[CountingOperator, RemoteRSAKey]:
    operator = CountingOperator(leaf.key)
    key = remote_key(leaf.certificate, operator, sni=leaf.name)
    assert isinstance(key, RemoteRSAKey)
    return operator, key


@pytest.mark.parametrize(
    ("kind", "cls"),
    [("rsa", RemoteRSAKey), ("ecdsa", RemoteECDSAKey), ("ed25519", RemoteEd25519Key)],
)
def test_remote_key_holds_no_private_key(kind: str, cls: type, leaves: dict[str, Leaf]) -> None:
    leaf = leaves[kind]
    key = remote_key(leaf.certificate, CountingOperator(), sni=None)
    assert type(key) is cls
    assert key.hasPrivateKey() is True
    assert key.ski == leaf.ski
    assert key.sni is None
    assert repr(key) == f"<{cls.__name__} ski={leaf.ski.hex()} sni=None>"
    assert_no_private_key(key, leaf.key)


def test_rsa_sign_forwards_each_padding(leaves: dict[str, Leaf]) -> None:
    leaf = leaves["rsa"]
    operator, key = operator_and_key(leaf)
    public = leaf.key.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    digest = hashes.Hash(hashes.SHA384())
    digest.update(b"to be signed")
    hashed = digest.finalize()

    pss = key.sign(hashed, "pss", "sha384", 48)
    public.verify(
        bytes(pss),
        hashed,
        padding.PSS(padding.MGF1(hashes.SHA384()), padding.PSS.DIGEST_LENGTH),
        Prehashed(hashes.SHA384()),
    )
    pkcs1 = key.sign(hashed, "pkcs1", "sha384")
    public.verify(bytes(pkcs1), hashed, padding.PKCS1v15(), Prehashed(hashes.SHA384()))
    # TLS 1.2 CertificateVerify style: the DigestInfo already prefixed, no hash name
    prefixed = key.sign(Python_RSAKey.addPKCS1Prefix(bytearray(hashed), "sha384"), "pkcs1")
    assert prefixed == pkcs1  # PKCS#1 v1.5 is deterministic
    assert [(c.op, c.payload_length) for c in operator.calls] == [
        (Op.RSA_PSS_SIGN_SHA384, 48),
        (Op.RSA_SIGN_SHA384, 48),
        (Op.RSA_SIGN_SHA384, 48),
    ]
    assert key.verify(pkcs1, hashed, "pkcs1", "sha384")


def test_rsa_refuses_what_it_cannot_forward(leaves: dict[str, Leaf]) -> None:
    operator, key = operator_and_key(leaves["rsa"])
    with pytest.raises(LocalProtocolError):
        key._rawPrivateKeyOp(12345)
    with pytest.raises(LocalProtocolError):
        key._raw_private_key_op_bytes(bytearray(256))  # tlslite's own padding paths end here
    with pytest.raises(LocalProtocolError):
        key.RSASSA_PSS_sign(bytearray(32), "sha256", 32)
    with pytest.raises(LocalProtocolError):
        key.sign(bytearray(32), "pss", "sha256", 20)  # the key server's PSS salt is the hash's
    with pytest.raises(LocalProtocolError):
        key.sign(bytearray(16), "pkcs1", "md5")
    with pytest.raises(LocalProtocolError):
        key.sign(bytearray(31), "pkcs1", "sha256")
    with pytest.raises(LocalProtocolError):
        key.sign(bytearray(32), "pkcs1")  # neither a DigestInfo nor MD5||SHA-1
    assert operator.calls == []


def test_rsa_decrypt_is_forwarded(leaves: dict[str, Leaf]) -> None:
    leaf = leaves["rsa"]
    operator, key = operator_and_key(leaf)
    public = leaf.key.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    secret = bytes([3, 3]) + bytes(range(46))
    assert key.decrypt(public.encrypt(secret, padding.PKCS1v15())) == secret
    assert operator.ops() == {Op.RSA_DECRYPT}
    # publicly invalid ciphertexts never reach the key server, as in tlslite's own decrypt
    assert key.decrypt(bytes(255)) is None
    assert key.decrypt(key.n.to_bytes(256, "big")) is None
    assert len(operator.calls) == 1


def test_key_server_failure_gives_an_empty_signature(
    leaves: dict[str, Leaf], caplog: pytest.LogCaptureFixture
) -> None:
    leaf = leaves["rsa"]
    operator, key = operator_and_key(leaf)
    operator.mode = "fail"
    with caplog.at_level(logging.WARNING, logger="keybroker.keyless.tlskeys"):
        assert key.sign(bytearray(32), "pss", "sha256", 32) == bytearray()
        assert key.decrypt(bytes(256)) is None
    assert [c.op for c in operator.calls] == [Op.RSA_PSS_SIGN_SHA256, Op.RSA_DECRYPT]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert all(leaf.ski.hex() in m and "test key server is down" in m for m in messages)
    # and tlslite's self-check, which follows every signature, rejects it
    assert key.verify(bytearray(), bytearray(32), "pss", "sha256", 32) is False


def test_ecdsa_signs_and_verifies_through_the_operator(leaves: dict[str, Leaf]) -> None:
    leaf = leaves["ecdsa"]
    operator = CountingOperator(leaf.key)
    key = remote_key(leaf.certificate, operator, sni="x.test")
    assert isinstance(key, RemoteECDSAKey)
    assert key.private_key.curve.baselen == 32  # what tlslite reads in TLS 1.2
    assert not hasattr(key.private_key, "sign_digest_deterministic")
    digest = bytearray(range(32))
    signature = key.sign(digest, hashAlg="sha256")
    assert key.verify(signature, digest)
    assert not key.verify(signature, bytearray(32))
    assert not key.verify(signature[:-1], digest)
    signature = key.hashAndSign(b"message", hAlg="sha384")
    assert key.hashAndVerify(signature, b"message", hAlg="sha384")
    # TLS 1.2 on P-256 with SHA-512: tlslite passes the digest truncated to 32 bytes, which is
    # signed as a 32-byte digest and verifies against the whole SHA-512 digest.
    full = hashes.Hash(hashes.SHA512())
    full.update(b"server key exchange")
    sha512 = full.finalize()
    truncated = key.sign(bytearray(sha512[:32]), hashAlg="sha512")
    public = leaf.key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(bytes(truncated), sha512, ec.ECDSA(Prehashed(hashes.SHA512())))
    assert [(c.op, c.payload_length) for c in operator.calls] == [
        (Op.ECDSA_SIGN_SHA256, 32),
        (Op.ECDSA_SIGN_SHA384, 48),
        (Op.ECDSA_SIGN_SHA256, 32),
    ]
    assert {c.sni for c in operator.calls} == {"x.test"}
    for length, name in [(33, "sha256"), (48, "sha256"), (20, "sha256"), (16, "sha384")]:
        with pytest.raises(LocalProtocolError):
            key.sign(bytearray(length), hashAlg=name)
    assert len(operator.calls) == 3


def test_ed25519_signs_the_whole_message(leaves: dict[str, Leaf]) -> None:
    leaf = leaves["ed25519"]
    operator = CountingOperator(leaf.key)
    key = remote_key(leaf.certificate, operator, sni=None)
    message = b"TLS 1.3, server CertificateVerify" * 3
    signature = key.hashAndSign(message)
    assert key.hashAndVerify(signature, message)
    assert not key.hashAndVerify(signature, message + b"!")
    public = leaf.key.public_key()
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(bytes(signature), message)
    (call,) = operator.calls
    assert (call.op, call.payload_length) == (Op.ED25519_SIGN, len(message))


def test_unsupported_certificate_key_is_a_configuration_error(ca: Authority) -> None:
    leaf = ca.issue("ed448.keyless.test", ed448.Ed448PrivateKey.generate())
    with pytest.raises(ConfigurationError):
        remote_key(leaf.certificate, CountingOperator(), sni=None)


def test_certificate_chain(leaves: dict[str, Leaf]) -> None:
    chain = certificate_chain(leaves["rsa"].chain_pem)
    assert chain.getNumCerts() == 2
    assert bytes(chain.x509List[0].writeBytes()) == leaves["rsa"].certificate.public_bytes(
        serialization.Encoding.DER
    )
    for bad in [
        b"",
        b"not pem",
        "é".encode(),
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ]:
        with pytest.raises(ConfigurationError):
            certificate_chain(bad)


def test_key_operation_failed_is_a_transport_error() -> None:
    error = KeyOperationFailed("refused", code=ErrorCode.NOT_AUTHORIZED)
    assert isinstance(error, TransportError)
    assert not isinstance(error, CryptoError)
    assert error.code is ErrorCode.NOT_AUTHORIZED
    assert KeyOperationFailed().code is None
