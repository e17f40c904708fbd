from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa
from broker_kit import Principal, World, csr_for
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from keybroker.broker import sign_with_identity
from keybroker.broker.events import (
    CertificateRevoked,
    DeliveryFailed,
    EnrolmentTokenCreated,
    PrincipalEnrolled,
    PrincipalRevoked,
)
from keybroker.errors import (
    AuthorizationError,
    CertificateInvalid,
    Conflict,
    CryptoError,
    DecodeError,
    NotFound,
    RemoteProtocolError,
)
from keybroker.keys import AES256_GCM
from keybroker.pki import PrincipalId, fingerprint, public_key_fingerprint
from keybroker.store.schema import certificates, enrolment_tokens

HOUR = timedelta(hours=1)


def test_enrol_issues_an_identity_certificate_and_logs_it(world: World) -> None:
    broker = world.broker
    alice = Principal.named("site/fra1")
    start = world.log_size()
    token = broker.create_enrolment_token(alice.pid, HOUR)
    result = alice.enrol(broker, token.secret)

    cert = result.certificate
    assert result.principal == alice.pid and not result.reenrolled
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["keybroker://site/fra1"]
    assert public_key_fingerprint(cert.public_key()) == public_key_fingerprint(
        alice.identity.public_key()
    )
    assert result.ca_certificate == broker.ca_certificate
    cert.verify_directly_issued_by(broker.ca_certificate)

    info = broker.show_principal("site/fra1")
    assert info.status == "active"
    assert info.certificate_sha256 == fingerprint(cert)
    assert info.hpke_public_key == alice.binding().public_key
    assert info.hpke_key_id == alice.binding().key_id
    assert [p.principal for p in broker.list_principals()] == [alice.pid]
    assert broker.principal_certificate(alice.pid) == cert

    created, enrolled = world.events_since(start)
    assert isinstance(created, EnrolmentTokenCreated) and created.token_id == token.token_id
    assert isinstance(enrolled, PrincipalEnrolled)
    assert enrolled.principal == "site/fra1" and enrolled.token_id == token.token_id
    assert enrolled.certificate_sha256 == fingerprint(cert)


def test_p256_identity_keys_enrol(world: World) -> None:
    bob = world.enrolled("device/bob-1", p256=True)
    cert = world.broker.principal_certificate(bob.pid)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_the_token_secret_is_stored_only_as_a_hash_and_never_printed(world: World) -> None:
    token = world.broker.create_enrolment_token("site/fra1", HOUR)
    assert len(token.secret) >= 43
    assert token.secret not in repr(token)
    flat = repr(world.dump())
    assert token.secret not in flat
    assert token.secret.encode() not in flat.encode()
    with world.home.store.snapshot() as conn:
        (stored,) = conn.execute(sa.select(enrolment_tokens.c.token_hash)).scalars()
    assert len(stored) == 32


def test_a_reused_token_is_refused_and_changes_nothing(world: World) -> None:
    broker = world.broker
    alice = Principal.named("site/fra1")
    token = broker.create_enrolment_token(alice.pid, HOUR)
    alice.enrol(broker, token.secret)
    before, size = world.dump(), world.log_size()
    with pytest.raises(AuthorizationError):
        Principal(alice.pid).enrol(broker, token.secret)
    assert world.dump() == before and world.log_size() == size


def test_an_expired_token_is_refused_and_changes_nothing(world: World) -> None:
    broker = world.broker
    alice = Principal.named("site/fra1")
    token = broker.create_enrolment_token(alice.pid, HOUR)
    world.clock.advance(HOUR)
    before, size = world.dump(), world.log_size()
    with pytest.raises(AuthorizationError):
        alice.enrol(broker, token.secret)
    assert world.dump() == before and world.log_size() == size


def test_a_token_for_another_principal_is_refused_and_changes_nothing(world: World) -> None:
    broker = world.broker
    token = broker.create_enrolment_token("site/fra1", HOUR)
    before, size = world.dump(), world.log_size()
    with pytest.raises(AuthorizationError):
        Principal.named("site/ams1").enrol(broker, token.secret)
    assert world.dump() == before and world.log_size() == size
    Principal.named("site/fra1").enrol(broker, token.secret)  # still good for its principal


def test_an_unknown_or_malformed_token_is_refused(world: World) -> None:
    alice = Principal.named("site/fra1")
    with pytest.raises(AuthorizationError):
        alice.enrol(world.broker, "A" * 43)
    with pytest.raises(DecodeError):
        alice.enrol(world.broker, "A" * 1000)
    assert world.broker.list_principals() == []


def test_a_csr_with_a_bad_signature_is_refused_and_changes_nothing(world: World) -> None:
    broker = world.broker
    alice = Principal.named("site/fra1")
    token = broker.create_enrolment_token(alice.pid, HOUR)
    args = alice.enrol_args()
    good = x509.load_pem_x509_csr(args["csr"])
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the Ed25519 signature
    args["csr"] = bytes(der)
    before, size = world.dump(), world.log_size()
    with pytest.raises(CertificateInvalid):
        broker.enrol(alice.pid, token.secret, **args)
    assert world.dump() == before and world.log_size() == size


def test_a_csr_key_outside_the_policy_is_refused(world: World) -> None:
    broker = world.broker
    alice = Principal.named("site/fra1")
    token = broker.create_enrolment_token(alice.pid, HOUR)
    args = alice.enrol_args()
    p384 = ec.generate_private_key(ec.SECP384R1())
    args["csr"] = csr_for(p384)
    before = world.dump()
    with pytest.raises(CertificateInvalid):
        broker.enrol(alice.pid, token.secret, **args)
    assert world.dump() == before


