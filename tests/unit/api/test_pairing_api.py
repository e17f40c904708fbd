"""Manufacturer CRLs published by the broker (S9), on SQLite and PostgreSQL.

An operator publishes a manufacturer CA's CRL on the broker host
(:class:`CrlPublisher`, what ``keybroker pair crl-publish`` runs); principals read
the latest CRL of every CA with ``GET /v1/pairing/crls``; a controller keeps a
relayed CRL only if it verifies under a CA chaining to a root it trusts
(:func:`fetch_trusted_crls`), so a broker that forges, swaps or withholds a CRL
cannot make a revoked device pass.

The broker's device inventory (:class:`Inventory`, what ``keybroker pair
inventory-add`` / ``inventory-remove`` run) is read by principals with
``GET /v1/pairing/inventory/{serial}`` (:func:`fetch_inventory_code`, what
``pair controller --from-inventory`` runs).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from api_kit import Env, problem
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from keybroker.api.pairing_schemas import InventoryRecordOut, ManufacturerCrls
from keybroker.api.routes import pairing as pairing_routes
from keybroker.broker.events import decode_event
from keybroker.errors import (
    AuthorizationError,
    CertificateInvalid,
    CertificateRevoked,
    Conflict,
    DecodeError,
    IdentityMismatch,
    NotFound,
    PublicKeyMismatch,
    RevocationUnknown,
)
from keybroker.flows.pairing.code import PairingCode
from keybroker.flows.pairing.crls import (
    LOG_ENTRIES,
    CrlPublished,
    CrlPublisher,
    PublishedCrl,
    fetch_trusted_crls,
    trusted_crls,
)
from keybroker.flows.pairing.inventory import LOG_ENTRIES as INVENTORY_ENTRIES
from keybroker.flows.pairing.inventory import (
    Inventory,
    InventoryAdded,
    InventoryRemoved,
    fetch_inventory_code,
)
from keybroker.flows.pairing.manufacturer import Manufacturer
from keybroker.pki import (
    CertificateAuthority,
    DeviceIdentity,
    Revocation,
    fingerprint,
    verify_device_chain,
    verify_device_identity,
)
from keybroker.store.schema import crls as crls_table

PATH = "/v1/pairing/crls"
DAY = timedelta(days=1)
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)  # the api conftest's clock
LAMP = DeviceIdentity("SN-0001", "0024be804ff1", "lamp-2")


@pytest.fixture
def api(env: Env) -> Env:
    """The API with the pairing router (included here until ``create_app`` includes it)."""
    if not any(getattr(route, "path", None) == PATH for route in env.app.routes):
        env.app.include_router(pairing_routes.router)
    return env


@pytest.fixture(scope="module")
def acme_maker() -> Manufacturer:
    return Manufacturer.create("Acme", T0 - 30 * DAY)


def _crl_signed_by(
    ca_name: x509.Name, key: ec.EllipticCurvePrivateKey, number: int, now: datetime
) -> x509.CertificateRevocationList:
    """A CRL naming ``ca_name`` as issuer, signed with ``key`` (a forgery unless the CA's)."""
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_name)
        .last_update(now)
        .next_update(now + 7 * DAY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .sign(key, hashes.SHA256())
    )


