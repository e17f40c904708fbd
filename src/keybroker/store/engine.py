"""Opening the store: SQLite (embedded default, WAL) or PostgreSQL from a URL.

Writes that belong together run in one :meth:`Store.transaction`. On SQLite a
transaction starts with ``BEGIN IMMEDIATE`` so two writers never both read a
value and then race to update it (the deferred default would upgrade the lock
late and fail with "database is locked" mid-way). On PostgreSQL, code that must
be the only writer of something (the log's append path, for one) takes
:meth:`Store.lock`, a transaction-scoped advisory lock, so N replicas on one
database stay correct.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError

from keybroker.errors import ConfigurationError, StoreError
from keybroker.store.migrate import upgrade as _migrate_upgrade
from keybroker.store.paths import default_home

Dialect = Literal["sqlite", "postgresql"]

DB_FILENAME = "keybroker.db"


def default_url(home: Path | None = None) -> str:
    return f"sqlite:///{(home or default_home()) / DB_FILENAME}"


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` as users write it and pick the psycopg 3 driver."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@dataclass(frozen=True, repr=False)
class Store:
    engine: Engine
    dialect: Dialect
    #: SQLite has one writer at a time; threads of this process queue here for it
    #: instead of in SQLite's busy handler, which sleeps in steps of up to 100 ms and
    #: turned 100 concurrent API writers into seconds of waiting. (Other processes on
    #: the same file still meet ``busy_timeout``.) Re-entrant, so a nested write on
    #: the same thread fails as before rather than deadlocking here.
    _writer: threading.RLock = field(default_factory=threading.RLock, compare=False)

    def __repr__(self) -> str:
        # The URL may carry a password: show only what identifies the database.
        url = self.engine.url
        return f"Store({self.dialect}, {url.host or ''}{url.database or ''})"

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction: everything inside commits together or not at all."""
        if self.dialect == "sqlite":
            with self._writer:
                yield from self._transaction()
        else:
            yield from self._transaction()

    def _transaction(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except DBAPIError as exc:
            raise StoreError(f"database error: {type(exc.orig).__name__}") from exc

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A read-only transaction (deferred on SQLite, so readers never block writers)."""
        try:
            with self.engine.connect() as raw:
                conn = raw.execution_options(keybroker_readonly=True)
                with conn.begin():
                    yield conn
        except DBAPIError as exc:
            raise StoreError(f"database error: {type(exc.orig).__name__}") from exc

    @contextmanager
    def reader(self) -> Iterator[Connection]:
        """A connection for reads that need no snapshot across statements (append-only data,
        or a single statement). On PostgreSQL it runs in autocommit, which saves the BEGIN
        and ROLLBACK round trips a :meth:`snapshot` costs on every call; on SQLite each
        statement likewise runs in its own implicit read transaction (no ``BEGIN``)."""
        if self.dialect != "postgresql":
            try:
                with self.engine.connect() as raw:
                    yield raw.execution_options(keybroker_statement_at_a_time=True)
            except DBAPIError as exc:
                raise StoreError(f"database error: {type(exc.orig).__name__}") from exc
            return
        try:
            with self.engine.connect() as raw:
                yield raw.execution_options(isolation_level="AUTOCOMMIT")
        except DBAPIError as exc:
            raise StoreError(f"database error: {type(exc.orig).__name__}") from exc

    def lock(self, conn: Connection, name: str) -> None:
        """Serialise writers on ``name`` until the transaction ends (no-op on SQLite,
        where ``BEGIN IMMEDIATE`` already made this the only writer)."""
        if self.dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(name)})

    def lock_many(self, conn: Connection, names: Iterable[str]) -> None:
        """:meth:`lock` on each of ``names``, in one statement.

        The locks are taken in the order of their keys, so two callers locking
        overlapping sets cannot deadlock on each other.
        """
        if self.dialect != "postgresql":
            return
        keys = sorted({_lock_key(name) for name in names})
        for start in range(0, len(keys), 1000):
            conn.execute(
                sa.text(
                    "SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS t(k)"
                ),
                {"keys": keys[start : start + 1000]},
            )

    def dispose(self) -> None:
        self.engine.dispose()


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin() below decide when transactions start.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=10000")
        # NORMAL is durable across application crashes in WAL mode; only a power
        # loss can drop the last commits, never corrupt the file.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get("keybroker_statement_at_a_time"):
            return  # Store.reader: SQLite's autocommit, each statement its own transaction
        if options.get("keybroker_readonly"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


#: A pooled PostgreSQL connection idle for longer than this is pinged before it is
#: handed out (see _configure_postgres).
PING_AFTER_IDLE_S = 1.0


def _configure_postgres(engine: Engine) -> None:
    """Ping a pooled connection before use only if it sat idle for a while.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout: a round trip before every
    request's first statement (an agent's inbox read became two round trips instead
    of one). A connection handed back less than :data:`PING_AFTER_IDLE_S` ago was
    working then; one that sat longer (the server may have restarted, a firewall
    dropped it) is pinged as before, and one that fails the ping is replaced. What
    is given up: a connection that died within that second fails its first
    statement (:class:`~keybroker.errors.StoreError`), and SQLAlchemy then
    invalidates every pooled connection opened before, so one request fails, not
    one per connection.
    """

    def _idle_from_now(_dbapi_conn: Any, record: Any) -> None:
        record.info["keybroker_idle_since"] = time.monotonic()

    event.listen(engine, "connect", _idle_from_now)  # a new connection works
    event.listen(engine, "checkin", _idle_from_now)

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("keybroker_idle_since")
        if since is not None and time.monotonic() - since < PING_AFTER_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # any failure means: not this connection
            raise DisconnectionError("connection failed its ping") from exc
        if not alive:
            raise DisconnectionError("connection failed its ping")


def open_store(
    url: str | None = None,
    *,
    home: Path | None = None,
    migrate: bool = True,
    pool_size: int = 5,
) -> Store:
    """Open (and by default migrate to the newest schema) the store at ``url``.

    With no URL this is the embedded SQLite file under ``home``
    (``$KEYBROKER_HOME``), created with mode 0600 in a 0700 directory.
    """
    raw = normalise_url(url or default_url(home))
    try:
        parsed = make_url(raw)
    except ArgumentError as exc:
        raise ConfigurationError("malformed database URL") from exc
    backend = parsed.get_backend_name()
    engine: Engine
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            path = Path(database)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not path.exists():
                # Create it 0600 before SQLite does, with the process umask out of the way.
                fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
        engine = sa.create_engine(parsed, connect_args={"timeout": 10})
        _configure_sqlite(engine)
        dialect: Dialect = "sqlite"
    elif backend == "postgresql":
        engine = sa.create_engine(parsed, pool_size=pool_size, max_overflow=pool_size)
        _configure_postgres(engine)
        dialect = "postgresql"
    else:
        raise ConfigurationError(f"unsupported database backend {backend!r}")
    store = Store(engine=engine, dialect=dialect)
    if migrate:
        try:
            _migrate_upgrade(store)
        except DBAPIError as exc:
            engine.dispose()
            raise StoreError(f"cannot open database: {type(exc.orig).__name__}") from exc
    return store
