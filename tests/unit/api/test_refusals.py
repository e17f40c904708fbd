"""Bad requests: each gets a clear problem+json and changes nothing (rows and log size
compared before and after), except the refusal records the broker keeps on purpose."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_kit import URL, Env, make_env, problem

from keybroker.api import revoke_admin_credentials
from keybroker.api.schemas import b64encode
from keybroker.broker import HpkeKeyBinding, make_ack_proof
from keybroker.broker.events import DeliveryExpired, DeliveryFailed
from keybroker.client import PrincipalClient
from keybroker.client.principal import Delivery, _binding_signature, _csr
from keybroker.errors import AuthorizationError, Conflict
from keybroker.keys import ED25519, X25519_HPKE, Keyset
from keybroker.pki import PrincipalId


class Unchanged:
    """``async with Unchanged(env): ...`` asserts the store and the log are as they were."""

    def __init__(self, env: Env) -> None:
        self.env = env

    async def __aenter__(self) -> None:
        self.before = self.env.dump()
        self.size = self.env.log_size()

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert self.env.dump() == self.before
            assert self.env.log_size() == self.size


def _enrolment_body(principal: str, token: str) -> dict[str, Any]:
    pid = PrincipalId.parse(principal)
    identity = Keyset.generate("i", ED25519)
    hpke = Keyset.generate("h", X25519_HPKE)
    binding = HpkeKeyBinding.from_public_keyset(pid, hpke.public_keyset())
    body = {
        "principal": principal,
        "token": token,
        "csr_pem": _csr(identity).decode(),
        "hpke": {
            "template": binding.template,
            "key_id": binding.key_id,
            "public_key": b64encode(binding.public_key),
            "signature": b64encode(_binding_signature(identity, binding)),
        },
    }
    return body


async def _token(env: Env, principal: str, ttl: timedelta = timedelta(hours=1)) -> str:
    return (await env.operator().create_enrolment_token(principal, ttl)).token


# -- enrolment ------------------------------------------------------------------------------


async def test_a_token_enrols_once(env: Env) -> None:
    http = env.http()
    token = await _token(env, "site/fra1")
    first = await http.post("/v1/enrolments", json=_enrolment_body("site/fra1", token))
    assert first.status_code == 201
    async with Unchanged(env):
        again = await http.post("/v1/enrolments", json=_enrolment_body("site/fra1", token))
        problem(again, 403, "authorization")


async def test_an_expired_token_is_refused(env: Env) -> None:
    http = env.http()
    token = await _token(env, "site/fra1", timedelta(minutes=5))
    env.clock.advance(timedelta(minutes=6))
    async with Unchanged(env):
        late = await http.post("/v1/enrolments", json=_enrolment_body("site/fra1", token))
        body = problem(late, 403, "authorization")
    # Same answer as an unknown token: which check failed is not told.
    unknown = await http.post("/v1/enrolments", json=_enrolment_body("site/fra1", "x" * 43))
    assert problem(unknown, 403, "authorization")["detail"] == body["detail"]


async def test_a_csr_whose_key_did_not_sign_the_hpke_binding_is_refused(env: Env) -> None:
    http = env.http()
    token = await _token(env, "site/fra1")
    body = _enrolment_body("site/fra1", token)
    body["csr_pem"] = _csr(Keyset.generate("other", ED25519)).decode()
    async with Unchanged(env):
        problem(await http.post("/v1/enrolments", json=body), 400, "crypto")
    # The token was not spent by the refusal.
    ok = await http.post("/v1/enrolments", json=_enrolment_body("site/fra1", token))
    assert ok.status_code == 201


async def test_a_binding_for_another_principal_is_refused(env: Env) -> None:
    http = env.http()
    token = await _token(env, "site/fra1")
    body = _enrolment_body("site/fra1", token)
    other = _enrolment_body("site/ams1", token)
    body["hpke"] = other["hpke"]  # signed for site/ams1, by another key
    async with Unchanged(env):
        problem(await http.post("/v1/enrolments", json=body), 400, "crypto")


# -- request bodies ---------------------------------------------------------------------------


async def test_oversized_bodies_are_refused_unread(env: Env) -> None:
    http = env.http()
    headers = env.admin_headers()
    big = json.dumps({"name": "k", "template": "AES256_GCM", "pad": "x" * 70_000}).encode()
    async with Unchanged(env):
        declared = await http.post("/v1/keysets", content=big, headers=headers)
        problem(declared, 413, "request/too-large")

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b"x" * 1024

        streamed = await http.post("/v1/keysets", content=chunks(), headers=headers)
        problem(streamed, 413, "request/too-large")


async def test_malformed_json_is_a_400(env: Env) -> None:
    http = env.http()
    async with Unchanged(env):
        response = await http.post(
            "/v1/keysets",
            content=b'{"name": "k", ',
            headers={**env.admin_headers(), "content-type": "application/json"},
        )
        problem(response, 400, "request/malformed")


async def test_unknown_fields_and_wrong_types_are_422_without_echo(env: Env) -> None:
    http = env.http()
    async with Unchanged(env):
        extra = await http.post(
            "/v1/keysets",
            json={"name": "k", "template": "AES256_GCM", "owner": "me"},
            headers=env.admin_headers(),
        )
        body = problem(extra, 422, "request/validation")
        assert body["errors"] == [
            {
                "loc": ["body", "owner"],
                "msg": "Extra inputs are not permitted",
                "type": "extra_forbidden",
            }
        ]
        token_like = "kbadm_" + "S" * 43
        wrong = await http.post(
            "/v1/enrolments",
            json={"principal": "site/fra1", "token": 12, "csr_pem": token_like, "hpke": 1},
        )
        body = problem(wrong, 422, "request/validation")
        assert token_like not in wrong.text
        bad_b64 = await http.post(f"/v1/deliveries/{'0' * 36}/ack", json={"proof": "not base64!"})
        assert bad_b64.status_code in (401, 422)  # unsigned: refused either way


async def test_unknown_route_and_wrong_method_are_problems(env: Env) -> None:
    http = env.http()
    problem(await http.get("/v1/nothing-here"), 404, "not-found")
    wrong = await http.delete("/v1/health")
    problem(wrong, 405, "request/method-not-allowed")
    assert wrong.headers["allow"] == "GET"


async def test_an_unexpected_exception_is_a_500_without_internals(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("table principals: password=hunter2")

    monkeypatch.setattr(env.broker, "list_keysets", boom)
    transport = httpx.ASGITransport(env.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=URL) as http:
        response = await http.get("/v1/keysets", headers=env.admin_headers())
    body = problem(response, 500, "internal")
    assert "hunter2" not in response.text and "principals" not in response.text
    assert body["detail"] == "internal server error"


# -- operators ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer kbadm_" + "A" * 43, "Bearer nonsense", "Basic YWRtaW46YWRtaW4=", "Bearer "],
)
async def test_a_wrong_admin_token_is_401(env: Env, authorization: str | None) -> None:
    http = env.http()
    headers = {} if authorization is None else {"authorization": authorization}
    async with Unchanged(env):
        response = await http.post(
            "/v1/keysets", json={"name": "k", "template": "AES256_GCM"}, headers=headers
        )
        problem(response, 401, "authentication")
        assert "www-authenticate" in response.headers
        problem(await http.get("/v1/principals", headers=headers), 401, "authentication")


async def test_a_revoked_admin_credential_stops_working(env: Env) -> None:
    http = env.http()
    assert (await http.get("/v1/keysets", headers=env.admin_headers())).status_code == 200
    assert revoke_admin_credentials(env.store) == 1
    problem(await http.get("/v1/keysets", headers=env.admin_headers()), 401, "authentication")


async def test_a_principal_is_not_an_operator(env: Env) -> None:
    fra1 = await env.enrolled("site/fra1")
    request = httpx.Request("GET", f"{URL}/v1/keysets")
    fra1._sign(request)  # a perfectly good principal signature
    response = await env.http().send(request)
    problem(response, 401, "authentication")


# -- principals: signatures ------------------------------------------------------------------


async def _signed(
    env: Env, client: PrincipalClient, method: str, path: str, **kw: Any
) -> httpx.Request:
    request = env.http().build_request(method, f"{URL}{path}", **kw)
    client._sign(request)
    return request


async def test_an_unsigned_request_is_401(env: Env) -> None:
    await env.enrolled("site/fra1")
    async with Unchanged(env):
        response = await env.http().get("/v1/deliveries")
        problem(response, 401, "authentication")
        assert "accept-signature" in response.headers


async def test_a_forged_signature_is_401(env: Env) -> None:
    fra1 = await env.enrolled("site/fra1")
    mallory = await env.enrolled("site/mallory")
    # Mallory signs with her key but names fra1 as the signer.
    request = env.http().build_request("GET", f"{URL}/v1/deliveries")
    mallory._sign(request)
    request.headers["signature-input"] = request.headers["signature-input"].replace(
        "site/mallory", "site/fra1"
    )
    async with Unchanged(env):
        problem(await env.http().send(request), 401, "authentication")
    assert fra1.principal == PrincipalId.parse("site/fra1")


async def test_a_signature_over_another_body_is_401(env: Env) -> None:
    op = env.operator()
    fra1 = await env.enrolled("site/fra1")
    await op.create_keyset("k", "AES256_GCM")
    await op.grant("site/fra1", "k", "hold")
    sent = await op.deliver("k", 1, "site/fra1")
    (delivery,) = await fra1.fetch_deliveries()
    fra1.open_delivery(delivery)
    path = f"/v1/deliveries/{sent.delivery_id}/ack"
    request = await _signed(env, fra1, "POST", path, json={"proof": b64encode(b"\x01" * 32)})
    # Swap the body after signing: Content-Digest no longer matches.
    forged = httpx.Request(
        "POST",
        request.url,
        headers={k: v for k, v in request.headers.items() if k != "content-length"},
        content=json.dumps({"proof": b64encode(b"\x02" * 32)}).encode(),
    )
    async with Unchanged(env):
        problem(await env.http().send(forged), 401, "authentication")
    # Dropping the digest altogether is refused as well.
    del forged.headers["content-digest"]
    async with Unchanged(env):
        problem(await env.http().send(forged), 401, "authentication")


async def test_a_replayed_request_is_401(env: Env) -> None:
    fra1 = await env.enrolled("site/fra1")
    request = await _signed(env, fra1, "GET", "/v1/deliveries")
    http = env.http()
    assert (await http.send(request)).status_code == 200
    async with Unchanged(env):
        again = await http.send(request)  # same signature, same nonce
        problem(again, 401, "authentication/replayed")


async def test_a_stale_or_future_signature_is_401(env: Env) -> None:
    fra1 = await env.enrolled("site/fra1")
    env.clock.advance(timedelta(minutes=10))
    request = await _signed(env, fra1, "GET", "/v1/deliveries")
    env.clock.advance(timedelta(minutes=5))
    async with Unchanged(env):
        problem(await env.http().send(request), 401, "authentication")
    env.clock.advance(timedelta(minutes=-10))
    async with Unchanged(env):
        problem(await env.http().send(request), 401, "authentication")


async def test_expired_nonces_are_purged(env: Env) -> None:
    fra1 = await env.enrolled("site/fra1")
    state = env.app.state.keybroker
    await fra1.fetch_deliveries()
    await fra1.fetch_deliveries()
    assert state.nonces.size() == 2
    env.clock.advance(timedelta(minutes=2))
    await fra1.fetch_deliveries()
    assert state.nonces.size() == 1


async def test_a_revoked_principal_is_403(env: Env) -> None:
    op = env.operator()
    fra1 = await env.enrolled("site/fra1")
    await op.revoke_principal("site/fra1", reason="keyCompromise")
    async with Unchanged(env):
        with pytest.raises(AuthorizationError, match="revoked"):
            await fra1.fetch_deliveries()
    request = await _signed(env, fra1, "GET", "/v1/deliveries")
    problem(await env.http().send(request), 403, "authorization")


async def test_an_expired_certificate_is_403(env: Env) -> None:
    fra1 = await env.enrolled("site/fra1")
    env.clock.advance(timedelta(days=400))
    request = await _signed(env, fra1, "GET", "/v1/deliveries")
    async with Unchanged(env):
        problem(await env.http().send(request), 403, "certificate/expired")


async def test_an_unknown_signer_is_401(env: Env) -> None:
    fra1 = await env.enrolled("site/fra1")
    request = await _signed(env, fra1, "GET", "/v1/deliveries")
    request.headers["signature-input"] = request.headers["signature-input"].replace(
        "site/fra1", "site/nobody"
    )
    problem(await env.http().send(request), 401, "authentication")


# -- deliveries -------------------------------------------------------------------------------


async def _delivered(env: Env, name: str = "site/fra1") -> tuple[PrincipalClient, Delivery]:
    op = env.operator()
    client = await env.enrolled(name)
    await op.create_keyset("k", "AES256_GCM")
    await op.grant(name, "k", "hold")
    await op.deliver("k", 1, name)
    (delivery,) = await client.fetch_deliveries()
    return client, delivery


async def test_another_principals_delivery_cannot_be_seen_or_acked(env: Env) -> None:
    fra1, delivery = await _delivered(env)
    ams1 = await env.enrolled("site/ams1")
    fra1.open_delivery(delivery)
    async with Unchanged(env):
        assert await ams1.fetch_deliveries() == []
        # ams1 cannot ack fra1's delivery, even with fra1's valid proof.
        keyset = fra1.keyset("k")
        proof = make_ack_proof(keyset, 1, delivery.envelope.challenge, delivery.delivery_id)
        path = f"/v1/deliveries/{delivery.delivery_id}/ack"
        request = await _signed(env, ams1, "POST", path, json={"proof": b64encode(proof)})
        problem(await env.http().send(request), 404, "not-found")
        # The operator view of a delivery is not open to principals.
        shown = await _signed(env, ams1, "GET", f"/v1/deliveries/{delivery.delivery_id}")
        problem(await env.http().send(shown), 401, "authentication")
    assert (await env.operator().show_delivery(delivery.delivery_id)).state == "sent"


async def test_an_ack_with_a_wrong_proof_fails_the_delivery(env: Env) -> None:
    fra1, delivery = await _delivered(env)
    before = env.log_size()
    path = f"/v1/deliveries/{delivery.delivery_id}/ack"
    request = await _signed(env, fra1, "POST", path, json={"proof": b64encode(b"\x00" * 32)})
    problem(await env.http().send(request), 400, "crypto")
    # The refusal is recorded, on purpose: a wrong proof ends the delivery (broker policy).
    (event,) = env.events_since(before)
    assert isinstance(event, DeliveryFailed) and event.delivery_id == delivery.delivery_id
    assert (await env.operator().show_delivery(delivery.delivery_id)).state == "failed"
    fra1.open_delivery(delivery)
    with pytest.raises(Conflict, match="failed"):
        await fra1.ack(delivery)  # even the right proof is too late now


async def test_an_ack_after_expiry_is_refused(env: Env) -> None:
    fra1, delivery = await _delivered(env)
    fra1.open_delivery(delivery)
    env.clock.advance(timedelta(hours=2))
    before = env.log_size()
    with pytest.raises(AuthorizationError, match="expired"):
        await fra1.ack(delivery)
    (event,) = env.events_since(before)
    assert isinstance(event, DeliveryExpired)
    assert (await env.operator().show_delivery(delivery.delivery_id)).state == "expired"


async def test_signatures_cover_the_public_url_behind_a_proxy(
    env: Env, tmp_path: Path, clock: Any
) -> None:
    fra1 = await env.enrolled("site/fra1")
    public = "https://broker.example:8443"
    behind_proxy = make_env(env.home, clock, tmp_path, public_url=public)
    # The client signs what it addressed; the proxy forwards to an internal name.
    request = httpx.Request("GET", f"{public}/v1/deliveries?wait=0")
    fra1._sign(request)
    request.url = httpx.URL("http://internal:8000/v1/deliveries?wait=0")
    request.headers["host"] = "internal:8000"
    async with httpx.AsyncClient(transport=behind_proxy.transport) as http:
        assert (await http.send(request)).status_code == 200
    # Without public_url the broker sees another target URI: the signature does not hold.
    request = httpx.Request("GET", f"{public}/v1/deliveries?wait=0")
    fra1._sign(request)
    request.url = httpx.URL("http://internal:8000/v1/deliveries?wait=0")
    request.headers["host"] = "internal:8000"
    problem(await env.http().send(request), 401, "authentication")
