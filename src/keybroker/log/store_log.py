"""The transparency log kept in the store: leaves, complete subtrees and signed tree heads.

Writes (:meth:`TransparencyLog.append`, :meth:`~TransparencyLog.append_batch`)
take the store lock ``keybroker/log`` inside their transaction, so any number
of replicas on one PostgreSQL append one after another (on SQLite ``BEGIN
IMMEDIATE`` already makes the transaction the only writer). Under the lock an
append reads the latest tree head and the O(log n) right-edge nodes, computes
the new leaves' hashes and every subtree they complete in memory, bulk-inserts
them, and signs one new tree head for the whole batch. Pass ``conn=`` to make
the entries part of the caller's transaction: a broker state change and its
log entry then commit, or roll back, together.

The lock assumes PostgreSQL's default READ COMMITTED isolation (each statement
sees what committed before it). Under a stricter level a stale read can only
make the insert collide on a primary key (:class:`~keybroker.errors.Conflict`),
never fork the tree.

Reads never rebuild the tree: a proof is a list of complete subtrees plus folds
of a few more (see :mod:`keybroker.log.merkle`), all fetched in one query that
also fetches the last leaf of the requested tree, so the common case needs no
separate size lookup.

Asking for something the log does not have (a leaf, head or proof beyond the
current size, an index outside the tree, ``old_size > new_size``) raises
:class:`~keybroker.errors.NotFound`: a client asked about data we lack (the API
answers 404); it is not a protocol violation on our side.

The two hot statements, node reads and bulk inserts, are plain SQL per dialect
rather than SQLAlchemy Core: PostgreSQL spends longer (~0.5 ms) planning an IN
list of (level, idx) pairs than running it, while a constant-text ``unnest``
query is prepared once per connection and planned generically; SQLite scans the
whole table for a row-value IN but answers an OR of primary-key lookups from
the index; and per-row executemany through SQLAlchemy and psycopg caps appends
well under 20,000 entries/s, where PostgreSQL's binary COPY and sqlite3's own
executemany do not.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from keybroker.errors import ConfigurationError, Conflict, LocalProtocolError, NotFound, StoreError
from keybroker.log import merkle
from keybroker.log.merkle import NodeId
from keybroker.log.sth import MAX_KEY_ID_LENGTH, SignedTreeHead, TreeHeadSigner
from keybroker.store.engine import Store
from keybroker.store.schema import log_leaves, tree_heads

LOCK_NAME = "keybroker/log"

#: Largest entry accepted; entries are canonical messages, far smaller than this.
MAX_ENTRY_SIZE = 1 << 20

Clock = Callable[[], int | datetime]
"""Returns the time as epoch milliseconds or an aware datetime."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

_HEADS_INSERT = tree_heads.insert()
_LATEST_HEAD = sa.select(tree_heads).order_by(tree_heads.c.tree_size.desc()).limit(1)
_HEAD_AT = sa.select(tree_heads).where(tree_heads.c.tree_size == sa.bindparam("size"))
_CURRENT_SIZE = sa.select(sa.func.max(tree_heads.c.tree_size))
_ENTRIES = (
    sa.select(log_leaves.c.entry)
    .where(log_leaves.c.idx >= sa.bindparam("start"), log_leaves.c.idx < sa.bindparam("end"))
    .order_by(log_leaves.c.idx)
)

