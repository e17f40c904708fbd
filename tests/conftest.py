"""Fixtures shared by the whole suite.

* ``store``: a freshly migrated store, parametrised over SQLite and PostgreSQL
  (a new schema per test, dropped afterwards). PostgreSQL comes from
  ``KEYBROKER_TEST_PG_URL`` (default: the local service, trust auth).
* Under ``CI=true`` nothing may skip: a missing service or tool is a failure.
  Outside CI a test may skip, with a reason that names what is missing.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from keybroker.store.engine import Store, normalise_url, open_store

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_URL = os.environ.get("KEYBROKER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def missing(what: str) -> None:
    """Skip (outside CI) or fail (under CI) because ``what`` is not available here."""
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true", pytrace=False)
    pytest.skip(f"{what} is not available")


@pytest.fixture
def require() -> Callable[[str], None]:
    """``require(what)``: skip (outside CI) or fail (under CI) because ``what`` is missing."""
    return missing


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which lets nothing skip: {report.longrepr}"


def _pg_admin_engine() -> sa.Engine:
    return sa.create_engine(normalise_url(PG_URL), isolation_level="AUTOCOMMIT")


_pg_checked: list[bool] = []


def _pg_available() -> bool:
    if not _pg_checked:
        try:
            eng = _pg_admin_engine()
            with eng.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            eng.dispose()
            _pg_checked.append(True)
        except Exception:
            _pg_checked.append(False)
    return _pg_checked[0]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh, empty schema (dropped afterwards)."""
    if not _pg_available():
        missing(f"PostgreSQL at {PG_URL}")
    schema = "kbtest_" + secrets.token_hex(6)
    admin = _pg_admin_engine()
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'keybroker.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    name = "pg_url" if request.param == "postgresql" else "sqlite_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    st = open_store(store_url)
    try:
        yield st
    finally:
        st.dispose()
