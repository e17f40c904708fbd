"""Helpers of the agent, traffic and keyring-retirement tests: keyrings made without a broker,
and a broker behind the API in-process (tests/unit/api/api_kit.py) for the agent."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "api"))

from keybroker.client.keyring import KekSource, Keyring
from keybroker.keys import AES256_GCM, ED25519, X25519_HPKE, Keyset
from keybroker.pki import PrincipalId

INFO = b"test delivery"


def deliver(keyring: Keyring, source: Keyset, version: int) -> None:
    """What a delivery does to a keyring: seal to its HPKE key, open, install."""
    sealed = source.seal_version(version, keyring.hpke.public_keyset(), info=INFO)
    held = keyring.received.get(source.name) or Keyset(source.name, source.purpose)
    held.install_sealed_version(sealed, keyring.hpke.hpke(), info=INFO)
    keyring.received[source.name] = held


def make_keyring(principal: str = "site/s1") -> Keyring:
    return Keyring(
        principal=PrincipalId.parse(principal),
        broker_url="https://broker.test",
        ca_pem=b"",
        log_public_key=b"",
        certificate_pem=b"",
        identity=Keyset.generate("keyring/identity", ED25519),
        hpke=Keyset.generate("keyring/hpke", X25519_HPKE),
    )


def kek_source() -> KekSource:
    return KekSource(kek=Keyset.generate("test-kek", AES256_GCM).aead())


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        document: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return document


async def eventually(
    check: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition"
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
