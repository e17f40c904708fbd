"""The edge's key-server client against a real mutual-TLS key server (the test kit's own).

Every test talks to an asyncio key server over loopback TLS with client certificates; the
private keys live only in that server's ``LocalKeyStore``.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

sys.path.insert(0, str(Path(__file__).parent))

from edge_kit import KEYSERVER_NAME, Mtls, TestKeyServer, make_mtls
from tlskit import PrivateKey, new_key

from keybroker.errors import ConfigurationError, TransportError
from keybroker.flows.keyless.codes import ErrorCode, Op
from keybroker.flows.keyless.keyclient import (
    KeyClient,
    KeyServerAddress,
    client_context,
    parse_address,
)
from keybroker.flows.keyless.operations import ski_of
from keybroker.flows.keyless.tlskeys import KeyOperationFailed

DIGEST = hashlib.sha256(b"keyless handshake transcript").digest()
#: A call that fails "fast" must fail well within this.
FAST = 1.0


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Mtls:
    return make_mtls(tmp_path_factory.mktemp("mtls"))


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    return {kind: new_key(kind) for kind in ("rsa", "ecdsa", "ed25519")}


@pytest.fixture
def server(mtls: Mtls, keys: dict[str, PrivateKey]) -> Iterator[TestKeyServer]:
    with TestKeyServer(list(keys.values()), mtls) as running:
        yield running


def client_for(mtls: Mtls, *addresses: str, **options: float) -> KeyClient:
    return KeyClient.from_files(
        list(addresses),
        ca=mtls.ca,
        cert=mtls.edge_cert,
        key=mtls.edge_key,
        server_name=KEYSERVER_NAME,
        **options,
    )


def ski(key: PrivateKey) -> bytes:
    return ski_of(key.public_key())


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def verify(key: PrivateKey, op: Op, payload: bytes, signature: bytes) -> None:
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, payload, ec.ECDSA(Prehashed(hashes.SHA256())))
    elif isinstance(public, rsa.RSAPublicKey):
        pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
        public.verify(signature, payload, pss, Prehashed(hashes.SHA256()))
    else:
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, payload)


OPS = {"rsa": Op.RSA_PSS_SIGN_SHA256, "ecdsa": Op.ECDSA_SIGN_SHA256, "ed25519": Op.ED25519_SIGN}


# --- working --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "ecdsa", "ed25519"])
def test_signs_with_each_key_type(
    kind: str, server: TestKeyServer, mtls: Mtls, keys: dict[str, PrivateKey]
) -> None:
    key = keys[kind]
    payload = DIGEST if kind != "ed25519" else b"the whole signed content"
    with client_for(mtls, server.address) as client:
        signature = client.operate(OPS[kind], ski(key), payload, sni="www.example.test")
    verify(key, OPS[kind], payload, signature)
    (call,) = server.key_calls()
    assert (call.op, call.ski, call.sni) == (OPS[kind], ski(key), "www.example.test")


def test_a_wrong_answer_would_be_caught(
    server: TestKeyServer, mtls: Mtls, keys: dict[str, PrivateKey]
) -> None:
    """The verification above can fail: a signature over other bytes does not verify."""
    with client_for(mtls, server.address) as client:
        signature = client.operate(OPS["ecdsa"], ski(keys["ecdsa"]), DIGEST, sni=None)
    with pytest.raises(InvalidSignature):
        verify(keys["ecdsa"], OPS["ecdsa"], hashlib.sha256(b"other").digest(), signature)


def test_many_threads_share_one_pipelined_connection(
    server: TestKeyServer, mtls: Mtls, keys: dict[str, PrivateKey]
) -> None:
    key = keys["ecdsa"]
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(256)]
    with client_for(mtls, server.address) as client, ThreadPoolExecutor(32) as pool:
        signatures = list(
            pool.map(lambda d: client.operate(OPS["ecdsa"], ski(key), d, sni=None), digests)
        )
        assert client.stats.connects == 1
        assert client.stats.succeeded == 256
    for digest, signature in zip(digests, signatures, strict=True):
        verify(key, OPS["ecdsa"], digest, signature)  # each thread got its own answer
    assert len(server.key_calls()) == 256


def test_replies_are_matched_by_id_out_of_order(mtls: Mtls, keys: dict[str, PrivateKey]) -> None:
    """A slow RSA signature does not hold up an ECDSA one sent after it."""
    slow = {Op.RSA_PSS_SIGN_SHA256: 1.0}
    with (
        TestKeyServer(list(keys.values()), mtls, delays=slow) as server,
        client_for(mtls, server.address) as client,
    ):
        client.ping()
        results: dict[str, float] = {}

        def rsa_call() -> None:
            client.operate(OPS["rsa"], ski(keys["rsa"]), DIGEST, sni=None)
            results["rsa"] = time.monotonic()

        thread = threading.Thread(target=rsa_call)
        started = time.monotonic()
        thread.start()
        time.sleep(0.1)  # the RSA request is on the wire first
        signature = client.operate(OPS["ecdsa"], ski(keys["ecdsa"]), DIGEST, sni=None)
        ecdsa_done = time.monotonic()
        thread.join(timeout=5)
    verify(keys["ecdsa"], OPS["ecdsa"], DIGEST, signature)
    assert ecdsa_done - started < 0.6, "the ECDSA reply waited for the RSA one"
    assert results["rsa"] - started >= 0.9
    assert client.stats.connects == 1


def test_ping_measures_a_round_trip(server: TestKeyServer, mtls: Mtls) -> None:
    with client_for(mtls, server.address) as client:
        rtt = client.ping(b"echo")
        assert 0 < rtt < FAST
        assert client.connected
        sock = client._link._sock  # type: ignore[union-attr]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# --- failing fast ---------------------------------------------------------------------------


def test_refusal_carries_the_error_code(mtls: Mtls, keys: dict[str, PrivateKey]) -> None:
    with (
        TestKeyServer(list(keys.values()), mtls, mode="refuse") as server,
        client_for(mtls, server.address) as client,
    ):
        started = time.monotonic()
        with pytest.raises(KeyOperationFailed) as caught:
            client.operate(OPS["ecdsa"], ski(keys["ecdsa"]), DIGEST, sni=None)
        assert time.monotonic() - started < FAST
        assert caught.value.code is ErrorCode.NOT_AUTHORIZED
        assert isinstance(caught.value, TransportError)
        assert client.stats.refused == 1
        assert client.connected  # a refusal does not drop the connection


def test_unknown_key_is_key_not_found(server: TestKeyServer, mtls: Mtls) -> None:
    with client_for(mtls, server.address) as client, pytest.raises(KeyOperationFailed) as caught:
        client.operate(OPS["ecdsa"], bytes(20), DIGEST, sni=None)
    assert caught.value.code is ErrorCode.KEY_NOT_FOUND


def test_nobody_listening_fails_fast_then_backs_off(
    mtls: Mtls, keys: dict[str, PrivateKey]
) -> None:
    with client_for(mtls, f"127.0.0.1:{free_port()}") as client:
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(KeyOperationFailed, match="no key server available"):
                client.operate(OPS["ecdsa"], ski(keys["ecdsa"]), DIGEST, sni=None)
            assert time.monotonic() - started < FAST
        # Calls made during the backoff do not even try to connect.
        assert client.stats.connect_failures == 1
        assert client.stats.failed == 5


def test_key_server_going_away_fails_calls_then_reconnects(
    mtls: Mtls, keys: dict[str, PrivateKey]
) -> None:
    key = keys["ecdsa"]
    server = TestKeyServer(list(keys.values()), mtls).start()
    with client_for(mtls, server.address) as client:
        client.operate(OPS["ecdsa"], ski(key), DIGEST, sni=None)
        server.stop()
        started = time.monotonic()
        with pytest.raises(KeyOperationFailed):
            client.operate(OPS["ecdsa"], ski(key), DIGEST, sni=None)
        assert time.monotonic() - started < FAST
        server.start()  # same port
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.operate(OPS["ecdsa"], ski(key), DIGEST, sni=None)
                    break
                except KeyOperationFailed:
                    assert time.monotonic() < deadline, "never reconnected"
                    time.sleep(0.05)
            assert client.stats.connects == 2
        finally:
            server.stop()


def test_a_restarted_key_server_costs_no_failed_call(
    mtls: Mtls, keys: dict[str, PrivateKey]
) -> None:
    """A connection found dead when the call is made is replaced, and the call retried."""
    key = keys["ecdsa"]
    server = TestKeyServer(list(keys.values()), mtls).start()
    try:
        with client_for(mtls, server.address) as client:
            client.operate(OPS["ecdsa"], ski(key), DIGEST, sni=None)
            link = client._link
            server.stop()
            server.start()
            assert link is not None
            # Whether or not the reader noticed the close yet, the call succeeds.
            client.operate(OPS["ecdsa"], ski(key), DIGEST, sni=None)
            assert client.stats.failed == 0
            assert client._link is not link
    finally:
        server.stop()


def test_a_silent_key_server_times_out_and_is_dropped(
    mtls: Mtls, keys: dict[str, PrivateKey]
) -> None:
    with (
        TestKeyServer(list(keys.values()), mtls, mode="hang") as server,
        client_for(mtls, server.address, timeout=0.4) as client,
    ):
        client.ping()
        started = time.monotonic()
        with pytest.raises(KeyOperationFailed, match="within the timeout"):
            client.operate(OPS["ecdsa"], ski(keys["ecdsa"]), DIGEST, sni=None)
        elapsed = time.monotonic() - started
        assert 0.35 < elapsed < 0.4 + FAST
        assert client.stats.timeouts == 1
        assert not client.connected  # nothing came back: the connection is taken for dead


def test_failover_uses_the_next_server_in_order(
    server: TestKeyServer, mtls: Mtls, keys: dict[str, PrivateKey]
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with client_for(mtls, dead, server.address) as client:
        client.operate(OPS["ecdsa"], ski(keys["ecdsa"]), DIGEST, sni=None)
        assert client.stats.connect_failures == 1
        assert client.stats.connects == 1
    assert len(server.key_calls()) == 1


def test_the_key_server_insists_on_a_client_certificate(
    server: TestKeyServer, mtls: Mtls, keys: dict[str, PrivateKey]
) -> None:
    anonymous = ssl.create_default_context(cafile=str(mtls.ca))
    with KeyClient([server.address], anonymous, server_name=KEYSERVER_NAME) as client:
        started = time.monotonic()
        with pytest.raises(KeyOperationFailed):
            client.operate(OPS["ecdsa"], ski(keys["ecdsa"]), DIGEST, sni=None)
        assert time.monotonic() - started < FAST + 1
    assert server.key_calls() == []


def test_the_client_checks_the_key_servers_certificate(
    server: TestKeyServer, mtls: Mtls, keys: dict[str, PrivateKey]
) -> None:
    wrong_name = client_for(mtls, server.address)
    wrong_name._server_name = "someone-else.test"
    with wrong_name, pytest.raises(KeyOperationFailed, match="certificate"):
        wrong_name.operate(OPS["ecdsa"], ski(keys["ecdsa"]), DIGEST, sni=None)
    assert server.key_calls() == []


def test_a_closed_client_refuses(server: TestKeyServer, mtls: Mtls) -> None:
    client = client_for(mtls, server.address)
    client.ping()
    client.close()
    with pytest.raises(KeyOperationFailed, match="closed"):
        client.operate(Op.ECDSA_SIGN_SHA256, bytes(20), DIGEST, sni=None)


def test_overload_is_reported_not_queued(mtls: Mtls, keys: dict[str, PrivateKey]) -> None:
    with (
        TestKeyServer(list(keys.values()), mtls, mode="hang") as server,
        KeyClient(
            [server.address],
            client_context(mtls.ca, mtls.edge_cert, mtls.edge_key),
            server_name=KEYSERVER_NAME,
            timeout=1.0,
            max_pending=1,
        ) as client,
    ):
        client.ping()
        first: list[KeyOperationFailed] = []

        def occupy() -> None:
            try:
                client.operate(OPS["ecdsa"], bytes(20), DIGEST, sni=None)
            except KeyOperationFailed as exc:
                first.append(exc)

        blocker = threading.Thread(target=occupy)
        blocker.start()
        time.sleep(0.2)
        with pytest.raises(KeyOperationFailed) as caught:
            client.operate(OPS["ecdsa"], bytes(20), DIGEST, sni=None)
        assert caught.value.code is ErrorCode.OVERLOADED
        blocker.join()
        assert first and first[0].code is None  # the first one timed out instead


# --- no secrets shown -----------------------------------------------------------------------


def test_logs_and_reprs_show_no_payload(
    mtls: Mtls, keys: dict[str, PrivateKey], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="keybroker")
    secret = b"\x5a" * 32
    with TestKeyServer(list(keys.values()), mtls, mode="refuse") as server:
        client = client_for(mtls, server.address)
        with pytest.raises(KeyOperationFailed) as caught:
            client.operate(OPS["ecdsa"], ski(keys["ecdsa"]), secret, sni=None)
        client.close()
    shown = caplog.text + repr(client) + str(caught.value) + repr(caught.value)
    assert "NOT_AUTHORIZED" in str(caught.value)
    assert secret.hex() not in shown
    assert str(secret) not in shown
    assert "connected to key server" in caplog.text  # the logs did run


# --- addresses ------------------------------------------------------------------------------


def test_addresses_parse() -> None:
    assert parse_address("ks.example:2407") == KeyServerAddress("ks.example", 2407)
    assert parse_address("[::1]:2407") == KeyServerAddress("::1", 2407)
    assert str(parse_address("[::1]:2407")) == "[::1]:2407"
    for bad in ("ks.example", "ks.example:0", ":2407", "ks.example:http", "ks:70000"):
        with pytest.raises(ConfigurationError):
            parse_address(bad)


def test_missing_files_are_a_configuration_error(tmp_path: Path, mtls: Mtls) -> None:
    with pytest.raises(ConfigurationError):
        client_context(tmp_path / "nope.pem", mtls.edge_cert, mtls.edge_key)
    with pytest.raises(ConfigurationError):
        KeyClient([], ssl.create_default_context())
