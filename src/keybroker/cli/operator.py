"""Operator commands that run on a broker host, against its home (``--home``).

They open the home's database and root key directly, so they work with or
without ``keybroker serve`` running, and with any number of replicas sharing
the database. Every change they make is logged like one made through the API.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from keybroker.errors import ConfigurationError
from keybroker.keys import TEMPLATES

if TYPE_CHECKING:
    # The broker (SQLAlchemy, Alembic) is imported by the commands that use it, so that
    # every `keybroker` process (agents, phones, edges) does not pay for it at start.
    from keybroker.broker.service import Broker
    from keybroker.log.sth import SignedTreeHead

out = Console()

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar="KEYBROKER_HOME", help="keybroker home [default: ./.keybroker]"),
]

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``7d``."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 15m, 1h or 7d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@contextmanager
def broker_for(home: Path | None) -> Iterator[Broker]:
    from keybroker.broker.home import open_home
    from keybroker.broker.service import Broker
    from keybroker.store.paths import default_home

    with open_home(home or default_home()) as opened:
        yield Broker.from_home(opened)


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


principal_app = typer.Typer(help="Enrolment tokens and principals.", no_args_is_help=True)
keyset_app = typer.Typer(help="Keysets and their versions.", no_args_is_help=True)
grant_app = typer.Typer(help="Who may use or hold which keyset.", no_args_is_help=True)
delivery_app = typer.Typer(help="Key versions sealed to principals.", no_args_is_help=True)


# -- principals ---------------------------------------------------------------------


@principal_app.command("token")
def principal_token(
    principal: Annotated[str, typer.Argument(help="KIND/NAME, e.g. site/fra1")],
    ttl: Annotated[str, typer.Option(help="how long the token is valid")] = "1h",
    dns: Annotated[
        list[str] | None,
        typer.Option(help="DNS name for a service's TLS server certificate (repeatable)"),
    ] = None,
    home: HomeOption = None,
) -> None:
    """Create a one-time enrolment token (shown once, never stored in clear)."""
    with broker_for(home) as broker:
        token = broker.create_enrolment_token(principal, parse_duration(ttl), dns_names=dns or ())
    out.print(f"enrolment token for {token.principal}, valid until {_when(token.expires_at)}:")
    typer.echo(token.secret)


@principal_app.command("list")
def principal_list(home: HomeOption = None) -> None:
    """List principals."""
    with broker_for(home) as broker:
        rows = broker.list_principals()
    table = Table("principal", "status", "serial", "certificate until", "enrolled")
    for p in rows:
        table.add_row(
            str(p.principal),
            p.status,
            p.serial_number or "",
            _when(p.certificate_not_after),
            _when(p.created_at),
        )
    out.print(table)


@principal_app.command("show")
def principal_show(principal: str, home: HomeOption = None) -> None:
    """Show one principal."""
    with broker_for(home) as broker:
        p = broker.show_principal(principal)
    out.print(f"principal     {p.principal}")
    out.print(f"status        {p.status}")
    out.print(f"serial        {p.serial_number or ''}")
    out.print(f"certificate   {(p.certificate_sha256 or b'').hex()}")
    out.print(f"valid until   {_when(p.certificate_not_after)}")
    out.print(f"sealing key   {p.hpke_template or ''} {(p.hpke_public_key or b'').hex()}")


@principal_app.command("revoke")
def principal_revoke(principal: str, reason: str = "unspecified", home: HomeOption = None) -> None:
    """Revoke a principal and its certificates (final)."""
    with broker_for(home) as broker:
        p = broker.revoke_principal(principal, reason=reason)
    out.print(f"{p.principal} is {p.status}")


# -- keysets ------------------------------------------------------------------------


@keyset_app.command("create")
def keyset_create(
    name: str,
    template: Annotated[
        str, typer.Option(help="one of: " + ", ".join(sorted(TEMPLATES)))
    ] = "AES256_GCM",
    home: HomeOption = None,
) -> None:
    """Create a keyset whose version 1 is primary."""
    with broker_for(home) as broker:
        info = broker.create_keyset(name, template)
    out.print(f"created {name}: version {info.version} ({info.template.name}) is {info.state}")


@keyset_app.command("rotate")
def keyset_rotate(name: str, home: HomeOption = None) -> None:
    """Add a new pending version (promote it once every holder has it)."""
    with broker_for(home) as broker:
        info = broker.rotate_keyset(name)
    out.print(f"{name}: version {info.version} added, {info.state}")


def _move(action: str, name: str, version: int, home: Path | None) -> None:
    with broker_for(home) as broker:
        step = {
            "promote": broker.promote_version,
            "enable": broker.enable_version,
            "disable": broker.disable_version,
            "destroy": broker.destroy_version,
        }[action]
        info = step(name, version)
    out.print(f"{name}: version {info.version} is {info.state}")


@keyset_app.command("promote")
def keyset_promote(name: str, version: int, home: HomeOption = None) -> None:
    """Make a version primary (the old primary stays enabled)."""
    _move("promote", name, version, home)


@keyset_app.command("enable")
def keyset_enable(name: str, version: int, home: HomeOption = None) -> None:
    """Re-enable a disabled version."""
    _move("enable", name, version, home)


@keyset_app.command("disable")
def keyset_disable(name: str, version: int, home: HomeOption = None) -> None:
    """Disable a version: its ciphertexts no longer decrypt."""
    _move("disable", name, version, home)


@keyset_app.command("destroy")
def keyset_destroy(name: str, version: int, home: HomeOption = None) -> None:
    """Destroy a disabled version's material (irreversible)."""
    _move("destroy", name, version, home)


