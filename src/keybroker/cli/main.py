"""The ``keybroker`` command line. Each flow adds one command group."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from keybroker import __version__
from keybroker.cli import operator
from keybroker.errors import KeybrokerError
from keybroker.flows.keyless.cli import keyless_app
from keybroker.flows.keyless.edge_cli import edge_command
from keybroker.flows.keyless.keyserver_cli import keyserver_command
from keybroker.flows.pairing.cli import pair_app
from keybroker.flows.pushauth.cli import login_command, phone_app, pushauth_app
from keybroker.flows.rotation.agent_cli import agent_command
from keybroker.flows.rotation.cli import rotation_app
from keybroker.store.paths import default_home

app = typer.Typer(
    name="keybroker",
    help="A trusted party that distributes keys, and the protocols that use them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar="KEYBROKER_HOME", help="keybroker home [default: ./.keybroker]"),
]


@app.command()
def version() -> None:
    """Print the keybroker version."""
    typer.echo(__version__)


@app.command()
def init(
    home: HomeOption = None,
    db: Annotated[
        str | None,
        typer.Option(help="database URL, e.g. postgresql://user@host/db [default: SQLite in home]"),
    ] = None,
    root_key: Annotated[
        str | None,
        typer.Option(
            "--root-key",
            help="file:PATH (default file:root.key) or pkcs11:module=…;token=…;key=…;pin-env=VAR",
        ),
    ] = None,
) -> None:
    """Create a keybroker home: root key, database, CA and transparency-log key."""
    from keybroker.broker.home import init_home

    target = home or default_home()
    from keybroker.cli.credentials import write_admin_token

    with init_home(target, db_url=db, root_key=root_key) as opened:
        head = opened.log.tree_head()
        token_file = write_admin_token(opened)
        typer.echo(f"initialised {target}")
        typer.echo(f"  root key   {opened.root_key.kek_id}")
        typer.echo(f"  database   {opened.store!r}")
        typer.echo(f"  CA         {opened.ca.certificate.subject.rfc4514_string()}")
        typer.echo(f"  log        size {head.tree_size}, root {head.root_hash.hex()[:16]}…")
        typer.echo(f"  admin      token in {token_file} (0600); move it off this host if you like")


@app.command()
def serve(
    home: HomeOption = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8443,
    name: Annotated[
        list[str] | None,
        typer.Option(help="extra DNS name or IP for the server certificate (repeatable)"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    bus: Annotated[
        str | None,
        typer.Option(help="nats://… or mqtt://…: wake long-polls on every replica at once"),
    ] = None,
    wake_topic: Annotated[str, typer.Option(help="bus topic replicas wake each other on")] = (
        "kb.wake"
    ),
    poll_interval: Annotated[
        float, typer.Option(help="seconds between database looks of a waiting long-poll")
    ] = 1.0,
    rotation_interval: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="seconds between steps of the rollout driver in this process (0: off)",
        ),
    ] = 1.0,
    push_expiry: Annotated[
        float, typer.Option(min=1.0, max=60.0, help="seconds a push-login challenge stays open")
    ] = 60.0,
    push_rate_limit: Annotated[
        int, typer.Option(min=1, help="push logins allowed per user per --push-rate-window")
    ] = 10,
    push_rate_window: Annotated[
        float, typer.Option(min=1.0, help="seconds of the per-user push-login rate limit")
    ] = 60.0,
    push_digits: Annotated[
        int, typer.Option(min=2, max=6, help="digits of the number shown on the terminal")
    ] = 3,
    push_lock_on_fraud: Annotated[
        bool, typer.Option(help="lock a user whose phone reports a login as fraud")
    ] = True,
) -> None:
    """Serve the HTTPS API (server certificate issued by the broker CA at start)."""
    from datetime import timedelta

    from keybroker.cli.serve import serve as run_server
    from keybroker.flows.pushauth.protocol import PushPolicy

    run_server(
        home or default_home(),
        host=host,
        port=port,
        names=["localhost", "127.0.0.1", *(name or [])],
        log_level=log_level,
        bus_url=bus,
        wake_topic=wake_topic,
        poll_interval=poll_interval,
        rotation_interval=rotation_interval,
        push_policy=PushPolicy(
            expiry=timedelta(seconds=push_expiry),
            number_digits=push_digits,
            rate_limit=push_rate_limit,
            rate_window=timedelta(seconds=push_rate_window),
            lock_on_fraud=push_lock_on_fraud,
        ),
    )


@app.command()
def enroll(
    principal: Annotated[str, typer.Argument(help="KIND/NAME this principal enrols as")],
    url: Annotated[str, typer.Option(help="broker URL, e.g. https://broker:8443")],
    ca: Annotated[Path, typer.Option(help="the broker CA certificate (PEM) from the operator")],
    token: Annotated[str, typer.Option(envvar="KEYBROKER_ENROL_TOKEN", help="enrolment token")],
    keyring: Annotated[Path, typer.Option(help="where to keep this principal's keys")],
    passphrase_env: Annotated[
        str, typer.Option(help="environment variable holding the keyring passphrase")
    ] = "KEYBROKER_KEYRING_PASSPHRASE",  # noqa: S107 - a variable name
    algorithm: Annotated[str, typer.Option(help="identity key: ed25519 or p256")] = "ed25519",
) -> None:
    """Enrol this machine as a principal: make its keys, get its certificate."""
    import asyncio

    from keybroker.client.principal import PrincipalClient

    passphrase = _passphrase(passphrase_env)
    if algorithm not in ("ed25519", "p256"):
        raise typer.BadParameter("algorithm is ed25519 or p256")

    async def run() -> None:
        client = await PrincipalClient.enrol(
            url,
            ca.read_bytes(),
            principal,
            token,
            keyring,
            passphrase=passphrase,
            identity_algorithm="ed25519" if algorithm == "ed25519" else "p256",
        )
        await client.aclose()

    asyncio.run(run())
    typer.echo(f"enrolled {principal}; keyring {keyring} (0600, encrypted)")


@app.command()
def receive(
    keyring: Annotated[Path, typer.Option(help="this principal's keyring")],
    wait: Annotated[float, typer.Option(help="seconds to wait for a delivery")] = 0,
    url: Annotated[str | None, typer.Option(help="broker URL (default: the enrolled one)")] = None,
    passphrase_env: Annotated[
        str, typer.Option(help="environment variable holding the keyring passphrase")
    ] = "KEYBROKER_KEYRING_PASSPHRASE",  # noqa: S107 - a variable name
) -> None:
    """Fetch this principal's deliveries, open them into the keyring and ack each."""
    import asyncio

    from keybroker.client.principal import PrincipalClient

    passphrase = _passphrase(passphrase_env)

    async def run() -> list[str]:
        async with PrincipalClient.open(keyring, passphrase=passphrase, url=url) as client:
            acked = await client.receive(wait=wait)
            return [f"{d.keyset} v{d.version}: {d.state}" for d in acked]

    done = asyncio.run(run())
    for line in done:
        typer.echo(line)
    if not done:
        typer.echo("no deliveries")


def _passphrase(variable: str) -> str:
    value = os.environ.get(variable)
    if value is None:
        value = typer.prompt("keyring passphrase", hide_input=True)
    if len(value) < 8:
        raise typer.BadParameter("the keyring passphrase must have at least 8 characters")
    return value


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="keep the demo's home directory")] = False,
) -> None:
    """Run every built stage end to end in a throwaway home and show what each proved."""
    from keybroker.cli.demo import run_demo

    ok = run_demo(keep=keep)
    raise typer.Exit(0 if ok else 1)


app.add_typer(operator.principal_app, name="principal")
app.add_typer(operator.keyset_app, name="keyset")
app.add_typer(operator.grant_app, name="grant")
app.add_typer(operator.delivery_app, name="delivery")
app.add_typer(operator.log_app, name="log")
app.command("agent")(agent_command)
app.command("edge")(edge_command)
app.command("keyserver")(keyserver_command)
app.add_typer(rotation_app, name="rotation")
app.add_typer(keyless_app, name="keyless")
app.add_typer(pushauth_app, name="pushauth")
app.add_typer(pair_app, name="pair")
app.add_typer(phone_app, name="phone")
app.command("login")(login_command)


def main() -> None:
    try:
        app()
    except KeybrokerError as exc:
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
