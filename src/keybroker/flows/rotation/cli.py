"""``keybroker rotation …``: start, follow, abort and retry rollouts; run link traffic.

Every command here but ``traffic`` is an operator's, and talks to a running
broker over HTTPS with the admin token, like ``keybroker log verify --url``:

* ``--url`` — the broker (``$KEYBROKER_URL``; default ``https://127.0.0.1:8443``,
  where ``keybroker serve`` listens by default);
* ``--ca`` — the broker CA the TLS connection is pinned to (default ``<home>/ca.pem``);
* ``--admin-token-file`` — the operator token (default ``<home>/admin.token``,
  which ``keybroker init`` writes).

The topology file is read and checked here first, so a typo fails before
anything is sent. ``watch`` ends with exit status 0 if every link retired its
old key and 3 if some link kept it (failed or aborted), so scripts can tell.
Heavy modules are imported inside the commands so ``keybroker --help`` stays quick.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from keybroker.errors import ConfigurationError, Conflict
from keybroker.flows.rotation.agent_cli import traffic_app

if TYPE_CHECKING:
    from keybroker.api.rotation_schemas import RolloutOut
    from keybroker.client.operator import OperatorClient
    from keybroker.flows.rotation.topology import Topology

rotation_app = typer.Typer(
    help="Staged key rotation across upstream nodes and downstream sites (S10).",
    no_args_is_help=True,
)
rotation_app.add_typer(traffic_app, name="traffic")

out = Console()
err = Console(stderr=True)
_T = TypeVar("_T")

#: Exit status of ``watch`` when some link kept its old key.
EXIT_KEPT_OLD: Final = 3
DEFAULT_URL: Final = "https://127.0.0.1:8443"
#: What ``keybroker init`` writes into the home (``keybroker.cli.credentials``).
_TOKEN_FILE: Final = "admin.token"  # noqa: S105 - a file name
_CA_FILE: Final = "ca.pem"
#: Links per setup request: each is a few transactions, so a request stays short.
SETUP_BATCH: Final = 200

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar="KEYBROKER_HOME", help="keybroker home (default: ./.keybroker)"),
]
UrlOption = Annotated[str, typer.Option(envvar="KEYBROKER_URL", help="broker URL")]
CaOption = Annotated[
    Path | None, typer.Option(help="broker CA certificate, PEM (default: <home>/ca.pem)")
]
TokenFileOption = Annotated[
    Path | None, typer.Option(help="operator token file (default: <home>/admin.token)")
]
LinkOption = Annotated[
    list[str] | None, typer.Option("--link", help="NODE/SITE: only this link (repeatable)")
]
TopologyArgument = Annotated[
    Path, typer.Argument(help="topology file (TOML; see docs/rotation.md)", show_default=False)
]
RolloutArgument = Annotated[str, typer.Argument(help="rollout id", show_default=False)]

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_ms(text: str, *, zero: bool = False) -> int:
    """``500ms``, ``90s``, ``15m``, ``1h``, ``7d`` as milliseconds (``0s`` only if ``zero``)."""
    match = _DURATION.match(text.strip())
    if not match or (int(match.group(1)) == 0 and not zero):
        raise typer.BadParameter(f"{text!r} is not a duration like 500ms, 90s, 15m, 1h or 7d")
    return int(match.group(1)) * _MS[match.group(2)]


# -- connecting -------------------------------------------------------------------------------


def _operator(
    url: str, ca: Path | None, token_file: Path | None, home: Path | None
) -> OperatorClient:
    from keybroker.client.operator import OperatorClient
    from keybroker.store.paths import default_home

    where = home or default_home()
    ca_file = ca or where / _CA_FILE
    token_path = token_file or where / _TOKEN_FILE
    try:
        ca_pem = ca_file.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the broker CA {ca_file}: {exc.strerror}") from None
    try:
        token = token_path.read_text().strip()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the operator token {token_path}: {exc.strerror}"
        ) from None
    return OperatorClient(url, token, ca_pem)


def _run(
    url: str,
    ca: Path | None,
    token_file: Path | None,
    home: Path | None,
    work: Callable[[OperatorClient], Awaitable[_T]],
) -> _T:
    import asyncio

    async def run() -> _T:
        async with _operator(url, ca, token_file, home) as op:
            return await work(op)

    return asyncio.run(run())


def _topology(path: Path) -> Topology:
    from keybroker.flows.rotation.topology import Topology

    return Topology.from_file(path)


def _part(topology: Topology, links: Sequence[Any]) -> dict[str, Any]:
    """The document of ``topology`` restricted to ``links`` (and the ends they use)."""
    import dataclasses

    nodes = tuple(dict.fromkeys(link.node for link in links))
    sites = tuple(dict.fromkeys(link.site for link in links))
    part = dataclasses.replace(topology, nodes=nodes, sites=sites, links=tuple(links))
    return part.to_mapping()


# -- reports ----------------------------------------------------------------------------------


def _when(value: Any) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _counts(status: RolloutOut) -> str:
    shown = [f"{state} {n}" for state, n in status.counts.items() if n]
    return " · ".join(shown) or "no links"


def _version(link: Any) -> str:
    return f"v{link.old_version}" + ("" if link.new_version is None else f"→v{link.new_version}")


def _links_table(links: Sequence[Any]) -> Table:
    table = Table("link", "state", "version", "attempts", "reason", "in use")
    for link in links:
        table.add_row(
            link.name,
            link.state,
            _version(link),
            str(link.attempt),
            escape(link.reason or ""),
            f"v{link.version_in_use}",
        )
    return table


def _header(status: RolloutOut) -> None:
    out.print(f"rollout   {status.rollout_id} ({status.topology})")
    reason = f" — {status.reason}" if status.reason else ""
    out.print(f"state     {status.state}{reason}", markup=False, highlight=False)
    out.print(f"started   {_when(status.created_at)}")
    if status.finished_at is not None:
        out.print(f"finished  {_when(status.finished_at)}")
    out.print(f"links     {status.total}: {_counts(status)}")


def final_report(status: RolloutOut, kept_old: Sequence[Any]) -> int:
    """Print how a finished rollout ended; the exit status ``watch`` answers with."""
    retired = status.counts.get("RETIRED_OLD", 0)
    out.print(
        f"rollout {status.rollout_id} {status.state}: "
        f"{retired} of {status.total} link(s) on their new key"
    )
    if not kept_old and retired == status.total:
        return 0
    out.print(f"{len(kept_old)} link(s) kept their old key:", style="bold red")
    table = Table("link", "state", "why", "key in use")
    for link in kept_old:
        table.add_row(
            link.name,
            link.state,
            escape(link.reason or ""),
            f"{link.keyset} v{link.version_in_use}",
        )
    out.print(table)
    return EXIT_KEPT_OLD


# -- commands ---------------------------------------------------------------------------------


@rotation_app.command("setup")
def setup(  # noqa: PLR0917 - one parameter per option
    topology_file: TopologyArgument,
    delivery_ttl: Annotated[
        str, typer.Option(help="how long an end has to pick up its first key")
    ] = "1h",
    url: UrlOption = DEFAULT_URL,
    ca: CaOption = None,
    admin_token_file: TokenFileOption = None,
    home: HomeOption = None,
) -> None:
    """Make every link ready: link keysets, hold grants, first key delivered to both ends.

    Idempotent: run it again after adding links or enrolling late agents. Every end
    must be enrolled first.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from keybroker.api.schemas import MAX_TTL_SECONDS

    topology = _topology(topology_file)
    ttl_seconds = max(1, parse_ms(delivery_ttl) // 1000)
    if ttl_seconds > MAX_TTL_SECONDS:
        raise typer.BadParameter("the delivery TTL is at most 30 days")
    links = topology.links

    async def work(op: OperatorClient) -> tuple[int, int, int]:
        active = {p.principal for p in await op.list_principals(status="active")}
        ends = {str(end) for link in links for end in (link.upstream, link.downstream)}
        missing = sorted(ends - active)
        if missing:
            raise Conflict(
                f"{len(missing)} end(s) are not enrolled and active, e.g. {missing[0]}; "
                "enrol them first"
            )
        totals = [0, 0, 0]
        with Progress(
            TextColumn("setting up links"), BarColumn(), MofNCompleteColumn(), console=err
        ) as progress:
            task = progress.add_task("setup", total=len(links))
            for i in range(0, len(links), SETUP_BATCH):
                chunk = links[i : i + SETUP_BATCH]
                report = await op.setup_rotation(_part(topology, chunk), ttl_seconds)
                totals[0] += report.keysets_created
                totals[1] += report.grants_created
                totals[2] += report.deliveries
                progress.advance(task, len(chunk))
        return totals[0], totals[1], totals[2]

    keysets, grants, deliveries = _run(url, ca, admin_token_file, home, work)
    out.print(
        f"{topology.name}: {len(links)} link(s) ready — {keysets} keyset(s) created, "
        f"{grants} grant(s) made, {deliveries} first key(s) on their way"
    )


@rotation_app.command("start")
def start(  # noqa: PLR0917 - one parameter per option
    topology_file: TopologyArgument,
    link: LinkOption = None,
    ack_timeout: Annotated[
        str, typer.Option(help="time a site or node has to install and acknowledge")
    ] = "60s",
    attempts: Annotated[
        int, typer.Option(min=1, max=100, help="deliveries per stage before a link gives up")
    ] = 3,
    grace: Annotated[
        str, typer.Option(help="how long the old key is still accepted after the switch")
    ] = "30s",
    backoff: Annotated[str, typer.Option(help="wait before the 2nd attempt (then doubled)")] = "2s",
    backoff_cap: Annotated[
        str | None,
        typer.Option(help="longest wait between attempts (default: max(60s, --backoff))"),
    ] = None,
    max_failed_percent: Annotated[
        int, typer.Option(min=0, max=100, help="halt once more than this % of links failed")
    ] = 100,
    max_parallel: Annotated[
        int, typer.Option(min=0, help="links in flight at once (0: no limit)")
    ] = 0,
    url: UrlOption = DEFAULT_URL,
    ca: CaOption = None,
    admin_token_file: TokenFileOption = None,
    home: HomeOption = None,
) -> None:
    """Start a rollout over the topology's links (or those given with --link); prints its id."""
    from pydantic import ValidationError

    from keybroker.api.rotation_schemas import RolloutPolicyIn

    topology = _topology(topology_file)
    try:
        policy = RolloutPolicyIn(
            ack_timeout_ms=parse_ms(ack_timeout),
            max_attempts=attempts,
            backoff_base_ms=parse_ms(backoff),
            backoff_cap_ms=None if backoff_cap is None else parse_ms(backoff_cap),
            grace_ms=parse_ms(grace, zero=True),
            max_failed_percent=max_failed_percent,
            max_parallel=max_parallel,
        )
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]) for e in exc.errors())
        raise typer.BadParameter(problems) from None
    links = list(link) if link else None
    # Only the chosen links travel (checked here first: a typo fails before anything is sent).
    chosen = [topology.link(name) for name in links] if links else list(topology.links)

    async def work(op: OperatorClient) -> RolloutOut:
        return await op.start_rollout(_part(topology, chosen), policy=policy)

    status = _run(url, ca, admin_token_file, home, work)
    err.print(f"started rollout over {status.total} link(s) of {status.topology}")
    typer.echo(status.rollout_id)


