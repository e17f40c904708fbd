"""The keyless edge end to end: real, unmodified TLS clients through the edge to an origin.

The edge runs in-process (an :class:`~keybroker.flows.keyless.edge.Edge` in a thread, with a
real :class:`~keybroker.flows.keyless.keyclient.KeyClient`) for most tests, and once as the
real ``edge_command`` in a subprocess with two worker processes. Every private key lives in the
test kit's mutual-TLS key server; every client verifies the chain against the test CA.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).parent))

from edge_kit import (
    CLIENT_TIMEOUT,
    Mtls,
    Site,
    TestKeyServer,
    TestOrigin,
    client_context,
    fetch,
    make_mtls,
    parse_response,
    private_values,
    reachable,
    wait_for,
    write_config,
)
from tests.conftest import missing
from tlskit import Authority, Leaf, new_key

from keybroker.errors import ConfigurationError
from keybroker.flows.keyless.codes import RSA_PSS_OPS, Op
from keybroker.flows.keyless.edge import (
    Edge,
    EdgeConfig,
    TicketKeyRing,
    key_client,
    load_config,
)
from keybroker.flows.keyless.tlskeys import RemoteEd25519Key, RemoteRSAKey

KINDS = ["rsa", "ecdsa", "ed25519"]
TLS13 = ssl.TLSVersion.TLSv1_3
TLS12 = ssl.TLSVersion.TLSv1_2
#: A handshake the key server cannot serve must end (with an alert) well within this.
FAIL_FAST = 5.0
SIGN_OPS = {
    "rsa": set(RSA_PSS_OPS),
    "ecdsa": {Op.ECDSA_SIGN_SHA256},
    "ed25519": {Op.ED25519_SIGN},
}
TLS12_CIPHER = {
    "rsa": "ECDHE-RSA-AES128-GCM-SHA256",
    "ecdsa": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ed25519": "ECDHE-ECDSA-AES128-GCM-SHA256",
}


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edge")


@pytest.fixture(scope="module")
def ca(workdir: Path) -> Authority:
    return Authority.create(workdir)


@pytest.fixture(scope="module")
def mtls(workdir: Path) -> Mtls:
    return make_mtls(workdir / "mtls")


@pytest.fixture(scope="module")
def leaves(ca: Authority) -> dict[str, Leaf]:
    made = {kind: ca.issue(f"{kind}.edge.test", new_key(kind)) for kind in KINDS}
    made["second"] = ca.issue("second.edge.test", ec.generate_private_key(ec.SECP384R1()))
    return made


@pytest.fixture(scope="module")
def keyserver(mtls: Mtls, leaves: dict[str, Leaf]) -> Iterator[TestKeyServer]:
    with TestKeyServer([leaf.key for leaf in leaves.values()], mtls) as server:
        yield server


@pytest.fixture(scope="module")
def origin() -> Iterator[TestOrigin]:
    with TestOrigin() as running:
        yield running


@pytest.fixture(scope="module")
def config_path(
    workdir: Path,
    leaves: dict[str, Leaf],
    keyserver: TestKeyServer,
    origin: TestOrigin,
    mtls: Mtls,
) -> Path:
    sites = [Site(leaf, origin.url) for leaf in leaves.values()]
    return write_config(workdir / "conf", sites, keyserver.address, mtls)


@pytest.fixture(scope="module")
def edge(config_path: Path) -> Iterator[Edge]:
    config = load_config(config_path)
    with key_client(config.keyserver) as client, Edge(config, client) as running:
        yield running


@contextlib.contextmanager
def own_edge(config: EdgeConfig, *, tickets: TicketKeyRing | None = None) -> Iterator[Edge]:
    with key_client(config.keyserver) as client, Edge(config, client, tickets=tickets) as running:
        yield running


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"the {name} command")
        raise AssertionError("unreachable")
    return path


def s_client(port: int, servername: str, ca: Authority, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [
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
            servername,
            "-brief",
            *args,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def curl(port: int, name: str, ca: Authority, *args: str, path: str = "/") -> tuple[int, str]:
    done = subprocess.run(
        [
            tool("curl"),
            "--silent",
            "--show-error",
            "--max-time",
            str(int(CLIENT_TIMEOUT)),
            "--cacert",
            str(ca.path),
            "--resolve",
            f"{name}:{port}:127.0.0.1",
            *args,
            f"https://{name}:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT + 5,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def key_calls_for(server: TestKeyServer, leaf: Leaf) -> int:
    return sum(1 for call in server.key_calls() if call.ski == leaf.ski)


def described(body: bytes) -> Any:
    return json.loads(body.decode())


@pytest.fixture(autouse=True)
def no_edge_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever a test does to it, the edge logs no ERROR (no unexpected exception)."""
    caplog.set_level(logging.INFO, logger="keybroker")
    yield
    errors = [
        record.getMessage()
        for record in caplog.get_records("call")
        if record.levelno >= logging.ERROR and record.name.startswith("keybroker")
    ]
    assert not errors, errors


