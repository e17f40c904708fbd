"""The root of trust: file root key, PKCS#11 root key (SoftHSM2) and root key specs."""

# python-pkcs11 is optional: the file-key tests must run without it, so the
# PKCS#11 tests import it where they need it.

from __future__ import annotations

import base64
import copy
import os
import pickle
import shutil
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker.errors import CryptoError, RootKeyError
from keybroker.keys.kek import KeyEncryptionKey
from keybroker.keys.root import (
    DEFAULT_KEY_LABEL,
    MODULE_ENV,
    FileRootKey,
    FileRootKeySpec,
    Pkcs11RootKey,
    Pkcs11RootKeySpec,
    create_root_key,
    find_pkcs11_module,
    open_root_key,
    parse_root_key_spec,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
AAD = b"keyset:payments/v3"


def _missing(what: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true", pytrace=False)
    pytest.skip(f"{what} is not available")


def _read_key_bytes(path: Path) -> bytes:
    """What a test (never keybroker code) may do: look inside the file."""
    return base64.b64decode(path.read_bytes().splitlines()[1])


# ---------------------------------------------------------------------------
# FileRootKey: create and load
# ---------------------------------------------------------------------------


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "root.key"


def test_create_then_load_round_trip(key_path: Path) -> None:
    with FileRootKey.create(key_path) as created, FileRootKey.load(key_path) as loaded:
        assert isinstance(created, KeyEncryptionKey)
        assert created.kek_id == loaded.kek_id
        assert loaded.decrypt(created.encrypt(b"key material", AAD), AAD) == b"key material"
        assert created.decrypt(loaded.encrypt(b"more", AAD), AAD) == b"more"


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o777])
def test_create_writes_mode_0600_whatever_the_umask(key_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        FileRootKey.create(key_path).close()
    finally:
        os.umask(old)
    st = os.lstat(key_path)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    FileRootKey.load(key_path).close()


def test_file_format_is_header_and_base64_of_32_bytes(key_path: Path) -> None:
    FileRootKey.create(key_path).close()
    lines = key_path.read_bytes().split(b"\n")
    assert lines[0] == b"keybroker-root-key-v1"
    assert len(base64.b64decode(lines[1], validate=True)) == 32
    assert lines[2:] == [b""]


def test_two_created_keys_differ(tmp_path: Path) -> None:
    a = FileRootKey.create(tmp_path / "a.key")
    b = FileRootKey.create(tmp_path / "b.key")
    assert a.kek_id != b.kek_id
    assert _read_key_bytes(tmp_path / "a.key") != _read_key_bytes(tmp_path / "b.key")


def test_create_refuses_to_overwrite(key_path: Path) -> None:
    FileRootKey.create(key_path).close()
    before = key_path.read_bytes()
    with pytest.raises(RootKeyError, match="already exists"):
        FileRootKey.create(key_path)
    assert key_path.read_bytes() == before


def test_create_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "stolen.key"
    target.parent.mkdir()
    (tmp_path / "root.key").symlink_to(target)
    with pytest.raises(RootKeyError, match="already exists"):
        FileRootKey.create(tmp_path / "root.key")
    assert not target.exists()


def test_create_in_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(RootKeyError, match="does not exist"):
        FileRootKey.create(tmp_path / "no-such-dir" / "root.key")


# ---------------------------------------------------------------------------
# FileRootKey: encrypt / decrypt
# ---------------------------------------------------------------------------


@pytest.fixture
def file_key(key_path: Path) -> Iterator[FileRootKey]:
    with FileRootKey.create(key_path) as key:
        yield key


@pytest.mark.parametrize(
    "plaintext", [b"", b"x", bytes(range(32)), bytes(range(256)) * 20], ids=["0", "1", "32", "5120"]
)
def test_file_round_trip(file_key: FileRootKey, plaintext: bytes) -> None:
    sealed = file_key.encrypt(plaintext, AAD)
    assert len(sealed) == 1 + 12 + len(plaintext) + 16
    assert sealed[0] == 0x01
    assert file_key.decrypt(sealed, AAD) == plaintext


def test_file_nonces_are_fresh(file_key: FileRootKey) -> None:
    sealed = {file_key.encrypt(b"same", AAD) for _ in range(50)}
    assert len({s[1:13] for s in sealed}) == 50


def test_file_format_matches_the_documented_layout(file_key: FileRootKey, key_path: Path) -> None:
    """An independent AES-GCM opens it: format byte || nonce || ct+tag, AAD = format || aad."""
    sealed = file_key.encrypt(b"interop", AAD)
    aead = AESGCM(_read_key_bytes(key_path))
    assert aead.decrypt(sealed[1:13], sealed[13:], b"\x01" + AAD) == b"interop"


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _bad_ciphertexts(sealed: bytes) -> dict[str, bytes]:
    return {
        "format byte": _flip(sealed, 0),
        "nonce": _flip(sealed, 5),
        "body": _flip(sealed, 14),
        "tag": _flip(sealed, len(sealed) - 1),
        "truncated": sealed[:-1],
        "tag only": sealed[:29],
        "too short": sealed[:28],
        "empty": b"",
        "extended": sealed + b"\x00",
    }


def test_file_tampering_is_one_opaque_crypto_error(file_key: FileRootKey) -> None:
    sealed = file_key.encrypt(b"secret material!", AAD)
    messages = set()
    for what, bad in _bad_ciphertexts(sealed).items():
        with pytest.raises(CryptoError) as info:
            file_key.decrypt(bad, AAD)
        messages.add(str(info.value))
        assert info.value.__cause__ is None, what
    assert messages == {"cryptographic verification failed"}


@pytest.mark.parametrize("other_aad", [b"", b"keyset:payments/v4", AAD + b"\x00", AAD[:-1]])
def test_file_wrong_aad(file_key: FileRootKey, other_aad: bytes) -> None:
    sealed = file_key.encrypt(b"m", AAD)
    with pytest.raises(CryptoError):
        file_key.decrypt(sealed, other_aad)


def test_file_other_key(file_key: FileRootKey, tmp_path: Path) -> None:
    other = FileRootKey.create(tmp_path / "other.key")
    with pytest.raises(CryptoError):
        other.decrypt(file_key.encrypt(b"m", AAD), AAD)


def test_closed_file_key_refuses(key_path: Path) -> None:
    with FileRootKey.create(key_path) as key:
        sealed = key.encrypt(b"m", AAD)
    with pytest.raises(RootKeyError, match="closed"):
        key.decrypt(sealed, AAD)
    with pytest.raises(RootKeyError, match="closed"):
        key.encrypt(b"m", AAD)
    key.close()  # idempotent


def test_file_repr_and_kek_id_name_no_key_bytes(file_key: FileRootKey, key_path: Path) -> None:
    raw = _read_key_bytes(key_path)
    text = repr(file_key)
    assert str(key_path) in text and file_key.kek_id in text
    for form in (raw.hex(), base64.b64encode(raw).decode(), repr(raw)):
        assert form not in text
        assert form not in file_key.kek_id
    assert file_key.kek_id.startswith("file:") and len(file_key.kek_id) == len("file:") + 16
    assert "_aead" not in text


def test_file_key_cannot_be_pickled_or_copied(file_key: FileRootKey) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(file_key)
    with pytest.raises(TypeError):
        copy.copy(file_key)


# ---------------------------------------------------------------------------
# FileRootKey.load refusals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602, 0o606, 0o610, 0o601])
def test_load_refuses_group_or_other_access(key_path: Path, mode: int) -> None:
    FileRootKey.create(key_path).close()
    key_path.chmod(mode)
    with pytest.raises(RootKeyError, match="chmod 600") as info:
        FileRootKey.load(key_path)
    assert f"{mode:04o}" in str(info.value)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_load_accepts_owner_only_modes(key_path: Path, mode: int) -> None:
    FileRootKey.create(key_path).close()
    key_path.chmod(mode)
    FileRootKey.load(key_path).close()


def test_load_refuses_symlink_even_to_a_good_key(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    FileRootKey.create(real).close()
    link = tmp_path / "root.key"
    link.symlink_to(real)
    with pytest.raises(RootKeyError, match="symbolic link"):
        FileRootKey.load(link)


def test_load_missing(key_path: Path) -> None:
    with pytest.raises(RootKeyError, match="does not exist"):
        FileRootKey.load(key_path)


def test_load_refuses_directory(key_path: Path) -> None:
    key_path.mkdir(mode=0o700)
    with pytest.raises(RootKeyError, match="not a regular file"):
        FileRootKey.load(key_path)


def test_load_refuses_fifo_without_blocking(key_path: Path) -> None:
    os.mkfifo(key_path, 0o600)
    with pytest.raises(RootKeyError, match="not a regular file"):
        FileRootKey.load(key_path)


def test_load_refuses_file_of_another_user(key_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FileRootKey.create(key_path).close()
    if os.geteuid() == 0:
        os.chown(key_path, 65534, 65534)  # nobody
        expected_owner = 65534
    else:
        # Unprivileged: pretend to run as someone else instead of chowning.
        expected_owner = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: expected_owner + 1)
    with pytest.raises(RootKeyError, match="chown") as info:
        FileRootKey.load(key_path)
    assert f"uid {expected_owner}" in str(info.value)


_GOOD_B64 = base64.b64encode(bytes(32))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not a keybroker root key"),
        (b"hello\n", "not a keybroker root key"),
        (b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n", "not a keybroker root key"),
        (bytes(32), "not a keybroker root key"),
        (b"keybroker-root-key-v2\n" + _GOOD_B64 + b"\n", "does not support"),
        (b"keybroker-root-key-v10\n" + _GOOD_B64 + b"\n", "does not support"),
        (b"keybroker-root-key-v1\n", "corrupt"),
        (b"keybroker-root-key-v1\n\n", "corrupt"),
        (b"keybroker-root-key-v1\nnot base64!\n", "corrupt"),
        (b"keybroker-root-key-v1\n" + base64.b64encode(bytes(31)) + b"\n", "corrupt"),
        (b"keybroker-root-key-v1\n" + base64.b64encode(bytes(33)) + b"\n", "corrupt"),
        (b"keybroker-root-key-v1\n" + _GOOD_B64 + b"\nextra\n", "corrupt"),
        (b"keybroker-root-key-v1\n" + _GOOD_B64 + b"\n\n", "corrupt"),
        (b"keybroker-root-key-v1\r\n" + _GOOD_B64 + b"\r\n", "not a keybroker root key"),
        (b"keybroker-root-key-v1\n" + _GOOD_B64 + b"\n" + b"x" * 5000, "larger than"),
    ],
)
def test_load_refuses_malformed(key_path: Path, content: bytes, match: str) -> None:
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    with pytest.raises(RootKeyError, match=match):
        FileRootKey.load(key_path)


def test_load_accepts_missing_final_newline(key_path: Path) -> None:
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"keybroker-root-key-v1\n" + _GOOD_B64)
    FileRootKey.load(key_path).close()


