"""Re-pairing after the common keyset rotates: the controller's record and the re-pair loop.

The issue: "the common key is a broker keyset that controller devices ``hold``;
rotating it re-pairs devices". A controller keeps a record of the devices it
paired (:class:`PairedDevices`, a JSON file next to its keyring: addresses,
pairing codes, certificate hashes and version numbers, nothing secret). When the
broker's primary of the common keyset is newer than the version a device was
given, :func:`repair_devices` runs the whole pairing with it again: a new Hello
and nonces, the chain, CRLs, identity and key-hash checks against its pairing
code, the proof of possession, then the new version sealed to its key with the
continuity proof (a MAC under the version it holds, see :mod:`.protocol`). A
device revoked since is refused like any other and is sent nothing.

:func:`watch` repeats a round (``keybroker pair rekey --watch``) every
``interval`` seconds; the CLI's round fetches the controller's deliveries, reads
the broker's primary from its holdings, and re-pairs the devices behind it.

A device refused (by our checks or its own) is not tried again for the same
version: it stays in the record with the reason, and is tried at the next
rotation. A device that could not be reached is tried again every round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from keybroker.errors import ConfigurationError, KeybrokerError, KeysetError
from keybroker.flows.pairing.code import PairingCode
from keybroker.flows.pairing.controller import ControllerOutcome, pair_with_device
from keybroker.flows.pairing.protocol import Controller, DevicePaired, Event, PairingRefused, Rng
from keybroker.flows.pairing.verification import DevicePolicy
from keybroker.keys import Keyset

logger = logging.getLogger("keybroker.pairing.rekey")

RECORD_FORMAT: Final = "keybroker/pairing/paired-devices/v1"

Clock = Callable[[], datetime]
Pair = Callable[..., Awaitable[ControllerOutcome]]


def default_record_path(keyring: Path) -> Path:
    """``ctl.keyring`` → ``ctl.keyring.devices.json``, next to the keyring."""
    return keyring.with_name(keyring.name + ".devices.json")


def split_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigurationError(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


@dataclass
class PairedDevice:
    """One device this controller paired: public facts only."""

    code: str  # its pairing code URI (identification info + SHA-256 of its key)
    address: str  # HOST:PORT it was reached at
    keyset: str
    version: int  # the version it was given and confirmed
    certificate_sha256: str  # hex, of the certificate it paired with
    refused: str | None = None  # the last refusal's reason, if the last attempt was refused
    refused_version: int | None = None  # the version that refusal was for

    @property
    def identity(self) -> str:
        return str(PairingCode.from_uri(self.code).identity)


class PairedDevices:
    """The record: a JSON file, replaced atomically on every change."""

    def __init__(self, path: Path, devices: Sequence[PairedDevice] = ()) -> None:
        self.path = Path(path)
        self.devices = list(devices)

    def __repr__(self) -> str:
        return f"PairedDevices({self.path}, {len(self.devices)} devices)"

    def __iter__(self) -> Iterator[PairedDevice]:
        return iter(self.devices)

    @classmethod
    def load(cls, path: Path) -> PairedDevices:
        """The record at ``path``; an empty one if there is no file yet."""
        try:
            document = json.loads(Path(path).read_bytes())
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"cannot read the paired-device record {path}: {exc}"
            ) from None
        try:
            if document["format"] != RECORD_FORMAT:
                raise ValueError("unknown format")
            devices = [PairedDevice(**entry) for entry in document["devices"]]
            for device in devices:
                PairingCode.from_uri(device.code)
                split_address(device.address)
        except (KeyError, TypeError, ValueError, KeybrokerError) as exc:
            raise ConfigurationError(f"{path} is not a paired-device record: {exc}") from None
        return cls(path, devices)

    def save(self) -> None:
        document = {"format": RECORD_FORMAT, "devices": [asdict(d) for d in self.devices]}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get(self, code: PairingCode) -> PairedDevice | None:
        uri = code.to_uri()
        return next((d for d in self.devices if d.code == uri), None)

    def paired(self, code: PairingCode, address: str, event: DevicePaired) -> PairedDevice:
        """Note a pairing that completed (a new device, or a new version for one we know)."""
        entry = PairedDevice(
            code=code.to_uri(),
            address=address,
            keyset=event.keyset,
            version=event.version,
            certificate_sha256=event.certificate_sha256.hex(),
        )
        known = self.get(code)
        if known is None:
            self.devices.append(entry)
        else:
            self.devices[self.devices.index(known)] = entry
        return entry

    def due(self, keyset: str, version: int) -> list[PairedDevice]:
        """Devices of ``keyset`` behind ``version``, except those refused for it already."""
        return [
            d
            for d in self.devices
            if d.keyset == keyset and d.version < version and d.refused_version != version
        ]


def previous_for(common: Keyset, known: PairedDevice | None) -> int | None:
    """The version to prove to a known device (None if unknown or no longer held)."""
    if known is None or known.keyset != common.name:
        return None
    try:
        common.version(known.version)
    except KeysetError:
        return None
    return known.version


@dataclass
class RepairResult:
    """One device's outcome: ``paired`` or ``refusal`` or ``error`` (unreachable, …)."""

    device: PairedDevice
    from_version: int
    to_version: int
    paired: DevicePaired | None = None
    refusal: PairingRefused | None = None
    error: str | None = None
    replies: list[bytes] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.paired is not None and self.refusal is None


