from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from keybroker.broker.home import CA_KEYSET, LOG_KEYSET, init_home, open_home
from keybroker.errors import ConfigurationError, RootKeyError
from keybroker.keys import SECRET_ACCESS, Keyset
from keybroker.log import merkle
from keybroker.pki import fingerprint
from keybroker.store.schema import certificates

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_init_then_open(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    home = tmp_path / "home"
    db = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    with init_home(home, db_url=db, clock=Clock()) as created:
        head = created.log.tree_head()
        ca_fp = fingerprint(created.ca.certificate)
    assert head.tree_size == 1
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(home / "root.key").st_mode) == 0o600
    with open_home(home, clock=Clock()) as opened:
        assert (
            opened.ca.certificate.fingerprint(opened.ca.certificate.signature_hash_algorithm)
            == ca_fp
        )  # type: ignore[arg-type]
        opened.log.tree_head().verify(opened.log_public_key)
        assert sorted(opened.keysets.names()) == [CA_KEYSET, LOG_KEYSET]
        with opened.store.snapshot() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(certificates)).scalar() == 1
        index = opened.log.append(b"entry")
        head2 = opened.log.tree_head()
        proof = opened.log.inclusion_proof(index, head2.tree_size)
        merkle.verify_inclusion(
            merkle.leaf_hash(b"entry"), index, head2.tree_size, proof, head2.root_hash
        )


def test_init_refuses_an_existing_home(tmp_path: Path) -> None:
    init_home(tmp_path / "h").close()
    with pytest.raises(ConfigurationError):
        init_home(tmp_path / "h")


def test_open_refuses_exposed_home_or_root_key(tmp_path: Path) -> None:
    home = tmp_path / "h"
    init_home(home).close()
    (home / "root.key").chmod(0o644)
    with pytest.raises(RootKeyError):
        open_home(home)
    (home / "root.key").chmod(0o600)
    home.chmod(0o777)
    with pytest.raises(ConfigurationError):
        open_home(home)
    home.chmod(0o700)
    open_home(home).close()


def test_open_refuses_what_is_not_a_home(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        open_home(tmp_path / "missing")
    (tmp_path / "empty").mkdir(mode=0o700)
    with pytest.raises(ConfigurationError):
        open_home(tmp_path / "empty")


def test_private_key_object_needs_the_access_token() -> None:
    signer = Keyset.generate("k", "ED25519").signer()
    with pytest.raises(TypeError):
        signer.private_key(object())  # type: ignore[arg-type]
    key = signer.private_key(SECRET_ACCESS)
    signature = signer.sign(b"m")
    # the handle's signature (after its 5-byte key-id prefix) is the key's own
    key.public_key().verify(signature[5:], b"m")  # type: ignore[union-attr, call-arg]