@keyset_app.command("list")
def keyset_list(home: HomeOption = None) -> None:
    """List keysets."""
    with broker_for(home) as broker:
        rows = broker.list_keysets()
    table = Table("keyset", "purpose", "template", "primary", "versions")
    for k in rows:
        states = ", ".join(f"v{v.version}:{v.state}" for v in k.versions)
        table.add_row(k.name, k.purpose, k.template, str(k.primary or ""), states)
    out.print(table)


@keyset_app.command("show")
def keyset_show(name: str, home: HomeOption = None) -> None:
    """Show a keyset's versions (ids and states; never key material)."""
    with broker_for(home) as broker:
        k = broker.show_keyset(name)
    table = Table("version", "key id", "template", "state", "since")
    for v in k.versions:
        table.add_row(
            str(v.version), f"{v.key_id:#010x}", v.template, v.state, _when(v.state_changed_at)
        )
    out.print(f"{k.name} ({k.purpose}), revision {k.revision}")
    out.print(table)


# -- grants -------------------------------------------------------------------------


@grant_app.command("add")
def grant_add(
    principal: str,
    keyset: str,
    mode: Annotated[str, typer.Option(help="use or hold")] = "hold",
    home: HomeOption = None,
) -> None:
    """Let a principal use or hold a keyset."""
    with broker_for(home) as broker:
        g = broker.grant(principal, keyset, mode)
    out.print(f"{g.principal} may {g.mode} {g.keyset} (grant {g.grant_id})")


@grant_app.command("revoke")
def grant_revoke(
    principal: str,
    keyset: str,
    mode: Annotated[str, typer.Option(help="use or hold")] = "hold",
    home: HomeOption = None,
) -> None:
    """Revoke a grant."""
    with broker_for(home) as broker:
        g = broker.revoke_grant(principal, keyset, mode)
    out.print(f"{g.principal} may no longer {g.mode} {g.keyset}")


@grant_app.command("list")
def grant_list(
    principal: str | None = None, keyset: str | None = None, home: HomeOption = None
) -> None:
    """List active grants."""
    with broker_for(home) as broker:
        rows = broker.list_grants(principal=principal, keyset=keyset)
    table = Table("principal", "keyset", "mode", "since", "grant")
    for g in rows:
        table.add_row(str(g.principal), g.keyset, str(g.mode), _when(g.created_at), g.grant_id)
    out.print(table)


# -- deliveries ---------------------------------------------------------------------


