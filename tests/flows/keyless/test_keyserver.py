"""The key server in-process, on loopback, over real mutual TLS (the test's event loop).

Every answer that carries a result is checked with the *public* key. After
each hostile input the server must still be healthy: a fresh connection gets
correct answers (:meth:`Running.assert_healthy`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pickle
import secrets
import signal
import socket
import ssl
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families
from tests.flows.keyless.pki_kit import (
    EdgeClient,
    Identity,
    Pki,
    at_eof,
    check_result,
    grants_toml,
    make_pki,
    make_service_keys,
    ops_for,
    payload_for,
    read_raw,
    ski,
    write_keys,
)
from tests.flows.keyless.softhsm import USER_PIN, SoftHSM, start_softhsm
from typer.testing import CliRunner

from keybroker.errors import ConfigurationError
from keybroker.flows.keyless.authz import KeyPolicy, StaticAuthorizer
from keybroker.flows.keyless.codes import KEY_OPS, SIGN_HASH, ErrorCode, Op, Tag
from keybroker.flows.keyless.keyserver import (
    FastSigningKeySource,
    KeyServer,
    KeyServerConfig,
    KeyServerSettings,
    KeySource,
    PemKeySource,
    Pkcs11KeySource,
    Pool,
    TlsFiles,
    identity_tls_context,
    perform_batch,
    run_keyserver,
    server_tls_context,
)
from keybroker.flows.keyless.operations import KeyOperationError, PrivateKey
from keybroker.flows.keyless.pkcs11keys import import_private_key
from keybroker.flows.keyless.protocol import HEADER, ITEM, Request, encode_request
from keybroker.pki.principal import PrincipalId

EDGE1 = PrincipalId.parse("node/edge1")
EDGE2 = PrincipalId.parse("node/edge2")
#: Granted to edge1 but held by no key source: KEY_NOT_FOUND.
GHOST_SKI = bytes.fromhex("00" * 19 + "01")


@dataclasses.dataclass(frozen=True)
class Material:
    pki: Pki
    keys: dict[str, PrivateKey]


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return Material(make_pki(tmp_path_factory.mktemp("pki")), make_service_keys())


def default_grants(keys: dict[str, PrivateKey]) -> str:
    return grants_toml(
        keys,
        {"node/edge1": list(keys), "node/edge2": ["p256"]},
        allow_decrypt=["rsa"],
        extra_skis={"node/edge1": [GHOST_SKI]},
    )


class GatedKeySource:
    """A PemKeySource whose operations with ``gated`` wait until ``release`` is set."""

    def __init__(self, inner: PemKeySource, gated: bytes | None) -> None:
        self.inner = inner
        self.gated = gated
        self.release = threading.Event()
        self.started = threading.Event()
        self.closed = threading.Event()
        self.reloaded: list[GatedKeySource] = []
        #: Reloads that return ``self`` (nothing changed) before one returns a new source.
        self.unchanged_reloads = 0

    def skis(self) -> Sequence[bytes]:
        return self.inner.skis()

    def perform(self, ski: bytes, op: Op, payload: bytes) -> bytes:
        if ski == self.gated:
            self.started.set()
            assert self.release.wait(20), "the test never released the gate"
        return self.inner.perform(ski, op, payload)

    def reload(self) -> GatedKeySource:
        if self.unchanged_reloads:
            self.unchanged_reloads -= 1
            return self
        fresh = GatedKeySource(self.inner.reload(), None)
        self.reloaded.append(fresh)
        return fresh

    def describe(self) -> str:
        return "gated " + self.inner.describe()

    def close(self) -> None:
        self.closed.set()


@dataclasses.dataclass
class Running:
    server: KeyServer
    address: tuple[str, int]
    material: Material
    keys_dir: Path
    grants: Path

    @property
    def metrics_url(self) -> str:
        assert self.server.metrics_address is not None
        host, port = self.server.metrics_address
        return f"http://{host}:{port}"

    async def connect(self, identity: Identity | None = None) -> EdgeClient:
        pki = self.material.pki
        return await EdgeClient.connect(
            self.address, pki.client_context(identity if identity is not None else pki.edge1)
        )

    async def raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context = self.material.pki.client_context(self.material.pki.edge1)
        return await asyncio.open_connection(
            *self.address, ssl=context, server_hostname="keyserver.test"
        )

    async def sign(self, client: EdgeClient, name: str, op: Op) -> None:
        """``op`` with key ``name`` over ``client`` succeeds and verifies."""
        key = self.material.keys[name]
        payload = payload_for(op, key)
        response = await client.call(op, ski(key), payload)
        assert response.error_code is None, response
        check_result(op, key.public_key(), payload, response.payload)

    async def assert_healthy(self, *, ed25519: bool = True) -> None:
        """A fresh connection still gets correct answers, and /healthz says so."""
        client = await self.connect()
        try:
            await self.sign(client, "p256", Op.ECDSA_SIGN_SHA256)
            if ed25519:
                await self.sign(client, "ed25519", Op.ED25519_SIGN)
            pong = await client.call(Op.PING, payload=b"still there?")
            assert pong.op is Op.PONG
        finally:
            await client.close()
        assert self.server.health()[0] == 200

    async def settle(self, condition: Callable[[], bool], what: str, timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)
        assert condition(), what


Starter = Callable[..., Awaitable[Running]]


@pytest.fixture
def pool() -> Pool:
    """The executor of servers started with default settings (tests parametrize it)."""
    return "thread"


#: Where the inline pool's batch path must answer exactly as the dispatched one.
POOLS_ANSWER_ALIKE = pytest.mark.parametrize("pool", ["thread", "inline"])


@pytest.fixture
async def start(material: Material, tmp_path: Path, pool: Pool) -> AsyncIterator[Starter]:
    servers: list[KeyServer] = []

    async def start_server(
        *,
        keys: KeySource | None = None,
        settings: KeyServerSettings | None = None,
        grants: str | None = None,
    ) -> Running:
        keys_dir = tmp_path / "keys"
        if not keys_dir.exists():
            write_keys(keys_dir, material.keys)
        grants_path = tmp_path / "grants.toml"
        grants_path.write_text(grants if grants is not None else default_grants(material.keys))
        pki = material.pki
        files = TlsFiles(pki.server.cert, pki.server.key, pki.ca.path)
        server = KeyServer(
            keys if keys is not None else PemKeySource(keys_dir),
            StaticAuthorizer.from_file(grants_path),
            server_tls_context(files),
            settings
            if settings is not None
            else KeyServerSettings(workers=2, idle_timeout=30, pool=pool),
            tls_files=files,
        )
        servers.append(server)
        address = await server.start("127.0.0.1", 0)
        await server.start_metrics("127.0.0.1", 0)
        return Running(server, address, material, keys_dir, grants_path)

    yield start_server
    for server in servers:
        await server.aclose(grace=2)


def pki_files(pki: Pki) -> TlsFiles:
    return TlsFiles(pki.server.cert, pki.server.key, pki.ca.path)


def gated(material: Material, tmp_path: Path, name: str) -> GatedKeySource:
    write_keys(tmp_path / "keys", material.keys)
    return GatedKeySource(PemKeySource(tmp_path / "keys"), ski(material.keys[name]))


def raw_frame(request_id: int, body: bytes, *, major: int = 1, length: int | None = None) -> bytes:
    return HEADER.pack(major, 0, len(body) if length is None else length, request_id) + body


def item(tag: int, data: bytes) -> bytes:
    return ITEM.pack(tag, len(data)) + data


# --- every opcode ---------------------------------------------------------------------------


@POOLS_ANSWER_ALIKE
@pytest.mark.parametrize("name", ["rsa", "p256", "ed25519"])
async def test_every_opcode_of_each_key_verifies(
    start: Starter, material: Material, name: str
) -> None:
    running = await start()
    key = material.keys[name]
    client = await running.connect()
    try:
        sent: dict[int, tuple[Op, bytes]] = {}
        for op in ops_for(key):
            payload = payload_for(op, key)
            sent[client.send(op, ski(key), payload)] = (op, payload)
        responses = await client.receive(len(sent))
        assert sorted(r.id for r in responses) == sorted(sent)
        for response in responses:
            op, payload = sent[response.id]
            assert response.error_code is None, (op, response)
            check_result(op, key.public_key(), payload, response.payload)
        # The opcodes for other kinds of key: a valid opcode, just not for this key.
        for op in sorted(KEY_OPS - set(ops_for(key))):
            if SIGN_HASH.get(op) == "md5sha1":
                expected = ErrorCode.BAD_OPCODE  # TLS 1.1 and older only: unsupported
            elif op is Op.RSA_DECRYPT:
                expected = ErrorCode.NOT_AUTHORIZED  # policy is checked before the key
            else:
                expected = ErrorCode.UNEXPECTED_OPCODE
            digest_length = 64 if op is Op.ED25519_SIGN else 32
            response = await client.call(op, ski(key), bytes(digest_length))
            assert response.error_code is expected, (op, response)
    finally:
        await client.close()
    assert running.server.metrics.requests["INVALID", "FORMAT"] == 0


async def test_ping_is_answered_inline(start: Starter, material: Material, tmp_path: Path) -> None:
    source = gated(material, tmp_path, "p256")
    running = await start(keys=source, settings=KeyServerSettings(workers=1, max_batch=1))
    client = await running.connect()
    try:
        slow = client.send(Op.ECDSA_SIGN_SHA256, ski(material.keys["p256"]), bytes(32))
        await asyncio.to_thread(source.started.wait, 5)
        # The only worker is busy: a PING still comes back at once.
        pong = await client.call(Op.PING, payload=b"echo")
        assert (pong.op, pong.payload) == (Op.PONG, b"echo")
        source.release.set()
        (answer,) = await client.receive(1)
        assert answer.id == slow and answer.error_code is None
    finally:
        source.release.set()
        await client.close()


# --- pipelining -----------------------------------------------------------------------------


async def test_64_pipelined_requests_are_answered_out_of_order(
    start: Starter, material: Material, tmp_path: Path
) -> None:
    source = gated(material, tmp_path, "rsa")
    running = await start(keys=source, settings=KeyServerSettings(workers=2, max_batch=1))
    rsa_key, ec_key = material.keys["rsa"], material.keys["p256"]
    client = await running.connect()
    try:
        sent: dict[int, tuple[PrivateKey, Op, bytes]] = {}
        slow_payload = payload_for(Op.RSA_PSS_SIGN_SHA256, rsa_key)
        slow = client.send(Op.RSA_PSS_SIGN_SHA256, ski(rsa_key), slow_payload)
        sent[slow] = (rsa_key, Op.RSA_PSS_SIGN_SHA256, slow_payload)
        for index in range(63):
            op = (Op.ECDSA_SIGN_SHA256, Op.ECDSA_SIGN_SHA384)[index % 2]
            payload = payload_for(op, ec_key)[:-1] + bytes([index])
            sent[client.send(op, ski(ec_key), payload)] = (ec_key, op, payload)
        # Every later request overtakes the first, which waits for the gate.
        early = await client.receive(63)
        assert slow not in {r.id for r in early}
        assert source.started.is_set()
        source.release.set()
        late = await client.receive(1)
        assert [r.id for r in late] == [slow]
        responses = early + late
        assert sorted(r.id for r in responses) == sorted(sent)
        for response in responses:
            key, op, payload = sent[response.id]
            assert response.error_code is None
            check_result(op, key.public_key(), payload, response.payload)
        assert running.server.pending == 0
    finally:
        source.release.set()
        await client.close()


async def test_more_than_max_pending_is_overloaded(
    start: Starter, material: Material, tmp_path: Path
) -> None:
    source = gated(material, tmp_path, "p256")
    running = await start(
        keys=source, settings=KeyServerSettings(workers=2, max_pending=4, max_batch=1)
    )
    client = await running.connect()
    key = material.keys["p256"]
    try:
        ids = [client.send(Op.ECDSA_SIGN_SHA256, ski(key), bytes(32)) for _ in range(5)]
        (refused,) = await client.receive(1)
        assert (refused.id, refused.error_code) == (ids[4], ErrorCode.OVERLOADED)
        assert running.server.pending == 4
        source.release.set()
        rest = await client.receive(4)
        assert sorted(r.id for r in rest) == ids[:4]
        assert all(r.error_code is None for r in rest)
    finally:
        source.release.set()
        await client.close()
    await running.assert_healthy()


@POOLS_ANSWER_ALIKE
async def test_one_read_of_mixed_requests_is_answered_request_by_request(
    start: Starter, material: Material, pool: Pool
) -> None:
    """Requests that arrive together (one write, one read: the inline pool's batch) are
    answered one by one, refusals and failures among them, exactly as requests that
    arrive alone; the metrics count each."""
    running = await start()
    keys = material.keys
    p256, rsa, ed25519 = keys["p256"], keys["rsa"], keys["ed25519"]
    reader, writer = await running.raw()

    def frame(request_id: int, op: Op, key_ski: bytes | None, payload: bytes) -> bytes:
        request = Request(request_id, op, ski=key_ski, sni="a.example", payload=payload)
        return encode_request(request)

    signing = [
        (p256, Op.ECDSA_SIGN_SHA256),
        (rsa, Op.RSA_PSS_SIGN_SHA256),
        (ed25519, Op.ED25519_SIGN),
    ]
    try:
        # First read: each key and opcode once (a key source learns its shortcuts here).
        sent = {
            index: (key, op, payload_for(op, key)) for index, (key, op) in enumerate(signing, 1)
        }
        writer.write(
            b"".join(frame(i, op, ski(k), payload) for i, (k, op, payload) in sent.items())
        )
        for _ in range(len(sent)):
            response = await read_raw(reader)
            assert response is not None and response.error_code is None
            key, op, payload = sent.pop(response.id)
            check_result(op, key.public_key(), payload, response.payload)
        before = dict(running.server.metrics.requests)
        # Second read: good requests around every kind of refusal and failure.
        good: dict[int, tuple[PrivateKey, Op, bytes]] = {}
        frames: list[bytes] = []
        expected: dict[int, ErrorCode | None] = {}
        wrong = [
            (Op.ECDSA_SIGN_SHA256, ski(p256), bytes(31), ErrorCode.FORMAT),  # digest length
            (Op.ECDSA_SIGN_SHA256, secrets.token_bytes(20), bytes(32), ErrorCode.NOT_AUTHORIZED),
            (Op.ECDSA_SIGN_SHA256, GHOST_SKI, bytes(32), ErrorCode.KEY_NOT_FOUND),
            (Op.RSA_PSS_SIGN_SHA256, ski(p256), bytes(32), ErrorCode.UNEXPECTED_OPCODE),
            (
                Op.RSA_DECRYPT,
                ski(keys["rsa-nodecrypt"]),
                payload_for(Op.RSA_DECRYPT, keys["rsa-nodecrypt"]),
                ErrorCode.NOT_AUTHORIZED,
            ),
            (Op.ECDSA_SIGN_SHA256, None, bytes(32), ErrorCode.FORMAT),  # no SKI
        ]
        request_id = 100
        for round_ in range(3):
            for key, op in signing:
                payload = payload_for(op, key)[:-1] + bytes([round_])
                good[request_id] = (key, op, payload)
                expected[request_id] = None
                frames.append(frame(request_id, op, ski(key), payload))
                request_id += 1
            if round_ < 2:
                for op, key_ski, payload, code in wrong:
                    expected[request_id] = code
                    frames.append(frame(request_id, op, key_ski, payload))
                    request_id += 1
        frames.insert(5, frame(99, Op.PING, None, b"echo"))
        writer.write(b"".join(frames))
        responses = [await read_raw(reader) for _ in frames]
        pong = next(r for r in responses if r is not None and r.id == 99)
        assert (pong.op, pong.payload) == (Op.PONG, b"echo")
        answered = {r.id: r for r in responses if r is not None and r.id != 99}
        assert sorted(answered) == sorted(expected)
        for response_id, code in expected.items():
            response = answered[response_id]
            assert response.error_code is code, (response_id, response)
            if code is None:
                key, op, payload = good[response_id]
                check_result(op, key.public_key(), payload, response.payload)
    finally:
        writer.close()
    counted = {
        label: count - before.get(label, 0)
        for label, count in running.server.metrics.requests.items()
        if count != before.get(label, 0)
    }
    assert counted == {
        ("ECDSA_SIGN_SHA256", "ok"): 3,
        ("RSA_PSS_SIGN_SHA256", "ok"): 3,
        ("ED25519_SIGN", "ok"): 3,
        ("ECDSA_SIGN_SHA256", "FORMAT"): 4,
        ("ECDSA_SIGN_SHA256", "NOT_AUTHORIZED"): 2,
        ("ECDSA_SIGN_SHA256", "KEY_NOT_FOUND"): 2,
        ("RSA_PSS_SIGN_SHA256", "UNEXPECTED_OPCODE"): 2,
        ("RSA_DECRYPT", "NOT_AUTHORIZED"): 2,
        ("PING", "ok"): 1,
    }
    assert running.server.pending == 0
    await running.assert_healthy()


class FailingShortcuts:
    """A :class:`PemKeySource` whose signing shortcuts always raise."""

    def __init__(self, inner: PemKeySource) -> None:
        self.inner = inner
        self.failed = 0

    def skis(self) -> Sequence[bytes]:
        return self.inner.skis()

    def perform(self, ski: bytes, op: Op, payload: bytes) -> bytes:
        return self.inner.perform(ski, op, payload)

    def fast_signer(self, ski: bytes, op: Op) -> tuple[int, Callable[[bytes], bytes]] | None:
        found = self.inner.fast_signer(ski, op)
        if found is None:
            return None

        def broken(digest: bytes) -> bytes:
            self.failed += 1
            raise RuntimeError("the shortcut broke")

        return found[0], broken

    def reload(self) -> FailingShortcuts:
        return self

    def describe(self) -> str:
        return "failing shortcuts"


async def test_a_shortcut_that_fails_falls_back_to_the_full_path(
    start: Starter, material: Material, tmp_path: Path
) -> None:
    write_keys(tmp_path / "keys", material.keys)
    source = FailingShortcuts(PemKeySource(tmp_path / "keys"))
    assert isinstance(source, FastSigningKeySource)
    running = await start(keys=source, settings=KeyServerSettings(workers=1, pool="inline"))
    client = await running.connect()
    key = material.keys["p256"]
    try:
        for _ in range(3):
            payload = secrets.token_bytes(32)
            response = await client.call(Op.ECDSA_SIGN_SHA256, ski(key), payload)
            assert response.error_code is None
            check_result(Op.ECDSA_SIGN_SHA256, key.public_key(), payload, response.payload)
    finally:
        await client.close()
    assert source.failed == 2  # learnt by the first request, tried and dropped by the others


def test_pem_key_source_hands_out_a_shortcut_once_learnt(
    material: Material, tmp_path: Path
) -> None:
    write_keys(tmp_path / "keys", material.keys)
    source = PemKeySource(tmp_path / "keys")
    key = material.keys["p256"]
    assert source.fast_signer(ski(key), Op.ECDSA_SIGN_SHA256) is None
    source.perform(ski(key), Op.ECDSA_SIGN_SHA256, bytes(32))
    found = source.fast_signer(ski(key), Op.ECDSA_SIGN_SHA256)
    assert found is not None
    size, sign = found
    assert size == 32
    digest = secrets.token_bytes(32)
    check_result(Op.ECDSA_SIGN_SHA256, key.public_key(), digest, sign(digest))
    # An operation without a shortcut (a raw decryption) never has one.
    rsa = material.keys["rsa"]
    source.perform(ski(rsa), Op.RSA_DECRYPT, payload_for(Op.RSA_DECRYPT, rsa))
    assert source.fast_signer(ski(rsa), Op.RSA_DECRYPT) is None


# --- hostile and broken input ---------------------------------------------------------------


@POOLS_ANSWER_ALIKE
async def test_malformed_bodies_are_answered_and_the_connection_goes_on(
    start: Starter, material: Material
) -> None:
    running = await start()
    key = material.keys["p256"]
    reader, writer = await running.raw()
    opcode = item(Tag.OPCODE, bytes([Op.ECDSA_SIGN_SHA256]))
    key_item = item(Tag.SKI, ski(key))
    cases: list[tuple[bytes, ErrorCode]] = [
        (raw_frame(1, opcode + opcode + key_item), ErrorCode.FORMAT),  # a tag twice
        (raw_frame(2, key_item), ErrorCode.FORMAT),  # no opcode
        (raw_frame(3, item(Tag.OPCODE, b"\x42") + key_item), ErrorCode.BAD_OPCODE),  # unknown
        (raw_frame(4, item(Tag.OPCODE, bytes([Op.RESPONSE]))), ErrorCode.UNEXPECTED_OPCODE),
        (raw_frame(5, opcode + item(Tag.SKI, b"short")), ErrorCode.FORMAT),
        (raw_frame(6, opcode + key_item + b"\x12\x00"), ErrorCode.FORMAT),  # truncated item
        (raw_frame(7, opcode + item(Tag.PAYLOAD, bytes(32))), ErrorCode.FORMAT),  # no SKI
        (
            raw_frame(8, item(Tag.OPCODE, bytes([Op.ECDSA_SIGN_MD5SHA1])) + key_item),
            ErrorCode.BAD_OPCODE,
        ),
        (raw_frame(9, opcode + key_item + item(Tag.PAYLOAD, bytes(31))), ErrorCode.FORMAT),
    ]
    try:
        for frame, expected in cases:
            writer.write(frame)
            response = await read_raw(reader)
            assert response is not None
            request_id = HEADER.unpack_from(frame)[3]
            assert (response.id, response.error_code) == (request_id, expected)
        # The same connection still works.
        payload = bytes(range(32))
        writer.write(
            encode_request(Request(10, Op.ECDSA_SIGN_SHA256, ski=ski(key), payload=payload))
        )
        response = await read_raw(reader)
        assert response is not None and response.id == 10 and response.error_code is None
        check_result(Op.ECDSA_SIGN_SHA256, key.public_key(), payload, response.payload)
    finally:
        writer.close()
    await running.assert_healthy()


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (raw_frame(77, bytes(100), length=5000), ErrorCode.FORMAT),  # oversized
        (raw_frame(78, bytes(100), major=2), ErrorCode.VERSION_MISMATCH),
        (b"GET / HTTP/1.1\r\nHost: keyserver\r\n\r\n", ErrorCode.VERSION_MISMATCH),  # garbage
    ],
    ids=["oversized", "version", "garbage"],
)
async def test_an_untrustworthy_header_is_answered_then_the_connection_closed(
    start: Starter, frame: bytes, expected: ErrorCode
) -> None:
    running = await start()
    reader, writer = await running.raw()
    try:
        writer.write(frame)
        response = await read_raw(reader)
        assert response is not None
        assert (response.id, response.error_code) == (HEADER.unpack_from(frame)[3], expected)
        assert await at_eof(reader)
    finally:
        writer.close()
    await running.settle(lambda: running.server.connections == 0, "connection closed")
    assert running.server.metrics.connections_closed["broken"] == 1
    await running.assert_healthy()


async def test_a_truncated_frame_then_close_leaves_nothing_behind(
    start: Starter, material: Material
) -> None:
    running = await start()
    frame = encode_request(
        Request(1, Op.ECDSA_SIGN_SHA256, ski=ski(material.keys["p256"]), payload=bytes(32))
    )
    _reader, writer = await running.raw()
    writer.write(frame[:500])
    await writer.drain()
    await running.settle(lambda: running.server.connections == 1, "connected")
    writer.close()
    await running.settle(lambda: running.server.connections == 0, "connection forgotten")
    assert running.server.pending == 0
    assert sum(running.server.metrics.requests.values()) == 0  # nothing was answered
    await running.assert_healthy()


@POOLS_ANSWER_ALIKE
async def test_unknown_and_ungranted_keys(start: Starter, material: Material) -> None:
    running = await start()
    edge1 = await running.connect()
    edge2 = await running.connect(material.pki.edge2)
    digest = bytes(32)
    try:
        # Granted to edge1 but not loaded: KEY_NOT_FOUND.
        response = await edge1.call(Op.ECDSA_SIGN_SHA256, GHOST_SKI, digest)
        assert response.error_code is ErrorCode.KEY_NOT_FOUND
        # Unknown and not granted: NOT_AUTHORIZED (no probing what the server holds).
        response = await edge1.call(Op.ECDSA_SIGN_SHA256, secrets.token_bytes(20), digest)
        assert response.error_code is ErrorCode.NOT_AUTHORIZED
        # A key the server holds, not granted to edge2.
        rsa_key = material.keys["rsa"]
        payload = payload_for(Op.RSA_PSS_SIGN_SHA256, rsa_key)
        response = await edge2.call(Op.RSA_PSS_SIGN_SHA256, ski(rsa_key), payload)
        assert response.error_code is ErrorCode.NOT_AUTHORIZED
        await running.sign(edge2, "p256", Op.ECDSA_SIGN_SHA256)  # its own key works
    finally:
        await edge1.close()
        await edge2.close()
    await running.assert_healthy()


@POOLS_ANSWER_ALIKE
async def test_rsa_decrypt_needs_the_keys_policy(start: Starter, material: Material) -> None:
    running = await start()
    client = await running.connect()
    try:
        await running.sign(client, "rsa", Op.RSA_DECRYPT)  # allow_decrypt = true
        key = material.keys["rsa-nodecrypt"]
        response = await client.call(Op.RSA_DECRYPT, ski(key), payload_for(Op.RSA_DECRYPT, key))
        assert response.error_code is ErrorCode.NOT_AUTHORIZED
        await running.sign(client, "rsa-nodecrypt", Op.RSA_PSS_SIGN_SHA256)  # signing is fine
    finally:
        await client.close()


async def _assert_handshake_refused(running: Running, context: ssl.SSLContext) -> None:
    try:
        client = await EdgeClient.connect(running.address, context)
    except (ssl.SSLError, ConnectionError):
        return  # refused during the handshake (TLS 1.2, or the client learnt at once)
    try:
        client.send(Op.PING, payload=b"hello?")
        # TLS 1.3: the client finishes first; the server's alert comes on the first read.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await client.receive(1)
    finally:
        await client.close()


@pytest.mark.parametrize("who", ["another CA", "no certificate", "server-only usage"])
async def test_edges_without_a_broker_certificate_are_refused_at_the_handshake(
    start: Starter, material: Material, who: str
) -> None:
    running = await start()
    pki = material.pki
    identity = {"another CA": pki.foreign_edge1, "server-only usage": pki.server_usage}.get(who)
    await _assert_handshake_refused(running, pki.client_context(identity))
    assert running.server.metrics.connections_accepted == 0
    await running.assert_healthy()


@POOLS_ANSWER_ALIKE
async def test_a_certificate_without_a_keybroker_uri_is_refused_at_the_first_request(
    start: Starter, material: Material, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start()
    client = await running.connect(material.pki.no_uri)
    try:
        response = await client.call(Op.PING, payload=b"hi")
        assert response.error_code is ErrorCode.NOT_AUTHORIZED
        assert await at_eof(client.reader)
    finally:
        await client.close()
    assert "names no keybroker principal" in caplog.text
    await running.settle(lambda: running.server.connections == 0, "connection closed")
    assert running.server.metrics.connections_closed["unauthenticated"] == 1
    await running.assert_healthy()


async def test_a_vanishing_peer_leaks_nothing(
    start: Starter, material: Material, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = gated(material, tmp_path, "p256")
    running = await start(keys=source, settings=KeyServerSettings(workers=2, max_batch=1))
    tasks_before = len(asyncio.all_tasks())
    client = await running.connect()
    key = material.keys["p256"]
    for _ in range(8):
        client.send(Op.ECDSA_SIGN_SHA256, ski(key), bytes(32))
    await client.writer.drain()
    await asyncio.to_thread(source.started.wait, 5)
    await running.settle(lambda: running.server.pending == 8, "all admitted")
    transport = client.writer.transport
    transport.abort()
    await running.settle(lambda: running.server.connections == 0, "connection forgotten")
    source.release.set()
    await running.settle(lambda: running.server.pending == 0, "operations finished")
    metrics = running.server.metrics
    assert metrics.requests["ECDSA_SIGN_SHA256", "abandoned"] == 8
    assert metrics.connections_open == 0
    assert len(asyncio.all_tasks()) <= tasks_before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await running.assert_healthy()


async def test_idle_connections_are_closed(start: Starter) -> None:
    running = await start(settings=KeyServerSettings(workers=1, idle_timeout=0.3))
    client = await running.connect()
    try:
        assert (await client.call(Op.PING)).op is Op.PONG
        assert await at_eof(client.reader, timeout=5)
    finally:
        await client.close()
    await running.settle(lambda: running.server.connections == 0, "closed")
    assert running.server.metrics.connections_closed["idle"] == 1


async def test_connections_beyond_the_limit_are_closed(start: Starter) -> None:
    running = await start(settings=KeyServerSettings(workers=1, max_connections=1))
    first = await running.connect()
    second = await running.connect()
    try:
        second.send(Op.PING)
        with pytest.raises(ConnectionError):
            await second.receive(1)
        assert (await first.call(Op.PING)).op is Op.PONG
    finally:
        await first.close()
        await second.close()
    assert running.server.metrics.connections_closed["limit"] == 1


# --- reload ---------------------------------------------------------------------------------


async def test_reload_applies_new_grants_and_refuses_a_bad_table(
    start: Starter, material: Material, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start()
    server = running.server
    edge2 = await running.connect(material.pki.edge2)
    rsa_key = material.keys["rsa"]
    payload = payload_for(Op.RSA_PSS_SIGN_SHA256, rsa_key)
    try:
        response = await edge2.call(Op.RSA_PSS_SIGN_SHA256, ski(rsa_key), payload)
        assert response.error_code is ErrorCode.NOT_AUTHORIZED
        running.grants.write_text(
            grants_toml(material.keys, {"node/edge1": ["p256"], "node/edge2": ["p256", "rsa"]})
        )
        assert await server.reload() is True
        # The connection stays; the new grants apply to its next request.
        await running.sign(edge2, "rsa", Op.RSA_PSS_SIGN_SHA256)
        edge1 = await running.connect()
        try:
            key = material.keys["ed25519"]
            response = await edge1.call(Op.ED25519_SIGN, ski(key), b"m")
            assert response.error_code is ErrorCode.NOT_AUTHORIZED  # edge1 lost it
        finally:
            await edge1.close()
        # A bad table is refused and the previous one stays.
        running.grants.write_text('[edges]\n"node/edge2" = ["no-such-key"]\n')
        assert await server.reload() is False
        assert "reload refused" in caplog.text and "no-such-key" in caplog.text
        await running.sign(edge2, "rsa", Op.RSA_PSS_SIGN_SHA256)
        assert server.metrics.reloads["ok"] == 1
        assert server.metrics.reloads["failed"] == 1
        assert server.metrics.generation == 2
    finally:
        await edge2.close()
    await running.assert_healthy(ed25519=False)  # edge1 lost it with the reload


async def test_periodic_reloads_log_changes_and_the_first_of_repeated_failures(
    start: Starter, material: Material, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="keybroker.keyless.keyserver")
    running = await start()
    server = running.server

    def levels(text: str) -> list[int]:
        found = [r.levelno for r in caplog.records if r.getMessage().startswith(text)]
        caplog.clear()
        return found

    assert await server.reload(quiet=True) is True  # nothing changed: a debug line only
    assert levels("reloaded") == [logging.DEBUG]
    running.grants.write_text('[edges]\n"node/edge2" = ["no-such-key"]\n')
    assert await server.reload(quiet=True) is False
    assert levels("reload refused") == [logging.ERROR]
    assert await server.reload(quiet=True) is False  # the same failure again: quiet
    assert levels("reload refused") == [logging.DEBUG]
    running.grants.write_text(default_grants(material.keys))
    assert await server.reload(quiet=True) is True  # recovered: said out loud
    assert levels("reloaded") == [logging.INFO]
    running.grants.write_text(grants_toml(material.keys, {"node/edge1": ["p256"]}))
    assert await server.reload(quiet=True) is True  # the grants changed
    assert levels("reloaded") == [logging.INFO]
    assert await server.reload() is True  # SIGHUP: always said
    assert levels("reloaded") == [logging.INFO]
    running.grants.write_text("[edges\n")
    assert await server.reload() is False
    running.grants.write_text("oops")
    assert await server.reload() is False  # not quiet: every failure is an error
    assert levels("reload refused") == [logging.ERROR, logging.ERROR]


async def test_run_keyserver_reloads_every_refresh_seconds(
    material: Material, tmp_path: Path
) -> None:
    settings = _base_config(material, tmp_path)
    config = KeyServerConfig.from_mapping(
        {**settings, "listen": "127.0.0.1:0", "refresh": 0.2, "workers": 1, "metrics_port": 0}
    )
    assert config.refresh_interval == 0.2
    stop = asyncio.Event()
    lines: list[str] = []
    task = asyncio.create_task(run_keyserver(config, ready=lines.append, stop=stop))
    try:
        async with asyncio.timeout(20):
            while not lines:
                await asyncio.sleep(0.02)
        port = int(lines[0].split()[2].rsplit(":", 1)[1])
        pki = material.pki
        edge1 = await EdgeClient.connect(("127.0.0.1", port), pki.client_context(pki.edge1))
        key = material.keys["p256"]
        payload = payload_for(Op.ECDSA_SIGN_SHA256, key)
        try:
            response = await edge1.call(Op.ECDSA_SIGN_SHA256, ski(key), payload)
            assert response.error_code is None
            # No SIGHUP: the grants file alone changes, and the next refresh applies it.
            Path(settings["grants"]).write_text(
                grants_toml(material.keys, {"node/edge2": ["p256"]})
            )
            async with asyncio.timeout(10):
                while response.error_code is None:
                    await asyncio.sleep(0.05)
                    response = await edge1.call(Op.ECDSA_SIGN_SHA256, ski(key), payload)
            assert response.error_code is ErrorCode.NOT_AUTHORIZED
        finally:
            await edge1.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_reload_picks_up_new_keys_and_keeps_the_old_on_a_bad_file(
    start: Starter, material: Material
) -> None:
    running = await start()
    server = running.server
    new_key = ec.generate_private_key(ec.SECP384R1())
    keys = {**material.keys, "p384": new_key}
    write_keys(running.keys_dir, {"p384": new_key})
    running.grants.write_text(grants_toml(keys, {"node/edge1": list(keys)}))
    assert await server.reload() is True
    assert server.metrics.keys_loaded == 5
    client = await running.connect()
    try:
        payload = payload_for(Op.ECDSA_SIGN_SHA384, new_key)
        response = await client.call(Op.ECDSA_SIGN_SHA384, ski(new_key), payload)
        assert response.error_code is None
        check_result(Op.ECDSA_SIGN_SHA384, new_key.public_key(), payload, response.payload)
        # A broken key file: the whole reload is refused, every key still works.
        bad = running.keys_dir / "broken.pem"
        bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        bad.chmod(0o600)
        assert await server.reload() is False
        assert server.metrics.keys_loaded == 5
        response = await client.call(Op.ECDSA_SIGN_SHA384, ski(new_key), payload)
        assert response.error_code is None
        # Key removed from disk: gone after the next reload.
        bad.unlink()
        (running.keys_dir / "p384.pem").unlink()
        assert await server.reload() is True
        response = await client.call(Op.ECDSA_SIGN_SHA384, ski(new_key), payload)
        assert response.error_code is ErrorCode.KEY_NOT_FOUND
    finally:
        await client.close()


async def test_requests_in_flight_finish_on_the_old_generation(
    start: Starter, material: Material, tmp_path: Path
) -> None:
    source = gated(material, tmp_path, "p256")
    running = await start(keys=source, settings=KeyServerSettings(workers=2, max_batch=1))
    key = material.keys["p256"]
    client = await running.connect()
    try:
        payload = payload_for(Op.ECDSA_SIGN_SHA256, key)
        in_flight = client.send(Op.ECDSA_SIGN_SHA256, ski(key), payload)
        await client.writer.drain()
        await asyncio.to_thread(source.started.wait, 5)
        # Revoke the key from edge1 and reload the keys while the operation runs.
        running.grants.write_text(grants_toml(material.keys, {"node/edge1": ["ed25519"]}))
        assert await running.server.reload() is True
        (fresh,) = source.reloaded
        assert running.server.keys is fresh
        assert not source.closed.is_set()  # still in use by the request in flight
        response = await client.call(Op.ECDSA_SIGN_SHA256, ski(key), payload)
        assert response.error_code is ErrorCode.NOT_AUTHORIZED  # new requests: new grants
        source.release.set()
        (answer,) = await client.receive(1)
        assert answer.id == in_flight and answer.error_code is None
        check_result(Op.ECDSA_SIGN_SHA256, key.public_key(), payload, answer.payload)
        await running.settle(source.closed.is_set, "the old key source is closed")
        assert not fresh.closed.is_set()
    finally:
        source.release.set()
        await client.close()


async def test_a_key_source_outlives_every_generation_with_requests_in_flight(
    start: Starter, material: Material, tmp_path: Path
) -> None:
    source = gated(material, tmp_path, "p256")
    source.unchanged_reloads = 1
    running = await start(keys=source, settings=KeyServerSettings(workers=2, max_batch=1))
    key = material.keys["p256"]
    client = await running.connect()
    try:
        in_flight = client.send(Op.ECDSA_SIGN_SHA256, ski(key), bytes(32))
        await client.writer.drain()
        await asyncio.to_thread(source.started.wait, 5)
        assert await running.server.reload() is True  # generation 2: same keys, new grants
        assert running.server.keys is source
        assert await running.server.reload() is True  # generation 3: new keys
        assert running.server.keys is not source
        await asyncio.sleep(0.1)
        assert not source.closed.is_set()  # generation 1's request still runs on it
        source.release.set()
        (answer,) = await client.receive(1)
        assert answer.id == in_flight and answer.error_code is None
        await running.settle(source.closed.is_set, "closed once unused")
    finally:
        source.release.set()
        await client.close()


async def test_reload_rotates_the_server_certificate(material: Material, tmp_path: Path) -> None:
    pki = material.pki
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    key.chmod(0o600)
    write_keys(tmp_path / "keys", material.keys)
    grants = tmp_path / "grants.toml"
    grants.write_text(default_grants(material.keys))
    files = TlsFiles(cert, key, pki.ca.path)
    server = KeyServer(
        PemKeySource(tmp_path / "keys"),
        StaticAuthorizer.from_file(grants),
        server_tls_context(files),
        KeyServerSettings(workers=1),
        tls_files=files,
    )
    address = await server.start("127.0.0.1", 0)

    async def served_certificate() -> bytes:
        client = await EdgeClient.connect(address, pki.client_context(pki.edge1))
        try:
            ssl_object = client.writer.get_extra_info("ssl_object")
            der: bytes = ssl_object.getpeercert(binary_form=True)
            assert (await client.call(Op.PING)).op is Op.PONG
            return der
        finally:
            await client.close()

    try:
        old = await served_certificate()
        rotated = pki.ca.issue(
            tmp_path, "rotated", common_name="service/ks", dns=["keyserver.test"], server=True
        )
        # A certificate whose key does not match: refused, the old pair stays.
        cert.write_bytes(rotated.cert.read_bytes())
        assert await server.reload() is False
        assert await served_certificate() == old
        key.write_bytes(rotated.key.read_bytes())
        assert await server.reload() is True
        new = await served_certificate()
        assert new != old
        assert new == rotated.certificate.public_bytes(serialization.Encoding.DER)
    finally:
        await server.aclose()


# --- health, metrics, shutdown --------------------------------------------------------------


@POOLS_ANSWER_ALIKE
async def test_health_and_metrics_endpoint(
    start: Starter, material: Material, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    running = await start()
    client = await running.connect()
    key = material.keys["p256"]
    payloads = [secrets.token_bytes(32) for _ in range(5)]
    try:
        for payload in payloads:
            response = await client.call(Op.ECDSA_SIGN_SHA256, ski(key), payload)
            assert response.error_code is None
        probe = secrets.token_bytes(20)
        response = await client.call(Op.ECDSA_SIGN_SHA256, probe, payloads[0])
        assert response.error_code is ErrorCode.NOT_AUTHORIZED
        async with httpx.AsyncClient(base_url=running.metrics_url) as http:
            health = await http.get("/healthz")
            assert health.status_code == 200 and health.text.startswith("ok: 4 keys")
            scraped = await http.get("/metrics")
            assert scraped.status_code == 200
            assert (await http.get("/nope")).status_code == 404
            assert (await http.post("/metrics")).status_code == 405
    finally:
        await client.close()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scraped.text)
        for sample in family.samples
    }
    assert samples["keyless_requests_total", (("op", "ECDSA_SIGN_SHA256"), ("result", "ok"))] == 5
    assert (
        samples[
            "keyless_requests_total", (("op", "ECDSA_SIGN_SHA256"), ("result", "NOT_AUTHORIZED"))
        ]
        == 1
    )
    assert samples["keyless_request_duration_seconds_count", (("op", "ECDSA_SIGN_SHA256"),)] == 6
    assert (
        samples[
            "keyless_request_duration_seconds_bucket", (("le", "+Inf"), ("op", "ECDSA_SIGN_SHA256"))
        ]
        == 6
    )
    assert samples["keyless_keys_loaded", ()] == 4
    assert samples["keyless_connections", ()] == 1
    assert samples["keyless_pending_requests", ()] == 0
    assert samples["keyless_connections_accepted_total", ()] == 1
    # No SKI and no payload in the metrics; no payload in the logs (the probe's SKI, in hex,
    # is the one thing a log line may name).
    for payload in payloads:
        assert payload.hex() not in scraped.text and payload.hex() not in caplog.text
    assert probe.hex() not in scraped.text and ski(key).hex() not in scraped.text
    await running.server.aclose()
    assert running.server.health() == (503, "shutting down\n")


async def test_graceful_shutdown_finishes_what_is_in_flight(
    start: Starter, material: Material, tmp_path: Path
) -> None:
    source = gated(material, tmp_path, "p256")
    running = await start(keys=source, settings=KeyServerSettings(workers=2, max_batch=1))
    key = material.keys["p256"]
    client = await running.connect()
    payload = payload_for(Op.ECDSA_SIGN_SHA256, key)
    in_flight = client.send(Op.ECDSA_SIGN_SHA256, ski(key), payload)
    await client.writer.drain()
    await asyncio.to_thread(source.started.wait, 5)
    closing = asyncio.create_task(running.server.aclose(grace=10))
    await running.settle(lambda: running.server.stopping, "stopping")
    with pytest.raises(OSError):  # no longer accepting connections
        await running.connect()
    late = client.send(Op.PING, payload=b"too late")  # nor requests
    await client.writer.drain()
    await asyncio.sleep(0.1)
    assert not closing.done()
    source.release.set()
    answers = []
    async with asyncio.timeout(10):
        while data := await client.reader.read(65536):
            answers += client.conn.receive_data(data)
    assert [a.id for a in answers] == [in_flight], f"{late} was answered"
    assert answers[0].error_code is None
    check_result(Op.ECDSA_SIGN_SHA256, key.public_key(), payload, answers[0].payload)
    await asyncio.wait_for(closing, 10)
    assert source.closed.is_set()
    await client.close()


# --- process pool ---------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["process", "inline"])
async def test_process_and_inline_pools_serve_pipelined_requests_and_reload(
    start: Starter, material: Material, pool: Pool
) -> None:
    running = await start(settings=KeyServerSettings(workers=2, pool=pool))
    client = await running.connect()
    try:
        sent: dict[int, tuple[PrivateKey, Op, bytes]] = {}
        for index in range(64):
            name = ("p256", "rsa", "ed25519", "rsa-nodecrypt")[index % 4]
            key = material.keys[name]
            op = ops_for(key)[index % len(ops_for(key))]
            if op is Op.RSA_DECRYPT:
                op = Op.RSA_SIGN_SHA256
            payload = payload_for(op, key)
            sent[client.send(op, ski(key), payload)] = (key, op, payload)
        responses = await client.receive(64, timeout=30)
        assert sorted(r.id for r in responses) == sorted(sent)
        for response in responses:
            key, op, payload = sent[response.id]
            assert response.error_code is None, (op, response)
            check_result(op, key.public_key(), payload, response.payload)
        # A new key reaches new worker processes.
        new_key = ec.generate_private_key(ec.SECP256R1())
        write_keys(running.keys_dir, {"p256-new": new_key})
        keys = {**material.keys, "p256-new": new_key}
        running.grants.write_text(grants_toml(keys, {"node/edge1": list(keys)}))
        assert await running.server.reload() is True
        payload = payload_for(Op.ECDSA_SIGN_SHA256, new_key)
        response = await client.call(Op.ECDSA_SIGN_SHA256, ski(new_key), payload)
        assert response.error_code is None
        check_result(Op.ECDSA_SIGN_SHA256, new_key.public_key(), payload, response.payload)
    finally:
        await client.close()
    await running.assert_healthy()


async def test_process_pool_replaces_dead_workers(
    start: Starter, material: Material, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start(settings=KeyServerSettings(workers=2, pool="process"))
    executor = running.server.generation.dispatcher._executor
    workers = list(executor._processes)  # type: ignore[attr-defined]
    assert len(workers) == 2  # started (and checked) before the server listened
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    client = await running.connect()
    key = material.keys["p256"]
    payload = payload_for(Op.ECDSA_SIGN_SHA256, key)
    codes = []
    try:
        async with asyncio.timeout(20):
            while True:
                response = await client.call(Op.ECDSA_SIGN_SHA256, ski(key), payload)
                codes.append(response.error_code)
                if response.error_code is None:
                    break
                await asyncio.sleep(0.05)
        check_result(Op.ECDSA_SIGN_SHA256, key.public_key(), payload, response.payload)
    finally:
        await client.close()
    assert set(codes[:-1]) <= {ErrorCode.INTERNAL}  # at worst the batches of the dead pool
    assert running.server.generation.dispatcher._executor is not executor
    assert caplog.text.count("starting a new pool") == 1


async def test_a_reload_racing_shutdown_is_dropped(start: Starter, material: Material) -> None:
    running = await start(settings=KeyServerSettings(workers=1, pool="process"))
    write_keys(running.keys_dir, {"p256-new": ec.generate_private_key(ec.SECP256R1())})
    reloading = asyncio.create_task(running.server.reload())
    await asyncio.sleep(0)  # the reload has started loading
    await running.server.aclose()
    assert await reloading is False
    assert running.server.generation.number == 1
    assert not any(running.server.metrics.reloads.values())  # neither applied nor refused


async def test_process_pool_needs_exportable_keys(material: Material, tmp_path: Path) -> None:
    pki = material.pki
    files = TlsFiles(pki.server.cert, pki.server.key, pki.ca.path)
    with pytest.raises(ConfigurationError, match=r"^pool: "):
        KeyServer(
            gated(material, tmp_path, "p256"),
            StaticAuthorizer({}),
            server_tls_context(files),
            KeyServerSettings(pool="process"),
        )


def test_perform_batch_answers_every_job() -> None:
    class Exploding:
        def perform(self, ski: bytes, op: Op, payload: bytes) -> bytes:
            if payload == b"boom":
                raise RuntimeError("secret payload text")
            if payload == b"no":
                raise KeyOperationError("nope", code=ErrorCode.CRYPTO)
            return b"fine"

    jobs = [(b"k" * 20, int(Op.ED25519_SIGN), p) for p in (b"boom", b"no", b"ok")]
    results = perform_batch(Exploding(), jobs)  # type: ignore[arg-type]
    assert results == [int(ErrorCode.INTERNAL), int(ErrorCode.CRYPTO), b"fine"]


# --- PKCS#11 -------------------------------------------------------------------------------

HSM_TOKEN = "ks-keys"


@pytest.fixture(scope="module")
def keyserver_hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHSM:
    return start_softhsm(tmp_path_factory.mktemp("keyserver-softhsm"), (HSM_TOKEN,))


@pytest.mark.hsm
async def test_pkcs11_keys_serve_every_signing_opcode_and_reload(
    start: Starter, material: Material, keyserver_hsm: SoftHSM
) -> None:
    module = keyserver_hsm.module
    for name in ("rsa", "p256", "ed25519"):
        import_private_key(module, HSM_TOKEN, USER_PIN, material.keys[name])
    source = Pkcs11KeySource(module, HSM_TOKEN, USER_PIN)
    assert USER_PIN not in repr(source)
    assert sorted(source.skis()) == sorted(
        ski(material.keys[n]) for n in ("rsa", "p256", "ed25519")
    )
    running = await start(keys=source)
    client = await running.connect()
    try:
        for name in ("rsa", "p256", "ed25519"):
            key = material.keys[name]
            for op in ops_for(key):
                payload = payload_for(op, key)
                response = await client.call(op, ski(key), payload)
                if op is Op.RSA_DECRYPT:  # allowed by the grants, refused by the token store
                    assert response.error_code is ErrorCode.NOT_AUTHORIZED
                    continue
                assert response.error_code is None, (op, response)
                check_result(op, key.public_key(), payload, response.payload)
        # Not in the token: granted but not found.
        response = await client.call(Op.RSA_SIGN_SHA256, GHOST_SKI, bytes(32))
        assert response.error_code is ErrorCode.KEY_NOT_FOUND
        assert await running.server.reload() is True
        assert running.server.keys is not source
        await running.settle(lambda: source.skis() == [], "the old store is closed")
        await running.sign(client, "p256", Op.ECDSA_SIGN_SHA256)  # the new one serves
    finally:
        await client.close()
    with pytest.raises(ConfigurationError, match=r"^pool: "):
        KeyServer(
            running.server.keys,
            StaticAuthorizer({}),
            server_tls_context(pki_files(material.pki)),
            KeyServerSettings(pool="process"),
        )


# --- configuration --------------------------------------------------------------------------


def _base_config(material: Material, tmp_path: Path) -> dict[str, Any]:
    write_keys(tmp_path / "keys", material.keys)
    grants = tmp_path / "grants.toml"
    grants.write_text(default_grants(material.keys))
    pki = material.pki
    return {
        "cert": pki.server.cert,
        "key": pki.server.key,
        "client_ca": pki.ca.path,
        "keys_dir": tmp_path / "keys",
        "grants": grants,
    }


@pytest.mark.parametrize(
    ("change", "bad_key"),
    [
        ({"grants": None}, "grants"),
        ({"listen_port": 2407}, "listen_port"),
        ({"pool": "fork"}, "pool"),
        ({"workers": "two"}, "workers"),
        ({"workers": 0}, "workers"),
        ({"listen": "localhost"}, "listen"),
        ({"pkcs11_token": "t"}, "keys_dir"),
        ({"metrics_port": 70000}, "metrics_port"),
        ({"idle_timeout": "soon"}, "idle_timeout"),
        ({"log_level": "loud"}, "log_level"),
        ({"max_pending": 5000}, "max_pending"),
    ],
)
def test_config_errors_name_the_bad_key(
    material: Material, tmp_path: Path, change: dict[str, Any], bad_key: str
) -> None:
    settings = {**_base_config(material, tmp_path), **change}
    settings = {name: value for name, value in settings.items() if value is not None}
    with pytest.raises(ConfigurationError, match=f"^{bad_key}: "):
        KeyServerConfig.from_mapping(settings)


@pytest.mark.parametrize(
    ("change", "bad_key"),
    [
        ({"cert": "server.crt"}, "cert"),
        ({"grants": "grants.toml"}, "grants"),
        ({"keys_dir": "keys"}, "keys_dir"),
        ({"pkcs11_token": "t"}, "pkcs11_token"),
        ({"pool": "process"}, "pool"),
        ({"refresh": -1}, "refresh"),
        ({"refresh": "5s"}, "refresh"),
        ({"broker": "http://broker:8443"}, "broker"),
        ({"passphrase_env": "MY PASS"}, "passphrase_env"),
        ({"keyring": ""}, "keyring"),
        ({"grants_max_age": 0}, "grants_max_age"),
        ({"grants_max_age": 3}, "grants_max_age"),
        ({"grants_max_age": 60, "refresh": 0}, "grants_max_age"),
    ],
)
def test_broker_mode_config_errors_name_the_bad_key(
    tmp_path: Path, change: dict[str, Any], bad_key: str
) -> None:
    settings = {"keyring": "ks1.keyring", **change}
    with pytest.raises(ConfigurationError, match=f"^{bad_key}: "):
        KeyServerConfig.from_mapping(settings, base=tmp_path)


def test_broker_mode_config(material: Material, tmp_path: Path) -> None:
    config = KeyServerConfig.from_mapping(
        {"keyring": "ks1.keyring", "broker": "https://broker.example:8443", "workers": 2},
        base=tmp_path,
    )
    assert config.brokered and config.keyring == tmp_path / "ks1.keyring"
    assert (
        config.refresh_interval == 5.0 and config.passphrase_env == "KEYBROKER_KEYRING_PASSPHRASE"
    )
    assert config.cert is None and config.grants is None
    with pytest.raises(ConfigurationError, match=r"^cert: "):
        config.tls_files()
    off = KeyServerConfig.from_mapping(
        {"keyring": "ks1.keyring", "refresh": 0, "passphrase-env": "KS_PASS"}, base=tmp_path
    )
    assert off.refresh_interval == 0.0 and off.passphrase_env == "KS_PASS"
    # Files: no periodic reload unless asked; the broker settings are refused.
    files = KeyServerConfig.from_mapping(_base_config(material, tmp_path))
    assert not files.brokered and files.refresh_interval == 0.0
    with pytest.raises(ConfigurationError, match=r"^broker: only with broker keys"):
        KeyServerConfig.from_mapping({**_base_config(material, tmp_path), "broker": "https://b"})
    with pytest.raises(ConfigurationError, match=r"^passphrase_env: only with broker keys"):
        KeyServerConfig.from_mapping({**_base_config(material, tmp_path), "passphrase_env": "P"})
    with pytest.raises(ConfigurationError, match=r"^grants_max_age: only with broker keys"):
        KeyServerConfig.from_mapping({**_base_config(material, tmp_path), "grants_max_age": 60})
    aged = KeyServerConfig.from_mapping({"keyring": "k", "grants-max-age": 60}, base=tmp_path)
    assert aged.grants_max_age == 60.0


def test_config_paths_are_relative_to_the_file(material: Material, tmp_path: Path) -> None:
    settings = _base_config(material, tmp_path)
    settings["grants"] = "grants.toml"
    settings["client-ca"] = settings.pop("client_ca")  # kebab-case is accepted too
    settings["max-connections"] = None  # None means "not given"
    settings["metrics-port"] = 0
    config = KeyServerConfig.from_mapping(settings, base=tmp_path)
    assert config.grants == tmp_path / "grants.toml"
    assert config.client_ca == material.pki.ca.path
    assert (config.metrics_port, config.max_connections) == (0, 1024)


def test_pem_key_source_refuses_unsafe_or_unusable_files(
    material: Material, tmp_path: Path
) -> None:
    keys_dir = tmp_path / "keys"
    write_keys(keys_dir, {"p256": material.keys["p256"]})
    source = PemKeySource(keys_dir)
    assert source.skis() == [ski(material.keys["p256"])]
    assert "PRIVATE" not in repr(source) and "p256.pem=" in repr(source)
    with pytest.raises(TypeError):
        pickle.dumps(source)
    (keys_dir / "notes.txt").write_text("ignored")
    (keys_dir / "p256.pem").chmod(0o644)
    with pytest.raises(ConfigurationError, match=r"^keys_dir: .*readable by others"):
        PemKeySource(keys_dir)
    (keys_dir / "p256.pem").chmod(0o600)
    encrypted = keys_dir / "enc.pem"
    encrypted.write_bytes(
        material.keys["ed25519"].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    encrypted.chmod(0o600)
    with pytest.raises(ConfigurationError, match=r"enc\.pem is not one unencrypted PKCS#8"):
        PemKeySource(keys_dir)
    encrypted.write_bytes(
        material.keys["p256"].private_bytes(  # traditional SEC 1, not PKCS#8
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigurationError, match=r"enc\.pem is not one unencrypted PKCS#8"):
        PemKeySource(keys_dir)
    encrypted.unlink()
    write_keys(keys_dir, {"copy": material.keys["p256"]})
    with pytest.raises(ConfigurationError, match=r"hold the same key"):
        PemKeySource(keys_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigurationError, match=r"^keys_dir: no PKCS#8 PEM key"):
        PemKeySource(empty)


def test_pem_key_source_answers_alike_once_it_has_learnt_a_key_and_opcode(
    material: Material, tmp_path: Path
) -> None:
    """After a first success a (key, opcode) is signed without the full path's checks; the
    results still verify, and every failure still gets the full path's code."""
    write_keys(tmp_path / "keys", material.keys)
    source = PemKeySource(tmp_path / "keys")
    for key in material.keys.values():
        for op in ops_for(key):
            for _ in range(3):
                payload = payload_for(op, key)
                check_result(op, key.public_key(), payload, source.perform(ski(key), op, payload))
            if SIGN_HASH.get(op) is not None:
                with pytest.raises(KeyOperationError) as short:
                    source.perform(ski(key), op, payload_for(op, key)[:-1])
                assert short.value.code is ErrorCode.FORMAT
        wrong = Op.ED25519_SIGN if SIGN_HASH.get(ops_for(key)[0]) else Op.ECDSA_SIGN_SHA256
        with pytest.raises(KeyOperationError) as unexpected:
            source.perform(ski(key), wrong, bytes(32))
        assert unexpected.value.code is ErrorCode.UNEXPECTED_OPCODE
    with pytest.raises(KeyOperationError) as missing:
        source.perform(GHOST_SKI, Op.ECDSA_SIGN_SHA256, bytes(32))
    assert missing.value.code is ErrorCode.KEY_NOT_FOUND


def test_tls_context_errors_name_the_file(material: Material, tmp_path: Path) -> None:
    pki = material.pki
    with pytest.raises(ConfigurationError, match=r"^cert/key: "):
        server_tls_context(TlsFiles(pki.edge1.cert, pki.server.key, pki.ca.path))
    with pytest.raises(ConfigurationError, match=r"^client_ca: "):
        server_tls_context(TlsFiles(pki.server.cert, pki.server.key, tmp_path / "missing.pem"))
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki.server.key.read_bytes())
    loose.chmod(0o644)
    with pytest.raises(ConfigurationError, match=r"^key: .*readable by others"):
        server_tls_context(TlsFiles(pki.server.cert, loose, pki.ca.path))


