from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from keybroker.store.bulk import bulk_update
from keybroker.store.engine import Store, open_store
from keybroker.store.schema import UTCDateTime

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

meta = sa.MetaData()
things = sa.Table(
    "bulk_things",
    meta,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("state", sa.String(24), nullable=False),
    sa.Column("version", sa.Integer, nullable=True),
    sa.Column("proof", sa.LargeBinary, nullable=True),
    sa.Column("at", UTCDateTime, nullable=False),
)

UPDATE = bulk_update(
    things,
    match={"id": "b_id", "seq": "b_seq"},
    assign={"state": "b_state", "version": "b_version", "proof": "b_proof", "at": "b_at"},
    computed={"seq": things.c.seq + 1},
)


@pytest.fixture
def db(store_url: str) -> Iterator[Store]:
    store = open_store(store_url, migrate=False)
    meta.create_all(store.engine)
    with store.transaction() as conn:
        conn.execute(
            things.insert(),
            [
                {"id": f"t{i}", "seq": 0, "state": "new", "version": i, "proof": None, "at": T0}
                for i in range(6)
            ],
        )
    try:
        yield store
    finally:
        meta.drop_all(store.engine)
        store.dispose()


def _rows(store: Store) -> dict[str, tuple[object, ...]]:
    with store.snapshot() as conn:
        return {
            r.id: (r.seq, r.state, r.version, r.proof, r.at)
            for r in conn.execute(sa.select(things))
        }


def test_a_bulk_update_sets_each_row_and_counts_only_those_it_found(db: Store) -> None:
    east = timezone(timedelta(hours=5))
    changes = [
        # t0: every kind of value, an aware time in another zone (stored as UTC)
        {
            "b_id": "t0",
            "b_seq": 0,
            "b_state": "done",
            "b_version": None,
            "b_proof": b"\x00p",
            "b_at": (T0 + timedelta(hours=1)).astimezone(east),
        },
        {
            "b_id": "t1",
            "b_seq": 0,
            "b_state": "done",
            "b_version": 7,
            "b_proof": None,
            "b_at": T0 + timedelta(seconds=1, microseconds=5),
        },
        {
            "b_id": "t2",
            "b_seq": 3,
            "b_state": "lost",
            "b_version": 1,
            "b_proof": None,
            "b_at": T0,
        },  # wrong seq: the compare-and-set misses
        {
            "b_id": "nope",
            "b_seq": 0,
            "b_state": "lost",
            "b_version": 1,
            "b_proof": None,
            "b_at": T0,
        },  # no such row
    ]
    with db.transaction() as conn:
        assert UPDATE.run(conn, changes) == 2
        assert UPDATE.run(conn, []) == 0
    rows = _rows(db)
    assert rows["t0"] == (1, "done", None, b"\x00p", T0 + timedelta(hours=1))
    assert rows["t1"] == (1, "done", 7, None, T0 + timedelta(seconds=1, microseconds=5))
    assert rows["t2"] == (0, "new", 2, None, T0)
    assert set(rows) == {f"t{i}" for i in range(6)}
    # The seq moved: the same change again finds nothing.
    with db.transaction() as conn:
        assert UPDATE.run(conn, changes[:2]) == 0


def test_a_bulk_update_refuses_a_naive_time_and_changes_nothing(db: Store) -> None:
    before = _rows(db)
    row = {
        "b_id": "t3",
        "b_seq": 0,
        "b_state": "x",
        "b_version": 1,
        "b_proof": None,
        "b_at": datetime(2026, 11, 30, 12, 0),
    }
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), db.transaction() as conn:
        UPDATE.run(conn, [row])
    assert _rows(db) == before


def test_a_parameter_named_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="used twice"):
        bulk_update(things, match={"id": "p"}, assign={"state": "p"})
