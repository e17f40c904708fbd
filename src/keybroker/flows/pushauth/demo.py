"""The ``push login`` stage of ``keybroker demo``: S7 with real processes, on loopback.

Against the demo's running ``keybroker serve`` (the embedded default: no MQTT or NATS,
so the phone long-polls the broker, and says so):

* the operator registers a phone for user ``ada`` (what ``keybroker pushauth phone-add``
  does, in-process against the home) and the phone enrols from the printed
  ``keybroker-push://`` URI with ``keybroker phone enrol`` (the URI pins the broker CA);
* the terminal ``service/workstation`` enrols like any principal;
* ``keybroker phone run`` waits for requests; its keyboard is a pipe this stage types
  into — the automated user reads the number on the terminal and types it;
* ``keybroker login ada`` shows the number; the phone approves with it; the terminal
  checks the session token (server signature, this terminal, this request);
* a second login gets a wrong number typed on the phone: denied, one try.

Logs are in ``<demo workdir>/pushauth`` (kept with ``keybroker demo --keep``).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Final, Protocol

from rich.console import Console

from keybroker.broker.home import open_home
from keybroker.broker.service import Broker
from keybroker.client.principal import PrincipalClient
from keybroker.flows._demo import DemoProcesses
from keybroker.flows.pushauth.cli import PASSPHRASE_ENV
from keybroker.flows.pushauth.server import PushAuthServer, ca_fingerprint
from keybroker.pki import certificate_pem

__all__ = ["stage_pushauth"]

USER: Final = "ada"
TERMINAL: Final = "service/workstation"
PASSPHRASE: Final = "demo push keyring passphrase"  # noqa: S105 - a throwaway demo keyring
LOGIN_TIMEOUT: Final = 90.0


class DemoContext(Protocol):
    """What the stage needs of ``keybroker.cli.demo.DemoState`` (flows do not import cli)."""

    workdir: Path
    url: str
    console: Console | None


def _register(s: DemoContext) -> tuple[str, bytes, str]:
    """The phone's enrolment URI, the CA (PEM) and the terminal's enrolment token."""
    with open_home(s.workdir / "home") as home:
        broker = Broker.from_home(home)
        reg = PushAuthServer(broker).register_phone(USER, timedelta(minutes=10))
        token = broker.create_enrolment_token(TERMINAL, timedelta(minutes=10))
        return (
            reg.uri(s.url, ca_fingerprint(broker)),
            certificate_pem(broker.ca_certificate),
            token.secret,
        )


def _login(
    procs: DemoProcesses, phone: subprocess.Popen[bytes], name: str, typed: str | None
) -> tuple[int, str, str]:
    """Run ``keybroker login``; type on the phone what the user would (None: the number)."""
    login = procs.start(name, "login", USER, "--keyring", "terminal.keyring", "--application",
                        "demo shell")  # fmt: skip
    number = procs.wait_for(name, r"^NUMBER (\d+)$", "number on the terminal").group(1)
    shown = procs.log("phone").count("login request")
    procs.wait_for("phone", rf"(?s)(login request.*){{{shown}}}", "request on the phone")
    answer = number if typed is None else typed
    assert phone.stdin is not None
    phone.stdin.write(answer.encode() + b"\n")
    phone.stdin.flush()
    try:
        status = login.wait(timeout=LOGIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise procs.failure(name, "the login did not end") from None
    procs.running.pop(name, None)
    return status, number, procs.log(name)


def stage_pushauth(s: DemoContext) -> str:
    """Registered in ``keybroker demo`` as ``push login``."""
    console = s.console or Console()
    directory = s.workdir / "pushauth"
    directory.mkdir(exist_ok=True)
    procs = DemoProcesses(
        directory, {**os.environ, PASSPHRASE_ENV: PASSPHRASE, "PYTHONUNBUFFERED": "1"}
    )
    try:
        uri, ca_pem, token = _register(s)

        async def enrol_terminal() -> None:
            client = await PrincipalClient.enrol(
                s.url,
                ca_pem,
                TERMINAL,
                token,
                directory / "terminal.keyring",
                passphrase=PASSPHRASE,
            )
            await client.aclose()

        asyncio.run(enrol_terminal())
        procs.start("phone-enrol", "phone", "enrol", uri, "--keyring", "phone.keyring")
        if procs.running["phone-enrol"].wait(timeout=LOGIN_TIMEOUT) != 0:
            raise procs.failure("phone-enrol", "the phone did not enrol")
        procs.running.pop("phone-enrol")
        phone = procs.start("phone", "phone", "run", "--keyring", "phone.keyring", stdin=True)
        ready = procs.wait_for("phone", r"ready: listening on (.*)$", "phone ready").group(1)
        status, number, text = _login(procs, phone, "login-1", None)
        if status != 0 or "APPROVED" not in text:
            raise procs.failure("login-1", f"the approved login ended with status {status}")
        request = procs.log("phone").split("login request")[-1].splitlines()
        console.print(
            f"    terminal showed [bold]{number}[/bold]; the phone showed:", highlight=False
        )
        for line in request[1:5]:
            console.print(f"    {line.strip(' │╭╮╰╯─')}", highlight=False)
        wrong = f"{(int(number) + 1) % 10 ** len(number):0{len(number)}d}"
        status, _, text = _login(procs, phone, "login-2", wrong)
        if status != 1 or "DENIED" not in text:
            raise procs.failure("login-2", f"a wrong number was not denied (status {status})")
        procs.stop("phone")
    finally:
        procs.close()
    how = re.sub(r"\s*\(.*", "", ready)
    return (
        f"{USER}'s phone approved with the terminal's number over {how}; session token checked; "
        "a wrong number was denied (one try)"
    )