async def test_a_controller_reads_the_published_crls_and_keeps_those_under_its_root(
    api: Env, acme_maker: Manufacturer
) -> None:
    now = api.clock()
    lamp = acme_maker.provision(LAMP, now - DAY)
    revoked = acme_maker.provision(DeviceIdentity("SN-0002", "0024be804ff2", "plug-1"), now - DAY)
    root_crl, devices_crl = acme_maker.crls(now - DAY, revoked=[revoked.certificate])
    publisher = CrlPublisher(api.broker)
    size = api.log_size()
    publisher.publish(acme_maker.root.certificate, root_crl)
    publisher.publish(acme_maker.intermediate.certificate, devices_crl)

    # Each publication is in the transparency log.
    entries = api.home.log.entries(size, api.log_size())
    assert [LOG_ENTRIES[CrlPublished.LABEL].decode(e).crl_number for e in entries] == [1, 1]
    published = CrlPublished.decode(entries[1])
    assert published.issuer_sha256 == fingerprint(acme_maker.intermediate.certificate)
    with pytest.raises(DecodeError):
        decode_event(entries[1])  # a flow's entry, not a core broker event

    ctl = await api.enrolled("device/ctl1")
    listed = await ctl.call(ManufacturerCrls, "GET", PATH)
    assert [(c.issuer, c.crl_number) for c in listed.crls] == [
        ("CN=Acme devices", 1),
        ("CN=Acme root", 1),
    ]
    assert listed.crls[0].issuer_sha256 == fingerprint(acme_maker.intermediate.certificate).hex()

    verdict = await fetch_trusted_crls(ctl, [acme_maker.root.certificate], now)
    assert verdict.ignored == ()
    assert [c.public_bytes(Encoding.DER) for c in verdict.kept] == [
        c.public_bytes(Encoding.DER) for c in (devices_crl, root_crl)
    ]
    # What the controller kept is what path validation uses: revoked refused, genuine passes.
    roots = [acme_maker.root.certificate]
    inter = [acme_maker.intermediate.certificate]
    verify_device_chain(lamp.certificate, inter, roots, now, crls=verdict.kept)
    with pytest.raises(CertificateRevoked):
        verify_device_chain(revoked.certificate, inter, roots, now, crls=verdict.kept)

    # A newer CRL replaces the older one in what principals read.
    newer = acme_maker.intermediate.issue_crl([], now, now + 7 * DAY, 2)
    publisher.publish(acme_maker.intermediate.certificate, newer)
    listed = await ctl.call(ManufacturerCrls, "GET", PATH)
    assert [(c.issuer, c.crl_number) for c in listed.crls] == [
        ("CN=Acme devices", 2),
        ("CN=Acme root", 1),
    ]


async def test_only_principals_read_the_crls(api: Env, acme_maker: Manufacturer) -> None:
    now = api.clock()
    CrlPublisher(api.broker).publish(acme_maker.root.certificate, acme_maker.crls(now - DAY)[0])
    http = api.http()
    problem(await http.get(PATH), 401, "authentication")
    problem(await http.get(PATH, headers=api.admin_headers()), 401, "authentication")
    ctl = await api.enrolled("device/ctl1")
    api.broker.revoke_principal("device/ctl1")
    with pytest.raises(AuthorizationError) as caught:
        await ctl.call(ManufacturerCrls, "GET", PATH)
    assert "revoked" in str(caught.value).lower()


async def test_a_crl_the_broker_cannot_vouch_for_is_refused_and_changes_nothing(
    api: Env, acme_maker: Manufacturer
) -> None:
    now = api.clock()
    publisher = CrlPublisher(api.broker)
    root = acme_maker.root
    inter = acme_maker.intermediate
    publisher.publish(inter.certificate, inter.issue_crl([], now - DAY, now + 7 * DAY, 5))
    before, size = api.dump(), api.log_size()
    forged = _crl_signed_by(inter.name, ec.generate_private_key(ec.SECP256R1()), 6, now)
    stale = inter.issue_crl([], now - 20 * DAY, now - 10 * DAY, 7)
    cases: list[tuple[type[Exception], x509.Certificate, x509.CertificateRevocationList, str]] = [
        (CertificateInvalid, inter.certificate, forged, "signature does not verify"),
        (CertificateInvalid, inter.certificate, stale, "not current"),
        (CertificateInvalid, root.certificate, inter.issue_crl([], now, now + DAY, 8), "not from"),
        (Conflict, inter.certificate, inter.issue_crl([], now, now + DAY, 5), "number 5"),
        (Conflict, inter.certificate, inter.issue_crl([], now, now + DAY, 4), "number 5"),
    ]
    device = acme_maker.provision(LAMP, now - DAY).certificate
    for error, ca, crl, words in cases:
        with pytest.raises(error, match=words):
            publisher.publish(ca, crl)
    with pytest.raises(CertificateInvalid, match="not a CA"):
        publisher.publish(device, inter.issue_crl([], now, now + DAY, 9))
    no_number = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(inter.name)
        .last_update(now)
        .next_update(now + DAY)
        .sign(inter._key, hashes.SHA256())  # type: ignore[attr-defined]
    )
    with pytest.raises(DecodeError, match="no CRL number"):
        publisher.publish(inter.certificate, no_number)
    assert api.dump() == before and api.log_size() == size

    # The same CRL again is a no-op, not a conflict.
    with api.store.snapshot() as conn:
        (der,) = conn.execute(sa.select(crls_table.c.der)).one()
    publisher.publish(inter.certificate, x509.load_der_x509_crl(bytes(der)))
    assert api.dump() == before and api.log_size() == size


