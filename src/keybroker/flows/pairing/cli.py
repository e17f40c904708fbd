"""``keybroker pair …``: certificate-checked common-key transport between devices (S9).

::

    keybroker pair device --cert device.pem --key device.key [--listen 127.0.0.1:0]
    keybroker pair controller --connect 127.0.0.1:7400 --code 'keybroker-pair:V:1;…;;' \\
        --trust-root acme-root.pem --crl acme-root.crl --crl acme-devices.crl \\
        --keyring ctl.keyring --keyset pairing/home [--sync] [--message hello]
    keybroker pair code --cert device.pem
    keybroker pair crl-publish --ca acme-devices.pem --crl acme-devices.crl [--home …]

The **device** listens in pairing mode, prints its pairing code and
``listening on HOST:PORT``, proves it holds its certified key, installs the common
key it is sent and acknowledges each message (``ack: <message>``) under it.

The **controller** is a broker principal that holds the common keyset (its
keyring, passphrase in ``$KEYBROKER_KEYRING_PASSPHRASE``; ``--sync`` first
fetches outstanding deliveries and follows the broker's primary). It checks the
device's chain against the manufacturer roots and CRLs, its identification info
and key hash against the pairing code, and its proof of possession; only then is
the common key sent, sealed to the device's key.

With ``--crl-from-broker`` the controller also takes the manufacturer CRLs the
broker publishes (``crl-publish``, run on the broker host), keeping only those that
verify under a CA chaining to one of its ``--trust-root`` certificates.

A refusal prints ``refused: <reason>: <what it means> (<detail>)`` on stderr,
on both sides, and exits with status 2.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import typer
from rich.console import Console
from rich.markup import escape

from keybroker.errors import KeybrokerError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from cryptography import x509

    from keybroker.flows.pairing.protocol import Event, PairingRefused
    from keybroker.keys import Keyset

pair_app = typer.Typer(
    help="Pairing (S9): a controller checks a device's certificate, then sends the common key.",
    no_args_is_help=True,
)

out = Console(highlight=False, emoji=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, emoji=False, soft_wrap=True)

EXIT_REFUSED: Final = 2
PASSPHRASE_ENV: Final = "KEYBROKER_KEYRING_PASSPHRASE"  # noqa: S105 - a variable name


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(EXIT_REFUSED)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read the {what} {path}: {exc.strerror}") from None


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise typer.BadParameter(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def _print_refusal(refusal: PairingRefused) -> None:
    who = "refused" if refusal.by_us else "refused by the peer"
    err.print(
        f"[red]{who}:[/red] {refusal.reason.value}: {escape(refusal.explanation)} "
        f"({escape(refusal.detail)})"
    )


def _report(event: Event) -> None:
    from keybroker.flows.pairing.protocol import (
        DevicePaired,
        KeyInstalled,
        MessageReceived,
    )

    if isinstance(event, DevicePaired):
        out.print(
            f"paired with {event.identity}: {event.keyset} v{event.version} sent and "
            f"confirmed (certificate SHA-256 {event.certificate_sha256.hex()[:16]}…)"
        )
    elif isinstance(event, KeyInstalled):
        out.print(f"paired: received {event.keyset} v{event.version} (key id {event.key_id:#010x})")
    elif isinstance(event, MessageReceived):
        out.print(f"received: {escape(event.plaintext.decode('utf-8', 'replace'))}")


# -- device ----------------------------------------------------------------------------------


@pair_app.command("device")
def device(
    cert: Annotated[
        Path, typer.Option(help="device certificate chain (PEM, leaf first)", show_default=False)
    ],
    key: Annotated[Path, typer.Option(help="device private key (PEM)", show_default=False)],
    listen: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1:0",
    sessions: Annotated[
        int, typer.Option(help="pairing attempts to serve before exiting (0: until stopped)")
    ] = 1,
) -> None:
    """Wait in pairing mode for a controller; print the pairing code first."""
    from keybroker.flows.pairing.code import PairingCode
    from keybroker.flows.pairing.device import DeviceSession, serve_device
    from keybroker.flows.pairing.protocol import Device
    from keybroker.keys import CertificateKey
    from keybroker.pki import load_certificates

    host, port = _address(listen)
    try:
        chain = load_certificates(_read(cert, "certificate chain"))
        device_key = CertificateKey.from_pem(_read(key, "device key"))
        code = PairingCode.for_certificate(chain[0])
        Device(key=device_key, chain=chain, rng=os.urandom)  # refuse a mismatched key now
    except KeybrokerError as exc:
        raise _fail(str(exc)) from None
    out.print(f"pairing code: {code.to_uri()}")
    results: list[DeviceSession] = []

    def listening(bound_host: str, bound_port: int) -> None:
        out.print(f"listening on {bound_host}:{bound_port}")
        sys.stdout.flush()

    def finished(session: DeviceSession) -> None:
        results.append(session)
        if session.refusal is not None:
            _print_refusal(session.refusal)
        elif session.error is not None:
            err.print(f"[red]error:[/red] {escape(session.error)}")
        sys.stdout.flush()

    def respond(message: bytes) -> bytes:
        return b"ack: " + message

    asyncio.run(
        serve_device(
            host,
            port,
            lambda: Device(key=device_key, chain=chain, rng=os.urandom),
            respond=respond,
            on_listening=listening,
            on_session=finished,
            sessions=sessions or None,
            on_event=_report,
        )
    )
    if not results or results[-1].installed is None:
        raise typer.Exit(EXIT_REFUSED)


# -- controller ------------------------------------------------------------------------------


def _from_broker(  # noqa: PLR0917 - one per CLI option
    keyring: Path,
    keyset: str,
    version: int | None,
    sync: bool,
    crl_roots: Sequence[x509.Certificate] | None,
    now: datetime,
) -> tuple[Keyset, int, tuple[x509.CertificateRevocationList, ...]]:
    """The common keyset and version to send and, with ``crl_roots``, the broker's CRLs
    that verify under those roots (one connection to the broker, if any is needed)."""
    from keybroker.client.principal import PrincipalClient
    from keybroker.flows.pairing.crls import fetch_trusted_crls
    from keybroker.keys import CONSUMING_STATES

    passphrase = os.environ.get(PASSPHRASE_ENV)
    if passphrase is None:
        raise _fail(f"set ${PASSPHRASE_ENV} to the keyring's passphrase")

    async def load() -> tuple[Keyset, int | None, tuple[x509.CertificateRevocationList, ...]]:
        client = PrincipalClient.open(keyring, passphrase=passphrase)
        async with client:
            primary = None
            if sync:
                await client.receive()
                for holding in await client.holdings():
                    if holding.name == keyset:
                        primary = holding.primary
            kept: tuple[x509.CertificateRevocationList, ...] = ()
            if crl_roots is not None:
                verdict = await fetch_trusted_crls(client, crl_roots, now)
                for why in verdict.ignored:
                    err.print(f"[yellow]ignored:[/yellow] {escape(why)}")
                out.print(f"{len(verdict.kept)} CRL(s) from the broker verified")
                kept = verdict.kept
            return client.keyset(keyset), primary, kept

    common, primary, fetched = asyncio.run(load())
    if version is None:
        version = primary
    if version is None:
        local = common.primary
        usable = [v.version for v in common.versions if v.state in CONSUMING_STATES]
        version = local.version if local is not None else max(usable, default=None)
    if version is None:
        raise _fail(f"keyset {keyset!r} has no usable version in {keyring}")
    return common, version, fetched


@pair_app.command("controller")
def controller(  # noqa: PLR0917 - one parameter per option
    connect: Annotated[str, typer.Option(help="the device's HOST:PORT", show_default=False)],
    code: Annotated[
        str, typer.Option(help="the device's pairing code (keybroker-pair:…)", show_default=False)
    ],
    trust_root: Annotated[
        list[Path],
        typer.Option(help="manufacturer root certificate (PEM; repeatable)", show_default=False),
    ],
    keyring: Annotated[
        Path,
        typer.Option(help="this controller's keyring (a broker principal)", show_default=False),
    ],
    keyset: Annotated[
        str, typer.Option(help="the common keyset to send, e.g. pairing/home", show_default=False)
    ],
    crl: Annotated[
        list[Path] | None,
        typer.Option(help="CRL of the root or an intermediate (PEM or DER; repeatable)"),
    ] = None,
    crl_from_broker: Annotated[
        bool,
        typer.Option(
            "--crl-from-broker",
            help="also use the broker's manufacturer CRLs (each verified under --trust-root)",
        ),
    ] = False,
    no_revocation: Annotated[
        bool, typer.Option("--no-revocation", help="skip revocation checking (not advised)")
    ] = False,
    max_intermediates: Annotated[
        int, typer.Option(help="most intermediate certificates a device chain may have")
    ] = 1,
    version: Annotated[
        int | None, typer.Option(help="version to send [default: the primary]")
    ] = None,
    sync: Annotated[
        bool, typer.Option("--sync", help="first fetch deliveries and the primary from the broker")
    ] = False,
    message: Annotated[
        list[str] | None,
        typer.Option(help="a message to send once paired (repeatable); the device answers each"),
    ] = None,
    name: Annotated[
        str, typer.Option(help="this controller's name, shown to devices")
    ] = "controller",
    timeout: Annotated[float, typer.Option(help="seconds the whole exchange may take")] = 30.0,
) -> None:
    """Verify a device against its pairing code and send it the common key."""
    from keybroker.flows.pairing.code import PairingCode
    from keybroker.flows.pairing.controller import pair_with_device, utc_now
    from keybroker.flows.pairing.protocol import Controller
    from keybroker.flows.pairing.verification import DevicePolicy
    from keybroker.pki import load_certificates, load_crl

    host, port = _address(connect)
    if no_revocation and (crl or crl_from_broker):
        raise _fail("--no-revocation cannot be combined with --crl or --crl-from-broker")
    if not crl and not crl_from_broker and not no_revocation:
        raise _fail(
            "give the manufacturer's CRLs with --crl or --crl-from-broker, or --no-revocation"
        )
    try:
        expected = PairingCode.from_uri(code)
        roots = tuple(c for path in trust_root for c in load_certificates(_read(path, "root")))
        local_crls = tuple(load_crl(_read(p, "CRL")) for p in crl or ())
        common, send_version, fetched = _from_broker(
            keyring, keyset, version, sync, roots if crl_from_broker else None, utc_now()
        )
        crls = None if no_revocation else local_crls + fetched
        policy = DevicePolicy(roots, crls, max_intermediates)
        machine = Controller(
            expected=expected,
            policy=policy,
            common=common,
            version=send_version,
            rng=os.urandom,
            name=name,
        )
        out.print(f"pairing with {expected.identity} at {host}:{port}")
        outcome = asyncio.run(
            pair_with_device(
                host,
                port,
                machine,
                messages=[m.encode("utf-8") for m in message or ()],
                timeout=timeout,
                on_event=_report,
            )
        )
    except KeybrokerError as exc:
        raise _fail(str(exc)) from None
    if outcome.refusal is not None:
        _print_refusal(outcome.refusal)
        raise typer.Exit(EXIT_REFUSED)


@pair_app.command("code")
def show_code(
    cert: Annotated[Path, typer.Option(help="device certificate (PEM)", show_default=False)],
) -> None:
    """Print the pairing code for a device certificate (what its label shows)."""
    from keybroker.flows.pairing.code import PairingCode
    from keybroker.pki import load_certificates

    try:
        leaf = load_certificates(_read(cert, "certificate"))[0]
        out.print(PairingCode.for_certificate(leaf).to_uri())
    except KeybrokerError as exc:
        raise _fail(str(exc)) from None


@pair_app.command("crl-publish")
def crl_publish(
    ca: Annotated[
        Path,
        typer.Option(help="the manufacturer CA certificate that signs the CRL (PEM or DER)"),
    ],
    crl: Annotated[Path, typer.Option(help="its current CRL (PEM or DER)", show_default=False)],
    home: Annotated[
        Path | None,
        typer.Option(
            "--home", envvar="KEYBROKER_HOME", help="keybroker home [default: ./.keybroker]"
        ),
    ] = None,
) -> None:
    """On the broker host: publish a manufacturer CA's CRL to controllers (GET /v1/pairing/crls).

    The CRL must be current and signed by the CA, with a higher CRL number than the
    one published before; controllers check it again under the roots they trust.
    """
    from keybroker.broker.home import open_home
    from keybroker.broker.service import Broker
    from keybroker.flows.pairing.crls import CrlPublisher
    from keybroker.pki import load_certificate, load_crl
    from keybroker.store.paths import default_home

    try:
        issuer = load_certificate(_read(ca, "CA certificate"))
        revocations = load_crl(_read(crl, "CRL"))
        with open_home(home or default_home()) as opened:
            published = CrlPublisher(Broker.from_home(opened)).publish(issuer, revocations)
    except KeybrokerError as exc:
        raise _fail(str(exc)) from None
    listed = len(list(published.crl))
    out.print(
        f"published CRL number {published.number} of {escape(published.name)} "
        f"({listed} revoked; next update {published.crl.next_update_utc:%Y-%m-%d %H:%M} UTC)"
    )


if __name__ == "__main__":
    pair_app()
