from __future__ import annotations

import os
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from keybroker.errors import ConfigurationError, StoreError
from keybroker.store.engine import Store, normalise_url, open_store
from keybroker.store.migrate import downgrade, upgrade
from keybroker.store.schema import keysets, metadata

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _keyset_row(name: str) -> dict[str, object]:
    return {
        "id": name,
        "name": name,
        "purpose": "aead",
        "template": "AES256_GCM",
        "revision": 1,
        "created_at": NOW,
        "updated_at": NOW,
    }


def test_migrations_produce_exactly_the_schema(store: Store) -> None:
    with store.snapshot() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, metadata) == []
        assert set(sa.inspect(conn).get_table_names()) >= set(metadata.tables)


def test_downgrade_to_base_and_back(store: Store) -> None:
    downgrade(store, "base")
    with store.snapshot() as conn:
        assert set(sa.inspect(conn).get_table_names()) == {"alembic_version"}
    upgrade(store)
    with store.snapshot() as conn:
        assert set(sa.inspect(conn).get_table_names()) >= set(metadata.tables)


def test_reopening_is_idempotent(store_url: str) -> None:
    open_store(store_url).dispose()
    st = open_store(store_url)
    with st.transaction() as conn:
        conn.execute(keysets.insert().values(**_keyset_row("a")))
    st.dispose()
    st = open_store(store_url)
    with st.snapshot() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(keysets)).scalar_one() == 1
    st.dispose()


def test_transaction_rolls_back_everything_on_error(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction() as conn:
        conn.execute(keysets.insert().values(**_keyset_row("a")))
        raise RuntimeError("boom")
    with store.snapshot() as conn:
        assert conn.execute(sa.select(keysets.c.name)).all() == []


def test_integrity_error_is_a_store_error(store: Store) -> None:
    with store.transaction() as conn:
        conn.execute(keysets.insert().values(**_keyset_row("a")))
    with pytest.raises(StoreError), store.transaction() as conn:
        conn.execute(keysets.insert().values(**_keyset_row("a")))


def test_datetimes_come_back_aware_utc(store: Store) -> None:
    with store.transaction() as conn:
        conn.execute(keysets.insert().values(**_keyset_row("a")))
    with store.snapshot() as conn:
        got = conn.execute(sa.select(keysets.c.created_at)).scalar_one()
    assert got == NOW
    assert got.tzinfo is not None


def test_naive_datetime_is_refused(store: Store) -> None:
    row = _keyset_row("a") | {"created_at": datetime(2026, 1, 1)}
    with pytest.raises(sa.exc.StatementError), store.transaction() as conn:
        conn.execute(keysets.insert().values(**row))


def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    home = tmp_path / "home"
    st = open_store(home=home)
    db = home / "keybroker.db"
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    with st.snapshot() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    st.dispose()


def test_unsupported_or_malformed_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        open_store("mysql://root@127.0.0.1/test")
    with pytest.raises(ConfigurationError):
        open_store("::not a url::")


def test_repr_hides_password() -> None:
    st = open_store("postgresql://user:hunter2@127.0.0.1:1/db", migrate=False)
    assert "hunter2" not in repr(st)
    st.dispose()


def test_lock_serialises_writers(store: Store) -> None:
    """Two writers doing read-modify-write under the lock never lose an update."""
    with store.transaction() as conn:
        conn.execute(keysets.insert().values(**_keyset_row("counter")))

    def bump(n: int) -> None:
        for _ in range(n):
            with store.transaction() as conn:
                store.lock(conn, "test/counter")
                rev = conn.execute(
                    sa.select(keysets.c.revision).where(keysets.c.name == "counter")
                ).scalar_one()
                conn.execute(
                    keysets.update().where(keysets.c.name == "counter").values(revision=rev + 1)
                )

    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with store.snapshot() as conn:
        rev = conn.execute(
            sa.select(keysets.c.revision).where(keysets.c.name == "counter")
        ).scalar_one()
    assert rev == 1 + 75


def _terminate_pooled_backend(pg_url: str, store: Store) -> None:
    """Kill, from another connection, the server process behind ``store``'s one pooled
    connection, the way a server restart or a dropped TCP connection would."""
    with store.reader() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    admin = sa.create_engine(normalise_url(pg_url))
    try:
        with admin.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
    finally:
        admin.dispose()


def test_a_pooled_connection_idle_for_a_while_is_pinged_and_replaced_if_dead(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keybroker.store import engine as engine_module

    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_S", 0.0)  # every checkout pings
    store = open_store(pg_url, pool_size=1)
    try:
        _terminate_pooled_backend(pg_url, store)
        with store.reader() as conn:  # the ping found it dead; a new one was opened
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
        with store.transaction() as conn:
            conn.execute(keysets.insert().values(_keyset_row("after-restart")))
        with store.snapshot() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(keysets)).scalar() == 1
    finally:
        store.dispose()


def test_a_connection_handed_back_just_now_is_not_pinged(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the idle threshold gives up, measured: a connection that dies within it fails
    one request (a StoreError, nothing half-written); the pool then replaces it."""
    from keybroker.store import engine as engine_module

    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_S", 3600.0)  # never pings
    store = open_store(pg_url, pool_size=1)
    try:
        _terminate_pooled_backend(pg_url, store)
        with pytest.raises(StoreError), store.transaction() as conn:
            conn.execute(keysets.insert().values(_keyset_row("lost")))
        with store.transaction() as conn:
            conn.execute(keysets.insert().values(_keyset_row("kept")))
        with store.snapshot() as conn:
            assert list(conn.execute(sa.select(keysets.c.name)).scalars()) == ["kept"]
    finally:
        store.dispose()


def test_a_reader_reads_statement_at_a_time_and_a_snapshot_does_not(store: Store) -> None:
    """Store.reader: each statement sees what is committed when it runs (PostgreSQL:
    autocommit; SQLite: no BEGIN), so it costs no transaction. On SQLite Store.snapshot
    holds one (on PostgreSQL it is READ COMMITTED: each statement sees the latest commit)."""
    count = sa.select(sa.func.count()).select_from(keysets)
    with store.reader() as reader, store.snapshot() as snap:
        assert reader.execute(count).scalar() == 0
        assert snap.execute(count).scalar() == 0
        with store.transaction() as conn:
            conn.execute(keysets.insert().values(_keyset_row("written-meanwhile")))
        assert reader.execute(count).scalar() == 1
        assert snap.execute(count).scalar() == (0 if store.dialect == "sqlite" else 1)