def test_a_client_closing_abruptly_is_no_error(
    edge: Edge, ca: Authority, leaves: dict[str, Leaf], caplog: pytest.LogCaptureFixture
) -> None:
    """No close_notify, no request: the edge just closes too (and logs no ERROR)."""
    context = client_context(ca.path, TLS13)
    connections = edge.counters["connections"]
    for _ in range(3):
        with (
            socket.create_connection(edge.address, timeout=CLIENT_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=leaves["ecdsa"].name),
        ):
            pass
    fetch(edge.address[1], leaves["ecdsa"].name, context)  # the edge is still fine
    wait_for(lambda: edge.counters["connections"] == connections + 4)
    time.sleep(0.3)  # let the edge's threads finish closing (and logging)


# --- real clients, every key type -----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_openssl_tls13(
    kind: str, edge: Edge, ca: Authority, leaves: dict[str, Leaf], keyserver: TestKeyServer
) -> None:
    leaf = leaves[kind]
    before = keyserver.key_calls()
    code, output = s_client(edge.address[1], leaf.name, ca, "-tls1_3")
    assert code == 0, output
    assert "Protocol version: TLSv1.3" in output
    assert "Verification: OK" in output
    new = keyserver.key_calls()[len(before) :]
    assert {call.op for call in new} <= SIGN_OPS[kind]
    assert {(call.ski, call.sni) for call in new} == {(leaf.ski, leaf.name)}


@pytest.mark.parametrize("kind", KINDS)
def test_openssl_tls12_ecdhe(
    kind: str, edge: Edge, ca: Authority, leaves: dict[str, Leaf], keyserver: TestKeyServer
) -> None:
    leaf = leaves[kind]
    before = key_calls_for(keyserver, leaf)
    code, output = s_client(
        edge.address[1], leaf.name, ca, "-tls1_2", "-cipher", TLS12_CIPHER[kind]
    )
    assert code == 0, output
    assert "Protocol version: TLSv1.2" in output
    assert f"Ciphersuite: {TLS12_CIPHER[kind]}" in output
    assert "Verification: OK" in output
    assert key_calls_for(keyserver, leaf) == before + 1


@pytest.mark.parametrize("kind", KINDS)
def test_curl_fetches_the_origin_page(
    kind: str, edge: Edge, ca: Authority, leaves: dict[str, Leaf], keyserver: TestKeyServer
) -> None:
    leaf = leaves[kind]
    before = key_calls_for(keyserver, leaf)
    code, output = curl(edge.address[1], leaf.name, ca, path="/hello?x=1")
    assert code == 0, output
    page = json.loads(output)
    assert page["path"] == "/hello?x=1"
    assert page["host"] == f"{leaf.name}:{edge.address[1]}"
    assert page["xff"] == ["127.0.0.1"]
    assert page["proto"] == "https"
    assert key_calls_for(keyserver, leaf) == before + 1


@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls13", "tls12"])
@pytest.mark.parametrize("kind", KINDS)
def test_python_ssl(
    kind: str,
    version: ssl.TLSVersion,
    edge: Edge,
    ca: Authority,
    leaves: dict[str, Leaf],
) -> None:
    leaf = leaves[kind]
    got = fetch(edge.address[1], leaf.name, client_context(ca.path, version), path="/py")
    assert got.version == ("TLSv1.3" if version is TLS13 else "TLSv1.2")
    assert got.status == 200
    assert described(got.body)["path"] == "/py"


def test_two_hostnames_two_keys_chosen_by_sni(
    edge: Edge, ca: Authority, leaves: dict[str, Leaf], keyserver: TestKeyServer
) -> None:
    context = client_context(ca.path, TLS13)
    for leaf in (leaves["ecdsa"], leaves["second"]):
        before = keyserver.key_calls()
        with (
            socket.create_connection(edge.address, timeout=CLIENT_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=leaf.name) as tls,
        ):
            served = tls.getpeercert(binary_form=True)
        assert served == leaf.certificate.public_bytes(serialization.Encoding.DER)
        new = keyserver.key_calls()[len(before) :]
        assert [(call.ski, call.sni) for call in new] == [(leaf.ski, leaf.name)]
    assert leaves["ecdsa"].ski != leaves["second"].ski