# ---------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, "", "file:root.key"])
def test_default_spec_is_root_key_under_home(tmp_path: Path, spec: str | None) -> None:
    assert parse_root_key_spec(spec, tmp_path) == FileRootKeySpec(tmp_path / "root.key")


def test_file_spec_paths(tmp_path: Path) -> None:
    assert parse_root_key_spec("file:/etc/kb/root.key", tmp_path).path == Path("/etc/kb/root.key")  # type: ignore[union-attr]
    assert parse_root_key_spec("file:keys/r.key", tmp_path).path == tmp_path / "keys/r.key"  # type: ignore[union-attr]


def test_pkcs11_spec_parses(tmp_path: Path) -> None:
    spec = parse_root_key_spec(
        "pkcs11:module=/usr/lib/x.so;token=My%3BToken;key=kb-root;pin-env=HSM_PIN", tmp_path
    )
    assert spec == Pkcs11RootKeySpec(
        token="My;Token", key="kb-root", module="/usr/lib/x.so", pin_env="HSM_PIN"
    )
    spec = parse_root_key_spec("pkcs11:token=t;pin-file=pin.txt", tmp_path)
    assert spec == Pkcs11RootKeySpec(
        token="t", key=DEFAULT_KEY_LABEL, pin_file=tmp_path / "pin.txt"
    )


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("root.key", "starts with"),
        ("sekrit-1234", "starts with"),
        ("http://example.com/root.key", "starts with"),
        ("FILE:root.key", "starts with"),
        ("file:", "needs a path"),
        ("pkcs11:", "name=value"),
        ("pkcs11:token=a", "exactly one of pin-env"),
        ("pkcs11:token=a;pin-env=X;pin-file=/p", "exactly one of pin-env"),
        ("pkcs11:pin-env=X", "needs token"),
        ("pkcs11:token=;pin-env=X", "empty"),
        ("pkcs11:token=a;;pin-env=X", "name=value"),
        ("pkcs11:token=a;pin-env=X;", "name=value"),
        ("pkcs11:token=a;token=b;pin-env=X", "twice"),
        ("pkcs11:token=a;slot=1;pin-env=X", "unknown field 'slot'"),
        ("pkcs11:token=%FF;pin-env=X", "not UTF-8"),
        ("pkcs11:token=a;pin=sekrit-1234", "must not contain the PIN"),
        ("pkcs11:token=a;pin-value=sekrit-1234", "must not contain the PIN"),
        ("pkcs11:token=a;pin-env=X;pin=sekrit-1234", "must not contain the PIN"),
    ],
)
def test_bad_specs(tmp_path: Path, spec: str, match: str) -> None:
    with pytest.raises(RootKeyError, match=match) as info:
        parse_root_key_spec(spec, tmp_path)
    assert "sekrit" not in str(info.value)


