"""Acceptance e2e for keyless TLS (S5): real processes, unmodified clients, no key at the edge.

Processes, all over loopback and all real subprocesses: two origins (``python -m
http.server``, each serving a page with its own random token), ``keybroker keyserver``
(keys in a 0600 PEM directory, or in a SoftHSM2 token through PKCS#11) and ``keybroker edge
--workers 2``, which has only certificates plus its own client identity for the key server.
One test CA, made here with ``cryptography``, issues the service leaves (RSA-2048, ECDSA
P-256, Ed25519), the key server's certificate and the edge's client certificate
(``keybroker://node/edge1``).

Every client verifies the chain and the host name against that CA: ``openssl s_client``
(TLS 1.3, and TLS 1.2 with ECDHE), ``curl`` and Python's ``ssl``. A successful handshake
therefore proves that the key server signed with the certificate's key, since the edge has
no key of its own to sign with. The processes live for the whole module. The tests that stop
the key server or revoke the grant restore it before they end.

Missing ``openssl``, ``curl`` or SoftHSM2 skips a test, or fails it under ``CI=true``.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import signal
import ssl
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.conftest import missing
from tests.flows.keyless.softhsm import USER_PIN, start_softhsm

from keybroker.flows.keyless.pkcs11keys import import_private_key
from keybroker.keys.root import find_pkcs11_module

from .keyless_kit import (
    Leaf,
    Outcome,
    PrivateKey,
    TestCA,
    children_of,
    curl,
    grants_toml,
    https_get,
    launch,
    log_path,
    log_size,
    memory_holds,
    metric,
    new_key,
    open_files,
    process_tree,
    s_client,
    secrets_of,
    shutdown,
    signatures,
    spki,
    steady_port,
    wait_listening,
    wait_until,
    write_private,
)
from .processes import KB, Env, Procs

KINDS = ["rsa", "p256", "ed25519"]
#: A second P-256 host with another key (and another origin): the SNI picks the key.
SECOND = "api"
#: A host whose leaf key is on no key server, with ``key_id`` naming the p256 host's key.
MISMATCH = "mismatch"
HOST = {name: f"{name}.keyless.test" for name in [*KINDS, SECOND, MISMATCH]}
KEYSERVER_NAME = "keyserver.keyless.test"
EDGE = "node/edge1"
TLS13 = ssl.TLSVersion.TLSv1_3
TLS12 = ssl.TLSVersion.TLSv1_2
#: openssl's name for the key server's signature, in the handshake it verified.
SIGNATURE_TYPE = {"rsa": "RSA-PSS", "p256": "ECDSA", "ed25519": "ed25519"}
TLS12_CIPHER = {"rsa": "ECDHE-RSA-", "p256": "ECDHE-ECDSA-", "ed25519": "ECDHE-ECDSA-"}
ECDHE_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
#: A handshake that cannot get its signature must end with an alert well within this many
#: seconds (the edge's key-server timeout is 2 s): a hang detector, not a speed test.
FAIL_FAST = 8.0
#: What openssl, curl and Python say when the edge sends an internal_error alert.
INTERNAL_ERROR = "alert internal error"
READY_ORIGIN = re.compile(r"Serving HTTP on 127\.0\.0\.1 port (\d+)")

#: The checks of what the edge holds read Linux's /proc.
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux /proc")


@dataclasses.dataclass
class KeyServer:
    name: str  # in procs
    config: Path
    grants: Path
    #: Always given with ``--listen`` (which wins over the file's port 0), so that a restart
    #: listens where the edge dials.
    port: int = dataclasses.field(default_factory=steady_port)
    metrics: str = ""
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    def start(self, procs: Procs) -> None:
        """Start (or start again) and wait for the ready line."""
        offset = log_size(procs, self.name)
        argv = [
            *KB,
            "keyserver",
            "--config",
            str(self.config),
            "--listen",
            f"127.0.0.1:{self.port}",
        ]
        launch(procs, self.name, argv, self.env)
        ready = wait_listening(procs, self.name, offset)
        assert int(ready.group(1)) == self.port
        self.metrics = f"http://127.0.0.1:{ready.group(2)}"

    def generation(self) -> float | None:
        return metric(self.metrics, "keyless_config_generation")

    def reload(self, procs: Procs) -> None:
        """SIGHUP, and wait until the new generation is in use."""
        before = self.generation()
        assert before is not None
        procs.running[self.name].send_signal(signal.SIGHUP)
        wait_until(lambda: self.generation() == before + 1, f"{self.name} reloading")


@dataclasses.dataclass
class Edge:
    name: str
    directory: Path
    config: Path
    port: int = 0
    pid: int = 0

    def start(self, procs: Procs) -> None:
        offset = log_size(procs, self.name)
        argv = [*KB, "edge", "--config", str(self.config), "--workers", "2"]
        self.pid = launch(procs, self.name, argv).pid
        self.port = int(wait_listening(procs, self.name, offset).group(1))
        wait_until(lambda: len(children_of(self.pid)) == 2, "the edge's two workers")


@dataclasses.dataclass
class World:
    root: Path
    procs: Procs
    ca: TestCA
    leaves: dict[str, Leaf]
    tokens: dict[str, str]  # host name -> the token of the page its origin serves
    origins: dict[str, str]  # origin name -> http://127.0.0.1:port
    keyserver: KeyServer
    edge: Edge

    def page_token(self, name: str) -> str:
        return self.tokens[HOST[name]]


def start_origin(procs: Procs, root: Path, name: str) -> tuple[str, str]:
    """A ``python -m http.server`` whose index.html holds a fresh token: (URL, token)."""
    token = f"keyless-e2e-{name}-{secrets.token_hex(12)}"
    directory = root / f"origin-{name}"
    directory.mkdir()
    (directory / "index.html").write_text(f"<html><body>{token}</body></html>\n")
    argv = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"]
    launch(procs, f"origin-{name}", [*argv, "--directory", str(directory)])
    port = wait_listening(procs, f"origin-{name}", 0, READY_ORIGIN).group(1)
    return f"http://127.0.0.1:{port}", token


def write_keyserver(
    directory: Path, ca: TestCA, keys: dict[str, PrivateKey], source: str
) -> tuple[Path, Path]:
    """The key server's TOML, TLS files and grants (``source``: the key-source lines)."""
    server = ca.identity(
        directory / "tls",
        "server",
        common_name="service/keyserver",
        dns=[KEYSERVER_NAME],
        ips=["127.0.0.1"],
        server=True,
    )
    grants = directory / "grants.toml"
    grants.write_text(grants_toml(keys, {EDGE: list(keys)}))
    config = directory / "keyserver.toml"
    config.write_text(
        'listen = "127.0.0.1:0"\n'
        f'cert = "{server.cert.relative_to(directory)}"\n'
        f'key = "{server.key.relative_to(directory)}"\n'
        f'client_ca = "{ca.path}"\n'
        f"{source}"
        'grants = "grants.toml"\n'
        "workers = 2\n"
        "metrics_port = 0\n"
    )
    return config, grants


