"""``keybroker keyless …``: service TLS keys on the broker, granted to edges, held by key servers.

These are operator commands that run **on a broker host**, against its home
(``--home``, ``$KEYBROKER_HOME``), like ``keybroker keyset …``: they open the
home's database and root key directly, so a service's private key is read from
its file and wrapped under the root key in this process, and never crosses the
network on its way to the broker. They work with or without ``keybroker serve``
running and with any number of replicas sharing the database; every change is
logged like one made through the API.

::

    keybroker keyless upload www --key www.key --chain www.pem [--allow-decrypt]
    keybroker keyless grant www --edge node/edge1
    keybroker keyless hold www --keyserver service/ks1
    keybroker keyless list
    keybroker keyless revoke www --edge node/edge1
    keybroker keyless revoke www --keyserver service/ks1

One command runs on an **edge's** host instead, with the edge's own keyring:
``keybroker keyless tls-files --keyring edge1.keyring --out tls`` writes the
edge principal's enrolment certificate, its identity key (0600) and the broker
CA, the three files of ``keybroker edge``'s ``[keyserver]`` section.

A refusal (weak key, unknown principal, nothing to revoke …) prints
``error: …`` on stderr and exits with status 2, as every ``keybroker`` command.
Heavy modules are imported inside the commands so ``keybroker --help`` stays quick.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from keybroker.errors import KeybrokerError

if TYPE_CHECKING:
    from keybroker.flows.keyless.service_keys import ServiceKeyInfo, ServiceKeys

keyless_app = typer.Typer(
    help="Keyless TLS (S5): service keys on the broker, granted to edges, held by key servers.",
    no_args_is_help=True,
)

out = Console()
err = Console(stderr=True)

#: Exit status of a refused command (as ``keybroker``'s own).
EXIT_REFUSED: Final = 2
_DURATION: Final = re.compile(r"^(\d+)([smhd])$")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar="KEYBROKER_HOME", help="keybroker home [default: ./.keybroker]"),
]
ServiceArgument = Annotated[
    str, typer.Argument(help="service name, e.g. www.example.com", show_default=False)
]
TtlOption = Annotated[
    str, typer.Option("--delivery-ttl", help="how long a key server has to pick a key up")
]


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``7d``."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 15m, 1h or 7d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@contextmanager
def _service_keys(home: Path | None) -> Iterator[ServiceKeys]:
    """The keyless operations on the home's broker; a refusal becomes ``error: …``, exit 2."""
    from keybroker.broker.home import open_home
    from keybroker.broker.service import Broker
    from keybroker.flows.keyless.service_keys import ServiceKeys
    from keybroker.store.paths import default_home

    try:
        with open_home(home or default_home()) as opened:
            yield ServiceKeys(Broker.from_home(opened))
    except KeybrokerError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(EXIT_REFUSED) from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        err.print(f"[red]error:[/red] cannot read the {what} {escape(str(path))}: {exc.strerror}")
        raise typer.Exit(EXIT_REFUSED) from None


def _policy(allow_decrypt: bool) -> str:
    return "sign, decrypt" if allow_decrypt else "sign"


# -- commands ------------------------------------------------------------------------------