@rotation_app.command("status")
def status(  # noqa: PLR0917 - one parameter per option
    rollout_id: RolloutArgument,
    state: Annotated[
        list[str] | None, typer.Option(help="only links in this state (repeatable)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the API's document, every link")] = False,
    url: UrlOption = DEFAULT_URL,
    ca: CaOption = None,
    admin_token_file: TokenFileOption = None,
    home: HomeOption = None,
) -> None:
    """Show a rollout: its state, links per state, and every link's versions and reason."""
    import json

    from keybroker.api.rotation_schemas import LINK_STATES

    states = [s.upper() for s in state or ()]
    unknown = [s for s in states if s not in LINK_STATES]
    if unknown:
        raise typer.BadParameter(f"{unknown[0]} is not one of {', '.join(LINK_STATES)}")

    async def work(op: OperatorClient) -> RolloutOut:
        return await op.rollout_with_links(rollout_id, states=states)

    found = _run(url, ca, admin_token_file, home, work)
    if as_json:
        typer.echo(json.dumps(found.model_dump(mode="json"), indent=2))
        return
    _header(found)
    out.print(_links_table(found.links))


@rotation_app.command("watch")
def watch(  # noqa: PLR0917 - one parameter per option
    rollout_id: RolloutArgument,
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between looks")] = 1.0,
    url: UrlOption = DEFAULT_URL,
    ca: CaOption = None,
    admin_token_file: TokenFileOption = None,
    home: HomeOption = None,
) -> None:
    """Follow a rollout until it finishes; exit 0 if every link moved, 3 if some kept its key."""
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from keybroker.api.rotation_schemas import KEPT_OLD_STATES, LINK_STATES
    from keybroker.errors import TransportError

    async def work(op: OperatorClient) -> int:
        current = await op.show_rollout(rollout_id, limit=0)
        with Progress(
            TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), console=out
        ) as progress:
            tasks = {s: progress.add_task(s, total=current.total) for s in LINK_STATES}
            failures = 0
            while True:
                for state, task in tasks.items():
                    progress.update(task, completed=current.counts.get(state, 0))
                if current.finished:
                    break
                await asyncio.sleep(interval)
                try:
                    current = await op.show_rollout(rollout_id, limit=0)
                    failures = 0
                except TransportError:
                    failures += 1  # a replica restarting; another look soon
                    if failures >= 10:
                        raise
        final = await op.rollout_with_links(rollout_id, states=KEPT_OLD_STATES)
        return final_report(final, final.links)

    code = _run(url, ca, admin_token_file, home, work)
    raise typer.Exit(code)