def test_create_and_open_by_default_spec(tmp_path: Path) -> None:
    with create_root_key(None, tmp_path) as created, open_root_key(None, tmp_path) as opened:
        assert isinstance(opened, FileRootKey)
        assert opened.path == tmp_path / "root.key"
        assert opened.decrypt(created.encrypt(b"m", AAD), AAD) == b"m"
    with pytest.raises(RootKeyError, match="already exists"):
        create_root_key("file:root.key", tmp_path)


def test_open_by_spec_applies_file_checks(tmp_path: Path) -> None:
    create_root_key(None, tmp_path).close()
    (tmp_path / "root.key").chmod(0o644)
    with pytest.raises(RootKeyError, match="chmod 600"):
        open_root_key(None, tmp_path)


def test_pin_env_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KB_TEST_PIN", raising=False)
    spec = parse_root_key_spec("pkcs11:token=t;pin-env=KB_TEST_PIN", tmp_path)
    assert isinstance(spec, Pkcs11RootKeySpec)
    with pytest.raises(RootKeyError, match="KB_TEST_PIN"):
        spec.read_pin()
    monkeypatch.setenv("KB_TEST_PIN", "")
    with pytest.raises(RootKeyError, match="KB_TEST_PIN"):
        spec.read_pin()


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(mode)