def test_unknown_sni_gets_unrecognized_name(
    edge: Edge, ca: Authority, keyserver: TestKeyServer
) -> None:
    before = len(keyserver.key_calls())
    failures = edge.counters["unknown_sni"]
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        fetch(edge.address[1], "nobody.edge.test", client_context(ca.path))
    assert len(keyserver.key_calls()) == before
    assert edge.counters["unknown_sni"] == failures + 1


def test_no_sni_gets_the_default_service_or_an_alert(
    workdir: Path,
    leaves: dict[str, Leaf],
    keyserver: TestKeyServer,
    origin: TestOrigin,
    mtls: Mtls,
    ca: Authority,
    edge: Edge,
) -> None:
    context = client_context(ca.path, TLS13)
    context.check_hostname = False  # no SNI, so no name to check; the chain is still verified
    request = b"GET /nosni HTTP/1.0\r\n\r\n"
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        fetch(edge.address[1], None, context, request=request)
    path = write_config(
        workdir / "default",
        [Site(leaves["ecdsa"], origin.url)],
        keyserver.address,
        mtls,
        default_service=leaves["ecdsa"].name,
    )
    with own_edge(load_config(path)) as defaulted:
        got = fetch(defaulted.address[1], None, context, request=request)
    assert got.status == 200
    assert described(got.body)["host"] == leaves["ecdsa"].name  # the edge filled it in


# --- resumption -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls13", "tls12"])
def test_resumption_needs_no_key_operation(
    kind: str,
    version: ssl.TLSVersion,
    edge: Edge,
    ca: Authority,
    leaves: dict[str, Leaf],
    keyserver: TestKeyServer,
) -> None:
    leaf = leaves[kind]
    context = client_context(ca.path, version)
    first = fetch(edge.address[1], leaf.name, context)
    assert not first.reused
    calls = len(keyserver.key_calls())
    resumed_before = edge.counters["resumed_handshakes"]
    session = first.session
    for _ in range(3):
        again = fetch(edge.address[1], leaf.name, context, session=session)
        assert again.reused
        assert again.status == 200
        session = again.session
    assert len(keyserver.key_calls()) == calls, "a resumed handshake called the key server"
    assert edge.counters["resumed_handshakes"] == resumed_before + 3


def test_tls12_session_id_cache_without_tickets(
    edge: Edge, ca: Authority, leaves: dict[str, Leaf], keyserver: TestKeyServer
) -> None:
    context = client_context(ca.path, TLS12)
    context.options |= ssl.OP_NO_TICKET
    first = fetch(edge.address[1], leaves["ecdsa"].name, context)
    assert first.session is not None and not first.session.has_ticket
    calls = len(keyserver.key_calls())
    again = fetch(edge.address[1], leaves["ecdsa"].name, context, session=first.session)
    assert again.reused
    assert len(keyserver.key_calls()) == calls


def test_tickets_resume_across_workers_sharing_the_ring(
    config_path: Path, ca: Authority, leaves: dict[str, Leaf], keyserver: TestKeyServer
) -> None:
    """Two workers, each with its own key client and session cache, one ticket key ring."""
    config = load_config(config_path)
    ring = TicketKeyRing()
    ring.rotate()
    leaf = leaves["ecdsa"]
    context = client_context(ca.path, TLS13)
    with own_edge(config, tickets=ring) as first, own_edge(config, tickets=ring) as second:
        got = fetch(first.address[1], leaf.name, context)
        calls = len(keyserver.key_calls())
        again = fetch(second.address[1], leaf.name, context, session=got.session)
        assert again.reused
        assert len(keyserver.key_calls()) == calls
        assert second.counters["resumed_handshakes"] == 1
        # An edge with its own ring cannot read the ticket: a full handshake.
        with own_edge(config) as stranger:
            other = fetch(stranger.address[1], leaf.name, context, session=again.session)
            assert not other.reused
            assert len(keyserver.key_calls()) == calls + 1
    ring.close()


