"""open_bus(url): which URLs it accepts, and clear errors for everything else.

A server that cannot be reached is simulated with a port nobody listens on
(bound, then closed), so these tests need no service and run everywhere.
"""

from __future__ import annotations

import socket

import pytest

from keybroker.bus import open_bus
from keybroker.bus.urls import redact_url
from keybroker.errors import ConfigurationError, TransportError


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("", "unsupported"),
        ("localhost:4222", "unsupported"),
        ("http://127.0.0.1:4222", "unsupported"),
        ("redis://127.0.0.1", "unsupported"),
        ("nats://", "no host"),
        ("mqtt://:1883", "no host"),
        ("mqtt://127.0.0.1:notaport", "invalid bus URL"),
        ("nats://127.0.0.1:99999", "invalid bus URL"),
        ("nats://127.0.0.1:4222?stream=X", "keyword arguments"),
        ("mqtt://127.0.0.1/topic", "keyword arguments"),
        ("memory://somewhere", "memory://"),
    ],
)
async def test_configuration_errors(url: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        await open_bus(url)


@pytest.mark.parametrize("scheme", ["nats", "mqtt"])
async def test_unreachable_server_is_a_transport_error(scheme: str) -> None:
    port = closed_port()
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}"):
        await open_bus(f"{scheme}://127.0.0.1:{port}", connect_timeout=2.0)


@pytest.mark.parametrize("scheme", ["nats", "mqtt"])
async def test_password_never_in_error(scheme: str) -> None:
    port = closed_port()
    with pytest.raises(TransportError) as info:
        await open_bus(f"{scheme}://alice:s3cr3t-pw@127.0.0.1:{port}", connect_timeout=2.0)
    assert "s3cr3t-pw" not in str(info.value)


async def test_password_not_in_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        await open_bus("ftp://alice:s3cr3t-pw@example.org")
    assert "s3cr3t-pw" not in str(info.value)


def test_redact_url() -> None:
    assert redact_url("mqtt://u:pw@h:1883") == "mqtt://u:***@h:1883"
    assert redact_url("nats://h:4222") == "nats://h:4222"
    assert redact_url("nats://[::1]:4222") == "nats://[::1]:4222"
    assert redact_url("nats://u:pw@[::1]:4222") == "nats://u:***@[::1]:4222"