def test_pin_file(tmp_path: Path) -> None:
    _write_private(tmp_path / "pin", b"12 34\n")
    spec = parse_root_key_spec("pkcs11:token=t;pin-file=pin", tmp_path)
    assert isinstance(spec, Pkcs11RootKeySpec)
    assert spec.read_pin() == "12 34"


@pytest.mark.parametrize(
    ("data", "mode", "match"),
    [
        (b"SEKRIT-PIN\n", 0o644, "chmod 600"),
        (b"\n", 0o600, "empty"),
        (b"\xffSEKRIT-PIN", 0o600, "UTF-8"),
    ],
    ids=["world-readable", "empty", "not-utf8"],
)
def test_bad_pin_file(tmp_path: Path, data: bytes, mode: int, match: str) -> None:
    _write_private(tmp_path / "pin", data, mode)
    spec = parse_root_key_spec("pkcs11:token=t;pin-file=pin", tmp_path)
    assert isinstance(spec, Pkcs11RootKeySpec)
    with pytest.raises(RootKeyError, match=match) as info:
        spec.read_pin()
    assert "SEKRIT" not in str(info.value)


def test_find_module_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "libvendor-pkcs11.so"
    fake.write_bytes(b"")
    monkeypatch.setenv(MODULE_ENV, str(fake))
    assert find_pkcs11_module() == str(fake)
    monkeypatch.setenv(MODULE_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(RootKeyError, match=MODULE_ENV):
        find_pkcs11_module()


# ---------------------------------------------------------------------------
# PKCS#11 (SoftHSM2)
# ---------------------------------------------------------------------------

USER_PIN = "kb-user-7391"
SO_PIN = "kb-so-2718"
TOKEN_A = "kb-root-a"
TOKEN_B = "kb-root-b"
TOKEN_PIN = "kb-root-pin"  # only for wrong-PIN tests, so nothing else shares its login


@dataclass(frozen=True)
class SoftHSM:
    module: str


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHSM]:
    """A private SoftHSM2 token directory with three fresh tokens, for this test process.

    SoftHSM2 reads ``SOFTHSM2_CONF`` once, at C_Initialize, and python-pkcs11
    keeps one initialised module per process, so the tokens must exist before
    the first test loads the module, and every test in the process shares them
    (tests keep apart by using unique key labels).
    """
    util = shutil.which("softhsm2-util")
    try:
        module = os.path.realpath(find_pkcs11_module())
    except RootKeyError:
        module = ""
    if util is None or not module:
        _missing("SoftHSM2 (softhsm2-util and libsofthsm2.so)")
    try:
        import pkcs11
    except ImportError:
        _missing("python-pkcs11")
    if module in pkcs11._loaded:
        pytest.fail(
            "SoftHSM2 was loaded in this process before the softhsm fixture set SOFTHSM2_CONF; "
            "move the fixture to tests/conftest.py so every test shares it",
            pytrace=False,
        )
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        pins = ["--pin", USER_PIN, "--so-pin", SO_PIN]
        for label in (TOKEN_A, TOKEN_B, TOKEN_PIN):
            subprocess.run(
                [util, "--init-token", "--free", "--label", label, *pins],
                check=True,
                capture_output=True,
            )
        yield SoftHSM(module)