def test_an_hpke_key_signed_by_another_key_is_refused_and_changes_nothing(world: World) -> None:
    broker = world.broker
    alice = Principal.named("site/fra1")
    token = broker.create_enrolment_token(alice.pid, HOUR)
    args = alice.enrol_args()
    mallory = ed25519.Ed25519PrivateKey.generate()
    args["hpke_key_signature"] = sign_with_identity(mallory, alice.binding().encode())
    before, size = world.dump(), world.log_size()
    with pytest.raises(CryptoError):
        broker.enrol(alice.pid, token.secret, **args)
    assert world.dump() == before and world.log_size() == size


def test_the_hpke_signature_covers_the_principal_and_key_id(world: World) -> None:
    broker = world.broker
    alice = Principal.named("site/fra1")
    token = broker.create_enrolment_token(alice.pid, HOUR)
    args = alice.enrol_args()
    args["hpke_key_id"] = int(args["hpke_key_id"]) ^ 1
    with pytest.raises(CryptoError):
        broker.enrol(alice.pid, token.secret, **args)
    args = alice.enrol_args()
    args["hpke_public_key"] = b"\x00" * 32  # low-order X25519 point
    with pytest.raises(DecodeError):
        broker.enrol(alice.pid, token.secret, **args)


def test_concurrent_enrolments_with_one_token_let_exactly_one_win(world: World) -> None:
    broker = world.broker
    pid = PrincipalId.parse("site/fra1")
    token = broker.create_enrolment_token(pid, HOUR)
    contenders = [Principal(pid), Principal(pid)]
    args = [c.enrol_args() for c in contenders]
    barrier = threading.Barrier(len(contenders))
    outcomes: list[object] = [None] * len(contenders)

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = broker.enrol(pid, token.secret, **args[i])
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(contenders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], AuthorizationError), outcomes
    with world.home.store.snapshot() as conn:
        issued = conn.execute(
            sa.select(sa.func.count())
            .select_from(certificates)
            .where(certificates.c.principal_id.is_not(None))
        ).scalar_one()
    assert issued == 1
    enrolled = [e for e in world.events_since(1) if isinstance(e, PrincipalEnrolled)]
    assert len(enrolled) == 1


def test_a_new_token_rekeys_an_existing_principal(world: World) -> None:
    broker = world.broker
    alice = world.enrolled("site/fra1")
    old_cert = broker.principal_certificate(alice.pid)
    broker.create_keyset("k", AES256_GCM)
    broker.grant(alice.pid, "k", "hold")
    old_delivery = broker.deliver("k", 1, alice.pid, HOUR)

    start = world.log_size()
    rekeyed = Principal(alice.pid)
    token = broker.create_enrolment_token(alice.pid, HOUR)
    result = rekeyed.enrol(broker, token.secret)

    assert result.reenrolled
    assert broker.principal_certificate(alice.pid) == result.certificate
    info = broker.show_principal(alice.pid)
    assert info.hpke_public_key == rekeyed.binding().public_key
    with world.home.store.snapshot() as conn:
        reason = conn.execute(
            sa.select(certificates.c.revocation_reason).where(
                certificates.c.fingerprint == fingerprint(old_cert)
            )
        ).scalar_one()
    assert reason == "superseded"
    assert broker.show_delivery(old_delivery.delivery_id).state == "failed"
    kinds = [type(e) for e in world.events_since(start)]
    assert kinds == [EnrolmentTokenCreated, PrincipalEnrolled, CertificateRevoked, DeliveryFailed]


def test_revoking_a_principal_is_final_and_logged(world: World) -> None:
    broker = world.broker
    alice = world.enrolled("site/fra1")
    spare = broker.create_enrolment_token(alice.pid, HOUR)
    start = world.log_size()

    info = broker.revoke_principal(alice.pid, reason="keyCompromise")
    assert info.status == "revoked" and info.certificate_sha256 is None
    kinds = [type(e) for e in world.events_since(start)]
    assert kinds == [PrincipalRevoked, CertificateRevoked]

    before, size = world.dump(), world.log_size()
    assert broker.revoke_principal(alice.pid).status == "revoked"  # twice: nothing new
    with pytest.raises(Conflict):
        broker.create_enrolment_token(alice.pid, HOUR)
    with pytest.raises(AuthorizationError):
        Principal(alice.pid).enrol(broker, spare.secret)
    with pytest.raises(NotFound):
        broker.principal_certificate(alice.pid)
    assert world.dump() == before and world.log_size() == size


def test_bad_operator_input_is_refused(world: World) -> None:
    broker = world.broker
    with pytest.raises(DecodeError):
        broker.create_enrolment_token("planet/earth", HOUR)
    with pytest.raises(RemoteProtocolError, match="ttl"):
        broker.create_enrolment_token("site/fra1", timedelta(0))
    with pytest.raises(RemoteProtocolError, match="ttl"):
        broker.create_enrolment_token("site/fra1", timedelta(days=365))
    with pytest.raises(NotFound):
        broker.revoke_principal("site/nobody")
    world.enrolled("site/fra1")
    before, size = world.dump(), world.log_size()
    with pytest.raises(DecodeError):
        broker.revoke_principal("site/fra1", reason="because")
    assert world.dump() == before and world.log_size() == size == 3  # init, token, enrolment
