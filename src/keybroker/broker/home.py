"""The keybroker home: root key, database, CA and log key, created by ``keybroker init``.

Layout of ``$KEYBROKER_HOME`` (default ``./.keybroker``, mode 0700)::

    keybroker.toml   where the database and the root key are (no secrets)
    root.key         the file root key, mode 0600 (absent with a PKCS#11 root key)
    keybroker.db     the embedded SQLite database (absent with --db postgresql://…)
    ca.pem           the broker CA certificate (public)

Every other key (the CA's, the log's) is a keyset in the database, wrapped
under the root key. :func:`open_home` refuses to start when the home or the
root key file is open to other users.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from keybroker.encoding import encode, message_label
from keybroker.errors import ConfigurationError, NotFound
from keybroker.keys import ECDSA_P256, ED25519, SECRET_ACCESS, Keyset
from keybroker.keys.root import RootKey, create_root_key, open_root_key
from keybroker.log.sth import Ed25519TreeHeadSigner
from keybroker.log.store_log import TransparencyLog
from keybroker.pki import (
    CertificateAuthority,
    certificate_der,
    certificate_pem,
    fingerprint,
    load_certificate,
)
from keybroker.store.engine import DB_FILENAME, Store, open_store
from keybroker.store.keysets import KeysetRepository
from keybroker.store.schema import certificates

CONFIG_FILENAME = "keybroker.toml"
CA_FILENAME = "ca.pem"
CA_KEYSET = "keybroker/ca"
LOG_KEYSET = "keybroker/log"
CA_VALIDITY = timedelta(days=3650)

#: Label of the log entry that records a home's creation.
INIT_ENTRY = message_label("keybroker/log/entry/init", 1)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class HomeConfig:
    home: Path
    db_url: str
    root_key: str

    @classmethod
    def load(cls, home: Path) -> HomeConfig:
        path = home / CONFIG_FILENAME
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(
                f"{home} is not a keybroker home (no {CONFIG_FILENAME}); run `keybroker init`"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{path}: {exc}") from None
        try:
            return cls(home=home, db_url=str(data["database"]), root_key=str(data["root_key"]))
        except KeyError as exc:
            raise ConfigurationError(f"{path}: missing setting {exc}") from None

    def save(self) -> None:
        # json.dumps produces valid TOML basic strings for these values.
        text = (
            "# keybroker home settings; no secrets here.\n"
            f"database = {json.dumps(self.db_url)}\n"
            f"root_key = {json.dumps(self.root_key)}\n"
        )
        path = self.home / CONFIG_FILENAME
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


@dataclass
class Home:
    """An opened home: everything the broker needs, ready to use. Close it when done."""

    config: HomeConfig
    store: Store
    root_key: RootKey
    keysets: KeysetRepository
    log: TransparencyLog
    log_signer: Ed25519TreeHeadSigner
    ca: CertificateAuthority
    clock: Clock

    @property
    def log_public_key(self) -> ed25519.Ed25519PublicKey:
        return self.log_signer.public_key()

    def close(self) -> None:
        self.store.dispose()
        self.root_key.close()

    def __enter__(self) -> Home:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_home_dir(home: Path) -> None:
    st = home.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"{home} is not a directory")
    if st.st_mode & 0o022:
        # Others could replace root.key or keybroker.toml with their own.
        raise ConfigurationError(f"{home} is writable by other users; run: chmod 700 {home}")


def init_home(
    home: Path,
    *,
    db_url: str | None = None,
    root_key: str | None = None,
    clock: Clock = utc_now,
    ca_name: str = "keybroker CA",
) -> Home:
    """Create a new home: root key, database, CA and log keys. Refuses to reuse one."""
    if (home / CONFIG_FILENAME).exists():
        raise ConfigurationError(f"{home} is already a keybroker home")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    config = HomeConfig(
        home=home,
        db_url=db_url or f"sqlite:///{(home / DB_FILENAME).resolve()}",
        root_key=root_key or "file:root.key",
    )
    key = create_root_key(config.root_key, home)
    store = open_store(config.db_url)
    try:
        keysets = KeysetRepository(store, key, clock)
        now = clock()
        if keysets.names():
            raise ConfigurationError("the database already holds keysets; use an empty one")
        ca_keyset = Keyset.generate(CA_KEYSET, ECDSA_P256, now=now)
        log_keyset = Keyset.generate(LOG_KEYSET, ED25519, now=now)
        ca = CertificateAuthority.create(ca_name, _ec_key(ca_keyset), now=now, validity=CA_VALIDITY)
        with store.transaction() as conn:
            keysets.create(ca_keyset, conn=conn)
            keysets.create(log_keyset, conn=conn)
            conn.execute(certificates.insert().values(**_root_certificate_row(ca.certificate)))
            signer = _log_signer(log_keyset)
            log = TransparencyLog(store, signer, clock)
            log.append(
                encode(INIT_ENTRY, {"ca": certificate_pem(ca.certificate).decode()}), conn=conn
            )
        (home / CA_FILENAME).write_bytes(certificate_pem(ca.certificate))
        config.save()
    except BaseException:
        store.dispose()
        key.close()
        raise
    return Home(config, store, key, keysets, log, signer, ca, clock)


def open_home(home: Path, *, clock: Clock = utc_now) -> Home:
    """Open an existing home, checking its permissions and its root key."""
    if not home.exists():
        raise ConfigurationError(f"{home} does not exist; run `keybroker init`")
    _check_home_dir(home)
    config = HomeConfig.load(home)
    key = open_root_key(config.root_key, home)
    store = open_store(config.db_url)
    try:
        keysets = KeysetRepository(store, key, clock)
        try:
            ca_keyset = keysets.load(CA_KEYSET).keyset
            log_keyset = keysets.load(LOG_KEYSET).keyset
        except NotFound:
            raise ConfigurationError(
                "the database has no CA or log key; was it initialised?"
            ) from None
        ca = CertificateAuthority(_load_ca_certificate(store), _ec_key(ca_keyset))
        signer = _log_signer(log_keyset)
        log = TransparencyLog(store, signer, clock)
    except BaseException:
        store.dispose()
        key.close()
        raise
    return Home(config, store, key, keysets, log, signer, ca, clock)


def _root_certificate_row(cert: x509.Certificate) -> dict[str, object]:
    """The broker's self-signed root as a ``certificates`` row (no issuer fingerprint)."""
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    return {
        "fingerprint": fingerprint(cert),
        "serial": format(cert.serial_number, "x"),
        "issuer_fingerprint": None,
        "principal_id": None,
        "subject": cert.subject.rfc4514_string(),
        "is_ca": basic.ca,
        "der": certificate_der(cert),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
    }


def _load_ca_certificate(store: Store) -> x509.Certificate:
    query = (
        sa.select(certificates.c.der)
        .where(certificates.c.is_ca.is_(True), certificates.c.issuer_fingerprint.is_(None))
        .order_by(certificates.c.not_before.desc())
        .limit(1)
    )
    with store.snapshot() as conn:
        der = conn.execute(query).scalar_one_or_none()
    if der is None:
        raise ConfigurationError("the database holds no CA certificate; was it initialised?")
    return load_certificate(der)


def _ec_key(keyset: Keyset) -> ec.EllipticCurvePrivateKey:
    key = keyset.signer().private_key(SECRET_ACCESS)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{keyset.name} is not a P-256 key")
    return key


def _log_signer(keyset: Keyset) -> Ed25519TreeHeadSigner:
    key = keyset.signer().private_key(SECRET_ACCESS)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigurationError(f"{keyset.name} is not an Ed25519 key")
    return Ed25519TreeHeadSigner(key)