@delivery_app.command("create")
def delivery_create(
    keyset: str,
    principal: str,
    version: Annotated[int | None, typer.Option(help="default: the primary")] = None,
    ttl: Annotated[str, typer.Option(help="time the principal has to ack")] = "1h",
    home: HomeOption = None,
) -> None:
    """Seal a key version to a principal that holds the keyset."""
    with broker_for(home) as broker:
        if version is None:
            version = broker.show_keyset(keyset).primary
            if version is None:
                raise ConfigurationError(f"{keyset} has no primary version; pass --version")
        envelope = broker.deliver(keyset, version, principal, parse_duration(ttl))
    out.print(f"delivery {envelope.delivery_id}: {keyset} v{version} sealed to {principal}")


@delivery_app.command("list")
def delivery_list(
    principal: str | None = None,
    keyset: str | None = None,
    state: str | None = None,
    home: HomeOption = None,
) -> None:
    """List deliveries and their states."""
    with broker_for(home) as broker:
        broker.expire_overdue()
        rows = broker.list_deliveries(principal=principal, keyset=keyset, state=state)
    table = Table("delivery", "principal", "keyset", "version", "state", "reason")
    for d in rows:
        table.add_row(
            d.delivery_id,
            str(d.principal),
            d.keyset,
            str(d.version),
            d.state,
            d.failure_reason or "",
        )
    out.print(table)


# -- the transparency log -----------------------------------------------------------

log_app = typer.Typer(help="The transparency log.", no_args_is_help=True)


@log_app.command("verify")
def log_verify(
    full: Annotated[
        bool, typer.Option(help="also recompute the root from every entry (local mode; slow)")
    ] = False,
    url: Annotated[
        str | None,
        typer.Option(help="check a broker over its API, like a CT monitor, instead of the home"),
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="broker CA (PEM) for --url")] = None,
    admin_token_file: Annotated[
        Path | None, typer.Option(help="operator token for --url [default: <home>/admin.token]")
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option(help="where the last verified head is kept [default: in the home]"),
    ] = None,
    home: HomeOption = None,
) -> None:
    """Check the latest signed tree head, and that it extends the last one seen here.

    With ``--url`` the check runs over the API and pins the log key seen the first
    time: a broker that changes its log key or rewrites history is reported.
    """
    from keybroker.log.sth import SignedTreeHead
    from keybroker.store.paths import default_home

    target = home or default_home()
    seen_file = state or target / ("log-head.seen" if url is None else "log-monitor.seen")
    previous = SignedTreeHead.decode(seen_file.read_bytes()) if seen_file.exists() else None
    if url is None:
        with broker_for(home) as broker:
            head = broker.verify_log(previous=previous, full=full)
    else:
        head = _verify_remote(url, ca or target / "ca.pem", admin_token_file, target, previous)
    tmp = seen_file.with_suffix(".tmp")
    tmp.write_bytes(head.encode())
    tmp.replace(seen_file)
    since = "" if previous is None else f", consistent with size {previous.tree_size} seen before"
    out.print(f"log ok: {head.tree_size} entries, root {head.root_hash.hex()[:16]}…{since}")


def _verify_remote(
    url: str,
    ca: Path,
    token_file: Path | None,
    home: Path,
    previous: SignedTreeHead | None,
) -> SignedTreeHead:
    import asyncio

    from keybroker.cli.credentials import read_admin_token
    from keybroker.client.operator import OperatorClient

    token = token_file.read_text().strip() if token_file is not None else read_admin_token(home)
    pin_file = home / "log-monitor.key"
    pinned = pin_file.read_bytes() if pin_file.exists() else None

    async def run() -> tuple[SignedTreeHead, bytes]:
        async with OperatorClient(url, token, ca.read_bytes()) as op:
            # With a pinned key, a head signed by any other key fails to verify.
            key = pinned if pinned is not None else await op.log_public_key()
            log = await op.log(public_key=key)
            return await log.check(previous), key

    head, key = asyncio.run(run())
    if pinned is None:
        pin_file.write_bytes(key)
    return head
