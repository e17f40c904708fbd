"""Keysets: named, versioned key material and its lifecycle (Tink's keyset + keyset manager).

A :class:`Keyset` is the management object: it adds versions, moves them
through the lifecycle in :mod:`keybroker.keys.lifecycle`, and hands out
read-only handles (:meth:`Keyset.aead`, :meth:`Keyset.mac`,
:meth:`Keyset.signer`, :meth:`Keyset.hpke`) that do the cryptography.

Key material leaves a keyset in only these ways:

* encrypted under a :class:`~keybroker.keys.kek.KeyEncryptionKey`, whole
  (:meth:`Keyset.encrypt_to_bytes`) or one row per version for the store
  (:meth:`Keyset.wrapped_versions`, AAD = :func:`version_aad`);
* HPKE-sealed to one principal (:meth:`Keyset.seal_version`), or to a key an
  X.509 certificate names (:meth:`Keyset.seal_version_to_certificate_key`: HPKE
  with P-256, RSA-OAEP with RSA);
* raw, through :meth:`Keyset.export_secret_material`, which needs
  :data:`~keybroker.keys.access.SECRET_ACCESS`.

Destroying a version drops its secret from the object; its number, key id and
public key stay, so old ciphertexts fail with a clear :class:`KeysetError`.
(Python cannot zero the bytes it copied; the OpenSSL key objects are freed,
and OpenSSL cleanses key schedules when it frees them.)
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Final, TypeVar

from keybroker.encoding import Message, encode, message_label
from keybroker.errors import CryptoError, DecodeError, KeysetError
from keybroker.keys import _material
from keybroker.keys._common import (
    NoPickle,
    check_key_id,
    check_name,
    check_time,
    check_version,
    from_micros,
    prefix,
    to_micros,
)
from keybroker.keys.access import SecretAccessToken, require_secret_access
from keybroker.keys.certificate_key import CertificateKey, seal_to_certificate_key
from keybroker.keys.handles import (
    HANDLE_TYPES,
    AeadHandle,
    HpkeHandle,
    KeysetHandle,
    MacHandle,
    SignerHandle,
)
from keybroker.keys.kek import KeyEncryptionKey
from keybroker.keys.lifecycle import (
    CONSUMING_STATES,
    DEMOTED_PRIMARY,
    KeyOp,
    KeyState,
    next_state,
)
from keybroker.keys.public import PublicKeyset, PublicVersion
from keybroker.keys.templates import KeyTemplate, Purpose, as_purpose, get_template

_H = TypeVar("_H", bound=KeysetHandle)

_VERSION_AAD_LABEL: Final = message_label("keybroker/keys/version-aad", 1)
_KEYSET_AAD_LABEL: Final = message_label("keybroker/keys/keyset-aad", 1)
_POP_LABEL: Final = message_label("keybroker/keys/proof-of-possession", 1)
_TRANSPORT_INFO_LABEL: Final = message_label("keybroker/keys/certificate-transport-info", 1)


def version_aad(keyset_name: str, version: int) -> bytes:
    """AAD under which one version's material is wrapped at rest.

    The canonical encoding of ``{"keyset": name, "version": n}``: a wrapped
    row copied to another keyset or version number no longer decrypts.
    """
    return encode(_VERSION_AAD_LABEL, {"keyset": keyset_name, "version": version})


@dataclass(frozen=True, slots=True)
class KeyVersionInfo:
    """What anyone may know about a key version: everything but the secret."""

    version: int
    key_id: int
    template: KeyTemplate
    state: KeyState
    #: In the template's public format; ``None`` for symmetric keys.
    public_key: bytes | None
    created_at: datetime | None
    state_changed_at: datetime | None

    def __repr__(self) -> str:
        return (
            f"KeyVersionInfo(version={self.version}, key_id={self.key_id:#010x}, "
            f"template={self.template.name}, state={self.state.value})"
        )


@dataclass(frozen=True, slots=True)
class WrappedVersion:
    """One store row: a version with its material wrapped under a KEK.

    ``wrapped_material`` is ``KEK.encrypt(material record, version_aad(keyset, version))``,
    ``None`` once destroyed. The record inside repeats keyset, version, key id
    and template, so a row whose columns were edited fails to load.
    """

    version: int
    key_id: int
    state: KeyState
    template: str
    public_key: bytes | None
    wrapped_material: bytes | None
    kek_id: str
    created_at: datetime | None = None
    state_changed_at: datetime | None = None

    def __repr__(self) -> str:
        return (
            f"WrappedVersion(version={self.version}, key_id={self.key_id:#010x}, "
            f"state={KeyState(self.state).value}, template={self.template}, kek_id={self.kek_id!r})"
        )


class VersionEntry:
    """Internal, mutable record of one version. Only :class:`Keyset` changes it."""

    __slots__ = (
        "created_at",
        "key_id",
        "prefix",
        "public",
        "secret",
        "state",
        "state_changed_at",
        "template",
        "version",
    )

    def __init__(
        self,
        *,
        version: int,
        key_id: int,
        template: KeyTemplate,
        state: KeyState,
        secret: _material.Secret | None,
        public: _material.Public | None,
        created_at: datetime | None,
        state_changed_at: datetime | None,
    ) -> None:
        self.version = version
        self.key_id = key_id
        self.template = template
        self.state = state
        self.secret = secret
        self.public = public
        self.prefix = prefix(key_id)
        self.created_at = created_at
        self.state_changed_at = state_changed_at

    def info(self) -> KeyVersionInfo:
        return KeyVersionInfo(
            version=self.version,
            key_id=self.key_id,
            template=self.template,
            state=self.state,
            public_key=None if self.public is None else self.public.raw(),
            created_at=self.created_at,
            state_changed_at=self.state_changed_at,
        )

    def __repr__(self) -> str:
        return f"{self.version}:{self.key_id:#010x}:{self.state.value}"


# -- plaintext records (canonical CBOR, keybroker.encoding) ---------------------


@dataclass(frozen=True)
class _VersionRecord(Message):
    LABEL: ClassVar[str] = message_label("keybroker/keys/keyset-version", 1)
    version: int
    key_id: int
    template: str
    state: str
    material: bytes | None
    public_key: bytes | None
    created_at: int | None
    state_changed_at: int | None


@dataclass(frozen=True)
class _KeysetRecord(Message):
    LABEL: ClassVar[str] = message_label("keybroker/keys/keyset", 1)
    name: str
    purpose: str
    versions: list[_VersionRecord]


@dataclass(frozen=True)
class _MaterialRecord(Message):
    LABEL: ClassVar[str] = message_label("keybroker/keys/version-material", 1)
    keyset: str
    version: int
    key_id: int
    template: str
    material: bytes


@dataclass(frozen=True)
class _SealedVersionRecord(Message):
    LABEL: ClassVar[str] = message_label("keybroker/keys/sealed-version", 1)
    keyset: str
    purpose: str
    version: int
    key_id: int
    template: str
    material: bytes


@dataclass(frozen=True)
class _TransportedVersionRecord(Message):
    # Compact on purpose: it must fit RSA-2048 OAEP (190 bytes). Keyset name and
    # purpose are bound through the encryption's info instead of carried.
    LABEL: ClassVar[str] = message_label("keybroker/keys/transported-version", 1)
    version: int
    key_id: int
    template: str
    material: bytes


def _transport_info(keyset: str, purpose: str, info: bytes) -> bytes:
    return encode(_TRANSPORT_INFO_LABEL, {"keyset": keyset, "purpose": purpose, "info": info})


class Keyset(NoPickle):
    """A named, versioned set of keys for one purpose.

    ``Keyset(name, purpose)`` is empty; :meth:`generate` makes one with a
    primary version. Lifecycle methods take ``now`` (a timezone-aware
    datetime, or ``None``) instead of reading the clock.
    """

    __slots__ = ("_by_key_id", "_by_prefix", "_name", "_primary", "_purpose", "_versions")

    def __init__(self, name: str, purpose: Purpose | str) -> None:
        self._name = check_name(name)
        self._purpose = as_purpose(purpose)
        self._versions: dict[int, VersionEntry] = {}
        self._by_key_id: dict[int, VersionEntry] = {}
        # Handles look versions up by the 5-byte output prefix: one slice, one dict probe.
        self._by_prefix: dict[bytes, VersionEntry] = {}
        self._primary: VersionEntry | None = None

    @classmethod
    def generate(
        cls,
        name: str,
        template: KeyTemplate | str,
        *,
        purpose: Purpose | str | None = None,
        now: datetime | None = None,
    ) -> Keyset:
        """A new keyset whose version 1 is primary. ``purpose`` defaults to the template's."""
        tpl = get_template(template)
        if purpose is None:
            if len(tpl.purposes) != 1:
                raise KeysetError(f"template {tpl.name} serves several purposes; pass purpose=")
            (purpose,) = tpl.purposes
        keyset = cls(name, purpose)
        keyset.promote(keyset.add(tpl, now=now).version, now=now)
        return keyset

    # -- reading -----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def purpose(self) -> Purpose:
        return self._purpose

    @property
    def versions(self) -> tuple[KeyVersionInfo, ...]:
        return tuple(self._versions[v].info() for v in sorted(self._versions))

    @property
    def primary(self) -> KeyVersionInfo | None:
        return None if self._primary is None else self._primary.info()

    def version(self, version: int) -> KeyVersionInfo:
        return self._entry(version).info()

    def __repr__(self) -> str:
        return f"Keyset({self._describe()})"

    def _describe(self) -> str:
        versions = ", ".join(repr(self._versions[v]) for v in sorted(self._versions))
        return f"{self._name!r}, {self._purpose.value}, [{versions}]"

    # -- lifecycle ---------------------------------------------------------------

    def add(
        self, template: KeyTemplate | str | None = None, *, now: datetime | None = None
    ) -> KeyVersionInfo:
        """Generate a new ``pending`` version. ``template`` defaults to the newest version's."""
        tpl = self._template_for_new(template)
        return self._add_secret(tpl, tpl.kind.generate(), check_time(now))

    def promote(self, version: int, *, now: datetime | None = None) -> KeyVersionInfo:
        """Make ``version`` primary; the previous primary becomes enabled."""
        check_time(now)
        entry = self._entry(version)
        new_state = next_state(entry.state, KeyOp.PROMOTE)
        old = self._primary
        if old is not None:
            old.state, old.state_changed_at = DEMOTED_PRIMARY, now
        entry.state, entry.state_changed_at = new_state, now
        self._primary = entry
        return entry.info()

    def disable(self, version: int, *, now: datetime | None = None) -> KeyVersionInfo:
        """Stop ``version`` from being used at all (never the primary)."""
        return self._move(version, KeyOp.DISABLE, now)

    def enable(self, version: int, *, now: datetime | None = None) -> KeyVersionInfo:
        """Let a disabled version decrypt and verify again."""
        return self._move(version, KeyOp.ENABLE, now)

    def destroy(self, version: int, *, now: datetime | None = None) -> KeyVersionInfo:
        """Drop a disabled version's secret for good; number, key id and public key stay."""
        info = self._move(version, KeyOp.DESTROY, now)
        self._versions[version].secret = None
        return info

    def _move(self, version: int, op: KeyOp, now: datetime | None) -> KeyVersionInfo:
        check_time(now)
        entry = self._entry(version)
        entry.state = next_state(entry.state, op)
        entry.state_changed_at = now
        return entry.info()

    # -- handles -----------------------------------------------------------------

    def handle(self) -> KeysetHandle:
        """The handle for this keyset's purpose (:class:`AeadHandle`, :class:`MacHandle` ...)."""
        handle_type = HANDLE_TYPES.get(self._purpose)
        if handle_type is None:
            raise KeysetError(f"no primitive for {self._purpose.value} keysets yet")
        return handle_type(self)

    def aead(self) -> AeadHandle:
        return AeadHandle(self)

    def mac(self) -> MacHandle:
        return MacHandle(self)

    def signer(self) -> SignerHandle:
        return SignerHandle(self)

    def hpke(self) -> HpkeHandle:
        return HpkeHandle(self)

    def public_keyset(self) -> PublicKeyset:
        """Public keys, key ids and states of every version (``sign`` and ``hpke`` keysets)."""
        entries = []
        for v in sorted(self._versions):
            entry = self._versions[v]
            if entry.public is None:
                raise KeysetError(f"keyset {self._name!r} has no public keys")
            info = PublicVersion(
                entry.version, entry.key_id, entry.template, entry.state, entry.public.raw()
            )
            entries.append((info, entry.public))
        return PublicKeyset(self._name, self._purpose, entries)

    # -- raw material (audited: grep SECRET_ACCESS) ------------------------------

    def export_secret_material(self, version: int, token: SecretAccessToken) -> bytes:
        """The raw secret of ``version`` in its template's secret format.

        The only way raw key bytes leave :mod:`keybroker.keys`. Needs
        :data:`~keybroker.keys.access.SECRET_ACCESS`.
        """
        require_secret_access(token)
        return self._secret_of(version).secret_bytes()

    def import_secret_material(
        self,
        template: KeyTemplate | str,
        material: bytes,
        token: SecretAccessToken,
        *,
        key_id: int | None = None,
        now: datetime | None = None,
    ) -> KeyVersionInfo:
        """Add a ``pending`` version holding existing key material.

        For migrating keys from elsewhere, for keys derived again on every use (a
        passphrase KEK: pass a fixed ``key_id`` so its outputs stay readable) and for
        known-answer tests. ``material`` is in the template's secret format. Needs
        :data:`~keybroker.keys.access.SECRET_ACCESS`.
        """
        require_secret_access(token)
        tpl = self._template_for_new(template)
        secret = tpl.kind.load_secret(bytes(material))
        return self._add_secret(
            tpl,
            secret,
            check_time(now),
            key_id=None if key_id is None else check_key_id(key_id),
        )

    # -- proof of possession -----------------------------------------------------

    def prove_possession(self, version: int, challenge: bytes) -> bytes:
        """Show that we hold ``version`` (any state with material, pending included).

        * signing keys sign the challenge message with that version: anyone with
          its public key can check the proof, and no secret is needed to verify;
        * every other key (AEAD, MAC, HPKE) MACs it (HMAC-SHA256) under a key
          derived from the version's secret, never the secret itself; the broker
          checks on its own copy.
        """
        secret = self._secret_of(version)
        message = self._pop_message(version, challenge)
        if isinstance(secret, _material.SigningSecret):
            return secret.sign(message)
        return _material.HmacSecret(secret.pop_key()).compute(message)

    def verify_possession(self, version: int, challenge: bytes, proof: bytes) -> None:
        """Return ``None`` or raise :class:`CryptoError` (MACs compared in constant time)."""
        entry = self._entry(version)
        message = self._pop_message(version, challenge)
        if isinstance(entry.public, _material.VerifyingKey):
            entry.public.verify(bytes(proof), message)
            return
        _material.HmacSecret(self._secret_of(version).pop_key()).verify(message, proof)

    def _pop_message(self, version: int, challenge: bytes) -> bytes:
        entry = self._entry(version)
        return encode(
            _POP_LABEL,
            {
                "keyset": self._name,
                "version": version,
                "key_id": entry.key_id,
                "challenge": bytes(challenge),
            },
        )

    # -- delivery: one version sealed to one principal ---------------------------

    def seal_version(self, version: int, recipient: PublicKeyset, *, info: bytes) -> bytes:
        """HPKE-seal ``version`` (material, key id, template) to ``recipient``.

        ``info`` should bind recipient, keyset, version and delivery id. Only
        pending, primary and enabled versions are delivered.
        """
        entry = self._entry(version)
        if entry.state not in CONSUMING_STATES or entry.secret is None:
            raise KeysetError(f"version {version} of {self._name!r} is {entry.state.value}")
        record = _SealedVersionRecord(
            keyset=self._name,
            purpose=self._purpose.value,
            version=version,
            key_id=entry.key_id,
            template=entry.template.name,
            material=entry.secret.secret_bytes(),
        )
        return recipient.seal(record.encode(), info)

    def install_sealed_version(
        self,
        sealed: bytes,
        opener: HpkeHandle,
        *,
        info: bytes,
        now: datetime | None = None,
    ) -> KeyVersionInfo:
        """Open a :meth:`seal_version` blob and add it as a ``pending`` version.

        Installing the same version again changes nothing (deliveries are
        retried). HPKE base mode does not say who sealed: authenticate the
        sender (e.g. verify the broker's signature over ``sealed``) first.
        Raises :class:`CryptoError` if it does not open, :class:`DecodeError`
        if what it holds is malformed, :class:`KeysetError` if it belongs to
        another keyset or clashes with a version already here.
        """
        check_time(now)
        record = _SealedVersionRecord.decode(opener.open(sealed, info))
        if record.keyset != self._name or record.purpose != self._purpose.value:
            raise KeysetError(f"sealed version is not for keyset {self._name!r}")
        return self._install_record(
            record.version, record.key_id, record.template, record.material, now
        )

    def _install_record(
        self, version: int, key_id: int, template: str, material: bytes, now: datetime | None
    ) -> KeyVersionInfo:
        try:
            tpl = get_template(template)
            check_version(version)
            check_key_id(key_id)
            secret = tpl.kind.load_secret(material)
        except KeysetError as exc:
            raise DecodeError(f"malformed sealed version: {exc}") from None
        existing = self._versions.get(version)
        if existing is not None:
            if existing.key_id != key_id or existing.template != tpl:
                raise KeysetError(f"version {version} of {self._name!r} already differs")
            return existing.info()
        return self._insert(
            VersionEntry(
                version=version,
                key_id=key_id,
                template=tpl,
                state=KeyState.PENDING,
                secret=secret,
                public=secret.public(),
                created_at=now,
                state_changed_at=now,
            )
        )

    # -- transport to a certified key (a device) ---------------------------------

    def seal_version_to_certificate_key(
        self, version: int, public_key: object, *, info: bytes
    ) -> bytes:
        """Encrypt ``version`` to a P-256 or RSA key from a certificate, bound to ``info``.

        HPKE DHKEM(P-256) or RSA-OAEP (see :mod:`keybroker.keys.certificate_key`);
        keyset name and purpose are bound too. Verify the certificate first: this
        seals to whatever key it is given.
        """
        entry = self._entry(version)
        if entry.state not in CONSUMING_STATES or entry.secret is None:
            raise KeysetError(f"version {version} of {self._name!r} is {entry.state.value}")
        record = _TransportedVersionRecord(
            version=version,
            key_id=entry.key_id,
            template=entry.template.name,
            material=entry.secret.secret_bytes(),
        )
        return seal_to_certificate_key(
            public_key, record.encode(), _transport_info(self._name, self._purpose.value, info)
        )

    def install_version_sealed_to_certificate_key(
        self,
        sealed: bytes,
        opener: CertificateKey,
        *,
        info: bytes,
        now: datetime | None = None,
    ) -> KeyVersionInfo:
        """Open a :meth:`seal_version_to_certificate_key` blob and add it as ``pending``.

        The same rules as :meth:`install_sealed_version`: CryptoError if it does not
        open (wrong key, info, keyset name or purpose), DecodeError if what it
        holds is malformed, KeysetError if it clashes with a version here.
        """
        check_time(now)
        plaintext = opener.open(sealed, _transport_info(self._name, self._purpose.value, info))
        record = _TransportedVersionRecord.decode(plaintext)
        return self._install_record(
            record.version, record.key_id, record.template, record.material, now
        )

    # -- serialisation: whole keyset under a KEK ---------------------------------

    def encrypt_to_bytes(self, kek: KeyEncryptionKey, aad: bytes) -> bytes:
        """Every version, state and secret, encrypted under ``kek`` bound to ``aad``.

        The only serialisation a keyset has. Choose ``aad`` to say where the
        bytes belong (a file name, a row id) so they cannot be moved.
        """
        record = _KeysetRecord(
            name=self._name,
            purpose=self._purpose.value,
            versions=[
                _VersionRecord(
                    version=e.version,
                    key_id=e.key_id,
                    template=e.template.name,
                    state=e.state.value,
                    material=None if e.secret is None else e.secret.secret_bytes(),
                    public_key=None if e.public is None else e.public.raw(),
                    created_at=to_micros(e.created_at),
                    state_changed_at=to_micros(e.state_changed_at),
                )
                for e in (self._versions[v] for v in sorted(self._versions))
            ],
        )
        return kek.encrypt(record.encode(), _keyset_aad(aad))

    @classmethod
    def decrypt_from_bytes(cls, data: bytes, kek: KeyEncryptionKey, aad: bytes) -> Keyset:
        """Inverse of :meth:`encrypt_to_bytes`; :class:`CryptoError` for a wrong KEK or AAD."""
        plaintext = kek.decrypt(data, _keyset_aad(aad))
        try:
            record = _KeysetRecord.decode(plaintext)
        except DecodeError:
            raise KeysetError("authentic, but not a serialised keyset") from None
        keyset = cls(record.name, record.purpose)
        for v in record.versions:
            tpl = get_template(v.template)
            state = _state(v.state)
            if v.material is None:
                secret, public = None, _public_or_none(tpl, v.public_key)
            else:
                secret = tpl.kind.load_secret(v.material)
                public = secret.public()
            keyset._insert(
                VersionEntry(
                    version=check_version(v.version),
                    key_id=check_key_id(v.key_id),
                    template=tpl,
                    state=state,
                    secret=secret,
                    public=public,
                    created_at=from_micros(v.created_at),
                    state_changed_at=from_micros(v.state_changed_at),
                )
            )
        return keyset

    # -- serialisation: one store row per version --------------------------------

    def wrap_version(self, version: int, kek: KeyEncryptionKey) -> WrappedVersion:
        """One version as a store row, its material encrypted under ``kek``."""
        entry = self._entry(version)
        wrapped = None
        if entry.secret is not None:
            record = _MaterialRecord(
                keyset=self._name,
                version=entry.version,
                key_id=entry.key_id,
                template=entry.template.name,
                material=entry.secret.secret_bytes(),
            )
            wrapped = kek.encrypt(record.encode(), version_aad(self._name, entry.version))
        return WrappedVersion(
            version=entry.version,
            key_id=entry.key_id,
            state=entry.state,
            template=entry.template.name,
            public_key=None if entry.public is None else entry.public.raw(),
            wrapped_material=wrapped,
            kek_id=kek.kek_id,
            created_at=entry.created_at,
            state_changed_at=entry.state_changed_at,
        )

    def wrapped_versions(self, kek: KeyEncryptionKey) -> list[WrappedVersion]:
        return [self.wrap_version(v, kek) for v in sorted(self._versions)]

    @classmethod
    def from_wrapped(
        cls,
        name: str,
        purpose: Purpose | str,
        versions: Iterable[WrappedVersion],
        kek: KeyEncryptionKey,
    ) -> Keyset:
        """Rebuild a keyset from its store rows (inverse of :meth:`wrapped_versions`).

        :class:`CryptoError` if a row does not decrypt under ``kek`` or its
        columns disagree with what was wrapped; :class:`KeysetError` if the
        rows do not form a valid keyset (two primaries, duplicate key ids,
        material on a destroyed version ...).
        """
        keyset = cls(name, purpose)
        for row in versions:
            tpl = get_template(row.template)
            state = _state(row.state)
            if state is KeyState.DESTROYED:
                if row.wrapped_material is not None:
                    raise KeysetError(f"destroyed version {row.version} still has material")
                secret, public = None, _public_or_none(tpl, row.public_key)
            else:
                if row.wrapped_material is None:
                    raise KeysetError(f"{state.value} version {row.version} has no material")
                plaintext = kek.decrypt(row.wrapped_material, version_aad(keyset.name, row.version))
                try:
                    record = _MaterialRecord.decode(plaintext)
                except DecodeError:
                    raise KeysetError("authentic, but not wrapped key material") from None
                if (record.keyset, record.version, record.key_id, record.template) != (
                    keyset.name,
                    row.version,
                    row.key_id,
                    tpl.name,
                ):
                    raise CryptoError()
                secret = tpl.kind.load_secret(record.material)
                public = secret.public()
                if (None if public is None else public.raw()) != row.public_key:
                    raise CryptoError()
            keyset._insert(
                VersionEntry(
                    version=check_version(row.version),
                    key_id=check_key_id(row.key_id),
                    template=tpl,
                    state=state,
                    secret=secret,
                    public=public,
                    created_at=row.created_at,
                    state_changed_at=row.state_changed_at,
                )
            )
        return keyset

    # -- internals ---------------------------------------------------------------

    def _entry(self, version: int) -> VersionEntry:
        entry = self._versions.get(version)
        if entry is None:
            raise KeysetError(f"keyset {self._name!r} has no version {version}")
        return entry

    def _secret_of(self, version: int) -> _material.Secret:
        entry = self._entry(version)
        if entry.secret is None:
            raise KeysetError(f"version {version} of keyset {self._name!r} is destroyed")
        return entry.secret

    def _template_for_new(self, template: KeyTemplate | str | None) -> KeyTemplate:
        if template is not None:
            return get_template(template)
        if not self._versions:
            raise KeysetError(f"keyset {self._name!r} is empty; name a template")
        return self._versions[max(self._versions)].template

    def _add_secret(
        self,
        tpl: KeyTemplate,
        secret: _material.Secret,
        now: datetime | None,
        *,
        key_id: int | None = None,
    ) -> KeyVersionInfo:
        if key_id is None:
            key_id = secrets.randbits(32)
            while key_id in self._by_key_id:
                key_id = secrets.randbits(32)
        version = max(self._versions, default=0) + 1
        return self._insert(
            VersionEntry(
                version=version,
                key_id=key_id,
                template=tpl,
                state=KeyState.PENDING,
                secret=secret,
                public=secret.public(),
                created_at=now,
                state_changed_at=now,
            )
        )

    def _insert(self, entry: VersionEntry) -> KeyVersionInfo:
        """Add a version after checking it fits; changes nothing if it does not."""
        if self._purpose not in entry.template.purposes:
            raise KeysetError(
                f"template {entry.template.name} does not serve {self._purpose.value} keysets"
            )
        if entry.version in self._versions:
            raise KeysetError(f"keyset {self._name!r} already has version {entry.version}")
        if entry.key_id in self._by_key_id:
            raise KeysetError(f"keyset {self._name!r} already has key id {entry.key_id:#010x}")
        if entry.state is KeyState.PRIMARY and self._primary is not None:
            raise KeysetError(f"keyset {self._name!r} would have two primary versions")
        if (entry.secret is None) != (entry.state is KeyState.DESTROYED):
            raise KeysetError("only destroyed versions lack material")
        self._versions[entry.version] = entry
        self._by_key_id[entry.key_id] = entry
        self._by_prefix[entry.prefix] = entry
        if entry.state is KeyState.PRIMARY:
            self._primary = entry
        return entry.info()


def _keyset_aad(aad: bytes) -> bytes:
    # Domain-separates whole-keyset blobs from per-version rows under the same KEK.
    return encode(_KEYSET_AAD_LABEL, {"aad": bytes(aad)})


def _state(value: str) -> KeyState:
    try:
        return KeyState(value)
    except ValueError:
        raise KeysetError(f"unknown key state {value!r}") from None


def _public_or_none(tpl: KeyTemplate, raw: bytes | None) -> _material.Public | None:
    if raw is None or not tpl.asymmetric:
        return None
    return tpl.kind.load_public(raw)
