"""The link data plane: framing (sans-IO), the node/site rule, counters, and a sender and a
receiver on loopback following their keyrings through a rotation."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from agent_kit import deliver, eventually, kek_source, make_keyring, read_json

from keybroker.client.keyring import KekSource, Keyring
from keybroker.errors import CryptoError, RemoteProtocolError
from keybroker.flows.rotation.traffic import (
    MAX_FRAME,
    Frame,
    FrameDecoder,
    KeyringView,
    ReceiverConfig,
    ReceiverStats,
    SenderConfig,
    encode_frame,
    frame_aad,
    run_receiver,
    run_sender,
    transmit_version,
    version_of,
    write_json_atomic,
    zero_loss,
)
from keybroker.keys import AES256_GCM, Keyset

LINK = "rotation/n1/s1"


# -- framing --------------------------------------------------------------------------------


def test_frames_round_trip_whole_or_byte_by_byte() -> None:
    frames = [Frame(0, b"\x01" * 40), Frame(1, b"\x01" * 33), Frame(2**64 - 1, b"z" * 5000)]
    wire = b"".join(encode_frame(f.sequence, f.ciphertext) for f in frames)
    assert FrameDecoder().feed(wire) == frames
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
    assert out == frames and decoder.pending == 0
    assert wire[:12] == (8 + 40).to_bytes(4, "big") + (0).to_bytes(8, "big")


@pytest.mark.parametrize("length", [0, 12, MAX_FRAME + 1, 2**32 - 1])
def test_a_length_out_of_bounds_breaks_the_stream(length: int) -> None:
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(length.to_bytes(4, "big") + b"\0" * 20)
    with pytest.raises(RemoteProtocolError):  # and it stays broken
        decoder.feed(encode_frame(1, b"\x01" * 40))


def test_frames_that_cannot_be_encoded_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_frame(-1, b"x" * 20)
    with pytest.raises(ValueError):
        encode_frame(1, b"x" * MAX_FRAME)


@given(st.lists(st.binary(max_size=300), max_size=20))
@settings(max_examples=200, deadline=None)
def test_garbage_raises_only_remote_protocol_errors(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                assert isinstance(frame.sequence, int) and len(frame.ciphertext) >= 5
    except RemoteProtocolError:
        pass


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(min_size=5, max_size=200))))
@settings(max_examples=100, deadline=None)
def test_decode_of_encode_is_identity(items: list[tuple[int, bytes]]) -> None:
    wire = b"".join(encode_frame(seq, ct) for seq, ct in items)
    assert FrameDecoder().feed(wire) == [Frame(seq, ct) for seq, ct in items]


def test_the_aad_binds_the_keyset_and_the_sequence_number() -> None:
    aead = Keyset.generate(LINK, AES256_GCM).aead()
    ct = aead.encrypt(b"msg", frame_aad(LINK, 7))
    assert aead.decrypt(ct, frame_aad(LINK, 7)) == b"msg"
    for aad in (frame_aad(LINK, 8), frame_aad("rotation/n2/s1", 7)):
        with pytest.raises(CryptoError):
            aead.decrypt(ct, aad)


# -- the rule and the counters --------------------------------------------------------------


def test_a_principal_transmits_under_its_local_primary_only() -> None:
    keyset = Keyset.generate(LINK, AES256_GCM)
    assert transmit_version(()) is None
    keyset.add()
    keyset.add()
    # Installed but not promoted by the broker: received, never sent under.
    assert transmit_version(keyset.versions) == 1
    keyset.promote(3)
    assert transmit_version(keyset.versions) == 3
    keyset.promote(2)
    keyset.disable(3)
    assert transmit_version(keyset.versions) == 2
    installed_only = Keyset(LINK, "aead")
    assert transmit_version(installed_only.versions) is None
    ct = keyset.aead().encrypt(b"m", b"")
    assert version_of(ct, keyset.versions) == 2
    assert version_of(b"\x01\0\0\0\0rest", keyset.versions) is None


def test_the_receiver_counts_gaps_and_duplicates() -> None:
    stats = ReceiverStats("site/s1", LINK)
    for seq in (0, 1, 2, 5, 6, 6, 3, 7):
        stats.observe(seq)
    assert (stats.received, stats.gaps, stats.duplicates, stats.last_seq) == (8, 2, 2, 7)
    late = ReceiverStats("site/s1", LINK)
    late.observe(4)  # 0..3 never arrived
    assert late.gaps == 4


def test_zero_loss_needs_everything_and_nothing_else() -> None:
    receiver = {"received": 10, "failed": 0, "gaps": 0, "duplicates": 0}
    assert zero_loss({"sent": 10}, receiver)
    assert not zero_loss({"sent": 11}, receiver)
    for key in ("failed", "gaps", "duplicates"):
        assert not zero_loss({"sent": 10}, {**receiver, key: 1})


def test_stats_files_are_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_the_view_reloads_only_when_the_file_is_replaced(tmp_path: Path) -> None:
    source, path = kek_source(), tmp_path / "n1.keyring"
    broker_side = Keyset.generate(LINK, AES256_GCM)
    keyring = make_keyring("node/n1")
    keyring.save(path, source)
    view = KeyringView(path, source, LINK)
    assert view.refresh() is True and view.principal == "node/n1"
    assert view.sender() is None and view.receiver() is None
    assert view.refresh() is False
    deliver(keyring, broker_side, 1)
    keyring.save(path, source)
    assert view.refresh() is True and view.installed == [1]
    assert view.sender() is None  # installed, not yet promoted: receive only
    keyring.promote_version(LINK, 1)  # what the agent does when the broker says so
    keyring.save(path, source)
    assert view.refresh() is True
    chosen = view.sender()
    assert chosen is not None and chosen[0] == 1
    wrong = KeyringView(path, kek_source(), LINK)  # another KEK: not loaded, logged
    assert wrong.refresh() is False and wrong.versions == ()


# -- on loopback ----------------------------------------------------------------------------


class Link:
    """A node's and a site's keyring files for one link keyset, and the broker's copy."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.source: KekSource = kek_source()
        self.broker_side = Keyset.generate(LINK, AES256_GCM)
        self.node = make_keyring("node/n1")
        self.site = make_keyring("site/s1")
        self.node_path, self.site_path = tmp_path / "n1.keyring", tmp_path / "s1.keyring"
        self.save()

    def save(self) -> None:
        self.node.save(self.node_path, self.source)
        self.site.save(self.site_path, self.source)

    def install(self, keyring: Keyring, version: int, *, promote: bool = False) -> None:
        """Install ``version`` (receive); with ``promote``, also transmit under it, as the
        agent does once the broker promoted it."""
        deliver(keyring, self.broker_side, version)
        if promote:
            keyring.promote_version(LINK, version)
        self.save()

    def promote(self, version: int) -> None:
        for keyring in (self.node, self.site):
            keyring.promote_version(LINK, version)
        self.save()

    def sender(self, port: int, **options: object) -> SenderConfig:
        return SenderConfig(
            keyring=self.node_path,
            source=self.source,
            keyset=LINK,
            host="127.0.0.1",
            port=port,
            stats=self.tmp / "send.json",
            **options,  # type: ignore[arg-type]
        )

    def receiver(self, port: int = 0) -> ReceiverConfig:
        return ReceiverConfig(
            keyring=self.site_path,
            source=self.source,
            keyset=LINK,
            port=port,
            stats=self.tmp / "receive.json",
        )


