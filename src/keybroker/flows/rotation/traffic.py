"""The link data plane: an upstream node sends, a downstream site receives, under the link keyset.

It is what shows that a staged rotation loses nothing. The rule both ends follow
(S10; :func:`transmit_version` is the whole of it):

* a **node** transmits with the link keyset's *local primary*: the version the
  broker promoted, which its agent mirrors. The broker promotes a link's new
  version only after the downstream site and then the node acknowledged it with
  proof of possession, so whatever a node sends with, the site can already read;
* a **site** receives with *any installed version*, chosen by the ciphertext's
  5-byte key-id prefix (:class:`~keybroker.keys.AeadHandle` does the lookup).

Both read the principal's keyring file (read-only; the agent owns it) and load
it again as soon as it changes: the agent replaces it atomically, so a change of
``(st_dev, st_ino, st_mtime_ns, st_size)`` is a new keyring
(:class:`KeyringView`). The sender therefore moves to a new version as soon as
its node's agent saw it promoted, and the receiver accepts it once its site's
agent installed it.

Wire format, one frame per message over TCP (TCP_NODELAY)::

    length (4, big-endian, of what follows) || sequence (8, big-endian) || ciphertext

``ciphertext`` is ``AeadHandle`` output (key-id prefix, nonce, AES-GCM) with
associated data :func:`frame_aad` binding the keyset name and the sequence number,
so a frame replayed under another number, or moved to another link, fails.
:class:`FrameDecoder` is the sans-IO parser; a peer's garbage raises
:class:`~keybroker.errors.RemoteProtocolError` and nothing else.

Counting: the sender counts what it sent per version; the receiver counts frames
received, decrypted and failed (bad tag or unknown key id), missing sequence
numbers (``gaps``) and decrypted frames per version. Zero loss is
``failed == 0 and gaps == 0 and received == sent`` (:func:`zero_loss`). Both write
their counters as JSON, atomically, at least once a second and when they stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from keybroker.client.keyring import KekSource, Keyring
from keybroker.encoding import encode, message_label
from keybroker.errors import CryptoError, KeybrokerError, KeysetError, RemoteProtocolError
from keybroker.keys import CONSUMING_STATES, AeadHandle, KeyState, KeyVersionInfo
from keybroker.keys._common import PREFIX_SIZE, prefix

logger = logging.getLogger("keybroker.rotation.traffic")

AAD_LABEL: Final = message_label("keybroker/rotation/traffic-aad", 1)
LENGTH: Final = struct.Struct(">I")
SEQUENCE: Final = struct.Struct(">Q")
#: Largest frame body accepted (sequence + ciphertext); a peer announcing more is refused
#: before anything is buffered.
MAX_FRAME: Final = 64 * 1024
#: Smallest body: the sequence number and at least a key-id prefix.
MIN_FRAME: Final = SEQUENCE.size + PREFIX_SIZE
MAX_PAYLOAD: Final = MAX_FRAME - SEQUENCE.size - 64
#: How often the counters reach the stats file while running.
STATS_INTERVAL: Final = 0.5


# -- the rule ------------------------------------------------------------------------------


def transmit_version(versions: Iterable[KeyVersionInfo]) -> int | None:
    """The version a principal transmits with: its local primary, ``None`` if it has none.

    The agent makes a version the local primary only when the broker promoted it
    (:meth:`.agent.RotationAgent.sync_once`), and the broker promotes a link's new
    version only after the downstream site and then the upstream node acknowledged
    it. So whatever one end sends with, the other end already holds; and a link
    whose rollout failed or was aborted never moves off its old key.
    """
    return next((v.version for v in versions if v.state is KeyState.PRIMARY), None)


def version_of(ciphertext: bytes, versions: Iterable[KeyVersionInfo]) -> int | None:
    """The installed version a ciphertext's key-id prefix names, if any (for counting)."""
    head = bytes(ciphertext[:PREFIX_SIZE])
    for v in versions:
        if prefix(v.key_id) == head:
            return v.version
    return None


# -- framing (sans-IO) ---------------------------------------------------------------------


def frame_aad(keyset: str, sequence: int) -> bytes:
    """Associated data of one message: the link keyset and the sequence number."""
    return encode(AAD_LABEL, {"keyset": keyset, "seq": sequence})


