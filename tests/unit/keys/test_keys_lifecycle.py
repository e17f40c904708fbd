"""The key-version lifecycle: each (state, operation) pair transitions or fails cleanly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keybroker.errors import KeysetError, KeyStateError
from keybroker.keys import AES256_GCM, SECRET_ACCESS, TRANSITIONS, KeyOp, Keyset, KeyState

T0 = datetime(2026, 1, 1, tzinfo=UTC)

# The specification, written out independently of keybroker.keys.lifecycle.
EXPECTED = {
    (KeyState.PENDING, KeyOp.PROMOTE): KeyState.PRIMARY,
    (KeyState.ENABLED, KeyOp.PROMOTE): KeyState.PRIMARY,
    (KeyState.PENDING, KeyOp.DISABLE): KeyState.DISABLED,
    (KeyState.ENABLED, KeyOp.DISABLE): KeyState.DISABLED,
    (KeyState.DISABLED, KeyOp.ENABLE): KeyState.ENABLED,
    (KeyState.DISABLED, KeyOp.DESTROY): KeyState.DESTROYED,
}


def keyset_with_version_in(state: KeyState) -> tuple[Keyset, int]:
    """A keyset with a primary version 1 and version 2 in ``state`` (or version 1 if primary)."""
    ks = Keyset.generate("test/lifecycle", AES256_GCM, now=T0)
    if state is KeyState.PRIMARY:
        return ks, 1
    v2 = ks.add(now=T0).version
    if state is KeyState.ENABLED:
        ks.promote(v2, now=T0)
        return ks, 1
    if state in (KeyState.DISABLED, KeyState.DESTROYED):
        ks.disable(v2, now=T0)
    if state is KeyState.DESTROYED:
        ks.destroy(v2, now=T0)
    return ks, v2


def apply(ks: Keyset, op: KeyOp, version: int, now: datetime) -> None:
    getattr(ks, op.value)(version, now=now)


def test_table_matches_the_specification() -> None:
    assert dict(TRANSITIONS) == EXPECTED


@pytest.mark.parametrize("state", list(KeyState))
@pytest.mark.parametrize("op", list(KeyOp))
def test_every_state_operation_pair(state: KeyState, op: KeyOp) -> None:
    ks, version = keyset_with_version_in(state)
    assert ks.version(version).state is state
    before = ks.versions
    later = T0 + timedelta(hours=1)
    if (state, op) in EXPECTED:
        apply(ks, op, version, later)
        info = ks.version(version)
        assert info.state is EXPECTED[(state, op)]
        assert info.state_changed_at == later
    else:
        with pytest.raises(KeyStateError):
            apply(ks, op, version, later)
        assert ks.versions == before
    primaries = [v for v in ks.versions if v.state is KeyState.PRIMARY]
    assert len(primaries) == 1


def test_promote_demotes_the_old_primary_to_enabled() -> None:
    ks = Keyset.generate("test/lifecycle", AES256_GCM, now=T0)
    v2 = ks.add(now=T0)
    assert v2.state is KeyState.PENDING and v2.version == 2
    ks.promote(2, now=T0 + timedelta(seconds=5))
    assert [(v.version, v.state) for v in ks.versions] == [
        (1, KeyState.ENABLED),
        (2, KeyState.PRIMARY),
    ]
    assert ks.version(1).state_changed_at == T0 + timedelta(seconds=5)
    assert ks.primary is not None and ks.primary.version == 2
    ks.promote(1)
    assert ks.primary.version == 1
    assert ks.version(2).state is KeyState.ENABLED


def test_the_primary_can_be_neither_disabled_nor_destroyed() -> None:
    ks = Keyset.generate("test/lifecycle", AES256_GCM)
    for op in (ks.disable, ks.destroy, ks.enable, ks.promote):
        with pytest.raises(KeyStateError):
            op(1)
    assert ks.version(1).state is KeyState.PRIMARY


def test_destroy_wipes_material_but_keeps_number_and_key_id() -> None:
    ks = Keyset.generate("test/lifecycle", AES256_GCM)
    key_id = ks.version(1).key_id
    ks.promote(ks.add().version)
    ks.disable(1)
    assert len(ks.export_secret_material(1, SECRET_ACCESS)) == 32
    ks.destroy(1)
    info = ks.version(1)
    assert (info.version, info.key_id, info.state) == (1, key_id, KeyState.DESTROYED)
    with pytest.raises(KeysetError, match="destroyed"):
        ks.export_secret_material(1, SECRET_ACCESS)
    with pytest.raises(KeyStateError):
        ks.enable(1)
    # Version numbers are never reused.
    assert ks.add().version == 3


def test_key_ids_are_unique_32_bit_and_versions_count_up() -> None:
    ks = Keyset.generate("test/lifecycle", AES256_GCM)
    for _ in range(40):
        ks.add()
    infos = ks.versions
    assert [v.version for v in infos] == list(range(1, 42))
    key_ids = {v.key_id for v in infos}
    assert len(key_ids) == 41
    assert all(0 <= k < 2**32 for k in key_ids)


def test_timestamps_are_arguments_and_must_be_aware() -> None:
    ks = Keyset.generate("test/lifecycle", AES256_GCM, now=T0)
    assert ks.version(1).created_at == T0
    assert Keyset.generate("test/x", AES256_GCM).version(1).created_at is None
    with pytest.raises(ValueError, match="timezone"):
        ks.add(now=datetime(2026, 1, 1))
    assert len(ks.versions) == 1


def test_unknown_versions_raise_keyset_error() -> None:
    ks = Keyset.generate("test/lifecycle", AES256_GCM)
    for op in (ks.promote, ks.disable, ks.enable, ks.destroy, ks.version):
        with pytest.raises(KeysetError):
            op(7)


def test_empty_keyset_needs_a_template() -> None:
    ks = Keyset("test/empty", "aead")
    assert ks.primary is None and ks.versions == ()
    with pytest.raises(KeysetError):
        ks.add()
    assert ks.add(AES256_GCM).version == 1
    assert ks.add().template == AES256_GCM
