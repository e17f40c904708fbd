from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from keybroker.errors import Conflict, CryptoError, KeysetError, NotFound
from keybroker.keys import SECRET_ACCESS, TEMPLATES, Keyset, KeyState
from keybroker.keys.root import FileRootKey
from keybroker.store.engine import Store, open_store
from keybroker.store.keysets import KeysetRepository
from keybroker.store.schema import key_versions, metadata

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def root_key(tmp_path: Path) -> Iterator[FileRootKey]:
    key = FileRootKey.create(tmp_path / "root.key")
    yield key
    key.close()


@pytest.fixture
def repo(store: Store, root_key: FileRootKey) -> KeysetRepository:
    return KeysetRepository(store, root_key, Clock())


def test_round_trip_keeps_states_and_decrypts(repo: KeysetRepository) -> None:
    ks = Keyset.generate("site/fra1/link", "AES256_GCM", now=T0)
    old_ct = ks.aead().encrypt(b"hello", b"ad")
    stored = repo.create(ks)
    v2 = ks.add(now=T0)
    ks.promote(v2.version, now=T0)
    repo.save(stored)
    loaded = repo.load("site/fra1/link")
    assert [(v.version, v.state) for v in loaded.keyset.versions] == [
        (1, KeyState.ENABLED),
        (2, KeyState.PRIMARY),
    ]
    assert loaded.revision == 2
    assert loaded.keyset.aead().decrypt(old_ct, b"ad") == b"hello"
    new_ct = loaded.keyset.aead().encrypt(b"x", b"")
    assert ks.aead().decrypt(new_ct, b"") == b"x"


def test_destroy_removes_material_from_the_row(repo: KeysetRepository, store: Store) -> None:
    ks = Keyset.generate("k", "AES256_GCM", now=T0)
    stored = repo.create(ks)
    ct = ks.aead().encrypt(b"secret", b"")
    ks.promote(ks.add(now=T0).version, now=T0)
    ks.disable(1, now=T0)
    ks.destroy(1, now=T0)
    repo.save(stored)
    with store.snapshot() as conn:
        row = conn.execute(sa.select(key_versions).where(key_versions.c.version == 1)).one()
    assert row.state == "destroyed"
    assert row.wrapped_material is None
    with pytest.raises(KeysetError):
        repo.load("k").keyset.aead().decrypt(ct, b"")


def test_concurrent_saves_conflict(repo: KeysetRepository) -> None:
    repo.create(Keyset.generate("k", "HMAC_SHA256", now=T0))
    a = repo.load("k")
    b = repo.load("k")
    a.keyset.add(now=T0)
    repo.save(a)
    b.keyset.add(now=T0)
    with pytest.raises(Conflict):
        repo.save(b)
    assert len(repo.load("k").keyset.versions) == 2


def test_duplicate_and_missing(repo: KeysetRepository) -> None:
    repo.create(Keyset.generate("k", "ED25519", now=T0))
    with pytest.raises(Conflict):
        repo.create(Keyset.generate("k", "ED25519", now=T0))
    with pytest.raises(NotFound):
        repo.load("nope")
    assert repo.names() == ["k"]


def test_rows_moved_between_keysets_do_not_open(repo: KeysetRepository, store: Store) -> None:
    a = repo.create(Keyset.generate("a", "AES256_GCM", now=T0))
    b = repo.create(Keyset.generate("b", "AES256_GCM", now=T0))
    with store.transaction() as conn:
        stolen = conn.execute(
            sa.select(key_versions.c.wrapped_material).where(key_versions.c.keyset_id == a.id)
        ).scalar_one()
        conn.execute(
            key_versions.update()
            .where(key_versions.c.keyset_id == b.id)
            .values(wrapped_material=stolen)
        )
    with pytest.raises(CryptoError):
        repo.load("b")


def test_other_root_key_cannot_open(store: Store, repo: KeysetRepository, tmp_path: Path) -> None:
    repo.create(Keyset.generate("k", "AES256_GCM", now=T0))
    other = FileRootKey.create(tmp_path / "other.key")
    with pytest.raises(CryptoError):
        KeysetRepository(store, other, Clock()).load("k")
    other.close()


def _secrets_of(ks: Keyset) -> list[bytes]:
    return [
        ks.export_secret_material(v.version, SECRET_ACCESS)
        for v in ks.versions
        if v.state is not KeyState.DESTROYED
    ]


def _needles(secret: bytes) -> list[bytes]:
    # Raw bytes, and the textual forms a careless writer might use.
    return [secret, secret.hex().encode(), base64.b64encode(secret), base64.b64encode(secret)[:-2]]


def _generate_all(repo: KeysetRepository) -> list[bytes]:
    secrets: list[bytes] = []
    for name in TEMPLATES:
        ks = Keyset.generate(f"all/{name.lower()}", name, now=T0)
        ks.promote(ks.add(now=T0).version, now=T0)
        repo.create(ks)
        secrets += _secrets_of(ks)
    return secrets


def test_no_key_material_in_clear_in_the_sqlite_file(tmp_path: Path, root_key: FileRootKey) -> None:
    home = tmp_path / "home"
    store = open_store(home=home)
    secrets = _generate_all(KeysetRepository(store, root_key, Clock()))
    store.dispose()
    files = [p for p in home.iterdir() if p.name.startswith("keybroker.db")]
    blob = b"".join(p.read_bytes() for p in files)
    assert len(blob) > 10_000  # the rows are really there
    assert len(secrets) >= 2 * len(TEMPLATES)
    for secret in secrets:
        for needle in _needles(secret):
            assert needle not in blob


def test_no_key_material_in_clear_in_postgresql_rows(pg_url: str, root_key: FileRootKey) -> None:
    store = open_store(pg_url)
    secrets = _generate_all(KeysetRepository(store, root_key, Clock()))
    dump = bytearray()
    with store.snapshot() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(sa.select(table)):
                for value in row:
                    dump += value if isinstance(value, bytes) else str(value).encode()
    store.dispose()
    assert len(dump) > 10_000
    for secret in secrets:
        for needle in _needles(secret):
            assert needle not in dump


def test_load_versions_unwraps_only_the_versions_asked_for(repo: KeysetRepository) -> None:
    ks = Keyset.generate("link/a", "AES256_GCM", now=T0)
    stored = repo.create(ks)
    v2 = ks.add(now=T0)
    v3 = ks.add(now=T0)
    repo.save(stored)
    other = Keyset.generate("link/b", "AES256_GCM", now=T0)
    repo.create(other)
    proof = ks.prove_possession(v2.version, b"challenge")

    found = repo.load_versions({"link/a": [v2.version, 9], "link/b": [1], "link/none": [1]})
    assert sorted(found) == ["link/a", "link/b"]  # an unknown keyset is left out
    assert [v.version for v in found["link/a"].versions] == [v2.version]  # 1, 3, 9: not
    found["link/a"].verify_possession(v2.version, b"challenge", proof)
    with pytest.raises(CryptoError):
        found["link/a"].verify_possession(v2.version, b"other", proof)
    with pytest.raises(KeysetError):  # present in the store, but not asked for
        found["link/a"].verify_possession(v3.version, b"challenge", proof)
    assert found["link/b"].versions[0].key_id == other.versions[0].key_id