def write_edge(
    directory: Path,
    ca: TestCA,
    keyserver_port: int,
    services: Sequence[tuple[Leaf, str, bytes | None]],
) -> Path:
    """The edge's directory: its TOML, the chains and its mutual-TLS files, nothing else."""
    tls = directory / "tls"
    tls.mkdir(parents=True)
    (tls / "ca.pem").write_bytes(ca.path.read_bytes())
    ca.identity(tls, "edge", common_name=EDGE, uri=f"keybroker://{EDGE}")
    lines = [
        "[edge]",
        'listen = "127.0.0.1:0"',
        "",
        "[keyserver]",
        f'address = "127.0.0.1:{keyserver_port}"',
        f'server_name = "{KEYSERVER_NAME}"',
        'ca = "tls/ca.pem"',
        'cert = "tls/edge.crt"',
        'key = "tls/edge.key"',
    ]
    (directory / "chains").mkdir()
    for leaf, origin, key_id in services:
        chain = directory / "chains" / f"{leaf.name}.pem"
        chain.write_bytes(leaf.chain_pem)
        lines += [
            "",
            "[[service]]",
            f'hostname = "{leaf.name}"',
            f'chain = "chains/{chain.name}"',
            f'origin = "{origin}"',
        ]
        if key_id is not None:
            lines.append(f'key_id = "{key_id.hex()}"')
    config = directory / "edge.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("keyless")
    procs = Procs(Env(root / "home", root))
    try:
        ca = TestCA.create(root / "pki" / "ca.pem")
        kinds = {name: name for name in KINDS} | {SECOND: "p256", MISMATCH: "p256"}
        leaves = {name: ca.leaf(HOST[name], new_key(kind)) for name, kind in kinds.items()}
        # The key server holds every key but the mismatch host's.
        held = {name: leaf.key for name, leaf in leaves.items() if name != MISMATCH}
        for name, key in held.items():
            write_private(root / "keyserver" / "keys" / f"{name}.pem", key)
        config, grants = write_keyserver(root / "keyserver", ca, held, 'keys_dir = "keys"\n')
        keyserver = KeyServer("keyserver", config, grants)
        keyserver.start(procs)

        www, www_token = start_origin(procs, root, "www")
        api, api_token = start_origin(procs, root, "api")
        services: list[tuple[Leaf, str, bytes | None]]
        services = [(leaves[name], www, None) for name in KINDS]
        services.append((leaves[SECOND], api, None))
        services.append((leaves[MISMATCH], www, leaves["p256"].ski))
        edge_config = write_edge(root / "edge", ca, keyserver.port, services)
        edge = Edge("edge", root / "edge", edge_config)
        edge.start(procs)
        tokens = {leaf.name: www_token for leaf in leaves.values()}
        tokens[HOST[SECOND]] = api_token
        yield World(root, procs, ca, leaves, tokens, {"www": www, "api": api}, keyserver, edge)
    finally:
        # The edges first (SIGTERM: status 0, workers ended), then the key servers.
        problems = shutdown(procs, ["edge", "edge-hsm", "keyserver", "keyserver-hsm"])
    assert not problems, problems