def encode_frame(sequence: int, ciphertext: bytes) -> bytes:
    body = len(ciphertext) + SEQUENCE.size
    if not 0 <= sequence < 1 << 64:
        raise ValueError("sequence numbers are 64-bit unsigned")
    if body > MAX_FRAME:
        raise ValueError(f"frame of {body} bytes exceeds {MAX_FRAME}")
    return LENGTH.pack(body) + SEQUENCE.pack(sequence) + ciphertext


@dataclass(frozen=True)
class Frame:
    sequence: int
    ciphertext: bytes


class FrameDecoder:
    """Bytes in, frames out. After a :class:`RemoteProtocolError` the stream is unusable."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._broken = False

    def feed(self, data: bytes) -> list[Frame]:
        if self._broken:
            raise RemoteProtocolError("the frame stream is already broken")
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(self._buffer)
            if not MIN_FRAME <= size <= MAX_FRAME:
                self._broken = True
                raise RemoteProtocolError(f"frame length {size} outside [{MIN_FRAME}, {MAX_FRAME}]")
            end = LENGTH.size + size
            if len(self._buffer) < end:
                break
            (sequence,) = SEQUENCE.unpack_from(self._buffer, LENGTH.size)
            frames.append(Frame(sequence, bytes(self._buffer[LENGTH.size + SEQUENCE.size : end])))
            del self._buffer[:end]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


# -- counters ------------------------------------------------------------------------------


@dataclass
class SenderStats:
    principal: str
    keyset: str
    peer: str
    sent: int = 0
    sent_by_version: dict[int, int] = field(default_factory=dict)
    current_version: int | None = None
    next_seq: int = 0
    connects: int = 0
    disconnects: int = 0
    #: Ticks with no installed version to send with (nothing sent, no sequence used).
    no_key: int = 0
    keyring_loads: int = 0
    done: bool = False

    def record(self, version: int) -> None:
        self.sent += 1
        self.next_seq += 1
        self.sent_by_version[version] = self.sent_by_version.get(version, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "role": "sender",
            "principal": self.principal,
            "keyset": self.keyset,
            "peer": self.peer,
            "sent": self.sent,
            "sent_by_version": {str(k): v for k, v in sorted(self.sent_by_version.items())},
            "current_version": self.current_version,
            "next_seq": self.next_seq,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "no_key": self.no_key,
            "keyring_loads": self.keyring_loads,
            "done": self.done,
            "updated_at": time.time(),
        }


@dataclass
class ReceiverStats:
    principal: str
    keyset: str
    listen: str = ""
    received: int = 0
    decrypted: int = 0
    #: Frames that did not decrypt: a bad tag, or a key id not installed here.
    failed: int = 0
    #: Of ``failed``: the key id named no installed version.
    unknown_key: int = 0
    #: Sequence numbers skipped over (messages that never arrived).
    gaps: int = 0
    #: Frames whose sequence number was at or below one already seen.
    duplicates: int = 0
    by_version: dict[int, int] = field(default_factory=dict)
    last_seq: int | None = None
    connections: int = 0
    protocol_errors: int = 0
    keyring_loads: int = 0
    installed_versions: list[int] = field(default_factory=list)
    done: bool = False

    def observe(self, sequence: int) -> None:
        """Account for a frame's sequence number (the sender starts at 0, one by one)."""
        self.received += 1
        expected = 0 if self.last_seq is None else self.last_seq + 1
        if sequence < expected:
            self.duplicates += 1
            return
        self.gaps += sequence - expected
        self.last_seq = sequence

    def decrypted_with(self, version: int | None) -> None:
        self.decrypted += 1
        if version is not None:
            self.by_version[version] = self.by_version.get(version, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "role": "receiver",
            "principal": self.principal,
            "keyset": self.keyset,
            "listen": self.listen,
            "received": self.received,
            "decrypted": self.decrypted,
            "failed": self.failed,
            "unknown_key": self.unknown_key,
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "by_version": {str(k): v for k, v in sorted(self.by_version.items())},
            "last_seq": self.last_seq,
            "connections": self.connections,
            "protocol_errors": self.protocol_errors,
            "keyring_loads": self.keyring_loads,
            "installed_versions": list(self.installed_versions),
            "done": self.done,
            "updated_at": time.time(),
        }


def zero_loss(sender: Mapping[str, Any], receiver: Mapping[str, Any]) -> bool:
    """From the two stats documents: nothing failed, nothing skipped, everything arrived."""
    return bool(
        receiver["failed"] == 0
        and receiver["gaps"] == 0
        and receiver["duplicates"] == 0
        and receiver["received"] == sender["sent"]
    )


