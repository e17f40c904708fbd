"""``keybroker pair …``: certificate-checked common-key transport between devices (S9).

::

    keybroker pair device --cert device.pem --key device.key [--listen 127.0.0.1:0]
    keybroker pair controller --connect 127.0.0.1:7400 --code 'keybroker-pair:V:1;…;;' \\
        --trust-root acme-root.pem --crl acme-root.crl --crl acme-devices.crl \\
        --keyring ctl.keyring --keyset pairing/home [--sync] [--message hello]
    keybroker pair rekey --keyring ctl.keyring --keyset pairing/home \
        --trust-root acme-root.pem --crl-from-broker [--watch [--interval 10]]
    keybroker pair code --cert device.pem
    keybroker pair crl-publish --ca acme-devices.pem --crl acme-devices.crl [--home …]
    keybroker pair inventory-add --code 'keybroker-pair:V:1;…;;' [--home …]
    keybroker pair inventory-remove --serial SN-0042 [--home …]
    keybroker pair controller --connect 127.0.0.1:7400 --from-inventory SN-0042 …

The **device** listens in pairing mode, prints its pairing code and
``listening on HOST:PORT``, proves it holds its certified key, installs the common
key it is sent and acknowledges each message (``ack: <message>``) under it.

The **controller** is a broker principal that holds the common keyset (its
keyring, passphrase in ``$KEYBROKER_KEYRING_PASSPHRASE``; ``--sync`` first
fetches outstanding deliveries and follows the broker's primary). It checks the
device's chain against the manufacturer roots and CRLs, its identification info
and key hash against the pairing code, and its proof of possession; only then is
the common key sent, sealed to the device's key.

With ``--from-inventory SERIAL`` instead of ``--code``, the identity to check is the
broker's inventory record of that device (``inventory-add``, run on the broker
host), fetched with the controller's signed request; the checks are the same.

With ``--crl-from-broker`` the controller also takes the manufacturer CRLs the
broker publishes (``crl-publish``, run on the broker host), keeping only those that
verify under a CA chaining to one of its ``--trust-root`` certificates.

The controller records every device it paired in ``<keyring>.devices.json``
(``--devices``; addresses, pairing codes, versions: nothing secret). After the
common keyset rotated at the broker, **rekey** fetches the new version and runs
the whole pairing again with every recorded device behind it (``--watch``: every
``--interval`` seconds, until stopped), printing per device ``re-paired …`` or
the refusal. A device keeps the key it was paired with across sessions and takes
a new one only from a controller that proves it holds that key.

A refusal prints ``refused: <reason>: <what it means> (<detail>)`` on stderr,
on both sides, and exits with status 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import typer
from rich.console import Console
from rich.markup import escape

from keybroker.errors import KeybrokerError, KeysetError, NotFound

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from datetime import datetime

    from cryptography import x509

    from keybroker.flows.pairing.code import PairingCode
    from keybroker.flows.pairing.protocol import Event, PairingRefused
    from keybroker.flows.pairing.rekey import RepairResult
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
    """Wait in pairing mode for a controller; print the pairing code first.

    Once paired, the device takes a new key (a re-pairing) only from a controller
    that proves it holds the one it has, and then keeps only the new one.
    """
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
    held: list[Keyset] = []  # the common key from the last pairing, for the next session

    def listening(bound_host: str, bound_port: int) -> None:
        out.print(f"listening on {bound_host}:{bound_port}")
        sys.stdout.flush()

    def finished(session: DeviceSession) -> None:
        results.append(session)
        if session.keyset is not None:
            held[:] = [session.keyset]
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
            lambda: Device(
                key=device_key, chain=chain, rng=os.urandom, held=held[-1] if held else None
            ),
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
    inventory_serial: str | None = None,
) -> tuple[Keyset, int, tuple[x509.CertificateRevocationList, ...], PairingCode | None]:
    """The common keyset and version to send, with ``crl_roots`` the broker's CRLs that
    verify under those roots, and with ``inventory_serial`` the broker's inventory record
    of that device (one connection to the broker, if any is needed)."""
    from keybroker.client.principal import PrincipalClient
    from keybroker.flows.pairing.crls import fetch_trusted_crls
    from keybroker.flows.pairing.inventory import fetch_inventory_code
    from keybroker.keys import CONSUMING_STATES

    passphrase = os.environ.get(PASSPHRASE_ENV)
    if passphrase is None:
        raise _fail(f"set ${PASSPHRASE_ENV} to the keyring's passphrase")

    async def load() -> tuple[
        Keyset, int | None, tuple[x509.CertificateRevocationList, ...], PairingCode | None
    ]:
        client = PrincipalClient.open(keyring, passphrase=passphrase)
        async with client:
            recorded = None
            if inventory_serial is not None:
                try:
                    recorded = await fetch_inventory_code(client, inventory_serial)
                except NotFound:
                    raise _fail(
                        f"the broker has no inventory record for device serial {inventory_serial}"
                        " (pair inventory-add on the broker host, or use --code)"
                    ) from None
                out.print(f"inventory record at the broker: {recorded.to_uri()}")
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
            return client.keyset(keyset), primary, kept, recorded

    common, primary, fetched, recorded = asyncio.run(load())
    if version is None:
        version = primary
    if version is None:
        local = common.primary
        usable = [v.version for v in common.versions if v.state in CONSUMING_STATES]
        version = local.version if local is not None else max(usable, default=None)
    if version is None:
        raise _fail(f"keyset {keyset!r} has no usable version in {keyring}")
    return common, version, fetched, recorded


def _revocation_args(
    crl: Sequence[Path] | None, crl_from_broker: bool, no_revocation: bool
) -> None:
    if no_revocation and (crl or crl_from_broker):
        raise _fail("--no-revocation cannot be combined with --crl or --crl-from-broker")
    if not crl and not crl_from_broker and not no_revocation:
        raise _fail(
            "give the manufacturer's CRLs with --crl or --crl-from-broker, or --no-revocation"
        )


@pair_app.command("controller")
def controller(  # noqa: PLR0917 - one parameter per option
    connect: Annotated[str, typer.Option(help="the device's HOST:PORT", show_default=False)],
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
    code: Annotated[
        str | None,
        typer.Option(help="the device's pairing code (keybroker-pair:…)", show_default=False),
    ] = None,
    from_inventory: Annotated[
        str | None,
        typer.Option(
            help="instead of --code: the serial of the broker's inventory record to check against",
            show_default=False,
        ),
    ] = None,
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
    devices: Annotated[
        Path | None,
        typer.Option(help="record of paired devices [default: <keyring>.devices.json]"),
    ] = None,
) -> None:
    """Verify a device against its pairing code (or the broker's inventory record) and send
    it the common key."""
    from keybroker.flows.pairing.code import PairingCode
    from keybroker.flows.pairing.controller import pair_with_device, utc_now
    from keybroker.flows.pairing.protocol import Controller
    from keybroker.flows.pairing.rekey import PairedDevices, default_record_path, previous_for
    from keybroker.flows.pairing.verification import DevicePolicy
    from keybroker.pki import load_certificates, load_crl

    host, port = _address(connect)
    if (code is None) == (from_inventory is None):
        raise _fail("give exactly one of --code and --from-inventory")
    _revocation_args(crl, crl_from_broker, no_revocation)
    try:
        record = PairedDevices.load(devices or default_record_path(keyring))
        given = PairingCode.from_uri(code) if code is not None else None
        roots = tuple(c for path in trust_root for c in load_certificates(_read(path, "root")))
        local_crls = tuple(load_crl(_read(p, "CRL")) for p in crl or ())
        common, send_version, fetched, recorded = _from_broker(
            keyring,
            keyset,
            version,
            sync,
            roots if crl_from_broker else None,
            utc_now(),
            from_inventory,
        )
        expected = given or recorded
        assert expected is not None  # one of the two, checked above
        crls = None if no_revocation else local_crls + fetched
        policy = DevicePolicy(roots, crls, max_intermediates)
        machine = Controller(
            expected=expected,
            policy=policy,
            common=common,
            version=send_version,
            rng=os.urandom,
            name=name,
            previous=previous_for(common, record.get(expected)),
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
        if outcome.paired is not None:
            record.paired(expected, f"{host}:{port}", outcome.paired)
            record.save()
    except (KeybrokerError, OSError) as exc:
        raise _fail(str(exc)) from None
    if outcome.refusal is not None:
        _print_refusal(outcome.refusal)
        raise typer.Exit(EXIT_REFUSED)


def _print_result(result: RepairResult) -> None:
    who = f"{result.device.identity} at {result.device.address}"
    if result.ok and result.paired is not None:
        out.print(
            f"re-paired {who}: {result.paired.keyset} v{result.from_version} → v{result.to_version}"
        )
    elif result.refusal is not None:
        refusal = result.refusal
        by = "refused" if refusal.by_us else "refused by the device"
        err.print(
            f"[red]{by}:[/red] {who}: {refusal.reason.value}: {escape(refusal.explanation)} "
            f"({escape(refusal.detail)}); it keeps v{result.from_version}"
        )
    else:
        err.print(f"[red]not re-paired:[/red] {who}: {escape(result.error or 'no outcome')}")


def _watch(one_round: Callable[[], Awaitable[object]], interval: float) -> None:
    from keybroker.flows.pairing.rekey import watch

    def failed(exc: BaseException) -> None:
        err.print(f"[yellow]round failed:[/yellow] {escape(str(exc))}")

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch(one_round, interval=interval, stop=asyncio.Event(), on_error=failed))


@pair_app.command("rekey")
def rekey(  # noqa: PLR0917 - one parameter per option
    trust_root: Annotated[
        list[Path],
        typer.Option(help="manufacturer root certificate (PEM; repeatable)", show_default=False),
    ],
    keyring: Annotated[
        Path,
        typer.Option(help="this controller's keyring (a broker principal)", show_default=False),
    ],
    keyset: Annotated[
        str, typer.Option(help="the common keyset, e.g. pairing/home", show_default=False)
    ],
    crl: Annotated[
        list[Path] | None,
        typer.Option(help="CRL of the root or an intermediate (read again every round)"),
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
    devices: Annotated[
        Path | None,
        typer.Option(help="record of paired devices [default: <keyring>.devices.json]"),
    ] = None,
    message: Annotated[
        list[str] | None,
        typer.Option(help="a message to send each re-paired device (repeatable)"),
    ] = None,
    name: Annotated[
        str, typer.Option(help="this controller's name, shown to devices")
    ] = "controller",
    timeout: Annotated[float, typer.Option(help="seconds one device's exchange may take")] = 30.0,
    watch: Annotated[
        bool, typer.Option("--watch", help="keep polling the broker and re-pair on each rotation")
    ] = False,
    interval: Annotated[float, typer.Option(help="seconds between polls with --watch")] = 10.0,
) -> None:
    """After the common keyset rotated: pair every recorded device again with the new primary.

    Fetches the controller's deliveries, reads the broker's primary, and runs the
    whole pairing (chain, CRLs, identity, proof; the new version sealed with a
    proof of the old one) with every device in the record that has an older
    version. Exits 2 if any device was refused or unreachable (without --watch).
    """
    from keybroker.client.principal import PrincipalClient
    from keybroker.flows.pairing.crls import fetch_trusted_crls
    from keybroker.flows.pairing.rekey import (
        PairedDevices,
        default_record_path,
        repair_devices,
        utc_now,
    )
    from keybroker.flows.pairing.verification import DevicePolicy
    from keybroker.pki import load_certificates, load_crl

    _revocation_args(crl, crl_from_broker, no_revocation)
    passphrase = os.environ.get(PASSPHRASE_ENV)
    if passphrase is None:
        raise _fail(f"set ${PASSPHRASE_ENV} to the keyring's passphrase")
    record_path = devices or default_record_path(keyring)
    roots = tuple(c for path in trust_root for c in load_certificates(_read(path, "root")))
    texts = [m.encode("utf-8") for m in message or ()]

    async def one_round() -> list[RepairResult]:
        local = tuple(load_crl(Path(p).read_bytes()) for p in crl or ())
        async with PrincipalClient.open(keyring, passphrase=passphrase) as client:
            await client.receive()
            holding = [h for h in await client.holdings() if h.name == keyset]
            fetched: tuple[x509.CertificateRevocationList, ...] = ()
            if crl_from_broker:
                verdict = await fetch_trusted_crls(client, roots, utc_now())
                for why in verdict.ignored:
                    err.print(f"[yellow]ignored:[/yellow] {escape(why)}")
                fetched = verdict.kept
            primary = holding[0].primary if holding else None
            if primary is None:
                raise KeysetError(f"this controller holds no primary of {keyset!r} at the broker")
            common = client.keyset(keyset)
            if primary not in {v.version for v in common.versions}:
                raise KeysetError(f"{keyset} v{primary} has not been delivered here yet")
            client.promote_version(keyset, primary)  # follow the broker (as the rotation agent)
            common = client.keyset(keyset)
        record = PairedDevices.load(record_path)
        due = record.due(keyset, primary)
        if due:
            out.print(f"{keyset} v{primary}: re-pairing {len(due)} device(s)")
        elif not watch:
            out.print(f"{keyset} v{primary}: no recorded device to re-pair")
        policy = DevicePolicy(roots, None if no_revocation else local + fetched, max_intermediates)
        results = await repair_devices(
            record,
            common=common,
            version=primary,
            policy=policy,
            rng=os.urandom,
            name=name,
            messages=texts,
            timeout=timeout,
            on_event=_report,
        )
        for result in results:
            _print_result(result)
        sys.stdout.flush()
        return results

    if watch:
        out.print(f"watching {keyset} every {interval:g} s (Ctrl-C to stop)")
        _watch(one_round, interval)
        return
    try:
        results = asyncio.run(one_round())
    except (KeybrokerError, OSError) as exc:
        raise _fail(str(exc)) from None
    if not all(r.ok for r in results):
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


# -- the broker's inventory (on the broker host) -----------------------------------------------

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar="KEYBROKER_HOME", help="keybroker home [default: ./.keybroker]"),
]
OperatorOption = Annotated[
    str | None,
    typer.Option(help="who makes the change, for the log [default: the login name]"),
]


def _operator_name(given: str | None) -> str:
    if given is not None:
        return given
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "operator"


@pair_app.command("inventory-add")
def inventory_add(  # noqa: PLR0917 - one parameter per option
    code: Annotated[
        str | None,
        typer.Option(help="the device's pairing code (keybroker-pair:…)", show_default=False),
    ] = None,
    serial: Annotated[str | None, typer.Option(help="instead of --code: serial number")] = None,
    hardware_id: Annotated[str | None, typer.Option(help="… hardware id (MAC)")] = None,
    model: Annotated[str | None, typer.Option(help="… model")] = None,
    key_sha256: Annotated[
        str | None, typer.Option(help="… SHA-256 of the device key's SPKI (hex)")
    ] = None,
    operator: OperatorOption = None,
    home: HomeOption = None,
) -> None:
    """On the broker host: record a device, so controllers can pair it with --from-inventory.

    Give its pairing code, or every one of --serial, --hardware-id, --model and
    --key-sha256. The addition is a transparency-log entry.
    """
    from keybroker.broker.home import open_home
    from keybroker.broker.service import Broker
    from keybroker.flows.pairing.code import PairingCode
    from keybroker.flows.pairing.inventory import Inventory
    from keybroker.pki import DeviceIdentity
    from keybroker.store.paths import default_home

    fields = (serial, hardware_id, model, key_sha256)
    if (code is None) == all(f is None for f in fields):
        raise _fail("give --code, or --serial, --hardware-id, --model and --key-sha256")
    try:
        if code is not None:
            if any(f is not None for f in fields):
                raise _fail("give --code or the fields, not both")
            device = PairingCode.from_uri(code)
        else:
            if any(f is None for f in fields) or key_sha256 is None:
                raise _fail("give all of --serial, --hardware-id, --model and --key-sha256")
            try:
                digest = bytes.fromhex(key_sha256)
            except ValueError:
                raise _fail("--key-sha256 is 64 hex digits") from None
            identity = DeviceIdentity(serial or "", hardware_id or "", model or "")
            device = PairingCode(identity, digest)
        with open_home(home or default_home()) as opened:
            added = Inventory(Broker.from_home(opened)).add(device, _operator_name(operator))
    except KeybrokerError as exc:
        raise _fail(str(exc)) from None
    out.print(
        f"recorded {added.code.identity}: {added.code.to_uri()} (by {escape(added.added_by)})"
    )


@pair_app.command("inventory-remove")
def inventory_remove(
    serial: Annotated[str, typer.Option(help="the device's serial number", show_default=False)],
    operator: OperatorOption = None,
    home: HomeOption = None,
) -> None:
    """On the broker host: remove a device's inventory record (logged)."""
    from keybroker.broker.home import open_home
    from keybroker.broker.service import Broker
    from keybroker.flows.pairing.inventory import Inventory
    from keybroker.store.paths import default_home

    try:
        with open_home(home or default_home()) as opened:
            removed = Inventory(Broker.from_home(opened)).remove(serial, _operator_name(operator))
    except KeybrokerError as exc:
        raise _fail(str(exc)) from None
    out.print(f"removed {removed.code.identity}: {removed.code.to_uri()}")


if __name__ == "__main__":
    pair_app()