@pytest.fixture(autouse=True)
def no_tracebacks(world: World) -> Iterator[None]:
    """Whatever a test does, neither the edge nor the key server logs a traceback."""
    names = [name for name in world.procs.running if not name.startswith("origin")]
    offsets = {name: log_size(world.procs, name) for name in names}
    yield
    for name, offset in offsets.items():
        text = log_path(world.procs, name).read_bytes()[offset:].decode(errors="replace")
        assert "Traceback" not in text, f"{name}:\n{text[-4000:]}"


# --- the edge holds no private key ----------------------------------------------------------


def edge_files(edge: Edge) -> dict[Path, bytes]:
    """Every file the edge's configuration names, and every file in its directory."""
    config = tomllib.loads(edge.config.read_text())
    named = [config["keyserver"][item] for item in ("ca", "cert", "key")]
    named += [service["chain"] for service in config["service"]]
    paths = {(edge.directory / name).resolve() for name in named}
    paths |= {path.resolve() for path in edge.directory.rglob("*") if path.is_file()}
    return {path: path.read_bytes() for path in paths}


def test_the_edge_runs_with_only_public_material(world: World) -> None:
    """The edge's files hold certificates and its own client key only; its processes have
    no key file open and no service key's secret anywhere in their memory, while the key
    server's memory does hold them (so the scan can find a key)."""
    edge, leaves = world.edge, world.leaves
    files = edge_files(edge)
    assert all(path.is_relative_to(edge.directory.resolve()) for path in files)
    own_key = (edge.directory / "tls" / "edge.key").resolve()
    assert [path for path, data in files.items() if b"PRIVATE KEY" in data] == [own_key]
    # The one private key is the edge's identity for the key server, no service's key.
    identity = serialization.load_pem_private_key(files[own_key], None)
    edge_cert = x509.load_pem_x509_certificate(files[(edge.directory / "tls/edge.crt").resolve()])
    assert isinstance(identity, ec.EllipticCurvePrivateKey)
    assert spki(identity.public_key()) == spki(edge_cert.public_key())  # type: ignore[arg-type]
    assert spki(identity.public_key()) not in {
        spki(leaf.key.public_key()) for leaf in leaves.values()
    }

    pids = process_tree(edge.pid)
    assert len(pids) == 3  # the supervisor and two workers
    key_dir = (world.root / "keyserver").resolve()
    for pid in pids:
        for path in open_files(pid):
            assert not path.is_relative_to(key_dir), (pid, path)
            if path.is_file():
                assert b"PRIVATE KEY" not in path.read_bytes(), (pid, path)
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"PRIVATE KEY" not in environ and b"SOFTHSM2_CONF" not in environ
    assert "PRIVATE" not in log_path(world.procs, edge.name).read_text()

    needles = [needle for leaf in leaves.values() for needle in secrets_of(leaf.key)]
    try:
        for pid in pids:
            assert not memory_holds(pid, needles), f"edge process {pid} holds key material"
        # The same scan finds every key in the key server's memory (but not the mismatch
        # host's key, which it was never given): the check above can fail.
        keyserver = world.procs.running["keyserver"].pid
        for name, leaf in leaves.items():
            found = memory_holds(keyserver, secrets_of(leaf.key))
            assert bool(found) is (name != MISMATCH), name
    except PermissionError:  # e.g. Yama ptrace_scope >= 2
        missing("reading a child process's memory (/proc/PID/mem)")