def utc_now() -> datetime:
    return datetime.now(UTC)


async def repair_devices(
    record: PairedDevices,
    *,
    common: Keyset,
    version: int,
    policy: DevicePolicy,
    rng: Rng,
    name: str = "controller",
    messages: Sequence[bytes] = (),
    clock: Clock = utc_now,
    timeout: float = 30.0,
    on_event: Callable[[Event], None] | None = None,
    pair: Pair = pair_with_device,
) -> list[RepairResult]:
    """Pair again, one at a time, every recorded device of ``common`` behind ``version``.

    The record is saved after each device, so a crash loses at most one outcome.
    """
    results = []
    for device in record.due(common.name, version):
        result = RepairResult(device, device.version, version)
        results.append(result)
        code = PairingCode.from_uri(device.code)
        try:
            host, port = split_address(device.address)
            machine = Controller(
                expected=code,
                policy=policy,
                common=common,
                version=version,
                rng=rng,
                name=name,
                previous=previous_for(common, device),
            )
            outcome = await pair(
                host,
                port,
                machine,
                messages=messages,
                clock=clock,
                timeout=timeout,
                on_event=on_event,
            )
        except KeybrokerError as exc:
            result.error = str(exc)
            logger.info("re-pairing %s at %s failed: %s", code.identity, device.address, exc)
            continue
        result.refusal, result.replies = outcome.refusal, outcome.replies
        if outcome.refusal is not None:
            device.refused, device.refused_version = outcome.refusal.reason.value, version
        elif outcome.paired is not None:
            result.paired = outcome.paired
            record.paired(code, device.address, outcome.paired)
        record.save()
    return results


async def watch(
    round_: Callable[[], Awaitable[object]],
    *,
    interval: float,
    stop: asyncio.Event,
    on_error: Callable[[BaseException], None] | None = None,
) -> int:
    """Run ``round_`` every ``interval`` seconds until ``stop`` is set; the rounds run.

    A round that fails (the broker or a file unreachable, …) is reported to
    ``on_error`` and the next one runs as usual.
    """
    if interval <= 0:
        raise ValueError("interval must be > 0")
    rounds = 0
    while not stop.is_set():
        try:
            await round_()
        except (KeybrokerError, OSError) as exc:
            if on_error is not None:
                on_error(exc)
            logger.warning("re-pairing round failed: %s", exc)
        rounds += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
    return rounds