async def start_receiver(
    link: Link, port: int = 0
) -> tuple[asyncio.Task[ReceiverStats], asyncio.Event, int]:
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_receiver(link.receiver(port), stop, listening=lambda _h, p: bound.set_result(p))
    )
    return task, stop, await asyncio.wait_for(bound, 10)


async def test_a_rotation_on_the_link_loses_nothing(tmp_path: Path) -> None:
    link = Link(tmp_path)
    link.broker_side.add()
    link.install(link.site, 1, promote=True)
    link.install(link.node, 1, promote=True)
    receiving, stop_receiver, port = await start_receiver(link)
    stop_sender = asyncio.Event()
    sending = asyncio.create_task(run_sender(link.sender(port, rate=400), stop_sender))
    received = lambda n: (read_json(tmp_path / "receive.json") or {}).get("received", 0) >= n  # noqa: E731

    await eventually(lambda: received(30), what="traffic under v1")
    link.install(link.site, 2)  # the site first: it accepts v2, the node still sends v1
    await eventually(lambda: received(60), what="more traffic")
    await eventually(
        lambda: (read_json(tmp_path / "send.json") or {}).get("sent_by_version") == {"1": ANY},
        what="the sender on v1 alone",
    )
    link.install(link.node, 2)  # then the node: installed, still sending under v1
    await asyncio.sleep(0.3)
    assert (read_json(tmp_path / "send.json") or {}).get("current_version") == 1
    link.promote(2)  # the broker promoted v2 and the agents mirrored it: the node switches
    await eventually(
        lambda: (read_json(tmp_path / "send.json") or {}).get("current_version") == 2,
        what="the sender switching to v2",
    )
    await eventually(lambda: received(150), what="traffic under v2")
    for keyring in (link.node, link.site):
        keyring.forget_version(LINK, 1)  # v1 retired after the switch: nothing fails
    link.save()
    await asyncio.sleep(0.2)

    stop_sender.set()
    sent = await asyncio.wait_for(sending, 10)
    await eventually(lambda: received(sent.sent), what="the last frames")
    stop_receiver.set()
    got = await asyncio.wait_for(receiving, 10)

    assert sent.sent_by_version[1] > 0 and sent.sent_by_version[2] > 0
    assert got.by_version == sent.sent_by_version
    assert got.failed == 0 and got.gaps == 0 and got.received == sent.sent
    assert zero_loss(sent.to_json(), got.to_json())
    on_disk_sent = read_json(tmp_path / "send.json")
    on_disk_received = read_json(tmp_path / "receive.json")
    assert on_disk_sent and on_disk_received
    assert on_disk_sent["done"] and on_disk_received["done"]
    assert on_disk_sent["sent"] == sent.sent and on_disk_received["received"] == got.received
    assert on_disk_received["by_version"] == {"1": got.by_version[1], "2": got.by_version[2]}
    assert on_disk_received["installed_versions"] == [2]
    assert zero_loss(on_disk_sent, on_disk_received)


