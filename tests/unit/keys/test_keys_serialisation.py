"""Keysets leave memory only encrypted: whole, per store row, or sealed to one principal."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from keybroker.encoding import decode
from keybroker.errors import CryptoError, DecodeError, KeysetError
from keybroker.keys import (
    AES256_GCM,
    ED25519,
    HMAC_SHA256,
    SECRET_ACCESS,
    X25519_HPKE,
    AeadHandle,
    Keyset,
    KeyState,
    PublicKeyset,
    WrappedVersion,
    version_aad,
)

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def lived_keyset(template: str = "AES256_GCM") -> Keyset:
    """Versions in every state: 1 destroyed, 2 disabled, 3 enabled, 4 primary, 5 pending."""
    ks = Keyset.generate("test/lived", template, now=T0)
    for _ in range(4):
        ks.add(now=T0)
    ks.promote(4, now=T0 + timedelta(seconds=1))
    ks.disable(1, now=T0 + timedelta(seconds=2))
    ks.destroy(1, now=T0 + timedelta(seconds=3))
    ks.disable(2)
    ks.promote(3)
    ks.promote(4)
    return ks


def secrets_of(ks: Keyset) -> list[bytes]:
    return [
        ks.export_secret_material(v.version, SECRET_ACCESS)
        for v in ks.versions
        if v.state is not KeyState.DESTROYED
    ]


# -- whole keyset -------------------------------------------------------------------


@pytest.mark.parametrize("template", ["AES256_GCM", "HMAC_SHA256", "ED25519", "X25519_HPKE"])
def test_encrypt_to_bytes_round_trip(template: str, kek: AeadHandle) -> None:
    ks = lived_keyset(template)
    assert [v.state for v in ks.versions] == [
        KeyState.DESTROYED,
        KeyState.DISABLED,
        KeyState.ENABLED,
        KeyState.PRIMARY,
        KeyState.PENDING,
    ]
    blob = ks.encrypt_to_bytes(kek, b"file:lived")
    again = Keyset.decrypt_from_bytes(blob, kek, b"file:lived")
    assert (again.name, again.purpose) == (ks.name, ks.purpose)
    assert again.versions == ks.versions
    assert again.version(1).state_changed_at == T0 + timedelta(seconds=3)
    assert secrets_of(again) == secrets_of(ks)
    for secret in secrets_of(ks):
        assert secret not in blob


def test_decrypt_from_bytes_old_ciphertexts_still_open(kek: AeadHandle) -> None:
    ks = Keyset.generate("test/aead", AES256_GCM)
    ct = ks.aead().encrypt(b"m", b"")
    again = Keyset.decrypt_from_bytes(ks.encrypt_to_bytes(kek, b""), kek, b"")
    assert again.aead().decrypt(ct, b"") == b"m"
    assert ks.aead().decrypt(again.aead().encrypt(b"n", b""), b"") == b"n"


def test_decrypt_from_bytes_wrong_aad_kek_or_tampering(kek: AeadHandle) -> None:
    ks = lived_keyset()
    blob = ks.encrypt_to_bytes(kek, b"aad")
    with pytest.raises(CryptoError):
        Keyset.decrypt_from_bytes(blob, kek, b"other")
    other_kek = Keyset.generate("root/other", AES256_GCM).aead()
    with pytest.raises(CryptoError):
        Keyset.decrypt_from_bytes(blob, other_kek, b"aad")
    for i in (0, 10, len(blob) // 2, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[i] ^= 0x80
        with pytest.raises(CryptoError):
            Keyset.decrypt_from_bytes(bytes(tampered), kek, b"aad")
    with pytest.raises(CryptoError):
        Keyset.decrypt_from_bytes(blob[:20], kek, b"aad")


def test_serialised_keyset_is_not_a_wrapped_row(kek: AeadHandle) -> None:
    # Whole-keyset blobs and per-version rows use distinct AADs under the same KEK.
    ks = Keyset.generate("test/aead", AES256_GCM)
    row = ks.wrap_version(1, kek)
    assert row.wrapped_material is not None
    with pytest.raises(CryptoError):
        Keyset.decrypt_from_bytes(row.wrapped_material, kek, version_aad("test/aead", 1))


# -- one row per version -------------------------------------------------------------


def test_version_aad_is_canonical_and_distinct() -> None:
    assert version_aad("a", 1) == version_aad("a", 1)
    assert decode("keybroker/keys/version-aad/v1", version_aad("a", 1))[1] == {
        "keyset": "a",
        "version": 1,
    }
    assert len({version_aad("a", 1), version_aad("a", 2), version_aad("b", 1)}) == 3


@pytest.mark.parametrize("template", ["AES256_GCM", "ED25519", "X25519_HPKE"])
def test_wrapped_versions_round_trip(template: str, kek: AeadHandle) -> None:
    ks = lived_keyset(template)
    rows = ks.wrapped_versions(kek)
    assert [r.version for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].wrapped_material is None and rows[0].state is KeyState.DESTROYED
    assert all(r.wrapped_material is not None for r in rows[1:])
    assert all(r.kek_id == kek.kek_id for r in rows)
    assert all(r.template == template for r in rows)
    for secret in secrets_of(ks):
        assert all(secret not in (r.wrapped_material or b"") for r in rows)
    again = Keyset.from_wrapped(ks.name, ks.purpose, rows, kek)
    assert again.versions == ks.versions
    assert secrets_of(again) == secrets_of(ks)


def test_wrapped_row_under_another_name_or_version_fails(kek: AeadHandle) -> None:
    rows = Keyset.generate("test/a", AES256_GCM).wrapped_versions(kek)
    with pytest.raises(CryptoError):
        Keyset.from_wrapped("test/b", "aead", rows, kek)
    with pytest.raises(CryptoError):
        Keyset.from_wrapped("test/a", "aead", [dataclasses.replace(rows[0], version=2)], kek)
    with pytest.raises(CryptoError):
        other = Keyset.generate("root/other", AES256_GCM).aead()
        Keyset.from_wrapped("test/a", "aead", rows, other)


def test_edited_row_columns_fail(kek: AeadHandle) -> None:
    ks = Keyset.generate("test/sig", ED25519)
    row = ks.wrap_version(1, kek)
    other = Keyset.generate("test/other", ED25519).version(1)
    edits = [
        dataclasses.replace(row, key_id=row.key_id ^ 1),
        dataclasses.replace(row, template="ECDSA_P256"),
        dataclasses.replace(row, public_key=other.public_key),
    ]
    for edited in edits:
        with pytest.raises(CryptoError):
            Keyset.from_wrapped("test/sig", "sign", [edited], kek)


def test_rows_that_do_not_form_a_keyset(kek: AeadHandle) -> None:
    ks = Keyset.generate("test/aead", AES256_GCM)
    ks.add()
    v1, v2 = ks.wrapped_versions(kek)
    bad_sets = [
        [v1, dataclasses.replace(v2, state=KeyState.PRIMARY)],
        [dataclasses.replace(v1, state=KeyState.DESTROYED)],
        [dataclasses.replace(v1, wrapped_material=None)],
        [v1, dataclasses.replace(v1)],
        [dataclasses.replace(v1, state="bogus")],  # type: ignore[arg-type]
        [dataclasses.replace(v1, template="NOPE")],
    ]
    for rows in bad_sets:
        with pytest.raises(KeysetError):
            Keyset.from_wrapped("test/aead", "aead", rows, kek)
    with pytest.raises(KeysetError):
        Keyset.from_wrapped("test/aead", "mac", [v1], kek)


def test_wrapped_version_repr_has_no_material(kek: AeadHandle) -> None:
    row = Keyset.generate("test/aead", AES256_GCM).wrap_version(1, kek)
    assert isinstance(row, WrappedVersion)
    assert row.wrapped_material is not None
    assert row.wrapped_material.hex() not in repr(row)
    assert repr(row.wrapped_material)[2:-1] not in repr(row)


# -- public keysets on the wire ---------------------------------------------------


def test_public_keyset_round_trip_and_garbage() -> None:
    ks = lived_keyset("ED25519")
    public = ks.public_keyset()
    data = public.to_bytes()
    again = PublicKeyset.from_bytes(data)
    assert again.versions == public.versions
    assert again.to_bytes() == data
    assert again.primary is not None and again.primary.version == 4
    for secret in secrets_of(ks):
        assert secret not in data
    for garbage in (b"", b"\x00", data[:-1], data + b"\x00", b"\xa0" * 10):
        with pytest.raises(DecodeError):
            PublicKeyset.from_bytes(garbage)


def test_public_keyset_from_bytes_rejects_bad_contents() -> None:
    from keybroker.keys.public import _PublicKeysetRecord

    record = _PublicKeysetRecord.decode(
        Keyset.generate("test/s", ED25519).public_keyset().to_bytes()
    )
    v = record.versions[0]
    bad_records = [
        dataclasses.replace(record, purpose="nope"),
        dataclasses.replace(record, purpose="aead"),
        dataclasses.replace(record, name="has space"),
        dataclasses.replace(record, versions=[dataclasses.replace(v, state="nope")]),
        dataclasses.replace(record, versions=[dataclasses.replace(v, template="NOPE")]),
        dataclasses.replace(record, versions=[dataclasses.replace(v, template="AES256_GCM")]),
        dataclasses.replace(record, versions=[dataclasses.replace(v, public_key=b"\x01")]),
        dataclasses.replace(record, versions=[dataclasses.replace(v, key_id=2**32)]),
        dataclasses.replace(record, versions=[dataclasses.replace(v, version=0)]),
        dataclasses.replace(record, versions=[v, v]),
        dataclasses.replace(record, versions=[v, dataclasses.replace(v, version=2, key_id=1)]),
    ]
    for bad in bad_records:
        with pytest.raises(DecodeError):
            PublicKeyset.from_bytes(bad.encode())


# -- delivery: one version sealed to one principal -----------------------------------


def test_seal_version_and_install_on_the_recipient() -> None:
    broker = Keyset.generate("site/fra1/link", AES256_GCM)
    broker.add()  # version 2, pending: the one being rolled out
    principal = Keyset.generate("principal/site/fra1/sealing", X25519_HPKE)
    recipient = PublicKeyset.from_bytes(principal.public_keyset().to_bytes())
    info = b"recipient=site/fra1;keyset=site/fra1/link;version=2;delivery=d-1"
    sealed = broker.seal_version(2, recipient, info=info)
    for secret in secrets_of(broker):
        assert secret not in sealed

    local = Keyset("site/fra1/link", "aead")
    installed = local.install_sealed_version(sealed, principal.hpke(), info=info, now=T0)
    assert installed.state is KeyState.PENDING
    assert (installed.version, installed.key_id) == (2, broker.version(2).key_id)
    assert local.export_secret_material(2, SECRET_ACCESS) == broker.export_secret_material(
        2, SECRET_ACCESS
    )
    # Installed for receive first: the broker's new primary decrypts at the site.
    broker.promote(2)
    assert local.aead().decrypt(broker.aead().encrypt(b"m", b""), b"") == b"m"
    # Redelivery is harmless.
    assert local.install_sealed_version(sealed, principal.hpke(), info=info) == installed


def test_install_sealed_version_failures() -> None:
    broker = Keyset.generate("site/fra1/link", AES256_GCM)
    principal = Keyset.generate("principal/p", X25519_HPKE)
    sealed = broker.seal_version(1, principal.public_keyset(), info=b"i")
    local = Keyset("site/fra1/link", "aead")
    with pytest.raises(CryptoError):
        local.install_sealed_version(sealed, principal.hpke(), info=b"other")
    with pytest.raises(CryptoError):
        local.install_sealed_version(sealed, Keyset.generate("p2", X25519_HPKE).hpke(), info=b"i")
    with pytest.raises(KeysetError):
        Keyset("site/other", "aead").install_sealed_version(sealed, principal.hpke(), info=b"i")
    with pytest.raises(KeysetError):
        Keyset("site/fra1/link", "mac").install_sealed_version(sealed, principal.hpke(), info=b"i")
    # Version 1 here already holds a different key.
    clash = Keyset.generate("site/fra1/link", AES256_GCM)
    with pytest.raises(KeysetError):
        clash.install_sealed_version(sealed, principal.hpke(), info=b"i")
    # Garbage sealed to the principal by anyone (HPKE base mode is unauthenticated).
    junk = principal.public_keyset().seal(b"not a sealed version", b"i")
    with pytest.raises(DecodeError):
        local.install_sealed_version(junk, principal.hpke(), info=b"i")
    assert local.versions == ()


def test_only_usable_versions_are_delivered() -> None:
    broker = Keyset.generate("k", HMAC_SHA256)
    broker.add()
    broker.disable(2)
    recipient = Keyset.generate("p", X25519_HPKE).public_keyset()
    with pytest.raises(KeysetError):
        broker.seal_version(2, recipient, info=b"")
    with pytest.raises(KeysetError):
        broker.seal_version(1, Keyset.generate("s", ED25519).public_keyset(), info=b"")


# -- proof of possession ---------------------------------------------------------------


@pytest.mark.parametrize("template", ["AES256_GCM", "HMAC_SHA256", "ED25519", "X25519_HPKE"])
def test_proof_of_possession(template: str) -> None:
    broker = Keyset.generate("k", template)
    broker.add()
    holder = Keyset.decrypt_from_bytes(
        broker.encrypt_to_bytes(kek := Keyset.generate("kek", AES256_GCM).aead(), b""), kek, b""
    )
    proof = holder.prove_possession(2, b"challenge-1")
    broker.verify_possession(2, b"challenge-1", proof)
    with pytest.raises(CryptoError):
        broker.verify_possession(2, b"challenge-2", proof)
    with pytest.raises(CryptoError):
        broker.verify_possession(1, b"challenge-1", proof)
    impostor = Keyset.generate("k", template)
    impostor.add()
    with pytest.raises(CryptoError):
        broker.verify_possession(2, b"challenge-1", impostor.prove_possession(2, b"challenge-1"))
    # The proof is not the key, nor a MAC the keyset's own primitive would make.
    assert holder.export_secret_material(2, SECRET_ACCESS) not in proof