# Plain SQL for the hot paths (see the module docstring); the names are schema.py's tables.
# One row per wanted node, NULL where none is stored. A single unnest() parameter pair keeps
# the text constant, so psycopg prepares it and PostgreSQL settles on a generic plan.
_PG_READ_NODES = (
    "SELECT w.level, w.idx, CASE WHEN w.level = 0 "
    "THEN (SELECT leaf_hash FROM log_leaves WHERE idx = w.idx) "
    "ELSE (SELECT hash FROM log_nodes AS n WHERE n.level = w.level AND n.idx = w.idx) END "
    "FROM unnest(%(levels)s::integer[], %(idxs)s::bigint[]) AS w(level, idx)"
)
_PG_COPY_LEAVES = "COPY log_leaves (idx, leaf_hash, entry, created_at) FROM STDIN (FORMAT BINARY)"
_PG_LEAF_TYPES = ["int8", "bytea", "bytea", "timestamp"]
_PG_COPY_NODES = "COPY log_nodes (level, idx, hash) FROM STDIN (FORMAT BINARY)"
_PG_NODE_TYPES = ["int4", "int8", "bytea"]
_SQLITE_INSERT_LEAVES = (
    "INSERT INTO log_leaves (idx, leaf_hash, entry, created_at) VALUES (?, ?, ?, ?)"
)
_SQLITE_INSERT_NODES = "INSERT INTO log_nodes (level, idx, hash) VALUES (?, ?, ?)"
_SQLITE_LEAF_ROWS = "SELECT 0, idx, leaf_hash FROM log_leaves WHERE idx IN ({})"
_SQLITE_NODE_ROWS = "SELECT level, idx, hash FROM log_nodes WHERE {}"


