"""``keybroker agent`` and ``keybroker rotation traffic send|receive``.

Heavy modules are imported inside the commands, as in :mod:`keybroker.cli.main`,
so ``keybroker --help`` stays quick. Every command stops cleanly on SIGTERM or
SIGINT (exit status 0) after writing its status or stats file one last time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    import asyncio

PASSPHRASE_ENV = "KEYBROKER_KEYRING_PASSPHRASE"  # noqa: S105 - a variable name

KeyringOption = Annotated[
    Path, typer.Option(help="this principal's keyring (made by `keybroker enroll`)")
]
PassphraseEnvOption = Annotated[
    str, typer.Option(help="environment variable holding the keyring passphrase")
]
LogLevelOption = Annotated[str, typer.Option(help="debug, info, warning or error")]

traffic_app = typer.Typer(
    help="Link traffic under a rotation keyset, counted, to show a rollout loses nothing.",
    no_args_is_help=True,
)


def _passphrase(variable: str) -> str:
    value = os.environ.get(variable)
    if value is None:
        value = typer.prompt("keyring passphrase", hide_input=True)
    if len(value) < 8:
        raise typer.BadParameter("the keyring passphrase must have at least 8 characters")
    return value


def _logging(level: str) -> None:
    import logging

    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise typer.BadParameter(f"unknown log level {level!r}")
    logging.basicConfig(
        level=numeric, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    # One line per HTTP request would drown what the agent says.
    logging.getLogger("httpx").setLevel(max(numeric, logging.WARNING))


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call inside the running loop)."""
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise typer.BadParameter(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def agent_command(  # noqa: PLR0917 - one parameter per option
    keyring: KeyringOption,
    url: Annotated[
        str | None, typer.Option(help="broker URL (default: the one enrolled with)")
    ] = None,
    sync_interval: Annotated[
        float, typer.Option(help="seconds between holdings checks (retiring keys)")
    ] = 5.0,
    wait: Annotated[float, typer.Option(help="seconds one inbox long-poll may wait")] = 30.0,
    bus: Annotated[
        str | None,
        typer.Option(help="nats://… or mqtt://…: fetch at once on the broker's wake-ups"),
    ] = None,
    wake_topic: Annotated[
        str, typer.Option(help="the servers' wake topic (`keybroker serve --wake-topic`)")
    ] = "kb.wake",
    status_file: Annotated[
        Path | None, typer.Option(help="JSON status, replaced atomically after every change")
    ] = None,
    passphrase_env: PassphraseEnvOption = PASSPHRASE_ENV,
    log_level: LogLevelOption = "info",
) -> None:
    """Run this principal's rotation agent: install and ack link keys, retire old ones."""
    import asyncio

    from keybroker.client.principal import PrincipalClient
    from keybroker.flows.rotation.agent import RotationAgent

    passphrase = _passphrase(passphrase_env)
    _logging(log_level)

    async def run() -> None:
        stop = _stop_on_signals()
        async with PrincipalClient.open(keyring, passphrase=passphrase, url=url) as client:
            agent = RotationAgent(
                client,
                wait=wait,
                sync_interval=sync_interval,
                status_file=status_file,
                bus_url=bus,
                wake_topic=wake_topic,
            )
            await agent.run(stop)

    asyncio.run(run())


@traffic_app.command("send")
def traffic_send(  # noqa: PLR0917 - one parameter per option
    keyring: KeyringOption,
    keyset: Annotated[str, typer.Option(help="the link keyset, e.g. rotation/up1-a/fra1")],
    connect: Annotated[str, typer.Option(help="the receiver's HOST:PORT")],
    rate: Annotated[float, typer.Option(help="messages per second")] = 50.0,
    size: Annotated[int, typer.Option(help="plaintext bytes per message")] = 64,
    count: Annotated[int, typer.Option(help="stop after this many messages (0: never)")] = 0,
    stats: Annotated[
        Path | None, typer.Option(help="JSON counters, replaced atomically every 0.5 s")
    ] = None,
    passphrase_env: PassphraseEnvOption = PASSPHRASE_ENV,
    log_level: LogLevelOption = "info",
) -> None:
    """Send to a downstream site under the local primary of the link keyset (see traffic.py)."""
    import asyncio

    from keybroker.client.keyring import KekSource
    from keybroker.flows.rotation.traffic import SenderConfig, run_sender

    passphrase = _passphrase(passphrase_env)
    host, port = _address(connect)
    _logging(log_level)
    config = SenderConfig(
        keyring=keyring,
        source=KekSource(passphrase=passphrase),
        keyset=keyset,
        host=host,
        port=port,
        rate=rate,
        size=size,
        count=count,
        stats=stats,
    )

    async def run() -> None:
        await run_sender(config, _stop_on_signals())

    try:
        asyncio.run(run())
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@traffic_app.command("receive")
def traffic_receive(  # noqa: PLR0917 - one parameter per option
    keyring: KeyringOption,
    keyset: Annotated[str, typer.Option(help="the link keyset, e.g. rotation/up1-a/fra1")],
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on (port 0: any)")] = (
        "127.0.0.1:0"
    ),
    stats: Annotated[
        Path | None, typer.Option(help="JSON counters, replaced atomically every 0.5 s")
    ] = None,
    passphrase_env: PassphraseEnvOption = PASSPHRASE_ENV,
    log_level: LogLevelOption = "info",
) -> None:
    """Receive from an upstream node, decrypting with any installed version, and count."""
    import asyncio

    from keybroker.client.keyring import KekSource
    from keybroker.flows.rotation.traffic import ReceiverConfig, run_receiver

    passphrase = _passphrase(passphrase_env)
    host, port = _address(listen)
    _logging(log_level)
    config = ReceiverConfig(
        keyring=keyring,
        source=KekSource(passphrase=passphrase),
        keyset=keyset,
        host=host,
        port=port,
        stats=stats,
    )

    def listening(bound_host: str, bound_port: int) -> None:
        typer.echo(f"listening on {bound_host}:{bound_port}", err=True)

    async def run() -> None:
        await run_receiver(config, _stop_on_signals(), listening=listening)

    asyncio.run(run())
