"""``open_bus(url)``: pick and connect a bus implementation from a URL.

=====================================  ======================================================
``memory://``                          :class:`~keybroker.bus.memory.MemoryBus` (this process)
``nats://[user:pass@]host[:4222]``     :class:`~keybroker.bus.natsbus.NatsBus`
``tls://[user:pass@]host[:4222]``      the same over TLS (nats-py's scheme)
``mqtt://[user:pass@]host[:1883]``     :class:`~keybroker.bus.mqttbus.MqttBus`
``mqtts://[user:pass@]host[:8883]``    the same over TLS (system CAs unless ``tls=`` is given)
=====================================  ======================================================

Anything else is a :class:`~keybroker.errors.ConfigurationError`; a server that
cannot be reached is a :class:`~keybroker.errors.TransportError` within the
connect timeout. Options (stream name, timeouts, TLS context…) are keyword
arguments passed on to the implementation's ``connect``; URLs carry no query
options, so a URL in a config file or log line says only where the server is.
Passwords in URLs never appear in error messages or logs.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from keybroker.bus.interface import Bus
from keybroker.errors import ConfigurationError

SCHEMES = ("memory", "nats", "tls", "mqtt", "mqtts")
_DEFAULT_PORTS = {"nats": 4222, "tls": 4222, "mqtt": 1883, "mqtts": 8883}


def redact_url(url: str) -> str:
    """``url`` without its password (for error messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<unparsable URL>"
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


async def open_bus(url: str, **options: Any) -> Bus:
    """Connect to the bus named by ``url`` (see the module docstring for the schemes)."""
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"invalid bus URL {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"unsupported bus URL {shown!r}: use one of " + ", ".join(f"{s}://" for s in SCHEMES)
        )
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ConfigurationError(
            f"bus URL {shown!r} must be only scheme://host:port; pass options as keyword arguments"
        )

    if scheme == "memory":
        if parts.netloc:
            raise ConfigurationError(f"a memory bus URL is just 'memory://', not {shown!r}")
        from keybroker.bus.memory import MemoryBus

        return MemoryBus(**options)

    host = parts.hostname
    if not host:
        raise ConfigurationError(f"bus URL {shown!r} names no host")
    port = port if port is not None else _DEFAULT_PORTS[scheme]
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None

    if scheme in ("nats", "tls"):
        try:
            from keybroker.bus.natsbus import NatsBus
        except ImportError:
            raise ConfigurationError(
                "the NATS bus needs nats-py: pip install 'keybroker[nats]'"
            ) from None
        # nats-py parses the URL itself (user:pass, tls:// → TLS); keep it whole.
        return await NatsBus.connect(url, **options)

    try:
        from keybroker.bus.mqttbus import MqttBus
    except ImportError:
        raise ConfigurationError(
            "the MQTT bus needs aiomqtt: pip install 'keybroker[mqtt]'"
        ) from None
    if scheme == "mqtts" and "tls" not in options:
        import ssl

        options["tls"] = ssl.create_default_context()
    if username is not None:
        options.setdefault("username", username)
    if password is not None:
        options.setdefault("password", password)
    return await MqttBus.connect(host, port, **options)
