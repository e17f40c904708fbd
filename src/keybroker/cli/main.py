"""The ``keybroker`` command line. Each flow adds one command group."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from keybroker import __version__
from keybroker.cli import operator
from keybroker.errors import KeybrokerError
from keybroker.store.engine import default_home

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
    with init_home(target, db_url=db, root_key=root_key) as opened:
        head = opened.log.tree_head()
        typer.echo(f"initialised {target}")
        typer.echo(f"  root key   {opened.root_key.kek_id}")
        typer.echo(f"  database   {opened.store!r}")
        typer.echo(f"  CA         {opened.ca.certificate.subject.rfc4514_string()}")
        typer.echo(f"  log        size {head.tree_size}, root {head.root_hash.hex()[:16]}…")


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


def main() -> None:
    try:
        app()
    except KeybrokerError as exc:
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