def test_identity_tls_context_leaves_no_key_on_disk(material: Material) -> None:
    pki = material.pki

    def scratch() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("keybroker-keyserver-*"))

    before = scratch()
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = pki.server.cert.read_bytes()
    ca = pki.ca.path.read_bytes()
    context = identity_tls_context(cert, key, ca)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert scratch() == before
    with pytest.raises(ConfigurationError, match=r"^cert/key: "):
        identity_tls_context(cert, ec.generate_private_key(ec.SECP256R1()), ca)
    with pytest.raises(ConfigurationError, match=r"^client_ca: "):
        identity_tls_context(cert, key, b"not a certificate")
    assert scratch() == before


# --- authorisation --------------------------------------------------------------------------


def test_static_authorizer_checks_grants_and_decrypt_policy(tmp_path: Path) -> None:
    a, b = bytes(range(20)), bytes(range(1, 21))
    document = {
        "keys": {"www": {"ski": a.hex(), "allow_decrypt": True}, "api": {"ski": b.hex()}},
        "edges": {"keybroker://node/edge1": ["www", b.hex()], "node/edge2": ["api"]},
    }
    path = tmp_path / "grants.json"
    path.write_text(json.dumps(document))
    authorizer = StaticAuthorizer.from_file(path)
    authorizer.check(EDGE1, a, Op.RSA_DECRYPT)
    authorizer.check(EDGE1, b, Op.ECDSA_SIGN_SHA256)
    with pytest.raises(KeyOperationError) as refused:
        authorizer.check(EDGE1, b, Op.RSA_DECRYPT)
    assert refused.value.code is ErrorCode.NOT_AUTHORIZED
    with pytest.raises(KeyOperationError) as refused:
        authorizer.check(EDGE2, a, Op.RSA_SIGN_SHA256)
    assert refused.value.code is ErrorCode.NOT_AUTHORIZED
    with pytest.raises(KeyOperationError):
        authorizer.check(PrincipalId.parse("node/stranger"), a, Op.RSA_SIGN_SHA256)
    assert authorizer.policy(a) == KeyPolicy(a, "www", True)
    assert authorizer.granted(EDGE2) == frozenset({b})
    # reload reads the file again and returns a new object; the old one is unchanged.
    document["edges"] = {"node/edge2": ["www"]}
    path.write_text(json.dumps(document))
    fresh = authorizer.reload()
    assert fresh is not authorizer and fresh.granted(EDGE1) == frozenset()
    authorizer.check(EDGE1, a, Op.RSA_DECRYPT)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"edges": {"node/edge1": ["www"]}}, r"edges\.'node/edge1'\[0\]: 'www' is neither"),
        ({"keys": {"www": {"ski": "abc"}}}, r"keys\.www\.ski: 'abc' is not an SKI"),
        ({"keys": {"www": {"ski": "00" * 20, "color": "red"}}}, r"keys\.www\.color: unknown"),
        ({"keys": {"www": {"ski": "00" * 20, "allow_decrypt": "yes"}}}, "allow_decrypt"),
        ({"keys": {"a": {"ski": "00" * 20}, "b": {"ski": "00" * 20}}}, "same key as keys.a"),
        ({"edges": {"Node/Edge": []}}, r"edges\.'Node/Edge'"),
        ({"grants": {}}, "unknown key 'grants'"),
        ({"edges": {"node/e": "www"}}, "must be a list"),
        ({"keys": {"00" * 20: {"ski": "00" * 20}}}, "may not look like an SKI"),
    ],
)
def test_grants_errors_name_the_bad_entry(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        StaticAuthorizer.from_mapping(document, origin="g.toml")


# --- the command ----------------------------------------------------------------------------


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Undo the command's ``logging.basicConfig(force=True)``: its handler writes to a stream
    CliRunner closes, and would break the logging of every later test in this process."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    httpx_level = logging.getLogger("httpx").level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("httpx").setLevel(httpx_level)


def _cli() -> Any:
    import typer

    from keybroker.flows.keyless.keyserver_cli import keyserver_command

    app = typer.Typer()
    app.command()(keyserver_command)
    return app


@pytest.mark.usefixtures("root_logging")
def test_cli_reports_bad_configuration_with_exit_status_2(
    material: Material, tmp_path: Path
) -> None:
    base = _base_config(material, tmp_path)
    runner = CliRunner()
    args = [
        "--cert", str(base["cert"]), "--key", str(base["key"]),
        "--client-ca", str(base["client_ca"]), "--keys-dir", str(base["keys_dir"]),
    ]  # fmt: skip
    result = runner.invoke(_cli(), args)
    assert result.exit_code == 2
    assert "configuration error: grants: required" in result.output
    config = tmp_path / "keyserver.toml"
    config.write_text('grants = "grants.toml"\npool = "fibers"\n')
    result = runner.invoke(_cli(), [*args, "--config", str(config)])
    assert result.exit_code == 2
    assert "pool: must be 'thread', 'process' or 'inline'" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(f'grants = "grants.toml"\nlisten = "127.0.0.1:{port}"\n')
        result = runner.invoke(_cli(), [*args, "--config", str(config)])
    assert result.exit_code == 2
    assert f"listen: cannot listen on 127.0.0.1:{port}" in result.output


@pytest.mark.usefixtures("root_logging")
def test_cli_with_broker_keys_reports_what_is_missing(tmp_path: Path) -> None:
    runner = CliRunner()
    keyring = tmp_path / "ks1.keyring"
    args = ["--keyring", str(keyring), "--passphrase-env", "KS1_PASSPHRASE", "--refresh", "2"]
    result = runner.invoke(_cli(), args, env={"KS1_PASSPHRASE": None})
    assert result.exit_code == 2
    assert "configuration error: passphrase_env: environment variable KS1_PASSPHRASE" in (
        result.output
    )
    result = runner.invoke(_cli(), args, env={"KS1_PASSPHRASE": "correct-horse-battery"})
    assert result.exit_code == 2
    assert f"configuration error: keyring: {keyring}: no keyring at {keyring}" in result.output
    assert "correct-horse-battery" not in result.output
    result = runner.invoke(_cli(), [*args, "--keys-dir", str(tmp_path)])
    assert result.exit_code == 2 and "keys_dir: not with broker keys" in result.output
