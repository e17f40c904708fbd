"""Test helpers: a broker behind the API in-process (httpx.ASGITransport), with its SDKs."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from fastapi import FastAPI

from keybroker.api import ApiSettings, create_admin_credential, create_app
from keybroker.broker import Broker
from keybroker.broker.events import Event, decode_event
from keybroker.broker.home import Home
from keybroker.client import OperatorClient, PrincipalClient
from keybroker.keys import AES256_GCM, Keyset
from keybroker.pki import certificate_pem
from keybroker.store.engine import Store
from keybroker.store.schema import metadata

URL = "https://broker.test"
#: Bookkeeping of authentication itself: it changes with every accepted signature.
AUTH_TABLES = frozenset({"request_nonces"})


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class RecordingTransport(httpx.ASGITransport):
    """ASGITransport that keeps every response body (to check none leaks a secret)."""

    def __init__(self, app: FastAPI, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.seen: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        body = await response.aread()
        self.seen.append(b"".join(f"{k}: {v}\n".encode() for k, v in response.headers.items()))
        self.seen.append(body)
        return httpx.Response(
            response.status_code, headers=response.headers, content=body, request=request
        )


@dataclass
class Env:
    home: Home
    broker: Broker
    app: FastAPI
    clock: Clock
    admin_token: str
    tmp: Path
    transport: RecordingTransport
    clients: list[Any] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    @property
    def store(self) -> Store:
        return self.home.store

    @property
    def ca_pem(self) -> bytes:
        return certificate_pem(self.broker.ca_certificate)

    def http(self) -> httpx.AsyncClient:
        client = httpx.AsyncClient(transport=self.transport, base_url=URL)
        self.clients.append(client)
        return client

    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_token}"}

    def operator(self) -> OperatorClient:
        op = OperatorClient(URL, self.admin_token, None, transport=self.transport)
        self.clients.append(op)
        return op

    def kek(self) -> Any:
        return Keyset.generate("test-kek", AES256_GCM).aead()

    async def enrolled(
        self, name: str, *, identity_algorithm: str = "ed25519", kek: Any = None
    ) -> PrincipalClient:
        op = self.operator()
        issued = await op.create_enrolment_token(name, timedelta(hours=1))
        self.tokens.append(issued.token)
        path = self.tmp / (name.replace("/", "_") + ".keyring")
        client = await PrincipalClient.enrol(
            URL,
            self.ca_pem,
            name,
            issued.token,
            path,
            kek=kek or self.kek(),
            identity_algorithm=identity_algorithm,  # type: ignore[arg-type]
            transport=self.transport,
            clock=self.clock,
        )
        self.clients.append(client)
        return client

    def log_size(self) -> int:
        return self.home.log.size()

    def events_since(self, size: int) -> list[Event]:
        return [decode_event(e) for e in self.home.log.entries(size, self.log_size())]

    def dump(self, *, skip: Iterable[str] = AUTH_TABLES) -> dict[str, list[str]]:
        return dump(self.store, skip=skip)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


def make_env(home: Home, clock: Clock, tmp: Path, **settings: Any) -> Env:
    broker = Broker.from_home(home)
    app = create_app(broker, ApiSettings(clock=clock, poll_interval_seconds=0.05, **settings))
    token = create_admin_credential(home.store, now=clock())
    transport = RecordingTransport(app)
    return Env(home, broker, app, clock, token, tmp, transport)


def dump(store: Store, *, skip: Iterable[str] = ()) -> dict[str, list[str]]:
    """Every row of every table, as sorted reprs: equal dumps mean nothing changed."""
    skipped = set(skip)
    out: dict[str, list[str]] = {}
    with store.snapshot() as conn:
        for name, table in metadata.tables.items():
            if name not in skipped:
                out[name] = sorted(repr(tuple(row)) for row in conn.execute(sa.select(table)))
    return out


def raw_rows(store: Store) -> bytes:
    """Every cell of every table as bytes, for searching."""
    parts: list[bytes] = []
    with store.snapshot() as conn:
        for table in metadata.tables.values():
            for row in conn.execute(sa.select(table)):
                for cell in row:
                    parts.append(
                        bytes(cell) if isinstance(cell, bytes | memoryview) else repr(cell).encode()
                    )
    return b"\x00".join(parts)


def encodings(secret: bytes) -> list[bytes]:
    """The ways a secret could show up: raw, hex, base64, base64url (padded or not)."""
    std = base64.b64encode(secret)
    url = base64.urlsafe_b64encode(secret)
    return [secret, secret.hex().encode(), std, std.rstrip(b"="), url, url.rstrip(b"=")]


def problem(response: httpx.Response, status: int, type_suffix: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body = response.json()
    assert body["type"] == f"https://keybroker.dev/problems/{type_suffix}", body
    assert body["status"] == status and body["title"] and body["detail"]
    return dict(body)
