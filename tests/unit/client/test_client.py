"""The SDK on its own terms: the keyring at rest, envelope checks, signing, log checks, errors."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from api_kit import URL, Env, encodings
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver, algorithms

from keybroker.api.problems import Replayed, Unauthenticated
from keybroker.client import KekSource, Keyring, LogClient, OperatorClient, PrincipalClient
from keybroker.client._http import Connection, raise_for_problem
from keybroker.client.principal import Delivery
from keybroker.errors import (
    AuthorizationError,
    ConfigurationError,
    CryptoError,
    DecodeError,
    IdentityMismatch,
    NotFound,
    RemoteProtocolError,
    TransportError,
)
from keybroker.keys import SECRET_ACCESS
from keybroker.keys.root import FileRootKey
from keybroker.pki import load_certificate

# -- the keyring ----------------------------------------------------------------------------


async def test_the_keyring_is_encrypted_under_a_passphrase_and_private(env: Env) -> None:
    path = env.tmp / "fra1.keyring"
    token = (await env.operator().create_enrolment_token("site/fra1")).token
    client = await PrincipalClient.enrol(
        URL,
        env.ca_pem,
        "site/fra1",
        token,
        path,
        passphrase="correct horse",
        transport=env.transport,
        clock=env.clock,
    )
    env.clients.append(client)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    for keyset in (client.keyring.identity, client.keyring.hpke):
        for form in encodings(keyset.export_secret_material(1, SECRET_ACCESS)):
            assert form not in data
    assert b"site/fra1" not in data  # even the public facts are sealed

    reopened = PrincipalClient.open(
        path, passphrase="correct horse", transport=env.transport, clock=env.clock
    )
    env.clients.append(reopened)
    assert reopened.principal == client.principal
    assert await reopened.fetch_deliveries() == []  # it signs with the identity it reloaded

    with pytest.raises(CryptoError):
        PrincipalClient.open(path, passphrase="wrong horse", transport=env.transport)
    tampered = bytearray(data)
    tampered[-20] ^= 1
    path.write_bytes(bytes(tampered))
    with pytest.raises(CryptoError):
        PrincipalClient.open(path, passphrase="correct horse", transport=env.transport)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigurationError, match="other users"):
        PrincipalClient.open(path, passphrase="correct horse", transport=env.transport)


async def test_the_keyring_can_be_sealed_under_a_root_key(env: Env) -> None:
    root = FileRootKey.create(env.tmp / "agent-root.key")
    client = await env.enrolled("site/fra1", kek=root)
    path = env.tmp / "site_fra1.keyring"
    loaded = Keyring.load(path, KekSource(kek=root))
    assert loaded.principal == client.principal
    with pytest.raises(ConfigurationError, match="KEK"):
        Keyring.load(path, KekSource(passphrase="anything"))
    other = FileRootKey.create(env.tmp / "other-root.key")
    with pytest.raises(CryptoError):
        Keyring.load(path, KekSource(kek=other))


async def test_enrolling_over_an_existing_keyring_is_refused(env: Env) -> None:
    await env.enrolled("site/fra1")
    token = (await env.operator().create_enrolment_token("site/fra1")).token
    with pytest.raises(ConfigurationError, match="exists"):
        await PrincipalClient.enrol(
            URL,
            env.ca_pem,
            "site/fra1",
            token,
            env.tmp / "site_fra1.keyring",
            kek=env.kek(),
            transport=env.transport,
        )


def test_a_keyring_asking_for_absurd_scrypt_costs_is_refused() -> None:
    source = KekSource(passphrase="pw")
    with pytest.raises(DecodeError):
        source.kek({"name": "scrypt", "salt": b"\x00" * 16, "log2_n": 30, "r": 8, "p": 1})
    with pytest.raises(DecodeError):
        source.kek({"name": "argon9"})
    with pytest.raises(ConfigurationError):
        KekSource()
    assert "pw" not in repr(source)


# -- deliveries --------------------------------------------------------------------------------


async def _one_delivery(env: Env) -> tuple[PrincipalClient, Delivery]:
    op = env.operator()
    client = await env.enrolled("site/fra1")
    await op.create_keyset("k", "ED25519")
    await op.grant("site/fra1", "k", "hold")
    await op.deliver("k", 1, "site/fra1")
    (delivery,) = await client.fetch_deliveries()
    return client, delivery


async def test_an_envelope_the_ca_did_not_sign_is_not_opened(env: Env) -> None:
    client, delivery = await _one_delivery(env)
    before = (env.tmp / "site_fra1.keyring").read_bytes()
    forged = replace(delivery.envelope, version=2)
    with pytest.raises(CryptoError):
        client.open_delivery(Delivery(forged, delivery.purpose))
    resigned = replace(delivery.envelope, signature=delivery.envelope.signature[:-1] + b"\x00")
    with pytest.raises(CryptoError):
        client.open_delivery(Delivery(resigned, delivery.purpose))
    assert client.received_keysets() == {}
    assert (env.tmp / "site_fra1.keyring").read_bytes() == before
    # The genuine one opens, is saved, and survives a reload.
    client.open_delivery(delivery)
    assert (await client.ack(delivery)).state == "acked"
    reloaded = Keyring.load(env.tmp / "site_fra1.keyring", KekSource(kek=client._source._kek))
    assert set(reloaded.received) == {"k"}
    signer = reloaded.received["k"]
    # A signing key delivered pending: present, usable for proofs, not yet primary.
    assert signer.versions[0].state.value == "pending"


async def test_receive_opens_and_acks_everything(env: Env) -> None:
    op = env.operator()
    client = await env.enrolled("site/fra1", identity_algorithm="p256")
    for name in ("a", "b"):
        await op.create_keyset(name, "HMAC_SHA256")
        await op.grant("site/fra1", name, "hold")
        await op.deliver(name, 1, "site/fra1")
    acked = await client.receive()
    assert sorted(a.keyset for a in acked) == ["a", "b"]
    assert {d.state for d in await op.list_deliveries()} == {"acked"}


# -- request signing -----------------------------------------------------------------------------


class _Key(HTTPSignatureKeyResolver):
    def __init__(self, key: object) -> None:
        self.key = key

    def resolve_public_key(self, key_id: str) -> object:
        return self.key


@pytest.mark.parametrize("identity", ["ed25519", "p256"])
async def test_signed_requests_verify_with_the_certificate_key(env: Env, identity: str) -> None:
    client = await env.enrolled("site/fra1", identity_algorithm=identity)
    request = httpx.Request("POST", f"{URL}/v1/deliveries/x/ack", content=b'{"proof":"AA"}')
    client._sign(request)
    assert "content-digest" in request.headers
    sig_input = request.headers["signature-input"]
    assert all(p in sig_input for p in ('"@method"', '"@target-uri"', '"content-digest"'))
    assert 'keyid="site/fra1"' in sig_input and 'tag="keybroker"' in sig_input
    cert = load_certificate(client.keyring.certificate_pem)
    algorithm = algorithms.ED25519 if identity == "ed25519" else algorithms.ECDSA_P256_SHA256
    verifier = HTTPMessageVerifier(
        signature_algorithm=algorithm, key_resolver=_Key(cert.public_key())
    )
    # The independent check uses the library's own clock; ours is fixed in 2026, so no max age.
    verifier.max_clock_skew = timedelta(days=3650)
    (result,) = verifier.verify(request, max_age=None, expect_tag="keybroker", body=request.content)
    assert result.parameters["keyid"] == "site/fra1"


# -- the log ---------------------------------------------------------------------------------------


async def test_a_log_signed_by_another_key_is_refused(env: Env) -> None:
    op = env.operator()
    honest = await op.log()
    head = await honest.check()
    impostor = LogClient(
        Connection(URL, None, transport=env.transport),
        Ed25519PrivateKey.generate().public_key(),
        headers=env.admin_headers(),
    )
    with pytest.raises(CryptoError):
        await impostor.tree_head()
    await op.create_keyset("k", "AES256_GCM")
    newer = await honest.check(previous=head)
    assert newer.tree_size > head.tree_size
    # A head from a different history is not consistent with what we saw.
    fake = replace(newer, root_hash=bytes(32))
    with pytest.raises(CryptoError):
        await honest.verify_consistency(head, fake)
    with pytest.raises(CryptoError):
        await honest.verify_inclusion(0, fake)


# -- errors ---------------------------------------------------------------------------------------


def _response(
    status: int, body: object, content_type: str = "application/problem+json"
) -> httpx.Response:
    return httpx.Response(
        status, content=json.dumps(body).encode(), headers={"content-type": content_type}
    )


def test_problems_come_back_as_keybroker_errors() -> None:
    base = "https://keybroker.dev/problems/"
    cases = [
        (404, "not-found", NotFound),
        (401, "authentication", Unauthenticated),
        (401, "authentication/replayed", Replayed),
        (403, "certificate/identity-mismatch", IdentityMismatch),
        (400, "crypto", CryptoError),
        (418, "who-knows", RemoteProtocolError),
        (503, "who-knows", TransportError),
    ]
    for status, suffix, cls in cases:
        with pytest.raises(cls) as caught:
            raise_for_problem(_response(status, {"type": base + suffix, "detail": "d"}))
        assert type(caught.value) is cls
    with pytest.raises(TransportError):
        raise_for_problem(httpx.Response(502, content=b"<html>bad gateway</html>"))
    raise_for_problem(_response(200, {}))


async def test_the_operator_client_never_shows_its_token(env: Env) -> None:
    op = env.operator()
    assert env.admin_token not in repr(op)
    assert env.admin_token not in repr(await op.log())
    wrong = OperatorClient(URL, "kbadm_" + "x" * 43, None, transport=env.transport)
    env.clients.append(wrong)
    with pytest.raises(Unauthenticated):
        await wrong.list_keysets()


def test_a_ca_is_required_to_talk_to_a_real_broker(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="CA"):
        Connection("https://broker.example", None)
    with pytest.raises(ConfigurationError, match="PEM"):
        Connection("https://broker.example", b"not a certificate")


async def test_a_refused_enrolment_leaves_no_keyring(env: Env) -> None:
    path = env.tmp / "fra1.keyring"
    with pytest.raises(AuthorizationError):
        await PrincipalClient.enrol(
            URL,
            env.ca_pem,
            "site/fra1",
            "not-a-token",
            path,
            kek=env.kek(),
            transport=env.transport,
        )
    assert not path.exists()