async def test_the_controller_does_not_trust_the_brokers_copy(
    api: Env, acme_maker: Manufacturer
) -> None:
    """A broker that relays a forged CRL, a CRL under a look-alike CA or another maker's
    CRL: the controller keeps none of them, so the revoked device is not let through."""
    now = api.clock()
    roots = [acme_maker.root.certificate]
    inter = acme_maker.intermediate
    revoked = acme_maker.provision(LAMP, now - DAY)
    root_crl, _ = acme_maker.crls(now - DAY)
    genuine = inter.issue_crl(
        [Revocation(revoked.certificate.serial_number, now - DAY)], now - DAY, now + 7 * DAY, 1
    )
    # A look-alike "Acme devices" CA (self-issued, same name) and its CRL listing nothing.
    fake_key = ec.generate_private_key(ec.SECP256R1())
    fake_ca = CertificateAuthority.create("Acme devices", fake_key, now - DAY, 30 * DAY)
    look_alike = fake_ca.issue_crl([], now - DAY, now + 7 * DAY, 2)
    forged = _crl_signed_by(inter.name, fake_key, 3, now - DAY)
    evil = Manufacturer.create("Evil", now - 30 * DAY)

    offered = [
        PublishedCrl(acme_maker.root.certificate, root_crl),
        PublishedCrl(fake_ca.certificate, look_alike),
        PublishedCrl(inter.certificate, forged),
        PublishedCrl(evil.intermediate.certificate, evil.crls(now - DAY)[1]),
    ]
    verdict = trusted_crls(offered, roots, now)
    assert verdict.kept == (root_crl,)
    assert len(verdict.ignored) == 3
    assert "CN=Acme devices: not a CA under a trusted manufacturer root" in verdict.ignored[0]
    assert "signature does not verify" in verdict.ignored[1]
    assert "CN=Evil devices: not a CA under a trusted" in verdict.ignored[2]
    # Nothing kept from Acme devices: revocation unknown, refused (fail closed).
    with pytest.raises(RevocationUnknown):
        verify_device_chain(revoked.certificate, [inter.certificate], roots, now, crls=verdict.kept)
    # With the genuine CRL offered as well, the device is revoked.
    verdict = trusted_crls([*offered, PublishedCrl(inter.certificate, genuine)], roots, now)
    assert genuine in verdict.kept
    with pytest.raises(CertificateRevoked):
        verify_device_chain(revoked.certificate, [inter.certificate], roots, now, crls=verdict.kept)

    # Over the API: a broker whose store was tampered with relays the forgery; the
    # controller ignores it and says why.
    CrlPublisher(api.broker).publish(inter.certificate, genuine)
    with api.store.transaction() as conn:
        conn.execute(
            crls_table.insert().values(
                issuer_fingerprint=fingerprint(inter.certificate),
                crl_number=9,
                der=forged.public_bytes(Encoding.DER),
                this_update=now - DAY,
                next_update=now + 7 * DAY,
            )
        )
    ctl = await api.enrolled("device/ctl1")
    verdict = await fetch_trusted_crls(ctl, roots, now)
    assert verdict.kept == ()
    assert verdict.ignored == (
        "CRL of CN=Acme devices: CRL signature does not verify under the key of CN=Acme devices",
    )


# -- the broker's device inventory -------------------------------------------------------------

INVENTORY = "/v1/pairing/inventory"