def write_json_atomic(path: Path, document: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``document`` as JSON: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(document, indent=1, sort_keys=True).encode()
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- the keyring, as a data plane sees it -------------------------------------------------


class KeyringView:
    """One link keyset of a principal's keyring file, loaded again whenever the file changes.

    Read-only: the agent owns the file and replaces it atomically. A keyring that
    does not load (mid-replacement cannot happen, but a wrong passphrase can) keeps
    the last good view and logs.
    """

    def __init__(self, path: Path, source: KekSource, keyset: str) -> None:
        self.path = Path(path)
        self.keyset = keyset
        self._source = source
        self._stamp: tuple[int, int, int, int] | None = None
        self.principal = ""
        self.versions: tuple[KeyVersionInfo, ...] = ()
        self.loads = 0
        self._keyring: Keyring | None = None
        self._receiver: AeadHandle | None = None
        self._sender: tuple[int, AeadHandle] | None = None

    def refresh(self) -> bool:
        """Load the keyring again if the file changed; ``True`` if it did."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            logger.warning("keyring %s unreadable: %s", self.path, exc.strerror)
            return False
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        try:
            keyring = Keyring.load(self.path, self._source)
        except KeybrokerError as exc:
            logger.warning("keyring %s not loaded: %s", self.path, exc)
            return False
        self._stamp = stamp
        self._keyring = keyring
        self.principal = str(keyring.principal)
        held = keyring.received.get(self.keyset)
        self.versions = () if held is None else held.versions
        self._receiver = self._sender = None
        self.loads += 1
        return True

    @property
    def installed(self) -> list[int]:
        return [v.version for v in self.versions if v.state in CONSUMING_STATES]

    def receiver(self) -> AeadHandle | None:
        """Decrypts with any installed version; ``None`` before the keyset arrived."""
        if self._receiver is None and self._keyring is not None and self.versions:
            self._receiver = self._keyring.data_aead(self.keyset)
        return self._receiver

    def sender(self) -> tuple[int, AeadHandle] | None:
        """``(version, aead)`` encrypting under :func:`transmit_version`; ``None`` if none."""
        version = transmit_version(self.versions)
        if version is None or self._keyring is None:
            return None
        if self._sender is None or self._sender[0] != version:
            self._sender = (version, self._keyring.data_aead(self.keyset, encrypt_version=version))
        return self._sender


# -- the two ends --------------------------------------------------------------------------


def _nodelay(writer: asyncio.StreamWriter) -> None:
    # asyncio already sets it on TCP transports (base_events._set_nodelay); said here
    # too because a frame a message must not wait for the next (Nagle + delayed ACK).
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _until(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))


async def _stats_writer(
    path: Path | None, document: Callable[[], Mapping[str, Any]], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        if path is not None:
            write_json_atomic(path, document())
        await _until(stop, STATS_INTERVAL)


@dataclass(frozen=True)
class SenderConfig:
    keyring: Path
    source: KekSource = field(repr=False)
    keyset: str
    host: str
    port: int
    rate: float = 50.0
    size: int = 64
    #: Stop after this many messages (0: until told to stop).
    count: int = 0
    stats: Path | None = None


@dataclass(frozen=True)
class ReceiverConfig:
    keyring: Path
    source: KekSource = field(repr=False)
    keyset: str
    host: str = "127.0.0.1"
    port: int = 0
    stats: Path | None = None


async def run_sender(config: SenderConfig, stop: asyncio.Event) -> SenderStats:
    """Send ``config.rate`` messages a second until ``stop`` is set (or ``count`` are sent).

    Reconnects whenever the receiver goes away. A message counts as sent once it was
    handed to the kernel whole; one that fails to be written is sent again, under the
    same sequence number, on the next connection.
    """
    if config.rate <= 0:
        raise ValueError("the rate must be positive")
    if not 0 <= config.size <= MAX_PAYLOAD:
        raise ValueError(f"the message size must be 0 to {MAX_PAYLOAD} bytes")
    view = KeyringView(config.keyring, config.source, config.keyset)
    view.refresh()
    stats = SenderStats(view.principal, config.keyset, f"{config.host}:{config.port}")
    done = asyncio.Event()
    writer_task = asyncio.create_task(_stats_writer(config.stats, stats.to_json, done))
    interval = 1.0 / config.rate
    payload = bytes(config.size)
    retry = 0.05
    try:
        while not stop.is_set() and not (config.count and stats.sent >= config.count):
            try:
                reader, writer = await asyncio.open_connection(config.host, config.port)
            except OSError:
                await _until(stop, retry)
                retry = min(1.0, retry * 2)
                continue
            retry = 0.05
            _nodelay(writer)
            stats.connects += 1
            logger.info("connected to %s:%s", config.host, config.port)
            try:
                await _send_loop(
                    config,
                    view,
                    stats,
                    stream=(reader, writer),
                    stop=stop,
                    interval=interval,
                    payload=payload,
                )
            except (ConnectionError, OSError) as exc:
                stats.disconnects += 1
                logger.warning("connection to the receiver lost (%s); reconnecting", exc)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()
    finally:
        stats.done = True
        stats.principal = view.principal
        stats.keyring_loads = view.loads
        done.set()
        await writer_task
        if config.stats is not None:
            write_json_atomic(config.stats, stats.to_json())
    return stats


async def _send_loop(
    config: SenderConfig,
    view: KeyringView,
    stats: SenderStats,
    *,
    stream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    stop: asyncio.Event,
    interval: float,
    payload: bytes,
) -> None:
    reader, writer = stream
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set() and not (config.count and stats.sent >= config.count):
        delay = next_at - loop.time()
        if delay > 0:
            await _until(stop, delay)
            if stop.is_set():
                return
        # Late by more than a second (a stall): pick up the pace from now, no burst.
        next_at = max(next_at + interval, loop.time() - 1.0)
        if view.refresh():
            stats.keyring_loads = view.loads
            stats.principal = view.principal
            logger.info("keyring reloaded; installed versions %s", view.installed)
        chosen = view.sender()
        if chosen is None:
            stats.no_key += 1
            continue
        version, aead = chosen
        if version != stats.current_version:
            logger.info("transmitting with %s v%d", config.keyset, version)
            stats.current_version = version
        if reader.at_eof():
            # The receiver closed its end (it never writes): whatever we write now is lost.
            raise ConnectionResetError("the receiver closed the connection")
        seq = stats.next_seq
        ciphertext = aead.encrypt(payload, frame_aad(config.keyset, seq))
        writer.write(encode_frame(seq, ciphertext))
        await writer.drain()
        stats.record(version)


async def run_receiver(
    config: ReceiverConfig,
    stop: asyncio.Event,
    *,
    listening: Callable[[str, int], None] | None = None,
) -> ReceiverStats:
    """Listen and count until ``stop`` is set; ``listening(host, port)`` once bound."""
    view = KeyringView(config.keyring, config.source, config.keyset)
    view.refresh()
    stats = ReceiverStats(view.principal, config.keyset)

    open_writers: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        open_writers.add(writer)
        stats.connections += 1
        decoder = FrameDecoder()
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    _receive(config.keyset, view, stats, frame)
        except RemoteProtocolError as exc:
            stats.protocol_errors += 1
            logger.warning("dropping a sender that broke the framing: %s", exc)
        except (ConnectionError, OSError) as exc:
            logger.info("sender connection ended: %s", exc)
        finally:
            open_writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, config.host, config.port)
    host, port = server.sockets[0].getsockname()[:2]
    stats.listen = f"{host}:{port}"
    stats.installed_versions = view.installed
    stats.keyring_loads = view.loads
    logger.info("listening on %s for %s", stats.listen, config.keyset)
    if config.stats is not None:
        write_json_atomic(config.stats, stats.to_json())
    if listening is not None:
        listening(host, port)
    done = asyncio.Event()
    writer_task = asyncio.create_task(_stats_writer(config.stats, stats.to_json, done))
    try:
        await stop.wait()
    finally:
        server.close()
        for writer in list(open_writers):
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), timeout=2.0)
        stats.done = True
        done.set()
        await writer_task
        if config.stats is not None:
            write_json_atomic(config.stats, stats.to_json())
    return stats


def _receive(keyset: str, view: KeyringView, stats: ReceiverStats, frame: Frame) -> None:
    stats.observe(frame.sequence)
    if view.refresh():
        stats.installed_versions = view.installed
        stats.keyring_loads = view.loads
        stats.principal = view.principal
        logger.info("keyring reloaded; installed versions %s", view.installed)
    aead = view.receiver()
    version = version_of(frame.ciphertext, view.versions)
    try:
        if aead is None:
            raise CryptoError()
        aead.decrypt(frame.ciphertext, frame_aad(keyset, frame.sequence))
    except (CryptoError, KeysetError):
        stats.failed += 1
        if version is None:
            stats.unknown_key += 1
        return
    stats.decrypted_with(version)