# --- unmodified clients, every key type -----------------------------------------------------


def assert_served(outcome: Outcome, leaf: Leaf) -> None:
    """openssl verified the chain and the host name, and the leaf it was sent is ``leaf``."""
    assert "Verify return code: 0 (ok)" in outcome.output, outcome.output
    assert outcome.served_certificate == leaf.certificate, outcome.output
    assert f"subject=CN = {leaf.name}" in outcome.output


@pytest.mark.parametrize("kind", KINDS)
def test_openssl_tls13(world: World, kind: str) -> None:
    leaf = world.leaves[kind]
    done = s_client(world.edge.port, leaf.name, world.ca.path, "-tls1_3")
    assert done.code == 0, done.output
    assert_served(done, leaf)
    assert re.search(
        r"New, TLSv1\.3, Cipher is TLS_(AES_\d+_GCM|CHACHA20_POLY1305)_SHA\d+", done.output
    )
    assert f"Peer signature type: {SIGNATURE_TYPE[kind]}" in done.output, done.output
    assert world.page_token(kind) in done.output  # the origin's page, through the edge


@pytest.mark.parametrize("kind", KINDS)
def test_openssl_tls12_ecdhe(world: World, kind: str) -> None:
    leaf = world.leaves[kind]
    done = s_client(world.edge.port, leaf.name, world.ca.path, "-tls1_2", "-cipher", ECDHE_CIPHERS)
    assert done.code == 0, done.output
    assert_served(done, leaf)
    cipher = re.search(r"New, TLSv1\.2, Cipher is (\S+)", done.output)
    assert cipher and cipher.group(1).startswith(TLS12_CIPHER[kind]), done.output
    assert re.search(r"Server Temp Key: (X25519|ECDH)", done.output), done.output
    assert f"Peer signature type: {SIGNATURE_TYPE[kind]}" in done.output, done.output
    assert world.page_token(kind) in done.output


@pytest.mark.parametrize("version", ["1.3", "1.2"])
@pytest.mark.parametrize("kind", KINDS)
def test_curl_fetches_the_origin_page(world: World, kind: str, version: str) -> None:
    leaf = world.leaves[kind]
    done = curl(
        world.edge.port, leaf.name, world.ca.path, "-v", f"--tlsv{version}", "--tls-max", version
    )
    assert done.code == 0, done.output
    assert world.page_token(kind) in done.output
    assert "SSL certificate verify ok" in done.output
    assert f"subject: CN={leaf.name}" in done.output
    assert re.search(rf"SSL connection using TLSv{re.escape(version)} / (TLS_|ECDHE-)", done.output)


@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls13", "tls12"])
@pytest.mark.parametrize("kind", KINDS)
def test_python_ssl(world: World, kind: str, version: ssl.TLSVersion) -> None:
    leaf = world.leaves[kind]
    page = https_get(world.edge.port, leaf.name, world.ca.path, version)
    assert page.version == ("TLSv1.3" if version is TLS13 else "TLSv1.2")
    if version is TLS12:
        assert page.cipher is not None and page.cipher.startswith(TLS12_CIPHER[kind])
    assert page.peer == leaf.der
    assert page.status == 200
    assert world.page_token(kind).encode() in page.body