def test_rotation_keeps_one_previous_key(
    config_path: Path, ca: Authority, leaves: dict[str, Leaf], keyserver: TestKeyServer
) -> None:
    config = load_config(config_path)
    leaf = leaves["ecdsa"]
    context = client_context(ca.path, TLS13)
    with own_edge(config) as running:
        session = fetch(running.address[1], leaf.name, context).session
        running.tickets.rotate()  # the ticket's key is now the previous one
        after_one = fetch(running.address[1], leaf.name, context, session=session)
        assert after_one.reused
        running.tickets.rotate()
        running.tickets.rotate()  # ... and now it is gone
        calls = len(keyserver.key_calls())
        after_three = fetch(running.address[1], leaf.name, context, session=after_one.session)
        assert not after_three.reused
        assert len(keyserver.key_calls()) == calls + 1


def test_each_service_has_its_own_ticket_key(config_path: Path) -> None:
    """So a ticket issued for one host name cannot resume a session on another."""
    config = load_config(config_path)
    ring = TicketKeyRing()
    ring.rotate()
    ring.rotate()
    with own_edge(config, tickets=ring) as one, own_edge(config, tickets=ring) as two:
        keys = {
            name: [bytes(k) for k in service.settings(ring).ticketKeys]
            for name, service in one.services.items()
        }
        same = {
            name: [bytes(k) for k in service.settings(ring).ticketKeys]
            for name, service in two.services.items()
        }
    assert keys == same  # every worker derives the same keys
    assert all(len(found) == 2 for found in keys.values())  # current and previous
    flat = [key for found in keys.values() for key in found]
    assert len(set(flat)) == len(flat)
    raw = ring.snapshot()[2]
    assert not set(raw) & set(flat)  # never the ring's own key
    ring.close()


def test_tickets_can_be_turned_off(
    workdir: Path,
    leaves: dict[str, Leaf],
    keyserver: TestKeyServer,
    origin: TestOrigin,
    mtls: Mtls,
    ca: Authority,
) -> None:
    path = write_config(
        workdir / "notickets",
        [Site(leaves["ecdsa"], origin.url)],
        keyserver.address,
        mtls,
        session_tickets=False,
    )
    context = client_context(ca.path, TLS13)
    with own_edge(load_config(path)) as running:
        got = fetch(running.address[1], leaves["ecdsa"].name, context)
        again = fetch(running.address[1], leaves["ecdsa"].name, context, session=got.session)
        assert running.counters["resumed_handshakes"] == 0
    assert not got.reused and not again.reused


# --- the key server failing -----------------------------------------------------------------


def single_site_edge(
    directory: Path, leaf: Leaf, server_address: str, origin: TestOrigin, mtls: Mtls
) -> EdgeConfig:
    return load_config(
        write_config(directory, [Site(leaf, origin.url)], server_address, mtls, idle_timeout=2)
    )


def test_key_server_down_gives_an_alert_promptly(
    workdir: Path, leaves: dict[str, Leaf], origin: TestOrigin, mtls: Mtls, ca: Authority
) -> None:
    leaf = leaves["ecdsa"]
    server = TestKeyServer([leaf.key], mtls).start()
    config = single_site_edge(workdir / "down", leaf, server.address, origin, mtls)
    try:
        with own_edge(config) as running:
            port = running.address[1]
            assert fetch(port, leaf.name, client_context(ca.path, TLS13)).status == 200
            server.stop()
            for version in (TLS13, TLS12):
                started = time.monotonic()
                with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
                    fetch(port, leaf.name, client_context(ca.path, version))
                assert time.monotonic() - started < FAIL_FAST
            started = time.monotonic()
            code, output = s_client(port, leaf.name, ca, "-tls1_3")
            assert code != 0
            assert "internal error" in output
            assert time.monotonic() - started < FAIL_FAST
            wait_for(lambda: running.counters["key_failures"] == 3)
            # Back up: new handshakes work again once the backoff has passed.
            server.start()
            deadline = time.monotonic() + 15
            while True:
                try:
                    fetch(port, leaf.name, client_context(ca.path, TLS13))
                    break
                except ssl.SSLError:
                    assert time.monotonic() < deadline, "the edge never reconnected"
                    time.sleep(0.1)
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["refuse", "hang"])
def test_refusing_or_silent_key_server_gives_an_alert_promptly(
    mode: str,
    workdir: Path,
    leaves: dict[str, Leaf],
    origin: TestOrigin,
    mtls: Mtls,
    ca: Authority,
) -> None:
    leaf = leaves["rsa"]
    with TestKeyServer([leaf.key], mtls, mode=mode) as server:
        config = single_site_edge(workdir / mode, leaf, server.address, origin, mtls)
        started = time.monotonic()
        with own_edge(config) as running:
            with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
                fetch(running.address[1], leaf.name, client_context(ca.path, TLS13))
            elapsed = time.monotonic() - started
            wait_for(lambda: running.counters["key_failures"] == 1)
        assert [call.ski for call in server.key_calls()] == [leaf.ski]
    # A silent key server costs the key client's timeout (2 s), a refusing one nothing.
    assert elapsed < (FAIL_FAST if mode == "hang" else 1.5)