async def test_a_node_ahead_of_its_site_is_counted_as_failures(tmp_path: Path) -> None:
    # What the staged order prevents: a node sending under a version its site lacks.
    link = Link(tmp_path)
    link.broker_side.add()
    link.install(link.site, 1, promote=True)
    link.install(link.node, 1, promote=True)
    link.install(link.node, 2, promote=True)
    receiving, stop_receiver, port = await start_receiver(link)
    sent = await run_sender(link.sender(port, rate=500, count=20), asyncio.Event())
    await eventually(lambda: (read_json(tmp_path / "receive.json") or {}).get("received") == 20)
    stop_receiver.set()
    got = await receiving
    assert sent.sent_by_version == {2: 20}
    assert (got.failed, got.unknown_key, got.decrypted) == (20, 20, 0)
    assert not zero_loss(sent.to_json(), got.to_json())


async def test_no_key_no_traffic_and_the_sender_reconnects(tmp_path: Path) -> None:
    link = Link(tmp_path)
    receiving, stop_receiver, port = await start_receiver(link)
    stop_sender = asyncio.Event()
    sending = asyncio.create_task(run_sender(link.sender(port, rate=200), stop_sender))
    await eventually(lambda: (read_json(tmp_path / "send.json") or {}).get("no_key", 0) > 5)
    assert read_json(tmp_path / "send.json")["sent"] == 0  # type: ignore[index]
    link.install(link.site, 1, promote=True)
    link.install(link.node, 1, promote=True)
    await eventually(lambda: (read_json(tmp_path / "receive.json") or {}).get("received", 0) > 10)

    stop_receiver.set()  # the receiver restarts on the same port
    first = await receiving
    receiving, stop_receiver, _ = await start_receiver(link, port)
    await eventually(
        lambda: (read_json(tmp_path / "receive.json") or {}).get("received", 0) > 10,
        what="traffic to the restarted receiver",
    )
    stop_sender.set()
    sent = await sending
    stop_receiver.set()
    second = await receiving
    assert sent.connects >= 2 and sent.disconnects >= 1
    assert first.received > 10 and second.received > 10
    assert first.failed == second.failed == 0
