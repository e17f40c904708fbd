"""S7 end to end with real processes over the machine's real Mosquitto and real NATS.

A broker (``keybroker serve --bus …``, challenges open 8 s), a terminal enrolled as
``service/term1`` running ``keybroker login``, and a phone enrolled from its
``keybroker-push://`` URI running ``keybroker phone run`` (its keyboard is a pipe the test
types into). In order: the right number approves and the terminal gets a checked session
token; a wrong number denies; no answer expires; a fraud report locks the user, the next
login is refused, and ``keybroker pushauth log`` shows both to the operator.

Meanwhile an eavesdropper subscribed to everything (``#`` on MQTT, ``>`` on NATS) records
every message, and none carries the number, the terminal's address, the user name or any
other plaintext field of a challenge.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from keybroker.errors import KeybrokerError
from keybroker.flows.pushauth.messages import BusAnswer, Notice

from .processes import KB, Procs, free_port, until


def _kind(payload: bytes) -> str:
    """What a message on one of our topics is, by its label: a notice, an answer, or other."""
    for kind, message in (("notice", Notice), ("answer", BusAnswer)):
        try:
            message.decode(payload)
        except KeybrokerError:
            continue
        return kind
    return "other"


MQTT_URL = os.environ.get("KEYBROKER_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
NATS_URL = os.environ.get("KEYBROKER_TEST_NATS_URL", "nats://127.0.0.1:4222")
EXPIRY = 8


class Eavesdropper:
    """Everything a curious message server (or anyone allowed ``#``/``>``) sees."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.ready = asyncio.Event()

    async def mqtt(self, stop: asyncio.Event) -> None:
        import aiomqtt

        url = urlsplit(MQTT_URL)
        async with aiomqtt.Client(url.hostname or "", url.port or 1883) as client:
            await client.subscribe("#", qos=1)
            self.ready.set()

            async def collect() -> None:
                async for message in aiomqtt_messages(client):
                    payload = message.payload  # type: ignore[attr-defined]
                    topic = str(message.topic)  # type: ignore[attr-defined]
                    self.seen.append((topic, bytes(payload) if payload else b""))

            # Cancelled once, at the end. Not a timeout on each message: aiomqtt's
            # iterator loses a message it has already taken off its queue when the wait
            # for it is cancelled (seen: 3 of 4 notices, once, on a slow VM).
            collector = asyncio.create_task(collect())
            await stop.wait()
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector

    async def nats(self, stop: asyncio.Event) -> None:
        import nats

        nc = await nats.connect(NATS_URL)
        try:

            async def record(msg: object) -> None:
                self.seen.append((msg.subject, bytes(msg.data)))  # type: ignore[attr-defined]

            await nc.subscribe(">", cb=record)
            await nc.flush()
            self.ready.set()
            await stop.wait()
        finally:
            await nc.close()


def aiomqtt_messages(client: object) -> AsyncIterator[object]:
    return client.messages.__aiter__()  # type: ignore[attr-defined, no-any-return]


def _reachable(url: str) -> bool:
    import socket

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=2):
            return True
    except OSError:
        return False


