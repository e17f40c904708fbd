"""``keybroker pushauth …`` (operators), ``keybroker phone …`` and ``keybroker login``.

On the **broker host** (against its home, like ``keybroker keyset …``)::

    keybroker pushauth phone-add alice --url https://broker:8443   # prints the URI and a QR code
    keybroker pushauth users                                       # phones and locks
    keybroker pushauth unlock alice                                # after a fraud report
    keybroker pushauth log [--user alice]                          # every decision, from the log
    keybroker pushauth phone-remove alice

On the **phone** (the app's stand-in, with its own encrypted keyring)::

    keybroker phone enrol 'keybroker-push://enrol?…' --keyring phone.keyring
    keybroker phone run --keyring phone.keyring [--bus mqtt://127.0.0.1:1883]

``phone run`` shows each request (user, terminal and its address, application,
time left) and reads one line: the number shown on the terminal approves
(a wrong number denies: one try), ``n`` denies, ``f`` reports fraud (the user
is locked), an empty line ignores it.

On the **terminal** (an enrolled principal, e.g. ``service/workstation-12``)::

    keybroker login alice --keyring terminal.keyring [--token-file session.token]

``login`` shows the number to type on the phone and waits. Exit status: 0
approved (the session token was checked: server signature, this terminal,
this request), 1 denied, expired or reported as fraud, 2 refused (unknown
user, locked, rate limited, or any other error).

Keyring passphrases come from ``$KEYBROKER_KEYRING_PASSPHRASE`` (or a prompt).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Awaitable, Callable

    from keybroker.broker.service import Broker
    from keybroker.flows.pushauth.messages import Challenge
    from keybroker.flows.pushauth.phone import Decision
    from keybroker.flows.pushauth.server import PushAuthServer

PASSPHRASE_ENV: Final = "KEYBROKER_KEYRING_PASSPHRASE"  # noqa: S105 - a variable name

pushauth_app = typer.Typer(
    help="Push login (S7): phones registered per user, locks, decisions (on the broker host).",
    no_args_is_help=True,
)
phone_app = typer.Typer(
    help="The phone authenticator: enrol from a push enrolment URI, then answer login requests.",
    no_args_is_help=True,
)

out = Console()
err = Console(stderr=True)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar="KEYBROKER_HOME", help="keybroker home [default: ./.keybroker]"),
]
KeyringOption = Annotated[Path, typer.Option(help="this principal's keyring")]


def _passphrase() -> str:
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        value = typer.prompt("keyring passphrase", hide_input=True)
    if len(value) < 8:
        raise typer.BadParameter("the keyring passphrase must have at least 8 characters")
    return value


@contextmanager
def _server(home: Path | None) -> Iterator[tuple[Broker, PushAuthServer]]:
    """The broker of ``home`` and its push-login server, for one operator command."""
    from keybroker.broker.home import open_home
    from keybroker.broker.service import Broker
    from keybroker.flows.pushauth.server import PushAuthServer
    from keybroker.store.paths import default_home

    with open_home(home or default_home()) as opened:
        broker = Broker.from_home(opened)
        yield broker, PushAuthServer(broker)


# -- operators ---------------------------------------------------------------------------


@pushauth_app.command("phone-add")
def phone_add(  # noqa: PLR0917 - one parameter per option
    user: Annotated[str, typer.Argument(help="the user this phone answers for")],
    url: Annotated[str, typer.Option(help="the broker URL the phone will reach")],
    ttl: Annotated[float, typer.Option(help="hours the enrolment URI stays valid")] = 24.0,
    qr: Annotated[bool, typer.Option(help="also print the URI as a QR code")] = True,
    uri_file: Annotated[
        Path | None, typer.Option(help="also write the URI to this file (0600)")
    ] = None,
    home: HomeOption = None,
) -> None:
    """Register a phone for USER and print its one-time enrolment URI."""
    from keybroker.flows.pushauth.server import ca_fingerprint

    with _server(home) as (broker, server):
        reg = server.register_phone(user, timedelta(hours=ttl))
        uri = reg.uri(url, ca_fingerprint(broker))
    if uri_file is not None:
        fd = os.open(uri_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(uri + "\n")
    out.print(f"phone [bold]{reg.device}[/bold] registered for [bold]{escape(user)}[/bold]")
    out.print(f"enrol before {reg.expires_at:%Y-%m-%d %H:%M} UTC with:")
    out.print(uri, soft_wrap=True, highlight=False)
    if qr:
        import io

        import segno

        buffer = io.StringIO()
        segno.make(uri, error="m").terminal(out=buffer, compact=True)
        out.print(buffer.getvalue(), highlight=False)
    out.print("[dim]the URI carries a one-time token: show it only to the phone's owner[/dim]")


@pushauth_app.command("phone-remove")
def phone_remove(user: str, home: HomeOption = None) -> None:
    """Forget USER's phone and revoke its principal."""
    with _server(home) as (_broker, server):
        device = server.remove_phone(user)
    out.print(f"removed {device} (revoked)")