@keyless_app.command("upload")
def upload(  # noqa: PLR0917 - one parameter per option
    service: ServiceArgument,
    key: Annotated[
        Path, typer.Option(help="the service's TLS private key (PEM or DER)", show_default=False)
    ],
    allow_decrypt: Annotated[
        bool,
        typer.Option(
            "--allow-decrypt",
            help="let key servers do RSA decryption with it (TLS 1.2 RSA key exchange)",
        ),
    ] = False,
    chain: Annotated[
        Path | None,
        typer.Option(help="its certificate chain (PEM, leaf first): checked against the key"),
    ] = None,
    password_env: Annotated[
        str | None,
        typer.Option(help="environment variable holding the key file's password, if any"),
    ] = None,
    delivery_ttl: TtlOption = "1d",
    home: HomeOption = None,
) -> None:
    """Upload a service's TLS private key: it becomes the primary of keyless/SERVICE.

    Key servers holding the service's keys get the new key delivered. Uploading a
    key again with the other --allow-decrypt setting changes its policy.
    """
    ttl = parse_duration(delivery_ttl)
    password = None
    if password_env is not None:
        value = os.environ.get(password_env)
        if value is None:
            raise typer.BadParameter(f"${password_env} is not set", param_hint="--password-env")
        password = value.encode("utf-8")
    key_bytes = _read(key, "key file")
    chain_bytes = None if chain is None else _read(chain, "certificate chain")
    with _service_keys(home) as keyless:
        done = keyless.upload(
            service,
            key_bytes,
            allow_decrypt=allow_decrypt,
            chain=chain_bytes,
            password=password,
            delivery_ttl=ttl,
        )
    del key_bytes
    v = done.version
    made = "created" if done.created else "updated"
    out.print(f"{made} {done.keyset}: version {v.version} is {v.state}", highlight=False)
    out.print(f"  key      {v.key_type}, SKI {(v.ski or b'').hex()}", highlight=False)
    out.print(f"  policy   {_policy(v.allow_decrypt)}", highlight=False)
    if done.certificate_sha256 is not None:
        out.print(f"  chain    leaf SHA-256 {done.certificate_sha256.hex()}", highlight=False)
    if done.replaced:
        replaced = ", ".join(f"v{n}" for n in done.replaced)
        out.print(f"  replaces {replaced} (same key, other policy: disabled)", highlight=False)
    servers = ", ".join(str(p) for p in done.delivered_to) or "none yet"
    out.print(f"  sent to  {servers}", highlight=False)


@keyless_app.command("grant")
def grant(
    service: ServiceArgument,
    edge: Annotated[
        list[str],
        typer.Option(help="edge principal, e.g. node/edge1 (repeatable)", show_default=False),
    ],
    home: HomeOption = None,
) -> None:
    """Let edges use the service's keys (a `use` grant on keyless/SERVICE)."""
    with _service_keys(home) as keyless:
        granted = [keyless.grant_edge(service, who) for who in edge]
    for g in granted:
        out.print(f"{g.principal} may use {g.keyset}", highlight=False)


@keyless_app.command("hold")
def hold(
    service: ServiceArgument,
    keyserver: Annotated[
        list[str],
        typer.Option(
            help="key server principal, e.g. service/ks1 (repeatable)", show_default=False
        ),
    ],
    delivery_ttl: TtlOption = "1d",
    home: HomeOption = None,
) -> None:
    """Let key servers hold the service's keys, and deliver them (sealed to each)."""
    ttl = parse_duration(delivery_ttl)
    with _service_keys(home) as keyless:
        held = [keyless.hold(service, who, delivery_ttl=ttl) for who in keyserver]
    for h in held:
        sent = ", ".join(f"v{version}" for version, _ in h.deliveries) or "nothing new"
        out.print(f"{h.grant.principal} holds {h.grant.keyset}; delivering {sent}", highlight=False)


@keyless_app.command("revoke")
def revoke(
    service: ServiceArgument,
    edge: Annotated[
        list[str] | None, typer.Option(help="edge principal whose use grant ends (repeatable)")
    ] = None,
    keyserver: Annotated[
        list[str] | None,
        typer.Option(help="key server principal whose hold (and use) grant ends (repeatable)"),
    ] = None,
    home: HomeOption = None,
) -> None:
    """End edges' use of the service's keys, or key servers' holding of them.

    Takes effect on a key server at its next reload (it re-reads the grants).
    """
    if not edge and not keyserver:
        raise typer.BadParameter("name at least one --edge or --keyserver")
    lines: list[str] = []
    with _service_keys(home) as keyless:
        for who in edge or ():
            g = keyless.revoke_edge(service, who)
            lines.append(f"{g.principal} may no longer use {g.keyset}")
        for who in keyserver or ():
            for g in keyless.release(service, who):
                lines.append(f"{g.principal}: {g.mode.value} grant on {g.keyset} revoked")
    for line in lines:
        out.print(line, highlight=False)


