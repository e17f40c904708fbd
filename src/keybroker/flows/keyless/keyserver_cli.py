"""``keybroker keyserver``: run the keyless TLS key server.

Settings come from options, from one ``--config FILE`` (TOML, the same names
in ``snake_case``), or both (an option given on the command line wins). Two
modes: files (``--cert``, ``--key``, ``--client-ca``, ``--grants`` and
``--keys-dir`` or a PKCS#11 token), or broker keys (``--keyring`` of an enrolled
``service`` principal: certificate, keys and grants come from the enrolment and
the broker, re-read every ``--refresh`` seconds). Secrets are never options: the
PKCS#11 PIN and the keyring passphrase are read from the environment variables
``--pkcs11-pin-env`` and ``--passphrase-env`` name. A bad setting exits with
status 2 and a message naming it; SIGTERM or SIGINT stops the server gracefully
(status 0); SIGHUP reloads keys, grants and the server certificate. Once
serving, one line goes to stdout: ``listening on HOST:PORT`` (plus
`` metrics on HOST:PORT``; with ``--processes N``, the N processes' metrics
addresses, comma-separated). If a key-server process dies, the others are
stopped and the command exits with status 1 (let the service manager restart it).

Heavy modules are imported inside the command, as in :mod:`keybroker.cli.main`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["keyserver_command"]

#: Exit status for a configuration the server refuses to run with.
EXIT_CONFIGURATION = 2
#: Exit status when one of ``--processes`` died (the others were stopped).
EXIT_WORKER_DIED = 1


def _logging(level: str) -> None:
    import logging

    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(
        level=numeric,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        force=True,
    )
    # With broker keys, one line per HTTP request of every refresh would drown the rest.
    logging.getLogger("httpx").setLevel(max(numeric, logging.WARNING))


def keyserver_command(  # noqa: PLR0917 - one parameter per option
    config: Annotated[
        Path | None,
        typer.Option(help="TOML file with any of the settings below (options override it)"),
    ] = None,
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT to listen on (default: 127.0.0.1:2407)")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option(help="server certificate chain (PEM), leaf first")
    ] = None,
    key: Annotated[Path | None, typer.Option(help="server private key (PEM, mode 0600)")] = None,
    client_ca: Annotated[
        Path | None, typer.Option(help="CA certificate(s) that issue edge certificates (PEM)")
    ] = None,
    keys_dir: Annotated[
        Path | None,
        typer.Option(help="directory of PKCS#8 PEM private keys (*.pem, *.key; mode 0600)"),
    ] = None,
    pkcs11_module: Annotated[
        str | None,
        typer.Option(help="PKCS#11 module (default: $KEYBROKER_PKCS11_MODULE or SoftHSM2)"),
    ] = None,
    pkcs11_token: Annotated[
        str | None, typer.Option(help="label of the PKCS#11 token holding the keys")
    ] = None,
    pkcs11_pin_env: Annotated[
        str | None,
        typer.Option(
            help="environment variable with the token's user PIN (default: KEYBROKER_PKCS11_PIN)"
        ),
    ] = None,
    grants: Annotated[
        Path | None, typer.Option(help="grants table (TOML or JSON): which edge may use which key")
    ] = None,
    keyring: Annotated[
        Path | None,
        typer.Option(
            help="broker keys: the keyring of this key server's service principal "
            "(`keybroker enroll service/NAME …`); replaces cert, key, client-ca, grants, keys"
        ),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(help="broker keys: the broker's URL (default: the one enrolled with)"),
    ] = None,
    passphrase_env: Annotated[
        str | None,
        typer.Option(
            help="broker keys: environment variable with the keyring passphrase "
            "(default: KEYBROKER_KEYRING_PASSPHRASE)"
        ),
    ] = None,
    refresh: Annotated[
        float | None,
        typer.Option(
            help="seconds between reloads of keys and grants; 0: SIGHUP only "
            "(default: 5 with broker keys, 0 otherwise)"
        ),
    ] = None,
    grants_max_age: Annotated[
        float | None,
        typer.Option(
            help="broker keys: refuse every operation once the grants last read from the "
            "broker are older than this many seconds (default: keep them)"
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="executor workers per process (default: the cores / --processes)"),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help="thread, process or inline (on the event loop) (default: thread; inline "
            "with --processes)"
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            help="key-server processes behind one listener, e.g. the number of cores for "
            "ECDSA keys (default: 1)"
        ),
    ] = None,
    metrics_host: Annotated[
        str | None, typer.Option(help="address of /healthz and /metrics (default: 127.0.0.1)")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="port of /healthz and /metrics (conventionally 2406) (default: off)"),
    ] = None,
    max_connections: Annotated[
        int | None, typer.Option(help="edge connections at once (default: 1024)")
    ] = None,
    idle_timeout: Annotated[
        float | None,
        typer.Option(help="seconds before an idle connection is closed (default: 300)"),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning or error (default: info)")
    ] = None,
) -> None:
    """Run the keyless TLS key server: sign for edges over mutual TLS with keys they never see."""
    import asyncio

    from keybroker.errors import ConfigurationError
    from keybroker.flows.keyless.keyserver import (
        KeyServerConfig,
        load_config_file,
        run_keyserver,
    )
    from keybroker.flows.keyless.prefork import WorkerDied

    options = {
        "listen": listen,
        "cert": cert,
        "key": key,
        "client_ca": client_ca,
        "keys_dir": keys_dir,
        "pkcs11_module": pkcs11_module,
        "pkcs11_token": pkcs11_token,
        "pkcs11_pin_env": pkcs11_pin_env,
        "grants": grants,
        "keyring": keyring,
        "broker": broker,
        "passphrase_env": passphrase_env,
        "refresh": refresh,
        "grants_max_age": grants_max_age,
        "workers": workers,
        "pool": pool,
        "processes": processes,
        "metrics_host": metrics_host,
        "metrics_port": metrics_port,
        "max_connections": max_connections,
        "idle_timeout": idle_timeout,
        "log_level": log_level,
    }

    def ready(line: str) -> None:
        typer.echo(line)

    try:
        settings: dict[str, object] = {}
        base: Path | None = None
        if config is not None:
            settings.update(
                (name.replace("-", "_"), value) for name, value in load_config_file(config).items()
            )
            base = config.resolve().parent
        # Options are relative to the working directory: make them absolute before merging.
        given = {
            name: (value.resolve() if isinstance(value, Path) else value)
            for name, value in options.items()
            if value is not None
        }
        settings.update(given)
        loaded = KeyServerConfig.from_mapping(settings, base=base)
        _logging(loaded.log_level)
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
            loop_factory = None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run_keyserver(loaded, ready=ready))
    except ConfigurationError as exc:
        typer.echo(f"keybroker keyserver: configuration error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIGURATION) from None
    except WorkerDied as exc:
        typer.echo(f"keybroker keyserver: {exc}", err=True)
        raise typer.Exit(EXIT_WORKER_DIED) from None


if __name__ == "__main__":
    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    _app.command()(keyserver_command)
    _app()