def test_two_hostnames_two_keys_chosen_by_sni(world: World) -> None:
    """Two P-256 hosts on one edge: each SNI gets its own certificate, signed for by its own
    key (the clients verify the signature with that certificate), and its own origin."""
    first, second = world.leaves["p256"], world.leaves[SECOND]
    assert first.ski != second.ski
    assert world.page_token("p256") != world.page_token(SECOND)
    for leaf in (first, second, first):
        done = s_client(world.edge.port, leaf.name, world.ca.path, "-tls1_3")
        assert done.code == 0, done.output
        assert_served(done, leaf)
        fetched = curl(world.edge.port, leaf.name, world.ca.path)
        assert fetched.code == 0, fetched.output
        assert fetched.output.strip().endswith(f"{world.tokens[leaf.name]}</body></html>")
        page = https_get(world.edge.port, leaf.name, world.ca.path, TLS12)
        assert page.peer == leaf.der and world.tokens[leaf.name].encode() in page.body


def test_a_signature_by_another_key_fails_the_handshake(world: World) -> None:
    """The mismatch host's certificate is not for the key its ``key_id`` names, so the key
    server signs with the wrong key: no client gets a verified handshake out of it."""
    leaf = world.leaves[MISMATCH]
    for version in ("-tls1_3", "-tls1_2"):
        done = s_client(world.edge.port, leaf.name, world.ca.path, version)
        assert done.code != 0, done.output
        assert re.search(r"alert (internal error|decrypt error)", done.output), done.output
        assert done.elapsed < FAIL_FAST
    with pytest.raises(ssl.SSLError):
        https_get(world.edge.port, leaf.name, world.ca.path, TLS13)
    assert curl(world.edge.port, leaf.name, world.ca.path).code != 0


# --- without the key server, no handshake -----------------------------------------------------


def assert_alert(world: World, edge: Edge, name: str) -> None:
    """A new handshake for host ``name`` ends promptly in an internal_error alert, for every
    client and both versions."""
    leaf = world.leaves[name]
    for args in (["-tls1_3"], ["-tls1_2", "-cipher", ECDHE_CIPHERS]):
        done = s_client(edge.port, leaf.name, world.ca.path, *args)
        assert done.code != 0 and INTERNAL_ERROR in done.output, done.output
        assert done.elapsed < FAIL_FAST, done
    done = curl(edge.port, leaf.name, world.ca.path)
    assert done.code == 35 and INTERNAL_ERROR in done.output, done.output
    for version in (TLS13, TLS12):
        started = time.monotonic()
        with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
            https_get(edge.port, leaf.name, world.ca.path, version)
        assert time.monotonic() - started < FAIL_FAST


def serves(world: World, edge: Edge, name: str) -> bool:
    done = s_client(edge.port, world.leaves[name].name, world.ca.path, "-tls1_3")
    return done.code == 0 and world.page_token(name) in done.output


@pytest.mark.parametrize("variant", ["pem", pytest.param("pkcs11", marks=pytest.mark.hsm)], ids=str)
def test_key_server_stopped_means_an_alert_then_it_works_again(
    world: World, variant: str, request: pytest.FixtureRequest
) -> None:
    """SIGTERM the key server (status 0): every new handshake, any key type, any client, ends
    in an alert within seconds. Started again on the same port, the edge's workers reconnect
    after their backoff and every handshake works again."""
    if variant == "pem":
        keyserver, edge = world.keyserver, world.edge
    else:
        hsm: HsmWorld = request.getfixturevalue("hsm")
        keyserver, edge = hsm.keyserver, hsm.edge
    procs = world.procs
    assert serves(world, edge, "rsa") and serves(world, edge, "ed25519")
    try:
        assert procs.terminate(keyserver.name) == 0
        for name in KINDS:
            assert_alert(world, edge, name)
    finally:
        if keyserver.name not in procs.running:
            keyserver.start(procs)  # on the same port, which the edge still dials
    # Each worker retries after its backoff (at most 5 s): soon every handshake works again,
    # whichever worker takes it.
    wait_until(lambda: serves(world, edge, "p256"), "the edge reconnecting", timeout=30)
    for _ in range(4):
        for name in KINDS:
            assert serves(world, edge, name), name