def _label() -> str:
    return "kb-test-" + uuid.uuid4().hex[:12]


@contextmanager
def _raw_session(hsm: SoftHSM, token_label: str, *, rw: bool = False) -> Iterator[Any]:
    """A python-pkcs11 session of our own, logged in; no Pkcs11RootKey may be open on the token."""
    import pkcs11

    token = pkcs11.lib(hsm.module).get_token(token_label=token_label)
    session = token.open(rw=rw, user_pin=USER_PIN)
    try:
        yield session
    finally:
        session.close()


@pytest.mark.hsm
def test_pkcs11_create_then_open_round_trip(softhsm: SoftHSM) -> None:
    label = _label()
    with Pkcs11RootKey.create(softhsm.module, TOKEN_A, USER_PIN, label) as created:
        assert isinstance(created, KeyEncryptionKey)
        sealed = created.encrypt(b"key material", AAD)
        assert sealed[0] == 0x02
        assert len(sealed) == 1 + 12 + len(b"key material") + 16
        kek_id = created.kek_id
    with Pkcs11RootKey.open(softhsm.module, TOKEN_A, USER_PIN, label) as opened:
        assert opened.kek_id == kek_id
        assert kek_id.startswith("pkcs11:")
        assert opened.decrypt(sealed, AAD) == b"key material"
        for plaintext in (b"", os.urandom(32), os.urandom(20000)):
            assert opened.decrypt(opened.encrypt(plaintext, AAD), AAD) == plaintext


@pytest.mark.hsm
def test_pkcs11_create_refuses_existing_label(softhsm: SoftHSM) -> None:
    label = _label()
    with Pkcs11RootKey.create(softhsm.module, TOKEN_A, USER_PIN, label) as key:
        sealed = key.encrypt(b"m", AAD)
        with pytest.raises(RootKeyError, match="already exists"):
            Pkcs11RootKey.create(softhsm.module, TOKEN_A, USER_PIN, label)
        # The refused create neither replaced the key nor logged the first one out.
        assert key.decrypt(sealed, AAD) == b"m"
    with Pkcs11RootKey.open(softhsm.module, TOKEN_A, USER_PIN, label) as again:
        assert again.decrypt(sealed, AAD) == b"m"


@pytest.mark.hsm
def test_pkcs11_open_missing_key(softhsm: SoftHSM) -> None:
    with pytest.raises(RootKeyError, match="no root key labelled"):
        Pkcs11RootKey.open(softhsm.module, TOKEN_A, USER_PIN, _label())


@pytest.mark.hsm
def test_pkcs11_unknown_token(softhsm: SoftHSM) -> None:
    with pytest.raises(RootKeyError, match="no PKCS#11 token labelled"):
        Pkcs11RootKey.open(softhsm.module, "no-such-token", USER_PIN, _label())