def test_key_id_names_the_key_on_the_key_server(
    workdir: Path,
    leaves: dict[str, Leaf],
    keyserver: TestKeyServer,
    origin: TestOrigin,
    mtls: Mtls,
    ca: Authority,
) -> None:
    leaf = leaves["ecdsa"]
    alias = bytes(range(20))
    path = write_config(
        workdir / "alias", [Site(leaf, origin.url, key_id=alias)], keyserver.address, mtls
    )
    with (
        own_edge(load_config(path)) as running,
        pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"),  # KEY_NOT_FOUND under the alias
    ):
        fetch(running.address[1], leaf.name, client_context(ca.path, TLS13))
    assert keyserver.key_calls()[-1].ski == alias


# --- the edge holds no private key ----------------------------------------------------------


def test_the_edge_holds_only_public_material(
    edge: Edge, config_path: Path, leaves: dict[str, Leaf], mtls: Mtls
) -> None:
    config = edge.config
    loaded = [config_path.read_bytes()] + [service.chain_pem for service in config.services]
    loaded += [service.chain_path.read_bytes() for service in config.services]
    assert all(b"PRIVATE KEY" not in data for data in loaded)
    ints, raws = reachable(edge)
    for leaf in leaves.values():
        secret_ints, secret_raws = private_values(leaf.key)
        assert not secret_ints & ints, f"a private number of {leaf.name} is in the edge"
        assert not any(secret in raw for secret in secret_raws for raw in raws)
    for service in edge.services.values():
        assert service.key.hasPrivateKey()
        if isinstance(service.key, RemoteRSAKey):
            assert (service.key.d, service.key.p, service.key.q) == (0, 0, 0)
        if isinstance(service.key, RemoteEd25519Key):
            assert service.key.private_key is None
    # The one private key the edge reads is its own client key for the key server, which
    # OpenSSL loads from the file; it is no service's key.
    edge_key = serialization.load_pem_private_key(mtls.edge_key.read_bytes(), None)
    assert all(
        edge_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        != leaf.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for leaf in leaves.values()
    )


def test_the_walk_would_find_a_private_key(leaves: dict[str, Leaf]) -> None:
    """The check above can fail: an object holding a private key is caught."""
    numbers = leaves["rsa"].key.private_numbers()
    ints, _ = reachable(types.SimpleNamespace(inner={"held": [numbers.d]}))
    secret_ints, _ = private_values(leaves["rsa"].key)
    assert secret_ints & ints


def test_a_chain_file_with_a_private_key_is_refused(
    workdir: Path,
    leaves: dict[str, Leaf],
    keyserver: TestKeyServer,
    origin: TestOrigin,
    mtls: Mtls,
) -> None:
    leaf = leaves["ecdsa"]
    path = write_config(workdir / "leaky", [Site(leaf, origin.url)], keyserver.address, mtls)
    chain = path.parent / f"{leaf.name}.chain.pem"
    chain.write_bytes(
        leaf.chain_pem
        + leaf.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigurationError, match="private key"):
        load_config(path)


def test_logs_show_no_ticket_keys(
    config_path: Path, ca: Authority, leaves: dict[str, Leaf], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="keybroker")
    config = load_config(config_path)
    context = client_context(ca.path, TLS13)
    with own_edge(config) as running:
        got = fetch(running.address[1], leaves["rsa"].name, context)
        fetch(running.address[1], leaves["rsa"].name, context, session=got.session)
        running.tickets.rotate()
        keys = running.tickets.snapshot()[2]
        derived = [
            bytes(key)
            for service in running.services.values()
            for key in service.settings(running.tickets).ticketKeys
        ]
        shown = caplog.text + repr(running) + repr(running.tickets)
    assert "resumed" in caplog.text and "full" in caplog.text  # the debug lines were there
    for secret in [*keys, *derived]:
        assert secret.hex() not in shown
        assert secret.hex().upper() not in shown
    assert "PRIVATE" not in shown


