"""TransparencyLog on SQLite and PostgreSQL (the ``store`` fixture runs every test on both)."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keybroker.errors import (
    ConfigurationError,
    CryptoError,
    LocalProtocolError,
    NotFound,
    StoreError,
)
from keybroker.log import merkle
from keybroker.log.sth import Ed25519TreeHeadSigner, SignedTreeHead
from keybroker.log.store_log import TransparencyLog
from keybroker.store.engine import Store, open_store
from keybroker.store.schema import log_leaves, log_nodes, tree_heads

VECTORS = json.loads(
    (Path(__file__).parents[2] / "vectors" / "rfc6962_merkle.json").read_text(encoding="utf-8")
)
T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now: int | datetime = T0

    def __call__(self) -> int | datetime:
        return self.now


@pytest.fixture
def signer() -> Ed25519TreeHeadSigner:
    return Ed25519TreeHeadSigner(Ed25519PrivateKey.generate(), "log-test")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def log(store: Store, signer: Ed25519TreeHeadSigner, clock: Clock) -> TransparencyLog:
    return TransparencyLog(store, signer, clock)


def counts(store: Store) -> tuple[int, int, int]:
    with store.snapshot() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
            for t in (log_leaves, log_nodes, tree_heads)
        )


def entries_for(n: int, tag: str = "e") -> list[bytes]:
    return [f"{tag}-{i}".encode() for i in range(n)]


# -- appending ------------------------------------------------------------------------------


def test_empty_log(log: TransparencyLog) -> None:
    assert log.size() == 0
    with pytest.raises(NotFound):
        log.tree_head()
    assert log.root_hash(0) == merkle.EMPTY_ROOT
    assert log.consistency_proof(0, 0) == []
    assert log.entries(0, 0) == []


def test_append_single(log: TransparencyLog, signer: Ed25519TreeHeadSigner) -> None:
    entries = entries_for(5)
    assert [log.append(e) for e in entries] == [0, 1, 2, 3, 4]
    assert log.size() == 5
    assert log.entries(0, 5) == entries
    assert log.entry(3) == entries[3]
    for n in range(1, 6):
        head = log.tree_head(n)
        assert head.tree_size == n
        assert head.root_hash == merkle.root_from_leaves(entries[:n])
        head.verify(signer.public_key())
    assert log.tree_head() == log.tree_head(5)


def test_append_batch_signs_one_head(log: TransparencyLog, store: Store) -> None:
    assert log.append_batch(entries_for(3)) == range(0, 3)
    assert log.append_batch(entries_for(10, "f")) == range(3, 13)
    assert log.append_batch([]) == range(13, 13)
    assert counts(store)[2] == 2
    with pytest.raises(NotFound):
        log.tree_head(7)
    assert log.tree_head().root_hash == merkle.root_from_leaves(
        entries_for(3) + entries_for(10, "f")
    )


def test_stored_nodes_are_exactly_the_complete_subtrees(log: TransparencyLog, store: Store) -> None:
    entries = entries_for(45)
    for chunk in (entries[:7], entries[7:8], entries[8:32], entries[32:]):
        log.append_batch(chunk)
    with store.snapshot() as conn:
        rows = conn.execute(sa.select(log_nodes)).all()
    stored = {(r.level, r.idx): bytes(r.hash) for r in rows}
    # 45 leaves complete 22 + 11 + 5 + 2 + 1 nodes at levels 1..5.
    assert len(stored) == 41
    for (level, idx), h in stored.items():
        span = entries[idx << level : (idx + 1) << level]
        assert len(span) == 1 << level
        assert h == merkle.root_from_leaves(span)


def test_reference_vectors_through_the_store(log: TransparencyLog) -> None:
    leaves = [bytes.fromhex(x) for x in VECTORS["leaves"]]
    for i, leaf in enumerate(leaves):
        assert log.append(leaf) == i
        assert log.tree_head().root_hash.hex() == VECTORS["roots"][str(i + 1)]
    for case in VECTORS["inclusion"]:
        got = log.inclusion_proof(case["leaf_index"], case["tree_size"])
        assert [h.hex() for h in got] == case["path"]
    for case in VECTORS["consistency"]:
        got = log.consistency_proof(case["old_size"], case["new_size"])
        assert [h.hex() for h in got] == case["path"]


def test_every_proof_verifies_against_signed_heads(
    log: TransparencyLog, signer: Ed25519TreeHeadSigner, clock: Clock
) -> None:
    rng = random.Random(6962)
    entries = entries_for(70)
    sizes = []
    done = 0
    while done < len(entries):
        k = rng.randint(1, 9)
        log.append_batch(entries[done : done + k])
        done = min(done + k, len(entries))
        sizes.append(done)
        assert isinstance(clock.now, int)
        clock.now += 1000
    heads = [log.tree_head(n) for n in sizes]
    for head in heads:
        head.verify(signer.public_key())
        assert log.root_hash(head.tree_size) == head.root_hash
        for i in range(head.tree_size):
            proof = log.inclusion_proof(i, head.tree_size)
            merkle.verify_inclusion(
                merkle.leaf_hash(entries[i]), i, head.tree_size, proof, head.root_hash
            )
    # STH history: every stored head is consistent with every later one.
    for a, old in enumerate(heads):
        for new in heads[a:]:
            proof = log.consistency_proof(old.tree_size, new.tree_size)
            merkle.verify_consistency(
                old.tree_size, new.tree_size, proof, old.root_hash, new.root_hash
            )
    assert [h.timestamp_ms for h in heads] == sorted(h.timestamp_ms for h in heads)


def test_tampered_stored_head_fails_verification(
    log: TransparencyLog, store: Store, signer: Ed25519TreeHeadSigner
) -> None:
    log.append_batch(entries_for(4))
    with store.transaction() as conn:
        conn.execute(sa.update(tree_heads).values(root_hash=bytes(32)))
    head = log.tree_head()
    with pytest.raises(CryptoError):
        head.verify(signer.public_key())
    # ...and the log refuses to extend a head its nodes do not match.
    with pytest.raises(StoreError):
        log.append(b"next")


# -- transactions ---------------------------------------------------------------------------


def test_batch_in_rolled_back_transaction_leaves_nothing(
    log: TransparencyLog, store: Store
) -> None:
    log.append_batch(entries_for(3))
    before = counts(store)

    class Abort(Exception):
        pass

    with pytest.raises(Abort), store.transaction() as conn:
        assert log.append_batch(entries_for(20, "x"), conn=conn) == range(3, 23)
        assert log.size(conn=conn) == 23
        raise Abort
    assert counts(store) == before
    assert log.size() == 3
    assert log.append(b"after") == 3
    assert log.tree_head().root_hash == merkle.root_from_leaves([*entries_for(3), b"after"])


def test_batch_commits_with_the_callers_transaction(log: TransparencyLog, store: Store) -> None:
    with store.transaction() as conn:
        log.append(b"state change", conn=conn)
        log.append_batch([b"a", b"b"], conn=conn)
    assert log.entries(0, 3) == [b"state change", b"a", b"b"]
    assert counts(store)[2] == 2


def _appender(
    log: TransparencyLog, tag: str, batches: int, out: list[bytes], errors: list[BaseException]
) -> None:
    rng = random.Random(tag)
    try:
        for b in range(batches):
            batch = [f"{tag}-{b}-{j}".encode() for j in range(rng.randint(1, 6))]
            log.append_batch(batch)
            out.extend(batch)
    except BaseException as exc:
        errors.append(exc)


def test_concurrent_replicas_produce_one_consistent_tree(
    store_url: str, signer: Ed25519TreeHeadSigner, clock: Clock
) -> None:
    # Two Store objects on one database stand for two replicas; each runs two threads.
    replicas = [open_store(store_url), open_store(store_url, migrate=False)]
    try:
        logs = [TransparencyLog(s, signer, clock) for s in replicas]
        outs: list[list[bytes]] = [[] for _ in range(4)]
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=_appender, args=(logs[i % 2], f"t{i}", 15, outs[i], errors))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        log = logs[0]
        appended = [e for out in outs for e in out]
        size = log.size()
        assert size == len(appended)
        stored = log.entries(0, size)
        assert sorted(stored) == sorted(appended)  # no gaps, no duplicates, nothing lost
        for out in outs:  # each writer's entries stay in its order
            positions = [stored.index(e) for e in out]
            assert positions == sorted(positions)
        head = log.tree_head()
        assert head.root_hash == merkle.root_from_leaves(stored)
        with replicas[0].snapshot() as conn:
            head_sizes = conn.execute(sa.select(tree_heads.c.tree_size)).scalars().all()
        assert len(head_sizes) == 60
        for n in head_sizes:
            old = log.tree_head(n)
            assert old.root_hash == merkle.root_from_leaves(stored[:n])
    finally:
        for s in replicas:
            s.dispose()


# -- errors ---------------------------------------------------------------------------------


def test_out_of_range_requests_are_not_found(log: TransparencyLog) -> None:
    log.append_batch(entries_for(5))
    calls: list[Callable[[], object]] = [
        lambda: log.entry(5),
        lambda: log.entry(-1),
        lambda: log.entries(3, 6),
        lambda: log.entries(4, 3),
        lambda: log.tree_head(6),
        lambda: log.tree_head(3),  # no head was signed at 3
        lambda: log.inclusion_proof(5, 5),
        lambda: log.inclusion_proof(0, 6),
        lambda: log.inclusion_proof(5, 6),
        lambda: log.inclusion_proof(-1, 5),
        lambda: log.consistency_proof(3, 2),
        lambda: log.consistency_proof(3, 6),
        lambda: log.consistency_proof(6, 6),
        lambda: log.consistency_proof(0, 6),
        lambda: log.root_hash(6),
        lambda: log.inclusion_proof(0, 1 << 64),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            call()


def test_missing_rows_are_a_store_error_not_not_found(log: TransparencyLog, store: Store) -> None:
    log.append_batch(entries_for(8))
    with store.transaction() as conn:
        conn.execute(sa.delete(log_nodes).where(log_nodes.c.level == 1, log_nodes.c.idx == 1))
    with pytest.raises(StoreError) as info:
        log.inclusion_proof(0, 8)  # needs (1, 1)
    assert not isinstance(info.value, NotFound)
    log.append(b"x")  # the right edge, (3, 0), is intact
    with store.transaction() as conn:
        conn.execute(sa.delete(log_nodes).where(log_nodes.c.level == 3))
    with pytest.raises(StoreError) as info:
        log.append(b"y")
    assert not isinstance(info.value, NotFound)


def test_bad_entries_are_refused(log: TransparencyLog, store: Store) -> None:
    with pytest.raises(LocalProtocolError):
        log.append("text")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        log.append_batch([b"ok", b"x" * ((1 << 20) + 1)])
    assert counts(store) == (0, 0, 0)
    assert log.append(bytearray(b"bytes-like")) == 0  # type: ignore[arg-type]


def test_clock_forms_and_monotonic_timestamps(log: TransparencyLog, clock: Clock) -> None:
    clock.now = datetime.fromtimestamp(T0 / 1000, UTC) + timedelta(milliseconds=7)
    log.append(b"a")
    assert log.tree_head().timestamp_ms == T0 + 7
    clock.now = T0 - 60_000  # another replica's clock is behind
    log.append(b"b")
    assert log.tree_head().timestamp_ms == T0 + 7
    clock.now = T0 + 10
    log.append(b"c")
    assert log.tree_head().timestamp_ms == T0 + 10


@pytest.mark.parametrize("bad", [datetime(2024, 1, 1), 1.5, -1, True])
def test_bad_clock_is_a_configuration_error(
    log: TransparencyLog, clock: Clock, store: Store, bad: object
) -> None:
    clock.now = bad  # type: ignore[assignment]
    with pytest.raises(ConfigurationError):
        log.append(b"a")
    assert counts(store) == (0, 0, 0)


def test_key_id_must_fit_the_column(store: Store, clock: Clock) -> None:
    with pytest.raises(ConfigurationError):
        TransparencyLog(store, Ed25519TreeHeadSigner(Ed25519PrivateKey.generate(), "k" * 65), clock)


def test_head_row_roundtrips_as_message(log: TransparencyLog) -> None:
    log.append(b"a")
    head = log.tree_head()
    assert SignedTreeHead.decode(head.encode()) == head