@pytest.mark.hsm
def test_pkcs11_key_is_non_extractable(softhsm: SoftHSM) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    label = _label()
    Pkcs11RootKey.create(softhsm.module, TOKEN_A, USER_PIN, label).close()
    with _raw_session(softhsm, TOKEN_A, rw=True) as session:
        key = session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, label=label)
        attrs = key.get_attributes(
            [
                Attribute.TOKEN,
                Attribute.PRIVATE,
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.ALWAYS_SENSITIVE,
                Attribute.NEVER_EXTRACTABLE,
                Attribute.MODIFIABLE,
                Attribute.VALUE_LEN,
                Attribute.WRAP,
                Attribute.DERIVE,
            ]
        )
        assert attrs == {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ALWAYS_SENSITIVE: True,
            Attribute.NEVER_EXTRACTABLE: True,
            Attribute.MODIFIABLE: False,
            Attribute.VALUE_LEN: 32,
            Attribute.WRAP: False,
            Attribute.DERIVE: False,
        }
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]
        # Nor can it be wrapped out under a key we know, or be made extractable.
        wrapper = session.generate_key(KeyType.AES, 256, store=False)
        with pytest.raises(pkcs11.PKCS11Error):
            wrapper.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP)
        with pytest.raises(pkcs11.PKCS11Error):
            key[Attribute.EXTRACTABLE] = True


@pytest.mark.hsm
def test_pkcs11_open_refuses_an_extractable_key(softhsm: SoftHSM) -> None:
    from pkcs11 import Attribute, KeyType

    label = _label()
    with _raw_session(softhsm, TOKEN_A, rw=True) as session:
        session.generate_key(
            KeyType.AES,
            256,
            label=label,
            store=True,
            template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
        )
    with pytest.raises(RootKeyError, match="extractable"):
        Pkcs11RootKey.open(softhsm.module, TOKEN_A, USER_PIN, label)


@pytest.fixture
def hsm_key(softhsm: SoftHSM) -> Iterator[Pkcs11RootKey]:
    with Pkcs11RootKey.create(softhsm.module, TOKEN_A, USER_PIN, _label()) as key:
        yield key


@pytest.mark.hsm
def test_pkcs11_tampering_is_one_opaque_crypto_error(hsm_key: Pkcs11RootKey) -> None:
    sealed = hsm_key.encrypt(b"secret material!", AAD)
    for what, bad in _bad_ciphertexts(sealed).items():
        with pytest.raises(CryptoError) as info:
            hsm_key.decrypt(bad, AAD)
        assert str(info.value) == "cryptographic verification failed", what
    # A failed decryption leaves the session usable.
    assert hsm_key.decrypt(sealed, AAD) == b"secret material!"


@pytest.mark.hsm
@pytest.mark.parametrize("other_aad", [b"", b"keyset:payments/v4", AAD + b"\x00"])
def test_pkcs11_wrong_aad(hsm_key: Pkcs11RootKey, other_aad: bytes) -> None:
    sealed = hsm_key.encrypt(b"m", AAD)
    with pytest.raises(CryptoError):
        hsm_key.decrypt(sealed, other_aad)
    assert hsm_key.decrypt(sealed, AAD) == b"m"


@pytest.mark.hsm
def test_pkcs11_other_key_same_token_and_other_token(
    softhsm: SoftHSM, hsm_key: Pkcs11RootKey
) -> None:
    sealed = hsm_key.encrypt(b"m", AAD)
    with (
        Pkcs11RootKey.create(softhsm.module, TOKEN_A, USER_PIN, _label()) as same_token,
        Pkcs11RootKey.create(softhsm.module, TOKEN_B, USER_PIN, _label()) as other_token,
    ):
        assert len({hsm_key.kek_id, same_token.kek_id, other_token.kek_id}) == 3
        for other in (same_token, other_token):
            with pytest.raises(CryptoError):
                other.decrypt(sealed, AAD)
            with pytest.raises(CryptoError):
                hsm_key.decrypt(other.encrypt(b"m", AAD), AAD)


@pytest.mark.hsm
def test_file_and_pkcs11_ciphertexts_do_not_cross(
    hsm_key: Pkcs11RootKey, file_key: FileRootKey
) -> None:
    with pytest.raises(CryptoError):
        hsm_key.decrypt(file_key.encrypt(b"m", AAD), AAD)
    with pytest.raises(CryptoError):
        file_key.decrypt(hsm_key.encrypt(b"m", AAD), AAD)


