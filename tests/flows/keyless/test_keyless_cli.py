"""``keybroker keyless …`` as an operator runs it on the broker host (Typer's CliRunner against a
real home on SQLite), with a key server enrolled through the API: upload, grant, hold, the key
server fetches and signs, list shows it, revoke takes effect; refusals exit 2 with a message."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from rich.console import Console
from typer.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).parent))

from keyless_broker_kit import Env, cert_pem, certificate, key_server, new_env, p256_key, pem

from keybroker.flows.keyless import cli as keyless_cli
from keybroker.flows.keyless.cli import keyless_app
from keybroker.flows.keyless.codes import ErrorCode, Op
from keybroker.flows.keyless.operations import KeyOperationError, ski_of
from keybroker.pki import PrincipalId, principal_of

EDGE1 = PrincipalId.parse("node/edge1")

#: What ``keybroker`` will look like once ``keyless_app`` is registered in ``cli/main.py``.
app = typer.Typer()
app.add_typer(keyless_app, name="keyless")


@pytest.fixture(autouse=True)
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consoles wide enough that Rich does not fold a 40-digit SKI inside its table cell
    (whatever ``$COLUMNS`` or ``$TERM`` the test runs under)."""
    monkeypatch.setattr(keyless_cli, "out", Console(width=250))
    monkeypatch.setattr(keyless_cli, "err", Console(width=250, stderr=True))


@pytest.fixture
async def env(tmp_path: Path, sqlite_url: str) -> AsyncIterator[Env]:
    # The CLI's broker reads the real clock; the API's reads the same time.
    made = new_env(tmp_path, sqlite_url, now=datetime.now(UTC))
    try:
        yield made
    finally:
        await made.aclose()
        made.home.close()


def kb(env: Env, *args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(app, ["keyless", *args, "--home", str(env.tmp / "home")])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def write(env: Env, name: str, data: bytes) -> Path:
    path = env.tmp / name
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


async def test_the_operator_round_trip(env: Env) -> None:
    service_key = p256_key()
    ski = ski_of(service_key.public_key())
    key_file = write(env, "www.key", pem(service_key))
    chain = write(env, "www.pem", cert_pem(certificate(service_key)))

    done = kb(env, "upload", "www", "--key", str(key_file), "--chain", str(chain))
    assert "created keyless/www: version 1 is primary" in done.stdout
    assert ski.hex() in done.stdout and "ecdsa-p256" in done.stdout
    assert "policy   sign\n" in done.stdout and "leaf SHA-256" in done.stdout

    await env.enrolled("node/edge1")
    ks = await key_server(env)
    assert (
        "node/edge1 may use keyless/www" in kb(env, "grant", "www", "--edge", "node/edge1").stdout
    )
    held = kb(env, "hold", "www", "--keyserver", "service/ks1")
    assert "service/ks1 holds keyless/www; delivering v1" in held.stdout

    listed = kb(env, "list")
    assert "www" in listed.stdout and "(awaiting)" in listed.stdout
    await asyncio.to_thread(ks.reload)
    listed = kb(env, "list")
    assert ski.hex() in listed.stdout and "node/edge1" in listed.stdout
    assert "service/ks1 ✓" in listed.stdout

    ks.authorizer.check(EDGE1, ski, Op.ECDSA_SIGN_SHA256)
    message = b"CertificateVerify content"
    signature = ks.source.perform(ski, Op.ECDSA_SIGN_SHA256, hashlib.sha256(message).digest())
    service_key.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))

    document = json.loads(kb(env, "list", "--json").stdout)
    (entry,) = document
    assert entry["service"] == "www" and entry["keys"][0]["ski"] == ski.hex()
    assert entry["edges"] == [{"principal": "node/edge1", "status": "active"}]
    assert entry["key_servers"] == [{"principal": "service/ks1", "status": "active", "acked": [1]}]

    revoked = kb(env, "revoke", "www", "--edge", "node/edge1")
    assert "node/edge1 may no longer use keyless/www" in revoked.stdout
    await asyncio.to_thread(ks.authorizer.refresh)
    with pytest.raises(KeyOperationError) as caught:
        ks.authorizer.check(EDGE1, ski, Op.ECDSA_SIGN_SHA256)
    assert caught.value.code is ErrorCode.NOT_AUTHORIZED

    released = kb(env, "revoke", "www", "--keyserver", "service/ks1")
    assert "service/ks1: hold grant on keyless/www revoked" in released.stdout
    await asyncio.to_thread(ks.source.reload)
    assert ks.source.skis() == []


