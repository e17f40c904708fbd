"""Keyless keys through the broker, on SQLite and PostgreSQL: a service key uploaded, granted to
an edge, held by a key server that fetches, installs, acknowledges and signs with it; the
broker's grants authorise edges (and RSA decryption only where the key's policy allows it);
revocations take effect at the next reload; weak keys are refused; the key is never in clear
in the database, the logs, the log entries or a repr."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import stat
import sys
import tempfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID

sys.path.insert(0, str(Path(__file__).parent))

from keyless_broker_kit import (
    Env,
    KeyServer,
    assert_no_secret,
    cert_pem,
    certificate,
    enrol,
    key_server,
    new_env,
    p256_key,
    pem,
    rsa_key,
)

from keybroker.broker.events import (
    DeliveryAcknowledged,
    DeliverySent,
    GrantCreated,
    GrantRevoked,
    KeyDisabled,
    KeyPromoted,
    KeysetCreated,
    KeyVersionAdded,
    decode_event,
)
from keybroker.client.keyring import KekSource, Keyring
from keybroker.errors import (
    AuthorizationError,
    ConfigurationError,
    Conflict,
    DecodeError,
    NotFound,
)
from keybroker.flows.keyless.brokered import (
    BrokerAuthorizer,
    BrokerKeySource,
    KeyServerPrincipal,
    client_tls_credentials,
    client_tls_files,
    open_brokered,
    server_tls_credentials,
    server_tls_files,
)
from keybroker.flows.keyless.codes import ErrorCode, Op
from keybroker.flows.keyless.keyclient import KeyClient
from keybroker.flows.keyless.keyserver import KeyServer as KeylessServer
from keybroker.flows.keyless.keyserver import KeyServerSettings, identity_tls_context
from keybroker.flows.keyless.operations import KeyOperationError, ski_of
from keybroker.flows.keyless.service_keys import (
    ServiceKeyRefused,
    ServiceKeys,
    ServiceKeyUploaded,
    WeakKeyError,
    decode_keyless_event,
)
from keybroker.flows.keyless.tlskeys import KeyOperationFailed
from keybroker.keys import SECRET_ACCESS
from keybroker.pki import PrincipalId, load_certificate
from keybroker.store.schema import metadata

EDGE1 = PrincipalId.parse("node/edge1")
EDGE2 = PrincipalId.parse("node/edge2")


@pytest.fixture
async def env(tmp_path: Path, store_url: str) -> AsyncIterator[Env]:
    made = new_env(tmp_path, store_url)
    try:
        yield made
    finally:
        await made.aclose()
        made.home.close()


@pytest.fixture
async def lite(tmp_path: Path, sqlite_url: str) -> AsyncIterator[Env]:
    """The same on SQLite only, for the tests that check one rule, not the database."""
    made = new_env(tmp_path, sqlite_url)
    try:
        yield made
    finally:
        await made.aclose()
        made.home.close()


def keyless_events(env: Env, since: int) -> list[object]:
    out: list[object] = []
    for entry in env.home.log.entries(since, env.log_size()):
        try:
            out.append(decode_event(entry))
        except Exception:
            out.append(decode_keyless_event(entry))
    return out


def sign_p256(ks: KeyServer, ski: bytes, message: bytes) -> bytes:
    digest = hashlib.sha256(message).digest()
    return ks.source.perform(ski, Op.ECDSA_SIGN_SHA256, digest)


def refused(call: object, code: ErrorCode = ErrorCode.NOT_AUTHORIZED) -> None:
    assert callable(call)
    with pytest.raises(KeyOperationError) as caught:
        call()
    assert caught.value.code is code, caught.value


# -- the whole way ---------------------------------------------------------------------------


async def test_upload_grant_hold_fetch_ack_sign(env: Env) -> None:
    service_key = p256_key()
    leaf = certificate(service_key)
    keyless = ServiceKeys(env.broker)
    start = env.log_size()

    uploaded = keyless.upload("www", pem(service_key), chain=cert_pem(leaf))
    ski = ski_of(service_key.public_key())
    assert (uploaded.keyset, uploaded.created, uploaded.version.version) == ("keyless/www", True, 1)
    assert uploaded.version.ski == ski and uploaded.version.key_type == "ecdsa-p256"
    assert uploaded.version.allow_decrypt is False and uploaded.delivered_to == ()

    await env.enrolled("node/edge1")
    await env.enrolled("node/edge2")
    ks = await key_server(env)
    keyless.grant_edge("www", "node/edge1")
    held = keyless.hold("www", ks.name)
    assert [version for version, _ in held.deliveries] == [1]
    assert keyless.hold("www", ks.name).deliveries == held.deliveries  # idempotent

    # Before the first reload the key server has nothing and authorises nobody.
    assert ks.source.skis() == []
    refused(lambda: ks.authorizer.check(EDGE1, ski, Op.ECDSA_SIGN_SHA256))
    ks.reload()
    assert ks.source.skis() == [ski]
    assert ks.source.where(ski) == ("keyless/www", 1)
    (delivery,) = env.broker.list_deliveries(principal=ks.name)
    assert delivery.state == "acked"  # with a proof of possession the broker checked

    ks.authorizer.check(EDGE1, ski, Op.ECDSA_SIGN_SHA256)
    message = b"TLS 1.3, server CertificateVerify" + bytes(64)
    signature = sign_p256(ks, ski, message)
    public = leaf.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))

    # An edge without a grant, and a key the broker never gave anyone, are refused alike.
    refused(lambda: ks.authorizer.check(EDGE2, ski, Op.ECDSA_SIGN_SHA256))
    refused(lambda: ks.authorizer.check(EDGE1, bytes(20), Op.ECDSA_SIGN_SHA256))
    refused(lambda: ks.authorizer.check(EDGE1, ski, Op.RSA_DECRYPT))
    refused(
        lambda: ks.source.perform(bytes(20), Op.ECDSA_SIGN_SHA256, bytes(32)),
        ErrorCode.KEY_NOT_FOUND,
    )

    # What the log says, in order.
    events = keyless_events(env, start)
    kinds = [type(e) for e in events]
    assert kinds[:2] == [KeysetCreated, ServiceKeyUploaded]
    upload = events[1]
    assert isinstance(upload, ServiceKeyUploaded)
    assert (upload.service, upload.keyset, upload.version, upload.ski) == (
        "www",
        "keyless/www",
        1,
        ski,
    )
    assert upload.template == "TLS_ECDSA_P256" and upload.allow_decrypt is False
    assert upload.certificate_sha256 == leaf.fingerprint(hashes.SHA256())
    grants = [(e.principal, e.mode) for e in events if isinstance(e, GrantCreated)]
    assert grants == [("node/edge1", "use"), ("service/ks1", "hold")]
    assert [e.principal for e in events if isinstance(e, DeliverySent)] == ["service/ks1"]
    assert [e.principal for e in events if isinstance(e, DeliveryAcknowledged)] == ["service/ks1"]

    # The keyring on disk holds the key (encrypted), so a restarted key server has it.
    again = BrokerKeySource(KeyServerPrincipal(ks.path, kek=ks.kek, transport=env.transport))
    assert again.skis() == [ski]


async def test_a_new_upload_reaches_the_key_servers_and_the_old_key_stays_served(
    lite: Env,
) -> None:
    env, keyless = lite, ServiceKeys(lite.broker)
    first, second = p256_key(), ed25519.Ed25519PrivateKey.generate()
    keyless.upload("api", pem(first))
    await env.enrolled("node/edge1")
    ks = await key_server(env)
    keyless.grant_edge("api", EDGE1)
    keyless.hold("api", ks.name)
    ks.reload()

    done = keyless.upload("api", pem(second))
    assert (done.created, done.version.version, done.version.state) == (False, 2, "primary")
    assert done.delivered_to == (PrincipalId.parse("service/ks1"),)
    ks.reload()
    skis = {ski_of(first.public_key()), ski_of(second.public_key())}
    assert set(ks.source.skis()) == skis
    message = b"a whole TLS 1.3 signed content"
    signature = ks.source.perform(ski_of(second.public_key()), Op.ED25519_SIGN, message)
    second.public_key().verify(signature, message)
    for ski in skis:
        ks.authorizer.check(EDGE1, ski, Op.ED25519_SIGN)

    # The operator retires the old key: key servers forget it at their next reload.
    env.broker.disable_version("keyless/api", 1)
    ks.reload()
    assert ks.source.skis() == [ski_of(second.public_key())]
    refused(lambda: ks.authorizer.check(EDGE1, ski_of(first.public_key()), Op.ECDSA_SIGN_SHA256))
    on_disk = Keyring.load(ks.path, KekSource(kek=ks.kek)).received["keyless/api"]
    assert [v.version for v in on_disk.versions] == [2]


# -- RSA: both paddings, and decryption only where the policy allows it ------------------------


async def test_rsa_signs_both_ways_and_decrypts_only_where_allowed(lite: Env) -> None:
    env, keyless = lite, ServiceKeys(lite.broker)
    key = rsa_key()
    ski = ski_of(key.public_key())
    keyless.upload("legacy", pem(key))
    await env.enrolled("node/edge1")
    ks = await key_server(env)
    keyless.grant_edge("legacy", EDGE1)
    keyless.hold("legacy", ks.name)
    ks.reload()

    digest = hashlib.sha256(b"ServerKeyExchange params").digest()
    prehashed = hashes.SHA256()
    pss = padding.PSS(mgf=padding.MGF1(prehashed), salt_length=32)
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    signature = ks.source.perform(ski, Op.RSA_PSS_SIGN_SHA256, digest)
    key.public_key().verify(signature, digest, pss, Prehashed(prehashed))
    signature = ks.source.perform(ski, Op.RSA_SIGN_SHA256, digest)
    key.public_key().verify(signature, digest, padding.PKCS1v15(), Prehashed(prehashed))
    ks.authorizer.check(EDGE1, ski, Op.RSA_PSS_SIGN_SHA256)
    refused(lambda: ks.authorizer.check(EDGE1, ski, Op.RSA_DECRYPT))

    # Uploading the same key with --allow-decrypt changes its policy: a new version replaces
    # the old one (disabled), and only after the reload may the edge decrypt.
    start = env.log_size()
    changed = keyless.upload("legacy", pem(key), allow_decrypt=True)
    assert (changed.version.version, changed.replaced) == (2, (1,))
    assert changed.version.template == "TLS_RSA2048_DECRYPT"
    kinds = [type(e) for e in keyless_events(env, start)]
    assert kinds == [KeyVersionAdded, KeyPromoted, KeyDisabled, ServiceKeyUploaded, DeliverySent]
    refused(lambda: ks.authorizer.check(EDGE1, ski, Op.RSA_DECRYPT))
    ks.reload()
    ks.authorizer.check(EDGE1, ski, Op.RSA_DECRYPT)
    assert ks.source.where(ski) == ("keyless/legacy", 2)
    ciphertext = key.public_key().encrypt(b"premaster secret", padding.PKCS1v15())
    try:
        assert ks.source.perform(ski, Op.RSA_DECRYPT, ciphertext) == b"premaster secret"
    except KeyOperationError as exc:
        # OpenSSL before 3.2 has no implicit rejection: operations.py refuses every decrypt.
        assert exc.code is ErrorCode.NOT_AUTHORIZED and "implicit rejection" in str(exc)

    # The same key and policy again is a conflict, and changes nothing.
    size = env.log_size()
    with pytest.raises(Conflict):
        keyless.upload("legacy", pem(key), allow_decrypt=True)
    assert env.log_size() == size


# -- revocation ----------------------------------------------------------------------------


async def test_revocations_take_effect_at_the_next_reload(env: Env) -> None:
    keyless = ServiceKeys(env.broker)
    service_key = p256_key()
    ski = ski_of(service_key.public_key())
    keyless.upload("www", pem(service_key))
    await env.enrolled("node/edge1")
    await env.enrolled("node/edge2")
    ks = await key_server(env)
    for edge in (EDGE1, EDGE2):
        keyless.grant_edge("www", edge)
    keyless.hold("www", ks.name)
    ks.reload()
    for edge in (EDGE1, EDGE2):
        ks.authorizer.check(edge, ski, Op.ECDSA_SIGN_SHA256)

    revoked = keyless.revoke_edge("www", "node/edge2")
    assert revoked.revoked_at is not None
    ks.authorizer.check(EDGE2, ski, Op.ECDSA_SIGN_SHA256)  # the view read before still holds
    assert ks.authorizer.refresh() is ks.authorizer
    refused(lambda: ks.authorizer.check(EDGE2, ski, Op.ECDSA_SIGN_SHA256))
    ks.authorizer.check(EDGE1, ski, Op.ECDSA_SIGN_SHA256)
    with pytest.raises(NotFound):
        keyless.revoke_edge("www", "node/edge2")

    # An edge principal revoked altogether loses its grants' effect too.
    env.broker.revoke_principal("node/edge1")
    ks.authorizer.reload()
    refused(lambda: ks.authorizer.check(EDGE1, ski, Op.ECDSA_SIGN_SHA256))

    # The key server's hold revoked: it forgets the key, on disk too, and authorises nothing.
    start = env.log_size()
    released = keyless.release("www", ks.name)
    assert [g.mode.value for g in released] == ["hold"]
    assert [type(e) for e in keyless_events(env, start)] == [GrantRevoked]
    assert ks.source.reload() is ks.source
    ks.authorizer.reload()
    assert ks.source.skis() == []
    assert "keyless/www" not in Keyring.load(ks.path, KekSource(kek=ks.kek)).received
    refused(lambda: ks.authorizer.check(EDGE1, ski, Op.ECDSA_SIGN_SHA256))

    # Holding again delivers the key again (it was acknowledged under the old grant only).
    env.clock.advance(timedelta(minutes=1))
    again = keyless.hold("www", ks.name)
    assert [v for v, _ in again.deliveries] == [1]
    ks.source.reload()
    assert ks.source.skis() == [ski]


# -- refusals -------------------------------------------------------------------------------------


async def test_weak_and_unsupported_keys_are_refused_and_change_nothing(lite: Env) -> None:
    env, keyless = lite, ServiceKeys(lite.broker)
    good = p256_key()
    before, size = env.dump(), env.log_size()
    with pytest.raises(WeakKeyError, match="1024 bits"):
        keyless.upload("weak", pem(rsa.generate_private_key(65537, 1024)))
    with pytest.raises(WeakKeyError, match="exponent"):
        keyless.upload("weak", pem(rsa.generate_private_key(3, 2048)))
    with pytest.raises(WeakKeyError, match="secp224r1"):
        keyless.upload("weak", pem(ec.generate_private_key(ec.SECP224R1())))
    with pytest.raises(ServiceKeyRefused, match="4096"):
        keyless.upload("big", pem(rsa.generate_private_key(65537, 4096)))
    with pytest.raises(ServiceKeyRefused, match="secp521r1"):
        keyless.upload("p521", pem(ec.generate_private_key(ec.SECP521R1())))
    with pytest.raises(ServiceKeyRefused, match="only RSA keys can decrypt"):
        keyless.upload("www", pem(good), allow_decrypt=True)
    with pytest.raises(ServiceKeyRefused, match="not for this key"):
        keyless.upload("www", pem(good), chain=cert_pem(certificate(p256_key())))
    with pytest.raises(ServiceKeyRefused, match="not for TLS servers"):
        keyless.upload("www", pem(good), chain=cert_pem(certificate(good, server_auth=False)))
    with pytest.raises(ServiceKeyRefused, match="not a readable private key"):
        keyless.upload(
            "www", b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
        )
    with pytest.raises(ServiceKeyRefused):
        keyless.upload("www", cert_pem(certificate(good)))
    with pytest.raises(ServiceKeyRefused):
        keyless.upload("www", b"")
    with pytest.raises(ServiceKeyRefused):
        keyless.upload("www", b"\x30\x03\x02\x01\x00")  # DER, but not a key
    assert env.dump() == before and env.log_size() == size
    assert issubclass(WeakKeyError, ServiceKeyRefused)
    assert WeakKeyError("x").status == 400
    assert WeakKeyError("x").type_uri.endswith("/keyless-key-refused/weak")


async def test_bad_names_and_principals_are_refused(lite: Env) -> None:
    env, keyless = lite, ServiceKeys(lite.broker)
    keyless.upload("www", pem(p256_key()))
    before = env.dump()
    for service in ("", "WWW", "a/b", "../x", "x" * 64):
        with pytest.raises(DecodeError, match="service name"):
            keyless.upload(service, pem(p256_key()))
    with pytest.raises(NotFound):
        keyless.grant_edge("www", "node/nobody")
    with pytest.raises(NotFound):
        keyless.grant_edge("other", "node/nobody")
    await env.enrolled("node/edge1")
    before = env.dump()
    with pytest.raises(AuthorizationError, match="service principals"):
        keyless.hold("www", "node/edge1")  # key servers present TLS server certificates
    with pytest.raises(NotFound):
        keyless.release("www", "node/edge1")
    assert env.dump() == before


# -- secrecy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "p256", "ed25519"])
async def test_the_service_key_is_never_in_clear_anywhere(
    kind: str, lite: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env, keyless = lite, ServiceKeys(lite.broker)
    key = {
        "rsa": rsa_key,
        "p256": p256_key,
        "ed25519": ed25519.Ed25519PrivateKey.generate,
    }[kind]()
    uploaded = keyless.upload("www", pem(key), allow_decrypt=kind == "rsa")
    await env.enrolled("node/edge1")
    ks = await key_server(env)
    keyless.grant_edge("www", EDGE1)
    keyless.hold("www", ks.name)
    ks.reload()
    ski = ski_of(key.public_key())
    assert ks.source.skis() == [ski]
    op = {"rsa": Op.RSA_SIGN_SHA256, "p256": Op.ECDSA_SIGN_SHA256, "ed25519": Op.ED25519_SIGN}
    ks.source.perform(ski, op[kind], bytes(32))
    with pytest.raises(KeyOperationError) as caught:
        ks.authorizer.check(EDGE2, ski, op[kind])

    # The database: every cell of every table, the key versions' wrapped material included.
    from api_kit import raw_rows

    rows = raw_rows(env.store)
    assert len(metadata.tables) >= 10 and uploaded.version.ski is not None
    assert ski in rows  # the search really covers what was stored (the log entry's SKI)
    assert_no_secret(rows, key, "the database")
    files = [p for p in (env.tmp / "home").iterdir() if p.name.startswith("keybroker.db")]
    for path in files:  # the SQLite file itself, free pages and journal included
        assert_no_secret(path.read_bytes(), key, path.name)
    # The transparency log, the API's answers, the logs and every repr.
    assert_no_secret(b"".join(env.home.log.entries(0, env.log_size())), key, "the log")
    assert_no_secret(b"".join(env.transport.seen), key, "the API's answers")
    assert_no_secret("\n".join(r.getMessage() for r in caplog.records), key, "the logs")
    reprs = [
        repr(x)
        for x in (
            keyless,
            uploaded,
            ks.source,
            ks.source.store,
            ks.authorizer,
            ks.principal,
            ks.principal.keyring,
            caught.value,
            server_tls_credentials(ks.principal.keyring),
        )
    ]
    assert_no_secret("\n".join(reprs), key, "a repr")
    assert ski.hex() in repr(ks.source.store)
    # The keyring file holds it encrypted only.
    assert_no_secret(ks.path.read_bytes(), key, "the keyring file")
    # ... while the search does find the key where it is: in the key server's memory.
    keyset = ks.principal.keyring.received["keyless/www"]
    exported = keyset.export_secret_material(1, SECRET_ACCESS)
    with pytest.raises(AssertionError):
        assert_no_secret(b"before" + exported + b"after", key, "a planted copy")


# -- the key server's own TLS identity ---------------------------------------------------------


async def test_the_key_server_serves_tls_with_its_enrolment_certificate(env: Env) -> None:
    path, kek = await enrol(env, "service/ks1", dns_names=("ks1.keyless.test",))
    creds = server_tls_credentials(path, kek=kek)
    cert = load_certificate(creds.certificate_pem)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["ks1.keyless.test"]

    cert_file, key_file = server_tls_files(path, kek=kek, directory=env.tmp)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_certificate(cert_file.read_bytes()) == cert
    loaded = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert loaded.public_key() == cert.public_key()
    server_tls_files(path, kek=kek, directory=env.tmp)  # again: replaced, still 0600
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    # A real TLS handshake: an edge trusting the broker CA checks the key server's name.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=env.ca_pem.decode())
    await asyncio.to_thread(_handshake, server, client, "ks1.keyless.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(_handshake, server, client, "other.keyless.test")

    # Other principals' certificates are for clients only.
    edge_path, edge_kek = await enrol(env, "node/edge1")
    with pytest.raises(ConfigurationError, match="not for TLS servers"):
        server_tls_credentials(edge_path, kek=edge_kek)


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    """A TLS handshake between the two contexts over memory BIOs."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname=name)
    done = {"server": False, "client": False}
    for _ in range(20):
        for side, obj, peer_in, own_out in (
            ("client", cli, s_in, c_out),
            ("server", srv, c_in, s_out),
        ):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(own_out.read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


# -- the protocols the key server consumes --------------------------------------------------------


async def test_the_source_and_authorizer_fit_the_key_server(lite: Env) -> None:
    from keybroker.flows.keyless.keyserver import KeySource

    keyless = ServiceKeys(lite.broker)
    key = p256_key()
    keyless.upload("www", pem(key))
    ks = await key_server(lite)
    keyless.hold("www", ks.name)
    source = ks.source.reload()
    assert source is ks.source and isinstance(source, KeySource)
    authorizer = ks.authorizer.reload()
    assert authorizer is ks.authorizer
    for method in ("check", "reload", "describe"):
        assert callable(getattr(authorizer, method))
    assert "1 keys" in source.describe() and "service/ks1" in source.describe()
    assert "1 keysets" in authorizer.describe()
    opened, authorized = open_brokered(
        ks.path, kek=ks.kek, transport=lite.transport, clock=lite.clock
    )
    assert opened.skis() == source.skis() and "1 keys" in authorized.describe()
    workers = source.worker_keys()
    assert list(workers) == [ski_of(key.public_key())]
    assert (
        serialization.load_der_private_key(workers[ski_of(key.public_key())], None).public_key()
        == key.public_key()
    )


def test_reload_from_synchronous_code(tmp_path: Path, sqlite_url: str) -> None:
    """No event loop running: reload() runs its own (the other tests call it from one)."""
    made = new_env(tmp_path, sqlite_url)
    try:
        keyless = ServiceKeys(made.broker)
        key = p256_key()
        keyless.upload("www", pem(key))
        ks = asyncio.run(key_server(made))
        keyless.hold("www", ks.name)
        keyless.grant_edge("www", asyncio.run(made.enrolled("node/edge1")).principal)
        ks.reload()
        assert ks.source.skis() == [ski_of(key.public_key())]
        ks.authorizer.check(EDGE1, ski_of(key.public_key()), Op.ECDSA_SIGN_SHA256)
    finally:
        asyncio.run(made.aclose())
        made.home.close()


async def test_a_broker_that_cannot_be_reached_changes_nothing(lite: Env) -> None:
    keyless = ServiceKeys(lite.broker)
    key = p256_key()
    ski = ski_of(key.public_key())
    keyless.upload("www", pem(key))
    await lite.enrolled("node/edge1")
    ks = await key_server(lite)
    keyless.grant_edge("www", EDGE1)
    keyless.hold("www", ks.name)
    ks.reload()

    import httpx

    from keybroker.errors import TransportError

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("broker down", request=request)

    offline = KeyServerPrincipal(ks.path, kek=ks.kek, transport=httpx.MockTransport(down))
    source, authorizer = BrokerKeySource(offline), BrokerAuthorizer(offline, max_age=60)
    assert source.skis() == [ski]  # from the keyring alone
    with pytest.raises(TransportError):
        source.reload()
    with pytest.raises(TransportError):
        authorizer.reload()
    assert source.skis() == [ski]
    refused(lambda: authorizer.check(EDGE1, ski, Op.ECDSA_SIGN_SHA256))  # never read: closed

    # A view older than max_age is not trusted any more.
    ticks = [0.0]
    stale = BrokerAuthorizer(ks.principal, max_age=60, monotonic=lambda: ticks[0]).reload()
    stale.check(EDGE1, ski, Op.ECDSA_SIGN_SHA256)
    ticks[0] = 61.0
    refused(lambda: stale.check(EDGE1, ski, Op.ECDSA_SIGN_SHA256))
    with pytest.raises(ConfigurationError):
        BrokerAuthorizer(ks.principal, max_age=0)


def test_the_authorizer_takes_the_policy_from_the_template_too() -> None:
    """A view whose ``allow_decrypt`` disagrees with the template it names allows signing only."""
    from keybroker.api.keyless_schemas import KeylessKeyOut, KeylessKeys, KeylessKeysetOut

    def view(template: str, allow_decrypt: bool) -> KeylessKeys:
        key = KeylessKeyOut(
            version=1,
            key_id=1,
            state="primary",
            template=template,
            key_type="rsa-2048",
            ski="ab" * 20,
            allow_decrypt=allow_decrypt,
        )
        held = KeylessKeysetOut(keyset="keyless/x", service="x", keys=[key], edges=[str(EDGE1)])
        return KeylessKeys(keysets=[held])

    class Stub:
        principal = PrincipalId.parse("service/ks1")

        def __init__(self, answer: KeylessKeys) -> None:
            self.answer = answer

        def call(self, work: object) -> KeylessKeys:
            return self.answer

    ski = bytes.fromhex("ab" * 20)
    for template, flag, allowed in (
        ("TLS_RSA2048", True, False),
        ("TLS_RSA2048_DECRYPT", False, False),
        ("TLS_RSA2048_DECRYPT", True, True),
        ("RSA2048_PSS", True, False),
    ):
        authorizer = BrokerAuthorizer(Stub(view(template, flag))).reload()  # type: ignore[arg-type]
        authorizer.check(EDGE1, ski, Op.RSA_PSS_SIGN_SHA256)
        if allowed:
            authorizer.check(EDGE1, ski, Op.RSA_DECRYPT)
        else:
            refused(lambda a=authorizer: a.check(EDGE1, ski, Op.RSA_DECRYPT))


# -- a key server on broker keys, edges on their enrolment identities ------------------------------


def _scratch_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("keybroker-keyserver-*"))