@pytest.mark.hsm
def test_pkcs11_threads_share_keys(softhsm: SoftHSM) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(8)
    label = _label()
    with (
        Pkcs11RootKey.create(softhsm.module, TOKEN_A, USER_PIN, label) as first,
        Pkcs11RootKey.open(softhsm.module, TOKEN_A, USER_PIN, label) as second,
    ):

        def work(n: int) -> None:
            try:
                start.wait()
                for i in range(40):
                    plaintext = f"thread {n} message {i}".encode()
                    aad = f"keyset-{n}/v{i}".encode()
                    writer, reader = (first, second) if i % 2 else (second, first)
                    assert reader.decrypt(writer.encrypt(plaintext, aad), aad) == plaintext
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


@pytest.mark.hsm
def test_pkcs11_closing_one_key_keeps_others_logged_in(softhsm: SoftHSM) -> None:
    label = _label()
    first = Pkcs11RootKey.create(softhsm.module, TOKEN_B, USER_PIN, label)
    second = Pkcs11RootKey.open(softhsm.module, TOKEN_B, USER_PIN, label)
    first.close()
    first.close()
    assert second.decrypt(second.encrypt(b"m", AAD), AAD) == b"m"
    with pytest.raises(RootKeyError, match="closed"):
        first.encrypt(b"m", AAD)
    second.close()
    # With the last key closed the token is logged out, so opening logs in again.
    with Pkcs11RootKey.open(softhsm.module, TOKEN_B, USER_PIN, label) as third:
        assert third.decrypt(third.encrypt(b"m", AAD), AAD) == b"m"


@pytest.mark.hsm
def test_pkcs11_wrong_pin(softhsm: SoftHSM) -> None:
    label = _label()
    wrong = "not-the-pin-5555"
    with pytest.raises(RootKeyError, match="PIN is incorrect") as info:
        Pkcs11RootKey.create(softhsm.module, TOKEN_PIN, wrong, label)
    assert wrong not in str(info.value) and USER_PIN not in str(info.value)
    with Pkcs11RootKey.create(softhsm.module, TOKEN_PIN, USER_PIN, label) as key:
        # Already logged in: a second opener's PIN is still checked.
        with pytest.raises(RootKeyError, match="PIN is incorrect") as info:
            Pkcs11RootKey.open(softhsm.module, TOKEN_PIN, wrong, label)
        assert wrong not in str(info.value)
        assert key.decrypt(key.encrypt(b"m", AAD), AAD) == b"m"
        text = repr(key)
        assert USER_PIN not in text
        assert TOKEN_PIN in text and label in text and key.kek_id in text
    with pytest.raises(RootKeyError, match="PIN is incorrect"):
        Pkcs11RootKey.open(softhsm.module, TOKEN_PIN, wrong, label)


@pytest.mark.hsm
def test_pkcs11_key_cannot_be_pickled(hsm_key: Pkcs11RootKey) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(hsm_key)


@pytest.mark.hsm
def test_pkcs11_by_spec_with_pin_env_and_pin_file(
    softhsm: SoftHSM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    label = _label()
    monkeypatch.setenv("KB_TEST_HSM_PIN", USER_PIN)
    spec = f"pkcs11:module={softhsm.module};token={TOKEN_A};key={label};pin-env=KB_TEST_HSM_PIN"
    with create_root_key(spec, tmp_path) as created:
        assert isinstance(created, Pkcs11RootKey)
        sealed = created.encrypt(b"m", AAD)
    _write_private(tmp_path / "hsm.pin", USER_PIN.encode() + b"\n")
    # No module= here: KEYBROKER_PKCS11_MODULE picks it.
    monkeypatch.setenv(MODULE_ENV, softhsm.module)
    with open_root_key(f"pkcs11:token={TOKEN_A};key={label};pin-file=hsm.pin", tmp_path) as key:
        assert key.decrypt(sealed, AAD) == b"m"


def test_importing_root_does_not_load_pkcs11() -> None:
    """python-pkcs11 is an optional extra; the file root key must work without it."""
    code = "import sys, keybroker.keys.root; assert 'pkcs11' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
