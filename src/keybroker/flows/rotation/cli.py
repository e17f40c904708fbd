"""``keybroker rotation …``: start, follow, abort and retry rollouts; run link traffic."""

from __future__ import annotations

import typer

rotation_app = typer.Typer(
    help="Staged key rotation across upstream nodes and downstream sites (S10).",
    no_args_is_help=True,
)