@pushauth_app.command("users")
def users(home: HomeOption = None) -> None:
    """Users with a phone or a lock."""
    with _server(home) as (_broker, server):
        found = server.users()
    table = Table("user", "phone", "locked", "reason")
    for u in found:
        table.add_row(
            escape(u.user), u.device or "-", "yes" if u.locked else "no", escape(u.reason or "")
        )
    out.print(table)


@pushauth_app.command("unlock")
def unlock(
    user: str,
    reason: Annotated[str, typer.Option(help="why (logged)")] = "unlocked by an operator",
    home: HomeOption = None,
) -> None:
    """Unlock USER (after a fraud report was looked into)."""
    with _server(home) as (_broker, server):
        server.set_lock(user, False, reason)
    out.print(f"unlocked {escape(user)}")


@pushauth_app.command("lock")
def lock(
    user: str,
    reason: Annotated[str, typer.Option(help="why (logged)")] = "locked by an operator",
    home: HomeOption = None,
) -> None:
    """Lock USER: every push login for them is refused until unlocked."""
    with _server(home) as (_broker, server):
        server.set_lock(user, True, reason)
    out.print(f"locked {escape(user)}")


@pushauth_app.command("log")
def log(
    user: Annotated[str | None, typer.Option(help="only this user")] = None,
    home: HomeOption = None,
) -> None:
    """Every push-login decision and lock change, read from the transparency log."""
    from keybroker.broker.events import from_ms
    from keybroker.encoding import decode
    from keybroker.errors import DecodeError
    from keybroker.flows.pushauth.messages import LOG_ENTRIES, LoginDecided, UserLockChanged

    labels = tuple(LOG_ENTRIES)
    table = Table("#", "time (UTC)", "user", "what", "terminal", "reason")
    with _server(home) as (broker, _unused):
        size = broker.log.size()
        for index, entry in enumerate(broker.log.entries(0, size)):
            try:
                label, _ = decode(labels, entry)
            except DecodeError:
                continue  # another kind of entry
            event = LOG_ENTRIES[label].decode(entry)
            if user is not None and event.user != user:
                continue
            when = f"{from_ms(event.at_ms):%Y-%m-%d %H:%M:%S}"
            if isinstance(event, LoginDecided):
                what = event.outcome
                where = f"{event.terminal} ({event.terminal_address})"
            elif isinstance(event, UserLockChanged):
                what = "LOCKED" if event.locked else "UNLOCKED"
                where = ""
            else:
                what, where = "PHONE REGISTERED", event.device
            reason = getattr(event, "reason", None) or ""
            table.add_row(str(index), when, escape(event.user), what, where, escape(reason))
    out.print(table)


# -- the phone ---------------------------------------------------------------------------


@phone_app.command("enrol")
def phone_enrol(
    uri: Annotated[str, typer.Argument(help="the keybroker-push://enrol?… URI")],
    keyring: KeyringOption,
) -> None:
    """Enrol this phone from its URI (the broker CA is pinned by the URI's fingerprint)."""
    import asyncio

    from keybroker.flows.pushauth.phone import enrol_phone

    passphrase = _passphrase()

    async def run() -> str:
        client = await enrol_phone(uri, keyring, passphrase=passphrase)
        await client.aclose()
        return str(client.principal)

    device = asyncio.run(run())
    out.print(f"enrolled {device}; keyring {keyring} (0600, encrypted)")


def _keyboard(loop: asyncio.AbstractEventLoop) -> Callable[[Challenge], Awaitable[Decision]]:
    """A handler that shows each request and reads the user's one-line answer from stdin."""
    import asyncio
    import sys
    import threading
    import time

    from keybroker.flows.pushauth.messages import APPROVE, DENY, FRAUD

    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.strip())
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read_stdin, name="phone-stdin", daemon=True).start()
    one_at_a_time = asyncio.Lock()

    async def ask(challenge: Challenge) -> Decision:
        async with one_at_a_time:
            remaining = challenge.expires_at_ms / 1000 - time.time()
            if remaining <= 0:
                return None
            _show(challenge, remaining)
            try:
                line = await asyncio.wait_for(lines.get(), timeout=remaining)
            except TimeoutError:
                out.print("[yellow]request expired unanswered[/yellow]")
                return None
            if not line:
                out.print("ignored")
                return None
            if line.lower() in ("n", "no", "deny"):
                out.print("[red]denied[/red]")
                return (DENY, "")
            if line.lower() in ("f", "fraud"):
                out.print("[red]reported as fraud[/red]")
                return (FRAUD, "")
            out.print(f"approving with {escape(line)}")
            return (APPROVE, line)

    return ask