async def test_rsa_keys_and_the_decrypt_policy(env: Env) -> None:
    key = rsa.generate_private_key(65537, 2048)
    key_file = write(env, "api.key", pem(key))
    first = kb(env, "upload", "api", "--key", str(key_file))
    assert "rsa-2048" in first.stdout and "policy   sign\n" in first.stdout
    changed = kb(env, "upload", "api", "--key", str(key_file), "--allow-decrypt")
    assert "updated keyless/api: version 2 is primary" in changed.stdout
    assert "policy   sign, decrypt" in changed.stdout
    assert "replaces v1 (same key, other policy: disabled)" in changed.stdout
    listed = kb(env, "list")
    assert "sign, decrypt" in listed.stdout and "v2 primary" in listed.stdout

    # An encrypted key file, with its password from the environment.
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"correct horse"),
    )
    locked = write(env, "locked.key", encrypted)
    os.environ["KB_TEST_KEY_PASSWORD"] = "wrong"
    try:
        refused = kb(
            env,
            "upload",
            "locked",
            "--key",
            str(locked),
            "--password-env",
            "KB_TEST_KEY_PASSWORD",
            code=2,
        )
        assert "password is wrong" in refused.stderr
        os.environ["KB_TEST_KEY_PASSWORD"] = "correct horse"
        kb(env, "upload", "locked", "--key", str(locked), "--password-env", "KB_TEST_KEY_PASSWORD")
    finally:
        del os.environ["KB_TEST_KEY_PASSWORD"]


async def test_refusals_exit_2_with_a_message_and_change_nothing(env: Env) -> None:
    weak = write(env, "weak.key", pem(rsa.generate_private_key(65537, 1024)))
    before = env.dump()
    result = kb(env, "upload", "www", "--key", str(weak), code=2)
    assert "error:" in result.stderr and "too weak" in result.stderr
    assert "BEGIN" not in result.stderr + result.stdout
    result = kb(env, "upload", "www", "--key", str(env.tmp / "missing.key"), code=2)
    assert "cannot read the key file" in result.stderr
    result = kb(env, "grant", "nothing", "--edge", "node/edge1", code=2)
    assert "error:" in result.stderr
    result = kb(env, "hold", "www", "--keyserver", "node/edge1", code=2)
    assert "error:" in result.stderr
    result = kb(env, "revoke", "www", code=2)
    result = kb(env, "upload", "www", "--key", str(weak), "--delivery-ttl", "soon", code=2)
    assert env.dump() == before
    empty = kb(env, "list")
    assert "no keyless services yet" in empty.stdout


async def test_tls_files_writes_the_edges_identity_for_keybroker_edge(env: Env) -> None:
    """On the edge's host: its enrolment certificate, its identity key (0600) and the broker
    CA, from its keyring; the passphrase comes from the environment only."""
    from keyless_broker_kit import URL

    from keybroker.client.principal import PrincipalClient

    issued = await env.operator().create_enrolment_token("node/edge1", 3600)
    keyring = env.tmp / "edge1.keyring"
    client = await PrincipalClient.enrol(
        URL, env.ca_pem, "node/edge1", issued.token, keyring,
        passphrase="edge one passphrase", transport=env.transport, clock=env.clock,
    )  # fmt: skip
    await client.aclose()
    out = env.tmp / "edge" / "tls"

    def run(*args: str, passphrase: str | None) -> Result:
        return CliRunner().invoke(
            app,
            ["keyless", "tls-files", "--keyring", str(keyring), "--out", str(out), *args],
            env={"EDGE1_PASSPHRASE": passphrase},
        )

    missing = run("--passphrase-env", "EDGE1_PASSPHRASE", passphrase=None)
    assert missing.exit_code == 2 and "EDGE1_PASSPHRASE is not set" in missing.output
    wrong = run("--passphrase-env", "EDGE1_PASSPHRASE", passphrase="not the passphrase")
    assert wrong.exit_code == 2 and "error:" in wrong.stderr and not out.exists()
    done = run("--passphrase-env", "EDGE1_PASSPHRASE", passphrase="edge one passphrase")
    assert done.exit_code == 0, (done.stdout, done.stderr, done.exception)
    assert "wrote the mutual-TLS files of node/edge1" in done.stdout
    assert f'key = "{out / "node-edge1.key"}"' in done.stdout
    assert "edge one passphrase" not in done.stdout + done.stderr
    assert (out.stat().st_mode & 0o777, (out / "node-edge1.key").stat().st_mode & 0o777) == (
        0o700,
        0o600,
    )
    assert (out / "broker-ca.pem").read_bytes() == env.ca_pem
    certificate = x509.load_pem_x509_certificate((out / "node-edge1.crt").read_bytes())
    identity = serialization.load_pem_private_key(
        (out / "node-edge1.key").read_bytes(), password=None
    )
    assert certificate.public_key() == identity.public_key()
    assert principal_of(certificate) == EDGE1