@rotation_app.command("abort")
def abort(
    rollout_id: RolloutArgument,
    url: UrlOption = DEFAULT_URL,
    ca: CaOption = None,
    admin_token_file: TokenFileOption = None,
    home: HomeOption = None,
) -> None:
    """Abort a rollout: links not yet switched keep their old key; switched ones finish."""

    async def work(op: OperatorClient) -> RolloutOut:
        return await op.abort_rollout(rollout_id)

    found = _run(url, ca, admin_token_file, home, work)
    out.print(f"rollout {found.rollout_id} {found.state}: {_counts(found)}")


@rotation_app.command("retry")
def retry(  # noqa: PLR0917 - one parameter per option
    rollout_id: RolloutArgument,
    link: LinkOption = None,
    url: UrlOption = DEFAULT_URL,
    ca: CaOption = None,
    admin_token_file: TokenFileOption = None,
    home: HomeOption = None,
) -> None:
    """Start a rollout's failed or aborted links again (all, or those given with --link)."""

    async def work(op: OperatorClient) -> RolloutOut:
        return await op.retry_rollout(rollout_id, links=list(link) if link else None)

    found = _run(url, ca, admin_token_file, home, work)
    out.print(f"rollout {found.rollout_id} {found.state}: {_counts(found)}")


@rotation_app.command("list")
def list_rollouts(
    url: UrlOption = DEFAULT_URL,
    ca: CaOption = None,
    admin_token_file: TokenFileOption = None,
    home: HomeOption = None,
) -> None:
    """List rollouts, newest first."""

    async def work(op: OperatorClient) -> list[Any]:
        return list(await op.list_rollouts())

    rows = _run(url, ca, admin_token_file, home, work)
    table = Table()
    table.add_column("rollout", no_wrap=True)
    for name in ("topology", "state", "started", "finished", "reason"):
        table.add_column(name)
    for r in rows:
        table.add_row(
            r.rollout_id,
            r.topology,
            r.state,
            _when(r.created_at),
            _when(r.finished_at),
            escape(r.reason or ""),
        )
    out.print(table)