def _show(challenge: Challenge, remaining: float) -> None:
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(challenge.issued_at_ms / 1000, UTC)
    body = (
        f"user          [bold]{escape(challenge.user)}[/bold]\n"
        f"terminal      {escape(challenge.terminal)} from {escape(challenge.terminal_address)}\n"
        f"application   {escape(challenge.application)}\n"
        f"asked at      {when:%H:%M:%S} UTC, {remaining:.0f} s left\n\n"
        "type the [bold]number shown on the terminal[/bold] to approve, "
        "[bold]n[/bold] to deny, [bold]f[/bold] if you did not ask for this (fraud)"
    )
    out.print(Panel(body, title="login request", expand=False))


@phone_app.command("run")
def phone_run(
    keyring: KeyringOption,
    bus: Annotated[
        str | None,
        typer.Option(help="mqtt://… or nats://…: the notification service (default: long-poll)"),
    ] = None,
    url: Annotated[str | None, typer.Option(help="broker URL (default: the enrolled one)")] = None,
) -> None:
    """Wait for login requests and answer them from the keyboard (one line each)."""
    import asyncio
    import signal

    from keybroker.client.principal import PrincipalClient
    from keybroker.flows.pushauth.phone import Phone

    passphrase = _passphrase()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ask = _keyboard(loop)

        async with PrincipalClient.open(keyring, passphrase=passphrase, url=url) as client:
            phone = Phone(client, bus_url=bus)
            where = await phone.where()
            how = f"{where.notification} ({bus})" if bus else "the broker's long-poll"
            if bus is None and where.notification != "long-poll":
                how += f" (the broker publishes on {where.notification}: pass --bus to use it)"
            if where.notification == "long-poll":
                how += " (no notification service on the broker)"
            elif bus and where.answers_topic is not None:
                how += "; answers go back on it (over HTTPS if the broker does not take them)"
            ready = asyncio.Event()
            task = asyncio.create_task(phone.run(ask, stop, ready=ready))
            await ready.wait()
            out.print(f"{phone.device} ready: listening on {how}", highlight=False)
            await task
            out.print(
                f"stopped: {phone.stats.shown} shown, {phone.stats.answered} answered "
                f"({phone.stats.answered_on_bus} on the bus, {phone.stats.fell_back} of them "
                f"posted again over HTTPS), {phone.stats.dropped} dropped"
            )

    asyncio.run(run())


# -- the terminal ------------------------------------------------------------------------


def login_command(
    user: Annotated[str, typer.Argument(help="who is logging in")],
    keyring: KeyringOption,
    application: Annotated[str, typer.Option(help="what the session is for")] = "login",
    token_file: Annotated[
        Path | None, typer.Option(help="write the session token here (0600) when approved")
    ] = None,
    url: Annotated[str | None, typer.Option(help="broker URL (default: the enrolled one)")] = None,
) -> None:
    """Open a session for USER: approve it on USER's phone with the number shown here."""
    import asyncio
    import base64

    from keybroker.client.principal import PrincipalClient
    from keybroker.flows.pushauth.protocol import LoginState
    from keybroker.flows.pushauth.terminal import LoginResult, push_login

    passphrase = _passphrase()

    def show(number: str, expires_at: object) -> None:
        out.print(
            Panel(
                f"[bold]{' '.join(number)}[/bold]",
                title="type this number on your phone",
                subtitle=f"until {expires_at:%H:%M:%S} UTC",
                expand=False,
                padding=(1, 6),
            )
        )
        out.print(f"NUMBER {number}", highlight=False)  # one greppable line for scripts

    async def run() -> LoginResult:
        async with PrincipalClient.open(keyring, passphrase=passphrase, url=url) as client:
            return await push_login(client, user, application=application, on_number=show)

    result = asyncio.run(run())
    if result.state is not LoginState.APPROVED or result.claims is None or result.token is None:
        out.print(f"[red]{result.state.value}[/red]: {escape(result.reason or '')}")
        raise typer.Exit(1)
    claims = result.claims
    out.print(
        f"[green]APPROVED[/green]: session {claims.session_id} for {escape(claims.user)}, "
        f"token {claims.token_id} valid {(claims.expires_at_ms - claims.issued_at_ms) // 1000} s "
        "(signature, terminal and request binding checked)"
    )
    if token_file is not None:
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.urlsafe_b64encode(result.token).decode("ascii").rstrip("=") + "\n")
