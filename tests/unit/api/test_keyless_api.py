"""``GET /v1/keyless/keys`` over the API and the SDK, on SQLite and PostgreSQL: a key server sees
the SKI, type and policy of each served key of the keyless keysets it holds, and the active
principals granted their use; anyone else gets a typed problem; no key material is in it."""

from __future__ import annotations

import json
from datetime import timedelta

from api_kit import Env, encodings, problem
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keybroker.api.keyless_schemas import KeylessKeys
from keybroker.errors import AuthorizationError
from keybroker.flows.keyless.operations import ski_of
from keybroker.flows.keyless.service_keys import ServiceKeys

PATH = "/v1/keyless/keys"


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


async def test_a_key_server_reads_the_keys_it_holds_and_who_may_use_them(env: Env) -> None:
    keyless = ServiceKeys(env.broker)
    www, api = ec.generate_private_key(ec.SECP384R1()), rsa.generate_private_key(65537, 2048)
    keyless.upload("www", _pem(www))
    keyless.upload("api", _pem(api), allow_decrypt=True)
    keyless.upload("other", _pem(ec.generate_private_key(ec.SECP256R1())))
    ks = await env.enrolled("service/ks1")
    for name in ("node/edge1", "node/edge2", "node/edge3"):
        await env.enrolled(name)
    keyless.hold("www", "service/ks1")
    keyless.hold("api", "service/ks1")
    keyless.grant_edge("www", "node/edge1")
    keyless.grant_edge("www", "node/edge2")
    keyless.grant_edge("api", "node/edge2")
    keyless.grant_edge("other", "node/edge3")  # a keyset ks1 does not hold: not shown
    env.broker.revoke_principal("node/edge1")  # a revoked edge is no longer listed

    view = await ks.call(KeylessKeys, "GET", PATH)
    assert [k.keyset for k in view.keysets] == ["keyless/api", "keyless/www"]
    api_set, www_set = view.keysets
    assert api_set.service == "api" and api_set.edges == ["node/edge2"]
    assert www_set.edges == ["node/edge2"]
    (api_key,) = api_set.keys
    assert (api_key.ski, api_key.key_type, api_key.allow_decrypt) == (
        ski_of(api.public_key()).hex(),
        "rsa-2048",
        True,
    )
    assert (api_key.version, api_key.state, api_key.template) == (
        1,
        "primary",
        "TLS_RSA2048_DECRYPT",
    )
    (www_key,) = www_set.keys
    assert (www_key.ski, www_key.key_type, www_key.allow_decrypt) == (
        ski_of(www.public_key()).hex(),
        "ecdsa-p384",
        False,
    )

    # Only primary and enabled versions are served: a disabled one drops out.
    keyless.upload("www", _pem(ec.generate_private_key(ec.SECP256R1())))
    view = await ks.call(KeylessKeys, "GET", PATH)
    assert [(k.version, k.state) for k in view.keysets[1].keys] == [(1, "enabled"), (2, "primary")]
    env.broker.disable_version("keyless/www", 1)
    view = await ks.call(KeylessKeys, "GET", PATH)
    assert [(k.version, k.state) for k in view.keysets[1].keys] == [(2, "primary")]

    # The answer carries no key material.
    answer = env.transport.seen[-1]
    assert b'"keysets"' in answer
    for key in (www, api):
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for form in encodings(der):
            assert form not in answer
    document = json.loads(answer)
    assert set(document["keysets"][0]) == {"keyset", "service", "keys", "edges"}
    assert set(document["keysets"][0]["keys"][0]) == {
        "version",
        "key_id",
        "state",
        "template",
        "key_type",
        "ski",
        "allow_decrypt",
    }


async def test_nobody_but_a_key_server_may_read_it(env: Env) -> None:
    keyless = ServiceKeys(env.broker)
    keyless.upload("www", _pem(ec.generate_private_key(ec.SECP256R1())))
    ks = await env.enrolled("service/ks1")
    edge = await env.enrolled("node/edge1")
    other = await env.enrolled("service/ks2")
    keyless.hold("www", "service/ks1")
    keyless.grant_edge("www", "node/edge1")
    await env.operator().create_keyset("site/fra1/restore", "AES256_GCM")
    await env.operator().grant("service/ks2", "site/fra1/restore", "hold")
    assert (await ks.call(KeylessKeys, "GET", PATH)).keysets  # the key server may

    # An edge (a use grant), a principal holding other keysets: 403, a typed problem.
    for who in (edge, other):
        try:
            await who.call(KeylessKeys, "GET", PATH)
        except AuthorizationError as exc:
            assert "holds no keyless keys" in str(exc)
        else:
            raise AssertionError(f"{who.principal} read the key servers' view")
    body = json.loads(env.transport.seen[-1])
    assert body["type"] == "https://keybroker.dev/problems/authorization"
    assert body["status"] == 403

    # A key server whose hold was revoked is one no more.
    keyless.release("www", "service/ks1")
    try:
        await ks.call(KeylessKeys, "GET", PATH)
    except AuthorizationError:
        pass
    else:
        raise AssertionError("a released key server still reads the view")

    # No signature, or the operator's token instead: 401.
    http = env.http()
    problem(await http.get(PATH), 401, "authentication")
    problem(await http.get(PATH, headers=env.admin_headers()), 401, "authentication")


async def test_a_revoked_key_server_is_refused(env: Env) -> None:
    keyless = ServiceKeys(env.broker)
    keyless.upload("www", _pem(ec.generate_private_key(ec.SECP256R1())))
    ks = await env.enrolled("service/ks1")
    keyless.hold("www", "service/ks1")
    env.broker.revoke_principal("service/ks1")
    try:
        await ks.call(KeylessKeys, "GET", PATH)
    except AuthorizationError:
        pass
    else:
        raise AssertionError("a revoked principal read the view")


async def test_the_openapi_document_says_it_is_signed(env: Env) -> None:
    doc = (await env.http().get("/openapi.json")).json()
    operation = doc["paths"][PATH]["get"]
    assert operation["security"] == [{"httpSignature": []}]
    assert {"401", "403", "500"} <= set(operation["responses"])
    schema = doc["components"]["schemas"]["KeylessKeyOut"]
    assert schema["properties"]["ski"]["pattern"] == "^[0-9a-f]{40}$"


async def test_service_tokens_may_name_dns_names(env: Env) -> None:
    op = env.operator()
    issued = await op.create_enrolment_token(
        "service/ks1", timedelta(hours=1), dns_names=["KS1.example.net", "ks1.example.net"]
    )
    assert issued.dns_names == ["ks1.example.net"]
    http = env.http()
    for body in (
        {"principal": "node/edge1", "dns_names": ["edge1.example.net"]},
        {"principal": "service/ks1", "dns_names": ["*.example.net"]},
        {"principal": "service/ks1", "dns_names": ["192.0.2.1"]},
        {"principal": "service/ks1", "dns_names": [f"n{i}.example.net" for i in range(5)]},
    ):
        response = await http.post("/v1/enrolment-tokens", json=body, headers=env.admin_headers())
        assert response.status_code in (400, 422), (body, response.text)