# --- HTTP relay -----------------------------------------------------------------------------


def raw_exchange(edge: Edge, leaf: Leaf, ca: Authority, request: bytes) -> bytes:
    context = client_context(ca.path, TLS13)
    with (
        socket.create_connection(edge.address, timeout=CLIENT_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=leaf.name) as tls,
    ):
        tls.sendall(request)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return data


def test_post_body_and_forwarded_headers(
    edge: Edge, ca: Authority, leaves: dict[str, Leaf]
) -> None:
    leaf = leaves["ecdsa"]
    body = b"x" * 100_000
    request = (
        f"POST /submit HTTP/1.1\r\nHost: {leaf.name}\r\nContent-Length: {len(body)}\r\n"
        "X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nConnection: close\r\n\r\n"
    ).encode() + body
    status, headers, payload = parse_response(raw_exchange(edge, leaf, ca, request))
    assert status == 200
    page = described(payload)
    assert page["method"] == "POST"
    assert page["body"] == body.decode()
    assert page["xff"] == ["127.0.0.1"]  # the client's claim is replaced
    assert page["connection"] == "close"
    assert headers["connection"] == "close"


def test_keep_alive_serves_several_requests(
    edge: Edge, ca: Authority, leaves: dict[str, Leaf]
) -> None:
    leaf = leaves["ecdsa"]
    one = f"GET /one HTTP/1.1\r\nHost: {leaf.name}\r\n\r\n".encode()
    two = f"GET /chunked HTTP/1.1\r\nHost: {leaf.name}\r\n\r\n".encode()
    three = f"HEAD /three HTTP/1.1\r\nHost: {leaf.name}\r\nConnection: close\r\n\r\n".encode()
    data = raw_exchange(edge, leaf, ca, one + two + three)
    first, rest = data.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 200")
    length = int(re.search(rb"Content-Length: (\d+)", first).group(1))  # type: ignore[union-attr]
    assert described(rest[:length])["path"] == "/one"
    rest = rest[length:]
    assert rest.startswith(b"HTTP/1.1 200")
    head, rest = rest.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    body, rest = rest.split(b"0\r\n\r\n", 1)
    decoded = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        decoded += body[: int(size, 16)]
        body = body[int(size, 16) + 2 :]
    assert described(decoded)["path"] == "/chunked"
    assert rest.startswith(b"HTTP/1.1 200")
    assert rest.endswith(b"\r\n\r\n")  # HEAD: no body
    assert b"Connection: close" in rest


def test_close_delimited_origin_body(edge: Edge, ca: Authority, leaves: dict[str, Leaf]) -> None:
    leaf = leaves["ecdsa"]
    request = f"GET /eof HTTP/1.1\r\nHost: {leaf.name}\r\n\r\n".encode()
    status, headers, payload = parse_response(raw_exchange(edge, leaf, ca, request))
    assert status == 200
    assert headers["connection"] == "close"
    assert described(payload)["path"] == "/eof"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: other.edge.test\r\n\r\n", 421),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: {name}\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"GET / HTTP/2.0\r\nHost: {name}\r\n\r\n", 505),
        (b"GET http://evil/ HTTP/1.1\r\nHost: {name}\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: {name}\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: {name}\r\n folded\r\n\r\n", 400),
    ],
    ids=["misdirected", "no-host", "chunked-request", "http2", "absolute-form", "huge", "fold"],
)
def test_bad_requests_are_answered_by_the_edge(
    request_bytes: bytes,
    status: int,
    edge: Edge,
    ca: Authority,
    leaves: dict[str, Leaf],
) -> None:
    leaf = leaves["ecdsa"]
    data = raw_exchange(edge, leaf, ca, request_bytes.replace(b"{name}", leaf.name.encode()))
    got, headers, _ = parse_response(data)
    assert got == status
    assert headers["connection"] == "close"