async def test_a_key_server_on_broker_keys_serves_an_enrolled_edge_over_mutual_tls(
    lite: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """What ``keybroker keyserver --keyring`` assembles, in-process: the key server's TLS
    identity is its enrolment, the edge's client certificate is its own enrolment's, and keys
    and grants follow the broker at each reload (a new version served, a revocation obeyed)."""
    caplog.set_level(logging.INFO, logger="keybroker.keyless")
    keyless = ServiceKeys(lite.broker)
    first = p256_key()
    keyless.upload("www", pem(first))
    ks_path, ks_kek = await enrol(lite, "service/ks1", dns_names=("ks1.keyless.test",))
    edge_path, edge_kek = await enrol(lite, "node/edge1")
    keyless.grant_edge("www", "node/edge1")

    principal = KeyServerPrincipal(ks_path, kek=ks_kek, transport=lite.transport, clock=lite.clock)
    creds = server_tls_credentials(principal.keyring)
    scratch = _scratch_dirs()
    context = identity_tls_context(creds.certificate_pem, creds.private_key, creds.ca_pem)
    assert _scratch_dirs() == scratch  # the (encrypted) key file is gone once loaded
    server = KeylessServer(
        BrokerKeySource(principal),
        BrokerAuthorizer(principal),
        context,
        KeyServerSettings(workers=1),
        allow_empty=True,
    )
    _, port = await server.start("127.0.0.1", 0)

    files = client_tls_files(edge_path, kek=edge_kek, directory=lite.tmp / "edge" / "tls")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.key.parent.stat().st_mode) == 0o700
    assert files.ca.read_bytes() == lite.ca_pem and files.principal == EDGE1
    edge_cert = load_certificate(files.cert.read_bytes())
    assert (
        edge_cert.public_key()
        == client_tls_credentials(edge_path, kek=edge_kek).private_key.public_key()
    )
    assert_no_secret(
        b"".join(f.read_bytes() for f in (files.cert, files.key, files.ca)),
        first,
        "the edge's files",
    )
    client = KeyClient.from_files(
        [f"127.0.0.1:{port}"], ca=files.ca, cert=files.cert, key=files.key,
        server_name="ks1.keyless.test",
    )  # fmt: skip

    def sign(ski: bytes) -> bytes:
        digest = hashlib.sha256(b"CertificateVerify " + ski).digest()
        return client.operate(Op.ECDSA_SIGN_SHA256, ski, digest, sni="www")

    def verify(key: ec.EllipticCurvePrivateKey, ski: bytes, signature: bytes) -> None:
        digest = hashlib.sha256(b"CertificateVerify " + ski).digest()
        key.public_key().verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

    try:
        # Started before it holds anything: up, but not healthy, and it refuses.
        assert server.health()[0] == 503
        ski1 = ski_of(first.public_key())
        with pytest.raises(KeyOperationFailed) as caught:
            await asyncio.to_thread(sign, ski1)
        assert caught.value.code is ErrorCode.NOT_AUTHORIZED

        keyless.hold("www", "service/ks1")
        assert await server.reload(quiet=True)
        assert server.health() == (200, "ok: 1 keys, generation 2\n")
        verify(first, ski1, await asyncio.to_thread(sign, ski1))

        # A new version is served after the next reload; the old one still is.
        second = p256_key()
        keyless.upload("www", pem(second))
        ski2 = ski_of(second.public_key())
        assert await server.reload(quiet=True)
        verify(second, ski2, await asyncio.to_thread(sign, ski2))
        verify(first, ski1, await asyncio.to_thread(sign, ski1))

        # Revoked: refused at the next reload, on the connection already open.
        keyless.revoke_edge("www", "node/edge1")
        assert await server.reload(quiet=True)
        for ski in (ski1, ski2):
            with pytest.raises(KeyOperationFailed) as caught:
                await asyncio.to_thread(sign, ski)
            assert caught.value.code is ErrorCode.NOT_AUTHORIZED
        assert "grants: node/edge1 may no longer use keyless/www" in caplog.text
    finally:
        client.close()
        await server.aclose()
    # The service keys were in no log line (the edge's identity key is not a service key).
    assert_no_secret(caplog.text, first, "the logs")
    assert_no_secret(caplog.text, second, "the logs")


async def test_client_tls_files_need_an_enrolled_keyring(lite: Env) -> None:
    path, kek = await enrol(lite, "node/edge1")
    keyring = Keyring.load(path, KekSource(kek=kek))
    keyring.certificate_pem = b""
    with pytest.raises(ConfigurationError, match="no certificate yet"):
        client_tls_files(keyring, directory=lite.tmp / "tls")
    assert not (lite.tmp / "tls").exists()
