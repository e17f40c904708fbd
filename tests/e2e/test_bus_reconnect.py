"""Subscribers and publishers survive a message-server restart.

Each test starts its own nats-server / mosquitto on a free port (never the
machine's services), stops it under a live subscription, starts it again on the
same port and store, and checks that traffic resumes. Under CI=true a missing
server binary fails the test.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from tests.conftest import missing

from keybroker.bus import Bus, BusMessage, open_bus, principal_topic
from keybroker.errors import ConfigurationError, TransportError

SALT = b"keybroker bus reconnect test salt"
TIMEOUT = 20.0  # bounds a hung test only


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


class Server:
    """A message server process we own: start, stop, start again with the same state."""

    def __init__(self, argv: Callable[[], list[str]], port: int) -> None:
        self._argv = argv
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_listening(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        missing(f"the {name} binary")
        raise AssertionError  # unreachable: missing() skips or fails
    return path


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[Server]:
    exe, port = binary("nats-server"), free_port()
    store = tmp_path / "js"
    server = Server(
        lambda: [exe, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)], port
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def plain_nats_server() -> Iterator[Server]:
    exe, port = binary("nats-server"), free_port()
    server = Server(lambda: [exe, "-a", "127.0.0.1", "-p", str(port)], port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Server]:
    exe, port = binary("mosquitto"), free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "set_tcp_nodelay true\n"
        "persistence true\n"
        f"persistence_location {tmp_path}/\n"
        "user root\n"
    )
    server = Server(lambda: [exe, "-c", str(conf)], port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def publish_until_accepted(bus: Bus, topic: str, payload: bytes) -> None:
    """The publisher may still be reconnecting: retry until the server takes the message."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        try:
            await bus.publish(topic, payload)
            return
        except TransportError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def next_message(sub: AsyncIterator[BusMessage]) -> BusMessage:
    return await asyncio.wait_for(anext(sub), TIMEOUT)


async def restart_under_subscriber(url: str, server: Server, **options: object) -> None:
    topic = principal_topic("device/restart", SALT)
    bus = await open_bus(url, **options)
    async with bus, bus.subscribe(topic, durable="restart") as sub:
        await bus.publish(topic, b"before")
        first = await next_message(sub)
        assert first.payload == b"before"
        await first.ack()

        # Off the event loop, so the clients see the connection drop as they would.
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)

        await publish_until_accepted(bus, topic, b"after the restart")
        while True:
            message = await next_message(sub)
            await message.ack()
            if message.payload == b"after the restart":
                break
            # At least once: an MQTT ack is one-way (PUBACK has no reply), so one
            # sent just before the server went down may be lost and "before" comes again.
            assert message.payload == b"before"


async def test_nats_subscriber_and_publisher_survive_restart(nats_server: Server) -> None:
    await restart_under_subscriber(
        f"nats://127.0.0.1:{nats_server.port}", nats_server, reconnect_time_wait=0.1
    )


async def test_mqtt_subscriber_and_publisher_survive_restart(mosquitto: Server) -> None:
    await restart_under_subscriber(f"mqtt://127.0.0.1:{mosquitto.port}", mosquitto)


async def test_nats_without_jetstream_is_a_configuration_error(plain_nats_server: Server) -> None:
    with pytest.raises(ConfigurationError, match="JetStream"):
        await open_bus(f"nats://127.0.0.1:{plain_nats_server.port}")