async def test_an_operator_records_a_device_and_a_controller_checks_against_it(
    api: Env, acme_maker: Manufacturer
) -> None:
    now = api.clock()
    lamp = acme_maker.provision(LAMP, now - DAY).certificate
    code = PairingCode.for_certificate(lamp)
    inventory = Inventory(api.broker)
    size = api.log_size()
    added = inventory.add(code, "alice")
    assert (added.code, added.added_by, added.added_at) == (code, "alice", now)

    ctl = await api.enrolled("device/ctl1")
    got = await ctl.call(InventoryRecordOut, "GET", f"{INVENTORY}/{LAMP.serial}")
    assert (got.serial, got.hardware_id, got.model) == ("SN-0001", "0024be804ff1", "lamp-2")
    assert got.key_sha256 == code.key_sha256.hex() and got.code == code.to_uri()
    assert (got.added_by, got.added_at) == ("alice", now)
    fetched = await fetch_inventory_code(ctl, LAMP.serial)
    assert fetched == code
    # What the controller checks with it: the genuine certificate passes; another device's
    # certificate, or the same identity with another key, does not.
    verify_device_identity(lamp, fetched.identity, fetched.key_sha256)
    plug = acme_maker.provision(DeviceIdentity("SN-0002", "0024be804ff2", "plug-1"), now - DAY)
    with pytest.raises(IdentityMismatch):
        verify_device_identity(plug.certificate, fetched.identity, fetched.key_sha256)
    other_key = acme_maker.provision(LAMP, now - DAY).certificate
    with pytest.raises(PublicKeyMismatch):
        verify_device_identity(other_key, fetched.identity, fetched.key_sha256)

    # The same record again is a no-op; another one for the same serial a conflict.
    before, logged = api.dump(), api.log_size()
    assert inventory.add(code, "bob").added_by == "alice"
    with pytest.raises(Conflict, match="already recorded"):
        inventory.add(PairingCode.for_certificate(other_key), "mallory")
    with pytest.raises(DecodeError, match="operator"):
        inventory.add(PairingCode.for_certificate(plug.certificate), "")
    assert api.dump() == before and api.log_size() == logged

    removed = inventory.remove(LAMP.serial, "bob")
    assert removed.code == code
    with pytest.raises(NotFound, match="no inventory record for device serial SN-0001"):
        await fetch_inventory_code(ctl, LAMP.serial)
    with pytest.raises(NotFound):
        inventory.remove(LAMP.serial, "bob")

    # Each change is in the transparency log, with who made it; nothing secret.
    entries = api.home.log.entries(size, api.log_size())
    ours = [e for e in entries if any(label.encode() in e for label in INVENTORY_ENTRIES)]
    decoded = [InventoryAdded.decode(ours[0]), InventoryRemoved.decode(ours[1])]
    assert [type(e) for e in decoded] == [InventoryAdded, InventoryRemoved]
    assert [(e.serial, e.key_sha256, e.operator) for e in decoded] == [
        ("SN-0001", code.key_sha256, "alice"),
        ("SN-0001", code.key_sha256, "bob"),
    ]
    assert len(ours) == 2
    with pytest.raises(DecodeError):
        decode_event(ours[0])


async def test_only_principals_read_the_inventory(api: Env, acme_maker: Manufacturer) -> None:
    now = api.clock()
    Inventory(api.broker).add(
        PairingCode.for_certificate(acme_maker.provision(LAMP, now - DAY).certificate), "alice"
    )
    http = api.http()
    problem(await http.get(f"{INVENTORY}/{LAMP.serial}"), 401, "authentication")
    problem(
        await http.get(f"{INVENTORY}/{LAMP.serial}", headers=api.admin_headers()),
        401,
        "authentication",
    )
    ctl = await api.enrolled("device/ctl1")
    with pytest.raises(NotFound):
        await fetch_inventory_code(ctl, "SN-9999")
    with pytest.raises(DecodeError):
        await fetch_inventory_code(ctl, "not/a serial")
    api.broker.revoke_principal("device/ctl1")
    with pytest.raises(AuthorizationError) as caught:
        await fetch_inventory_code(ctl, LAMP.serial)
    assert "revoked" in str(caught.value).lower()