class Terminal:
    """One `keybroker login` run: its output in a file, the number it shows."""

    def __init__(self, procs: Procs, workdir: Path, user: str, n: int) -> None:
        self.out = workdir / f"login-{n}.out"
        self.token = workdir / f"login-{n}.token"
        with self.out.open("wb") as sink:
            self.proc = subprocess.Popen(
                [
                    *KB,
                    "login",
                    user,
                    "--keyring",
                    "term.keyring",
                    "--application",
                    "ssh",
                    "--token-file",
                    str(self.token),
                ],
                cwd=workdir,
                env=procs.env.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self.procs = procs

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    async def number(self) -> str:
        def shown() -> str | None:
            found = re.search(r"^NUMBER (\d+)$", self.text(), re.MULTILINE)
            if found is None and self.proc.poll() is not None:
                raise AssertionError(f"login ended without a number:\n{self.text()}")
            return found.group(1) if found else None

        number: str = await until(shown, "the terminal's number", self.procs, timeout=60)
        return number

    async def result(self) -> tuple[int, str]:
        await until(lambda: self.proc.poll() is not None, "login to end", self.procs, timeout=90)
        return self.proc.returncode, self.text()


@pytest.mark.parametrize("service", ["mqtt", "nats"])
async def test_push_login_over_a_real_notification_service(
    procs: Procs, tmp_path: Path, service: str, require: Callable[[str], None]
) -> None:
    bus_url = MQTT_URL if service == "mqtt" else NATS_URL
    if not _reachable(bus_url):
        require(f"{service} at {bus_url}")
    env = procs.env
    env.env["PYTHONUNBUFFERED"] = "1"
    env.run("init")
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    topic = f"kb.wake-{os.getpid()}-{port}"
    procs.running["serve"] = env.serve(
        port,
        "--bus",
        bus_url,
        "--wake-topic",
        topic,
        "--poll-interval",
        "0.2",
        "--push-expiry",
        str(EXPIRY),
    )

    # The terminal enrols like any principal; the phone from the URI the operator prints.
    token = env.run("principal", "token", "service/term1").stdout.strip().splitlines()[-1]
    enrol = subprocess.run(
        [
            *KB,
            "enroll",
            "service/term1",
            "--url",
            url,
            "--ca",
            str(env.home / "ca.pem"),
            "--keyring",
            "term.keyring",
        ],
        cwd=tmp_path,
        env={**env.env, "KEYBROKER_ENROL_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert enrol.returncode == 0, enrol.stdout + enrol.stderr
    added = env.run("pushauth", "phone-add", "alice", "--url", url, "--uri-file", "alice.uri")
    assert "keybroker-push://enrol?" in added.stdout
    assert any(block in added.stdout for block in "█▀▄"), added.stdout  # the QR code
    uri = (tmp_path / "alice.uri").read_text().strip()
    device = re.search(r"principal=(device%2F[0-9a-z-]+|device/[0-9a-z-]+)", uri)
    assert device is not None
    env.run("phone", "enrol", uri, "--keyring", "phone.keyring")

    spy = Eavesdropper()
    stop_spy = asyncio.Event()
    spying = asyncio.create_task(spy.mqtt(stop_spy) if service == "mqtt" else spy.nats(stop_spy))
    await asyncio.wait_for(spy.ready.wait(), 20)

    phone_log = tmp_path / "phone.out"
    with phone_log.open("wb") as sink:
        phone = subprocess.Popen(
            [*KB, "phone", "run", "--keyring", "phone.keyring", "--bus", bus_url],
            cwd=tmp_path,
            env=env.env,
            stdin=subprocess.PIPE,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    procs.running["phone"] = phone
    assert phone.stdin is not None
    await until(lambda: "ready: listening on" in phone_log.read_text(), "the phone", procs)
    assert service in phone_log.read_text()

    def type_on_phone(line: str) -> None:
        assert phone.stdin is not None
        phone.stdin.write(line.encode() + b"\n")
        phone.stdin.flush()

    async def request_shown(count: int) -> None:
        await until(
            lambda: phone_log.read_text().count("login request") >= count,
            f"request {count} on the phone",
            procs,
        )

    numbers: list[str] = []
    # 1. The right number: approved, and the terminal checked its session token.
    login = Terminal(procs, tmp_path, "alice", 1)
    numbers.append(await login.number())
    await request_shown(1)
    shown = phone_log.read_text()
    assert "alice" in shown and "service/term1" in shown and "127.0.0.1" in shown and "ssh" in shown
    type_on_phone(numbers[-1])
    code, text = await login.result()
    assert code == 0, text
    assert "APPROVED" in text and "request binding checked" in text
    assert login.token.stat().st_mode & 0o777 == 0o600 and login.token.read_text().strip()

    # 2. A wrong number: denied (one try).
    login = Terminal(procs, tmp_path, "alice", 2)
    numbers.append(await login.number())
    await request_shown(2)
    type_on_phone(f"{(int(numbers[-1]) + 1) % 1000:03d}")
    code, text = await login.result()
    assert code == 1 and "DENIED" in text and "wrong number" in text, text
    assert not login.token.exists()

    # 3. No answer: expired at the deadline.
    login = Terminal(procs, tmp_path, "alice", 3)
    numbers.append(await login.number())
    await request_shown(3)
    code, text = await login.result()
    assert code == 1 and "EXPIRED" in text, text
    await until(lambda: "expired unanswered" in phone_log.read_text(), "phone timeout", procs)

    # 4. A fraud report: the user is locked, the next login refused, the operator sees both.
    login = Terminal(procs, tmp_path, "alice", 4)
    numbers.append(await login.number())
    await request_shown(4)
    type_on_phone("f")
    code, text = await login.result()
    assert code == 1 and "FRAUD" in text, text
    refused = Terminal(procs, tmp_path, "alice", 5)
    code, text = await refused.result()
    assert code == 2 and "is locked" in text, text
    users = env.run("pushauth", "users").stdout
    assert re.search(r"alice\s.*\syes\s", users), users
    log = env.run("pushauth", "log", "--user", "alice").stdout
    for outcome in ("APPROVED", "DENIED", "EXPIRED", "FRAUD", "LOCKED"):
        assert outcome in log, log

    stop_spy.set()
    await asyncio.wait_for(spying, 20)
    procs.terminate("phone")

    # What the eavesdropper saw: sealed notices on the phone's opaque topic, sealed answers
    # on the server's (approve, deny, fraud: the expired login had none), nothing readable.
    seen = spy.seen
    assert seen, "the eavesdropper saw nothing: it was not listening"
    ours = re.compile(r"kb[./][0-9a-f]{32}")
    by_topic: dict[str, list[bytes]] = {}
    for topic_name, payload in seen:
        if len(payload) > 300 and ours.fullmatch(topic_name):
            by_topic.setdefault(topic_name, []).append(payload)
    kinds = {topic_name: {_kind(p) for p in ps} for topic_name, ps in by_topic.items()}
    assert sorted(map(sorted, kinds.values())) == [["answer"], ["notice"]], kinds
    (notices,) = [ps for t, ps in by_topic.items() if kinds[t] == {"notice"}]
    (answers,) = [ps for t, ps in by_topic.items() if kinds[t] == {"answer"}]
    assert len(notices) >= 4 and len(answers) >= 3, (len(notices), len(answers))
    words = [b"alice", b"127.0.0.1", b"service/term1", b"term1", b"ssh", b"device/", b"phone-"]
    for topic_name, payload in seen:
        for word in words:
            assert word not in payload and word not in topic_name.encode(), (topic_name, word)
        if topic_name.startswith("kb"):
            # (Elsewhere, the server's own JSON carries digits of its own.)
            for number in numbers:
                assert number.encode() not in payload, (topic_name, number)