class TransparencyLog:
    """An RFC 9162 log of opaque entries, appended under one signing key.

    ``clock`` is the only source of time. Tree-head timestamps never go
    backwards: if the clock does (another replica's, say), the new head reuses
    the previous timestamp.
    """

    def __init__(self, store: Store, signer: TreeHeadSigner, clock: Clock) -> None:
        if not 0 < len(signer.key_id) <= MAX_KEY_ID_LENGTH:
            raise ConfigurationError(f"log key id must be 1 to {MAX_KEY_ID_LENGTH} characters")
        self._store = store
        self._signer = signer
        self._clock = clock
        self._postgres = store.dialect == "postgresql"

    def __repr__(self) -> str:
        return f"TransparencyLog({self._store!r}, key_id={self._signer.key_id!r})"

    # -- writes -------------------------------------------------------------

    def append(self, entry: bytes, *, conn: Connection | None = None) -> int:
        """Append one entry and sign a new tree head; return the entry's index."""
        return self.append_batch([entry], conn=conn).start

    def append_batch(self, entries: Iterable[bytes], *, conn: Connection | None = None) -> range:
        """Append entries in order under one new tree head; return their indices.

        An empty batch changes nothing and signs no head.
        """
        items = [_checked_entry(e) for e in entries]
        if conn is not None:
            return self._append(conn, items)
        with self._store.transaction() as own:
            return self._append(own, items)

    def _append(self, conn: Connection, items: list[bytes]) -> range:
        self._store.lock(conn, LOCK_NAME)
        latest = conn.execute(_LATEST_HEAD).one_or_none()
        size = latest.tree_size if latest is not None else 0
        if not items:
            return range(size, size)
        edge_ids = merkle.frontier(size)
        stored = self._read_nodes(conn, edge_ids)
        try:
            edge = [(level, stored[(level, idx)]) for level, idx in edge_ids]
        except KeyError:
            raise StoreError("log nodes are missing below the latest tree head") from None
        old_root = bytes(latest.root_hash) if latest is not None else merkle.EMPTY_ROOT
        if merkle.edge_root(edge) != old_root:
            # Appending would sign a head that is not consistent with the last one.
            raise StoreError("log nodes do not match the latest tree head")

        hashes = [merkle.leaf_hash(e) for e in items]
        new_edge, completed = merkle.append_leaves(size, edge, hashes)
        timestamp_ms = self._timestamp_ms(latest.timestamp_ms if latest is not None else 0)
        new_size = size + len(items)
        head = SignedTreeHead.sign(self._signer, new_size, merkle.edge_root(new_edge), timestamp_ms)

        created_at = _bind_value(conn, log_leaves.c.created_at, _EPOCH + timestamp_ms * _MS)
        leaves = [
            (size + i, h, e, created_at) for i, (h, e) in enumerate(zip(hashes, items, strict=True))
        ]
        try:
            if self._postgres:
                _pg_copy(conn, _PG_COPY_LEAVES, _PG_LEAF_TYPES, leaves)
                _pg_copy(conn, _PG_COPY_NODES, _PG_NODE_TYPES, completed)
            else:
                conn.exec_driver_sql(_SQLITE_INSERT_LEAVES, leaves)
                if completed:
                    conn.exec_driver_sql(_SQLITE_INSERT_NODES, completed)
            conn.execute(
                _HEADS_INSERT,
                {
                    "tree_size": head.tree_size,
                    "root_hash": head.root_hash,
                    "timestamp_ms": head.timestamp_ms,
                    "signature": head.signature,
                    "key_id": head.key_id,
                },
            )
        except sa.exc.IntegrityError as exc:
            raise Conflict("another writer appended to the log without its lock") from exc
        return range(size, new_size)

    def _timestamp_ms(self, previous_ms: int) -> int:
        now = self._clock()
        if isinstance(now, datetime):
            if now.tzinfo is None:
                raise ConfigurationError("the log's clock returned a naive datetime")
            ms = (now - _EPOCH) // _MS
        elif isinstance(now, int) and not isinstance(now, bool):
            ms = now
        else:
            raise ConfigurationError("the log's clock must return epoch ms or an aware datetime")
        if ms < 0:
            raise ConfigurationError("the log's clock is before 1970")
        return max(ms, previous_ms)

    # -- reads --------------------------------------------------------------

    def size(self, *, conn: Connection | None = None) -> int:
        """Number of entries (the size of the latest tree head; 0 when empty)."""
        with self._reading(conn) as c:
            return _current_size(c)

    def tree_head(
        self, size: int | None = None, *, conn: Connection | None = None
    ) -> SignedTreeHead:
        """The latest signed tree head, or the one signed at exactly ``size`` entries.

        Heads exist only for sizes an append ended at; an empty log has none.
        """
        with self._reading(conn) as c:
            if size is None:
                row = c.execute(_LATEST_HEAD).one_or_none()
            else:
                row = c.execute(_HEAD_AT, {"size": size}).one_or_none()
        if row is None:
            raise NotFound("no such tree head")
        return SignedTreeHead(
            tree_size=row.tree_size,
            root_hash=bytes(row.root_hash),
            timestamp_ms=row.timestamp_ms,
            key_id=row.key_id,
            signature=bytes(row.signature),
        )

    def entry(self, index: int, *, conn: Connection | None = None) -> bytes:
        return self.entries(index, index + 1, conn=conn)[0]

    def entries(self, start: int, end: int, *, conn: Connection | None = None) -> list[bytes]:
        """Entries ``start`` to ``end - 1``, in order."""
        if not 0 <= start <= end:
            raise NotFound("no such log entries")
        with self._reading(conn) as c:
            rows = c.execute(_ENTRIES, {"start": start, "end": end}).scalars().all()
            if len(rows) != end - start:
                _missing(c, end)
        return [bytes(r) for r in rows]

    def root_hash(self, tree_size: int, *, conn: Connection | None = None) -> bytes:
        """MTH of the first ``tree_size`` entries, from stored nodes."""
        if tree_size == 0:
            return merkle.EMPTY_ROOT
        with self._reading(conn) as c:
            return merkle.root_hash(tree_size, self._reader(c, tree_size))

    def inclusion_proof(
        self, index: int, tree_size: int, *, conn: Connection | None = None
    ) -> list[bytes]:
        """PATH(index, D[tree_size]) (RFC 9162 §2.1.3.1), leaf to root."""
        if not 0 <= index < tree_size <= merkle.MAX_TREE_SIZE:
            raise NotFound("no such log entry")
        with self._reading(conn) as c:
            return merkle.inclusion_proof(index, tree_size, self._reader(c, tree_size))

    def consistency_proof(
        self, old_size: int, new_size: int, *, conn: Connection | None = None
    ) -> list[bytes]:
        """PROOF(old_size, D[new_size]) (RFC 9162 §2.1.4.1); empty if ``old_size`` is 0."""
        if not 0 <= old_size <= new_size <= merkle.MAX_TREE_SIZE:
            raise NotFound("no such consistency proof")
        if new_size == 0:
            return []
        with self._reading(conn) as c:
            return merkle.consistency_proof(old_size, new_size, self._reader(c, new_size))

    @contextmanager
    def _reading(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            # The log is append-only and every stored node is final, so reads need no
            # snapshot: a statement sees a prefix of the tree, which is all a proof uses.
            with self._store.reader() as own:
                yield own

    def _reader(self, conn: Connection, tree_size: int) -> merkle.NodeReader:
        """Reads nodes for a proof about the first ``tree_size`` leaves.

        Also reads the last of those leaves: if it exists the tree does, so the
        size needs no query of its own unless something is missing.
        """
        last_leaf = (0, tree_size - 1)

        def read(ids: Collection[NodeId]) -> Mapping[NodeId, bytes]:
            wanted = {*ids, last_leaf}
            got = self._read_nodes(conn, wanted)
            if len(got) != len(wanted):
                _missing(conn, tree_size)
            return got

        return read

    def _read_nodes(self, conn: Connection, ids: Collection[NodeId]) -> dict[NodeId, bytes]:
        """Hashes of the requested complete subtrees in one query (level 0 from log_leaves)."""
        if not ids:
            return {}
        if self._postgres:
            # Array literals as text: psycopg adapts a str at once, while a list of ints is
            # inspected element by element (~0.3 ms a proof); PostgreSQL casts them below.
            params = {
                "levels": "{" + ",".join(str(level) for level, _ in ids) + "}",
                "idxs": "{" + ",".join(str(idx) for _, idx in ids) + "}",
            }
            rows = conn.exec_driver_sql(_PG_READ_NODES, params)
        else:
            leaf_idx = [idx for level, idx in ids if level == 0]
            node_ids = [(level, idx) for level, idx in ids if level > 0]
            parts, flat = [], []
            if leaf_idx:
                parts.append(_SQLITE_LEAF_ROWS.format(", ".join("?" * len(leaf_idx))))
                flat.extend(leaf_idx)
            if node_ids:
                pairs = " OR ".join(["(level = ? AND idx = ?)"] * len(node_ids))
                parts.append(_SQLITE_NODE_ROWS.format(pairs))
                flat.extend(v for pair in node_ids for v in pair)
            rows = conn.exec_driver_sql(" UNION ALL ".join(parts), tuple(flat))
        return {(level, idx): bytes(h) for level, idx, h in rows if h is not None}


def _checked_entry(entry: Any) -> bytes:
    if isinstance(entry, (bytearray, memoryview)):
        entry = bytes(entry)
    if not isinstance(entry, bytes):
        raise LocalProtocolError("log entries must be bytes")
    if len(entry) > MAX_ENTRY_SIZE:
        raise LocalProtocolError(f"log entry larger than {MAX_ENTRY_SIZE} bytes")
    return entry


def _current_size(conn: Connection) -> int:
    size = conn.execute(_CURRENT_SIZE).scalar()
    return int(size) if size is not None else 0


def _missing(conn: Connection, needed_size: int) -> None:
    """Something asked for was not stored: the log is too small, or the store is damaged."""
    if needed_size > _current_size(conn):
        raise NotFound("the log is smaller than that")
    raise StoreError("log rows are missing below the latest tree head")


def _bind_value(conn: Connection, column: sa.Column[Any], value: object) -> object:
    """``value`` as SQLAlchemy would bind it for ``column`` (e.g. UTCDateTime → naive UTC)."""
    impl = column.type.dialect_impl(conn.dialect)
    process = impl.bind_processor(conn.dialect)
    return process(value) if process else value


def _pg_copy(conn: Connection, sql: str, types: list[str], rows: Sequence[tuple[Any, ...]]) -> None:
    import psycopg  # the optional postgres extra, present with this dialect

    if not rows:
        return
    raw = conn.connection.driver_connection
    assert raw is not None
    try:
        with raw.cursor() as cur, cur.copy(sql) as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)
    except psycopg.errors.UniqueViolation as exc:
        raise Conflict("another writer appended to the log without its lock") from exc
    except psycopg.Error as exc:
        raise StoreError(f"database error: {type(exc).__name__}") from exc