def test_origin_down_is_a_502(
    workdir: Path,
    leaves: dict[str, Leaf],
    keyserver: TestKeyServer,
    mtls: Mtls,
    ca: Authority,
) -> None:
    leaf = leaves["ecdsa"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    path = write_config(
        workdir / "nodrigin", [Site(leaf, f"http://127.0.0.1:{dead}")], keyserver.address, mtls
    )
    with own_edge(load_config(path)) as running:
        got = fetch(running.address[1], leaf.name, client_context(ca.path))
        assert got.status == 502
        assert running.counters["origin_errors"] == 1


# --- configuration --------------------------------------------------------------------------


def test_configuration_mistakes_are_refused(
    workdir: Path, leaves: dict[str, Leaf], keyserver: TestKeyServer, mtls: Mtls
) -> None:
    leaf = leaves["ecdsa"]
    good = write_config(workdir / "mistakes", [Site(leaf, "http://127.0.0.1:1")], "h:1", mtls)
    text = good.read_text()
    load_config(good)  # the baseline loads
    cases = {
        "typo": text.replace("[edge]", "[edge]\nworkerz = 2"),
        "no keyserver": text.split("[keyserver]")[0] + "[[service]]" + text.split("[[service]]")[1],
        "bad origin": text.replace("http://127.0.0.1:1", "https://127.0.0.1:1"),
        "bad key_id": text.replace('origin = "', 'key_id = "zz"\norigin = "'),
        "unknown default": text.replace("[edge]", '[edge]\ndefault_service = "x.test"'),
        "wrong host": text.replace(f'hostname = "{leaf.name}"', 'hostname = "not.covered.test"'),
        "duplicate": text + text[text.index("[[service]]") :],
        "bad version": text.replace("[edge]", '[edge]\nmin_version = "1.1"'),
    }
    for name, broken in cases.items():
        path = workdir / "mistakes" / f"{name.replace(' ', '_')}.toml"
        path.write_text(broken)
        with pytest.raises(ConfigurationError):
            load_config(path)


# --- the real command, two worker processes -------------------------------------------------


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def test_edge_command_with_two_workers(
    workdir: Path,
    leaves: dict[str, Leaf],
    keyserver: TestKeyServer,
    origin: TestOrigin,
    mtls: Mtls,
    ca: Authority,
) -> None:
    stats = workdir / "cli" / "stats.json"
    path = write_config(
        workdir / "cli",
        [Site(leaves["ecdsa"], origin.url), Site(leaves["rsa"], origin.url)],
        keyserver.address,
        mtls,
        stats_file=str(stats),
        stats_interval=0.2,
        ticket_rotation=2,
    )
    command = [
        sys.executable,
        "-m",
        "keybroker.cli.main",
        "edge",
        "--config",
        str(path),
        "--workers",
        "2",
        "--log-level",
        "info",
    ]
    log_path = workdir / "cli" / "edge.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, line + log_path.read_text()
        port = int(match.group(1))
        wait_for(lambda: len(children_of(process.pid)) == 2)

        code, output = curl(port, leaves["ecdsa"].name, ca, path="/via-cli")
        assert code == 0, output
        assert json.loads(output)["path"] == "/via-cli"
        code, output = s_client(port, leaves["rsa"].name, ca, "-tls1_3")
        assert code == 0 and "Verification: OK" in output, output

        # Tickets from either worker resume on either worker, with no key operation.
        context = client_context(ca.path, TLS13)
        session = fetch(port, leaves["rsa"].name, context).session
        calls = len(keyserver.key_calls())
        for _ in range(8):
            again = fetch(port, leaves["rsa"].name, context, session=session)
            assert again.reused
            session = again.session
        assert len(keyserver.key_calls()) == calls

        # A worker that dies is replaced, and the replacement reads the same ticket keys.
        workers = children_of(process.pid)
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: len(set(children_of(process.pid)) - set(workers)) == 1)
        wait_for(lambda: len(children_of(process.pid)) == 2)
        for _ in range(4):
            again = fetch(port, leaves["rsa"].name, context, session=session)
            assert again.reused
            session = again.session
        assert len(keyserver.key_calls()) == calls

        def report() -> Any:
            with contextlib.suppress(OSError, ValueError):
                return json.loads(stats.read_text())
            return {"ticket_generation": 0, "total": {"resumed_handshakes": 0}}

        # The parent rotates the ticket keys (every 2 s here) and reports the counters.
        wait_for(lambda: report()["ticket_generation"] >= 3)
        wait_for(lambda: report()["total"]["resumed_handshakes"] >= 12)
        document = report()
        assert len(document["workers"]) == 2
        total = document["total"]
        assert total["handshakes"] == sum(row["handshakes"] for row in document["workers"])
        assert total["full_handshakes"] == 3
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
    logs = log_path.read_text()
    assert process.returncode == 0, logs
    errors = [line for line in logs.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "restarting it" in errors[0], logs  # the worker we killed
    assert "Traceback" not in logs, logs
    assert "PRIVATE" not in logs
    assert "session ticket keys rotated" in logs
    for config_file in [path, *path.parent.glob("*.chain.pem")]:
        assert b"PRIVATE KEY" not in config_file.read_bytes()


#: ``keybroker edge`` with the kernel's parent-death signal unavailable (as off Linux), so
#: that only the workers' portable watchdog (the lifeline pipe) notices a dead supervisor.
WITHOUT_PRCTL = (
    "import sys; import keybroker.flows.keyless.edge as edge; edge._prctl = None; "
    "from keybroker.cli.main import main; sys.argv[0] = 'keybroker'; main()"
)


def start_edge(
    path: Path, log_path: Path, *, prctl: bool = True
) -> tuple[subprocess.Popen[str], int]:
    """``keybroker edge --config path --workers 2``, its port once it listens."""
    launcher = ["-m", "keybroker.cli.main"] if prctl else ["-c", WITHOUT_PRCTL]
    command = [sys.executable, *launcher, "edge", "--config", str(path), "--workers", "2"]
    with log_path.open("a") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
    if not match:
        process.kill()
        process.wait()
        raise AssertionError(line + log_path.read_text())
    return process, int(match.group(1))


def nobody_listens(port: int) -> bool:
    """Whether a connection to ``127.0.0.1:port`` finds no listener. A closed port in the
    ephemeral range can be connected to *itself* (TCP simultaneous open, when the kernel
    happens to pick that port as the source): that also means nobody listens."""
    try:
        probe = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    except ConnectionRefusedError:
        return True
    with probe:
        return bool(probe.getsockname() == probe.getpeername())


def listeners(port: int) -> list[str]:
    """``pid command`` of each process holding a socket listening on ``port`` (Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                command = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                found.append(f"{fd_dir.parent.name} {command.decode(errors='replace')[:120]}")
    return found


def running(pid: int) -> bool:
    """Whether any thread of process ``pid`` is alive. The main thread's own state is not
    enough: it can be a zombie while other threads of the process still run and hold its
    sockets (a listener that still accepts); only when every thread has ended are they
    released."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            return True
    return False


@pytest.mark.parametrize("prctl", [True, False], ids=["pdeathsig", "watchdog"])
def test_workers_exit_when_the_edge_is_killed(
    prctl: bool,
    workdir: Path,
    leaves: dict[str, Leaf],
    keyserver: TestKeyServer,
    origin: TestOrigin,
    mtls: Mtls,
    ca: Authority,
) -> None:
    """However the supervisor dies (SIGKILL here), its workers close the listening socket and
    exit within a second or so, so that the next edge can listen on the same port."""
    directory = workdir / f"orphans-{'pdeathsig' if prctl else 'watchdog'}"
    leaf = leaves["ecdsa"]
    path = write_config(directory, [Site(leaf, origin.url)], keyserver.address, mtls)
    log_path = directory / "edge.log"
    context = client_context(ca.path)
    processes: list[subprocess.Popen[str]] = []
    workers: list[int] = []
    try:
        process, port = start_edge(path, log_path, prctl=prctl)
        processes.append(process)
        wait_for(lambda: len(children_of(process.pid)) == 2)
        workers = children_of(process.pid)
        assert fetch(port, leaf.name, context).status == 200

        process.kill()
        process.wait(timeout=10)
        killed = time.monotonic()
        wait_for(lambda: not any(running(pid) for pid in workers), timeout=5.0)
        assert time.monotonic() - killed < 3.0
        # Nothing accepts on the port any more (else: who does, for the next reader).
        assert nobody_listens(port), listeners(port)
        socket.create_server(("127.0.0.1", port)).close()  # and it can be bound again

        # A new edge listens on the same port and serves.
        again = directory / "again.toml"
        again.write_text(
            path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
        )
        second, second_port = start_edge(again, log_path)
        processes.append(second)
        assert second_port == port
        wait_for(lambda: len(children_of(second.pid)) == 2)
        workers += children_of(second.pid)
        assert fetch(port, leaf.name, context).status == 200
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=15) == 0, log_path.read_text()
        assert not any(running(pid) for pid in workers)
    finally:
        for started in processes:
            if started.poll() is None:
                started.kill()
                started.wait()
        for pid in workers:  # without the fix, the orphans would serve on
            if running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    logs = log_path.read_text()
    assert "Traceback" not in logs, logs
    if not prctl:  # the watchdog said why each worker went
        assert logs.count(" is gone; this worker exits") == 2, logs