@keyless_app.command("list")
def list_keys(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document instead")] = False,
    home: HomeOption = None,
) -> None:
    """Every service's served keys (primary and enabled), their policy, edges and key servers."""
    with _service_keys(home) as keyless:
        services = keyless.list_services()
    if as_json:
        json.dump([_document(s) for s in services], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if not services:
        out.print("no keyless services yet: keybroker keyless upload SERVICE --key FILE")
        return
    # An SKI is copied into configurations: folded onto more lines rather than cut short.
    ski_column = Column("SKI", overflow="fold")
    table = Table("service", "version", ski_column, "key type", "policy", "edges", "key servers")
    for info in services:
        edges = "\n".join(_who(p, status) for p, status in info.edges) or "—"
        served = info.served or (None,)
        for v in served:
            servers = "\n".join(
                _who(k.principal, k.status)
                + ("" if v is None else " ✓" if v.version in k.acked else " (awaiting)")
                for k in info.key_servers
            )
            table.add_row(
                info.service,
                "—" if v is None else f"v{v.version} {v.state}",
                "—" if v is None or v.ski is None else v.ski.hex(),
                "—" if v is None else v.key_type or v.template,
                "—" if v is None else _policy(v.allow_decrypt),
                edges,
                servers or "—",
            )
    out.print(table)
    out.print("✓: the key server acknowledged that version (proof of possession)")


@keyless_app.command("tls-files")
def tls_files(
    keyring: Annotated[
        Path,
        typer.Option(
            help="the edge's keyring (`keybroker enroll node/NAME …`)", show_default=False
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option("--out", help="directory for the files (made 0700 if missing)"),
    ],
    passphrase_env: Annotated[
        str, typer.Option(help="environment variable holding the keyring passphrase")
    ] = "KEYBROKER_KEYRING_PASSPHRASE",  # noqa: S107 - a variable name
) -> None:
    """On an edge: write its client certificate, identity key (0600) and the broker CA.

    These are the cert, key and ca of `keybroker edge`'s [keyserver] section: the edge
    proves to key servers that it is this principal. Run it again after re-enrolling.
    """
    from keybroker.flows.keyless.brokered import client_tls_files

    passphrase = os.environ.get(passphrase_env)
    if not passphrase:
        raise typer.BadParameter(f"${passphrase_env} is not set", param_hint="--passphrase-env")
    try:
        written = client_tls_files(keyring, passphrase, directory=out_dir.resolve())
    except KeybrokerError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(EXIT_REFUSED) from None
    except OSError as exc:
        err.print(f"[red]error:[/red] cannot write to {escape(str(out_dir))}: {exc.strerror}")
        raise typer.Exit(EXIT_REFUSED) from None
    until = f"{written.not_after:%Y-%m-%d %H:%M} UTC"
    out.print(f"wrote the mutual-TLS files of {written.principal}:", highlight=False)
    out.print(f"  cert  {written.cert}  (its certificate, until {until})", highlight=False)
    out.print(f"  key   {written.key}  (its identity key, mode 0600)", highlight=False)
    out.print(f"  ca    {written.ca}  (the broker CA)", highlight=False)
    out.print("for the edge's configuration:", highlight=False)
    out.print(
        escape(f'[keyserver]\nca = "{written.ca}"\ncert = "{written.cert}"\nkey = "{written.key}"'),
        highlight=False,
    )


def _who(principal: Any, status: str) -> str:
    return str(principal) if status == "active" else f"{principal} ({status})"


def _document(info: ServiceKeyInfo) -> dict[str, Any]:
    return {
        "service": info.service,
        "keyset": info.keyset,
        "keys": [
            {
                "version": v.version,
                "key_id": v.key_id,
                "state": v.state,
                "template": v.template,
                "key_type": v.key_type,
                "ski": None if v.ski is None else v.ski.hex(),
                "allow_decrypt": v.allow_decrypt,
            }
            for v in info.versions
        ],
        "edges": [{"principal": str(p), "status": s} for p, s in info.edges],
        "key_servers": [
            {"principal": str(k.principal), "status": k.status, "acked": list(k.acked)}
            for k in info.key_servers
        ],
    }
