"""``keybroker edge``: run the keyless TLS edge (see :mod:`.edge` and ``docs/keyless-edge.md``).

The command loads the configuration, binds, forks the workers and prints exactly one line,
``listening on HOST:PORT``, once the socket accepts connections; everything else goes to the
log (stderr). SIGTERM or SIGINT stops it cleanly (exit status 0). A configuration it refuses
exits with status 2 and one ``error:`` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["edge_command"]


def _logging(level: str) -> None:
    import logging

    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise typer.BadParameter(f"unknown log level {level!r}")
    logging.basicConfig(
        level=numeric,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        force=True,
    )


def edge_command(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            help="the edge's TOML configuration (sections edge, keyserver and service)",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, help="worker processes (default: the workers setting of the edge section)"
        ),
    ] = None,
) -> None:
    """Terminate TLS for the configured services, with every private key on the key server."""
    from keybroker.errors import ConfigurationError
    from keybroker.flows.keyless.edge import load_config, run_edge

    _logging(log_level)
    try:
        loaded = load_config(config)
        if workers is not None:
            loaded = loaded.with_workers(workers)

        def ready(host: str, port: int) -> None:
            shown = f"[{host}]" if ":" in host else host
            print(f"listening on {shown}:{port}", flush=True)  # the one line on stdout

        run_edge(loaded, ready=ready)
    except ConfigurationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
