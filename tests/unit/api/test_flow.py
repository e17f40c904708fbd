"""The whole path through the API, as the SDKs drive it: enrol, deliver, long-poll, open,
ack, and check the log — on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging

import pytest
from api_kit import Env, encodings, raw_rows

from keybroker.broker.events import DeliveryAcknowledged, DeliverySent, PrincipalEnrolled
from keybroker.keys import SECRET_ACCESS


@pytest.mark.parametrize("identity", ["ed25519", "p256"])
async def test_token_enrol_deliver_longpoll_open_ack_and_log_proofs(
    env: Env, identity: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    op = env.operator()
    log = await op.log()
    first_head = await log.check()

    fra1 = await env.enrolled("site/fra1", identity_algorithm=identity)
    assert (await op.show_principal("site/fra1")).status == "active"

    created = await op.create_keyset("site/fra1/restore", "AES256_GCM")
    assert created.primary == 1
    grant = await op.grant("site/fra1", "site/fra1/restore", "hold")
    assert (grant.principal, grant.mode) == ("site/fra1", "hold")

    # The principal is already waiting when the operator delivers: the poll returns with it.
    waiting = asyncio.create_task(fra1.fetch_deliveries(wait=30))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    sent = await op.deliver("site/fra1/restore", 1, "site/fra1")
    assert sent.state == "sent"
    (delivery,) = await asyncio.wait_for(waiting, timeout=10)
    assert (delivery.delivery_id, delivery.keyset, delivery.version) == (
        sent.delivery_id,
        "site/fra1/restore",
        1,
    )

    info = fra1.open_delivery(delivery)
    assert info.version == 1 and info.state.value == "pending"
    acked = await fra1.ack(delivery)
    assert acked.state == "acked"
    assert (await op.show_delivery(sent.delivery_id)).state == "acked"
    assert await fra1.fetch_deliveries() == []
    assert [d.state for d in await op.list_deliveries(principal="site/fra1")] == ["acked"]

    # The principal really holds the broker's key.
    theirs = env.home.keysets.load("site/fra1/restore").keyset
    ours = fra1.keyset("site/fra1/restore")
    assert ours.aead().decrypt(theirs.aead().encrypt(b"device state", b"ad"), b"ad") == (
        b"device state"
    )
    assert set(fra1.received_keysets()) == {"site/fra1/restore"}

    # The log: the ack is in it, and the log only grew — checked by the principal's client.
    head = await fra1.log.check(previous=first_head)
    events = env.events_since(first_head.tree_size)
    kinds = [type(e) for e in events]
    assert PrincipalEnrolled in kinds and DeliverySent in kinds
    index = first_head.tree_size + kinds.index(DeliveryAcknowledged)
    entry = await fra1.log.verify_inclusion(index, head)
    assert isinstance(events[index - first_head.tree_size], DeliveryAcknowledged)
    assert entry == env.home.log.entry(index)
    assert (await log.check(previous=head)).tree_size == head.tree_size

    # Nothing secret in clear: not in responses, not in log lines, not in the database.
    secrets = [env.admin_token.encode()]
    secrets.append(theirs.export_secret_material(1, SECRET_ACCESS))
    secrets.append(fra1.keyring.identity.export_secret_material(1, SECRET_ACCESS))
    secrets.append(fra1.keyring.hpke.export_secret_material(1, SECRET_ACCESS))
    rows = raw_rows(env.store)
    seen = b"\n".join(env.transport.seen)
    logged = "\n".join(r.getMessage() for r in caplog.records).encode()
    keyring_file = (env.tmp / "site_fra1.keyring").read_bytes()
    for secret in secrets:
        for form in encodings(secret):
            assert form not in rows
            assert form not in seen
            assert form not in logged
            assert form not in keyring_file
    # The enrolment token is shown once, in the answer to its creation, and kept nowhere.
    (token,) = env.tokens
    assert token.encode() not in rows and token.encode() not in logged
    assert sum(token.encode() in body for body in env.transport.seen) == 1


async def test_longpoll_returns_empty_when_nothing_comes(env: Env) -> None:
    fra1 = await env.enrolled("site/fra1")
    assert await fra1.fetch_deliveries(wait=1) == []


async def test_a_principal_sees_only_its_own_deliveries(env: Env) -> None:
    op = env.operator()
    fra1 = await env.enrolled("site/fra1")
    ams1 = await env.enrolled("site/ams1")
    await op.create_keyset("shared", "HMAC_SHA256")
    await op.grant("site/fra1", "shared", "hold")
    await op.grant("site/ams1", "shared", "hold")
    to_fra1 = await op.deliver("shared", 1, "site/fra1")
    assert await ams1.fetch_deliveries() == []
    to_ams1 = await op.deliver("shared", 1, "site/ams1")
    (theirs,) = await fra1.fetch_deliveries()
    (mine,) = await ams1.fetch_deliveries()
    assert theirs.delivery_id == to_fra1.delivery_id
    assert mine.delivery_id == to_ams1.delivery_id
    assert theirs.envelope.recipient == "site/fra1" and mine.envelope.recipient == "site/ams1"


async def test_keyset_names_with_slashes_route_unambiguously(env: Env) -> None:
    op = env.operator()
    await op.create_keyset("a", "AES256_GCM")
    await op.create_keyset("a/versions/2", "AES256_GCM")
    await op.create_keyset("a/rotate", "AES256_GCM")
    await op.rotate_keyset("a/versions/2")
    promoted = await op.promote_version("a/versions/2", 2)
    assert promoted.state == "primary"
    rotated = await op.rotate_keyset("a/rotate")
    assert rotated.version == 2
    assert (await op.show_keyset("a")).primary == 1
    assert len((await op.show_keyset("a")).versions) == 1
    assert (await op.show_keyset("a/versions/2")).primary == 2
    assert len((await op.show_keyset("a/rotate")).versions) == 2
    await op.disable_version("a/versions/2", 1)
    destroyed = await op.destroy_version("a/versions/2", 1)
    assert destroyed.state == "destroyed"
    assert {k.name for k in await op.list_keysets()} == {"a", "a/versions/2", "a/rotate"}


async def test_grants_list_and_revoke(env: Env) -> None:
    op = env.operator()
    await env.enrolled("site/fra1")
    await op.create_keyset("k", "AES256_GCM")
    await op.grant("site/fra1", "k", "use")
    again = await op.grant("site/fra1", "k", "use")
    assert len(await op.list_grants(principal="site/fra1")) == 1
    revoked = await op.revoke_grant("site/fra1", "k", "use")
    assert revoked.grant_id == again.grant_id and revoked.revoked_at is not None
    assert await op.list_grants() == []
    assert len(await op.list_grants(include_revoked=True)) == 1


async def test_health_metrics_and_ca(env: Env) -> None:
    op = env.operator()
    health = await op.health()
    assert health.status == "ok" and health.log_size >= 1
    assert (await op.ca_pem()).encode() == env.ca_pem
    fra1 = await env.enrolled("site/fra1")
    await op.create_keyset("k", "AES256_GCM")
    await op.grant("site/fra1", "k", "hold")
    await op.deliver("k", 1, "site/fra1")
    await fra1.receive()
    http = env.http()
    text = (await http.get("/metrics")).text
    assert 'keybroker_deliveries{state="acked"} 1.0' in text
    assert 'keybroker_deliveries{state="sent"} 0.0' in text
    assert (
        'keybroker_http_requests_total{method="POST",route="/v1/deliveries/{delivery_id}/ack",'
        'status="200"} 1.0'
    ) in text
    assert "keybroker_http_request_duration_seconds_bucket" in text