def test_revoked_grant_means_an_alert_for_that_host_only(world: World) -> None:
    """The grants table loses the api host's key for this edge (then SIGHUP): that host's
    handshakes end in an alert at once, the other hosts' keep working on the same key server
    connections; the grant back (SIGHUP), the host works again."""
    keyserver, procs, leaves = world.keyserver, world.procs, world.leaves
    held = {name: leaf.key for name, leaf in leaves.items() if name != MISMATCH}
    original = keyserver.grants.read_text()
    assert serves(world, world.edge, SECOND)
    try:
        granted = [name for name in held if name != SECOND]
        keyserver.grants.write_text(grants_toml(held, {EDGE: granted}))
        keyserver.reload(procs)
        assert_alert(world, world.edge, SECOND)
        for name in granted:
            assert serves(world, world.edge, name), name
        log = log_path(procs, keyserver.name).read_text()
        assert f"refused: {EDGE} is not granted key {leaves[SECOND].ski.hex()}" in log
    finally:
        keyserver.grants.write_text(original)
        keyserver.reload(procs)
    assert serves(world, world.edge, SECOND)


# --- the same, with the keys in SoftHSM2 through PKCS#11 ---------------------------------------


@dataclasses.dataclass
class HsmWorld:
    keyserver: KeyServer
    edge: Edge


@pytest.fixture(scope="module")
def hsm(world: World) -> HsmWorld:
    """A key server whose keys are in a SoftHSM2 token (imported before it starts; it has no
    key directory), and a second edge that uses it. Processes end with ``world``'s."""
    root, procs = world.root, world.procs
    token = "keyless-e2e"
    (root / "softhsm").mkdir()
    softhsm = start_softhsm(root / "softhsm", (token,))
    keys = {name: world.leaves[name].key for name in KINDS}
    for key in keys.values():
        import_private_key(softhsm.module, token, USER_PIN, key)
    module = str(Path(find_pkcs11_module()).resolve())  # the real libsofthsm2.so
    source = f'pkcs11_module = "{module}"\npkcs11_token = "{token}"\n'
    config, grants = write_keyserver(root / "keyserver-hsm", world.ca, keys, source)
    env = {"SOFTHSM2_CONF": str(softhsm.conf), "KEYBROKER_PKCS11_PIN": USER_PIN}
    keyserver = KeyServer("keyserver-hsm", config, grants, env=env)
    keyserver.start(procs)
    assert metric(keyserver.metrics, "keyless_keys_loaded") == len(keys)
    services = [(world.leaves[name], world.origins["www"], None) for name in KINDS]
    edge_config = write_edge(root / "edge-hsm", world.ca, keyserver.port, services)
    edge = Edge("edge-hsm", root / "edge-hsm", edge_config)
    edge.start(procs)
    return HsmWorld(keyserver, edge)


@pytest.mark.hsm
@pytest.mark.parametrize("kind", KINDS)
def test_pkcs11_keys_serve_every_client(world: World, hsm: HsmWorld, kind: str) -> None:
    leaf, port, ca = world.leaves[kind], hsm.edge.port, world.ca.path
    assert "keys_dir" not in hsm.keyserver.config.read_text()
    signed = signatures(hsm.keyserver.metrics)
    done = s_client(port, leaf.name, ca, "-tls1_3")
    assert done.code == 0, done.output
    assert_served(done, leaf)
    assert "New, TLSv1.3" in done.output
    assert f"Peer signature type: {SIGNATURE_TYPE[kind]}" in done.output
    assert world.page_token(kind) in done.output
    done = s_client(port, leaf.name, ca, "-tls1_2", "-cipher", ECDHE_CIPHERS)
    assert done.code == 0, done.output
    assert_served(done, leaf)
    assert f"Cipher is {TLS12_CIPHER[kind]}" in done.output
    done = curl(port, leaf.name, ca)
    assert done.code == 0, done.output
    assert world.page_token(kind) in done.output
    page = https_get(port, leaf.name, ca, TLS13)
    assert page.peer == leaf.der and world.page_token(kind).encode() in page.body
    # Four full handshakes, four signatures by the token's key server.
    assert signatures(hsm.keyserver.metrics) == signed + 4
    assert USER_PIN not in log_path(world.procs, hsm.keyserver.name).read_text()
