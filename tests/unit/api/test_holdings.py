"""``GET /v1/holdings`` over the API and the SDK, on SQLite and PostgreSQL: signed, only the
caller's own holdings, and no key material in the answer."""

from __future__ import annotations

import json
import logging

import pytest
from api_kit import Env, encodings, problem

from keybroker.keys import SECRET_ACCESS


async def test_a_principal_sees_exactly_what_it_holds(env: Env) -> None:
    op = env.operator()
    site = await env.enrolled("site/fra1")
    node = await env.enrolled("node/up1-a")
    for name in ("rotation/up1-a/fra1", "rotation/up1-b/fra1"):
        await op.create_keyset(name, "AES256_GCM")
    await op.grant("site/fra1", "rotation/up1-a/fra1", "hold")
    await op.grant("site/fra1", "rotation/up1-b/fra1", "use")
    await op.grant("node/up1-a", "rotation/up1-a/fra1", "hold")
    await op.grant("node/up1-a", "rotation/up1-b/fra1", "hold")
    await op.rotate_keyset("rotation/up1-a/fra1")

    (held,) = await site.holdings()
    stored = await op.show_keyset("rotation/up1-a/fra1")
    assert (held.name, held.purpose, held.primary) == ("rotation/up1-a/fra1", "aead", 1)
    assert [(v.version, v.key_id, v.state) for v in held.versions] == [
        (v.version, v.key_id, v.state) for v in stored.versions
    ]
    assert [v.state for v in held.versions] == ["primary", "pending"]
    assert [h.name for h in await node.holdings()] == ["rotation/up1-a/fra1", "rotation/up1-b/fra1"]

    await op.revoke_grant("node/up1-a", "rotation/up1-b/fra1", "hold")
    assert [h.name for h in await node.holdings()] == ["rotation/up1-a/fra1"]
    await op.disable_version("rotation/up1-a/fra1", 2)
    (held,) = await site.holdings()
    assert [v.state for v in held.versions] == ["primary", "disabled"]


async def test_holdings_carry_no_key_material(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    op = env.operator()
    site = await env.enrolled("site/fra1")
    await op.create_keyset("link", "AES256_GCM")
    await op.rotate_keyset("link")
    await op.grant("site/fra1", "link", "hold")
    start = len(env.transport.seen)

    (held,) = await site.holdings()
    assert len(held.versions) == 2
    answer = b"\n".join(env.transport.seen[start:])
    assert b'"holdings"' in answer  # what is searched is really the answer
    keyset = env.home.keysets.load("link").keyset
    for version in (1, 2):
        secret = keyset.export_secret_material(version, SECRET_ACCESS)
        logged = "\n".join(r.getMessage() for r in caplog.records).encode()
        for form in encodings(secret):
            assert form not in answer
            assert form not in logged
    fields = {"name", "purpose", "primary", "versions"}
    document = json.loads(env.transport.seen[-1])
    assert set(document["holdings"][0]) == fields
    assert set(document["holdings"][0]["versions"][0]) == {"version", "key_id", "state"}


async def test_holdings_need_a_principal_signature(env: Env) -> None:
    await env.enrolled("site/fra1")
    http = env.http()
    problem(await http.get("/v1/holdings"), 401, "authentication")
    # An operator is not a principal: the admin token does not stand in for a signature.
    problem(await http.get("/v1/holdings", headers=env.admin_headers()), 401, "authentication")


async def test_the_openapi_document_says_holdings_are_signed(env: Env) -> None:
    doc = (await env.http().get("/openapi.json")).json()
    operation = doc["paths"]["/v1/holdings"]["get"]
    assert operation["security"] == [{"httpSignature": []}]
    assert {"200", "401", "403", "500"} <= set(operation["responses"])
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Holdings"
    )
