"""The broker's side of keyless TLS: service keys uploaded, granted to edges, held by key servers.

**Upload.** A service's existing TLS private key (PEM or DER, PKCS#8 or the
traditional formats; RSA-2048/3072, ECDSA P-256/P-384 or Ed25519) becomes the
keyset ``keyless/<service>`` (purpose ``sign``): version 1 if the keyset is new,
otherwise a new version that is promoted at once, the versions before it staying
enabled so a key server serves both while edges move to the new certificate.
The key enters :mod:`keybroker.keys` through
:meth:`~keybroker.keys.Keyset.import_secret_material` and is stored like every
key, wrapped under the root key; it is never written anywhere in clear.

**Policy.** Whether the key server may do RSA decryption with a key (TLS 1.2
static-RSA key exchange) is the key's ``allow_decrypt``, default false. It is
the version's *template*: ``TLS_RSA2048`` / ``TLS_RSA2048_DECRYPT`` and so on
(:data:`TLS_KEY_TYPES`). The template is inside every version's wrapped record
and every sealed delivery, so the policy is authenticated wherever the key goes,
and the broker's API reports it to key servers with each key. Uploading a key
that is already a version with the other policy *changes the policy*: the new
version replaces the old ones holding that key (they are disabled). Uploading it
again with the same policy is a :class:`~keybroker.errors.Conflict`.

**Weak keys** (RSA under 2048 bits or with a public exponent under 65537, or a
curve under 256 bits) are refused with :class:`WeakKeyError`, other key types
with :class:`ServiceKeyRefused`, before anything changes.

**Grants.** An edge gets a ``use`` grant on the keyset: the key server lets it use
the keyset's keys. A key server gets a ``hold`` grant and a sealed delivery of
each primary or enabled version it has not acknowledged since that grant was
made (:meth:`ServiceKeys.hold`); later uploads deliver their new version to
every key server holding the keyset, in the upload's transaction. Key servers
are ``service`` principals, because only their certificates are TLS server
certificates. Revoking removes an edge's ``use`` grant, or a key server's
``hold`` (failing its outstanding deliveries) and ``use`` grants.

**The log.** Every change is in the transparency log, in the same transaction:
the core's entries (``keyset-created`` or ``key-version-added`` +
``key-promoted`` [+ ``key-disabled``], ``grant-created``, ``grant-revoked``,
``delivery-sent`` …) and one :class:`ServiceKeyUploaded` per upload, which names
the key by its SKI and says its policy and the SHA-256 of the certificate it was
uploaded with. No entry holds key material.

:meth:`ServiceKeys.key_server_view` is what a key server reads
(``GET /v1/keyless/keys``) to decide which edge may do what with which key.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar, Final

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from sqlalchemy.engine import Connection

from keybroker.broker import Broker, GrantInfo, GrantMode
from keybroker.broker._context import BrokerContext, keyset_name, principal_id, record
from keybroker.broker._delivery_rows import fail_sent
from keybroker.broker.deliveries import deliver_in
from keybroker.broker.events import (
    Event,
    KeyDisabled,
    KeyPromoted,
    KeysetCreated,
    KeyVersionAdded,
    to_ms,
)
from keybroker.broker.principals import ACTIVE, require_row
from keybroker.encoding import decode, message_label
from keybroker.errors import (
    AuthorizationError,
    Conflict,
    DecodeError,
    KeybrokerError,
    NotFound,
    RemoteProtocolError,
)
from keybroker.flows.keyless.operations import PrivateKey, PublicKey, ski_of
from keybroker.keys import (
    SECRET_ACCESS,
    TLS_ECDSA_P256,
    TLS_ECDSA_P384,
    TLS_ED25519,
    TLS_RSA2048,
    TLS_RSA2048_DECRYPT,
    TLS_RSA3072,
    TLS_RSA3072_DECRYPT,
    Keyset,
    KeyState,
    KeyTemplate,
    KeyVersionInfo,
    Purpose,
)
from keybroker.pki import PrincipalId, PrincipalKind, fingerprint, load_certificates
from keybroker.store.schema import deliveries, grants, key_versions, keysets, principals

logger = logging.getLogger("keybroker.keyless.broker")

#: Every keyless service keyset is named ``keyless/<service>``.
KEYSET_PREFIX: Final = "keyless/"
#: How long a key server has to pick up and acknowledge a delivered key.
DEFAULT_DELIVERY_TTL: Final = timedelta(days=1)
#: Largest key or chain file accepted.
MAX_INPUT_SIZE: Final = 256 * 1024
_SERVICE_NAME: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_MIN_RSA_BITS: Final = 2048
_MIN_RSA_EXPONENT: Final = 65537
#: States of the versions a key server holds and serves.
SERVED_STATES: Final = (KeyState.PRIMARY.value, KeyState.ENABLED.value)


# -- errors ---------------------------------------------------------------------------


class ServiceKeyRefused(RemoteProtocolError):
    """A key (or certificate chain) keyless does not take: unreadable, of an unsupported
    type or size, or not matching its certificate. Nothing was changed."""

    problem = "protocol/keyless-key-refused"


class WeakKeyError(ServiceKeyRefused):
    """A key too weak to protect TLS: RSA under 2048 bits or with a small public exponent,
    or an elliptic curve under 256 bits. Nothing was changed."""

    problem = "protocol/keyless-key-refused/weak"


# -- key types and templates ------------------------------------------------------------


@dataclass(frozen=True)
class TlsKeyType:
    """What a ``TLS_*`` template says about a key: its type and its policy."""

    template: KeyTemplate
    #: ``rsa-2048``, ``rsa-3072``, ``ecdsa-p256``, ``ecdsa-p384`` or ``ed25519``.
    key_type: str
    #: Whether the key server may do ``RSA_DECRYPT`` with the key.
    allow_decrypt: bool


TLS_KEY_TYPES: Final[Mapping[str, TlsKeyType]] = MappingProxyType(
    {
        t.template.name: t
        for t in (
            TlsKeyType(TLS_RSA2048, "rsa-2048", allow_decrypt=False),
            TlsKeyType(TLS_RSA2048_DECRYPT, "rsa-2048", allow_decrypt=True),
            TlsKeyType(TLS_RSA3072, "rsa-3072", allow_decrypt=False),
            TlsKeyType(TLS_RSA3072_DECRYPT, "rsa-3072", allow_decrypt=True),
            TlsKeyType(TLS_ECDSA_P256, "ecdsa-p256", allow_decrypt=False),
            TlsKeyType(TLS_ECDSA_P384, "ecdsa-p384", allow_decrypt=False),
            TlsKeyType(TLS_ED25519, "ed25519", allow_decrypt=False),
        )
    }
)
_RSA_TEMPLATES: Final = {
    (2048, False): TLS_RSA2048,
    (2048, True): TLS_RSA2048_DECRYPT,
    (3072, False): TLS_RSA3072,
    (3072, True): TLS_RSA3072_DECRYPT,
}
_EC_TEMPLATES: Final = {"secp256r1": TLS_ECDSA_P256, "secp384r1": TLS_ECDSA_P384}


def service_keyset(service: str) -> str:
    """``keyless/<service>``; :class:`DecodeError` unless ``service`` is a service name
    (1-63 lower-case letters, digits, ``.``, ``_`` or ``-``, starting with a letter or digit)."""
    if not isinstance(service, str) or not _SERVICE_NAME.fullmatch(service):
        raise DecodeError(f"{service!r:.80} is not a service name (like www.example.com)")
    return keyset_name(KEYSET_PREFIX + service)


def service_of(keyset: str) -> str:
    """The service a keyless keyset serves (``keyless/www`` → ``www``)."""
    if not keyset.startswith(KEYSET_PREFIX):
        raise DecodeError(f"{keyset!r:.80} is not a keyless keyset")
    return keyset[len(KEYSET_PREFIX) :]


def load_service_key(data: bytes, *, password: bytes | None = None) -> PrivateKey:
    """A private key from PEM (PKCS#8 or traditional) or DER PKCS#8 bytes.

    :class:`ServiceKeyRefused` for bytes that hold no private key we can read
    (the message never quotes them), or for a key of a type keyless does not
    serve. Its strength is checked by :func:`tls_template`.
    """
    if not isinstance(data, bytes | bytearray) or not 0 < len(data) <= MAX_INPUT_SIZE:
        raise ServiceKeyRefused(f"a private key file is 1 byte to {MAX_INPUT_SIZE} bytes")
    raw = bytes(data)
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            key: object = serialization.load_pem_private_key(raw, password=password)
        else:
            key = serialization.load_der_private_key(raw, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message may describe the input; ours says only what is wrong.
        hint = "" if password is None else " (or the password is wrong)"
        raise ServiceKeyRefused(f"not a readable private key{hint}") from None
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ServiceKeyRefused(
            f"keyless serves RSA, ECDSA and Ed25519 keys, not {type(key).__name__}"
        )
    return key


def tls_template(private_key: PrivateKey, *, allow_decrypt: bool = False) -> KeyTemplate:
    """The ``TLS_*`` template for ``private_key`` with the given policy.

    :class:`WeakKeyError` for RSA under 2048 bits or with a public exponent that is
    even or under 65537, and for curves under 256 bits; :class:`ServiceKeyRefused`
    for other keys keyless does not take (RSA-4096, P-521 …) and for
    ``allow_decrypt`` on a key that cannot decrypt (only RSA keys can).
    """
    if isinstance(private_key, rsa.RSAPrivateKey):
        bits = private_key.key_size
        if bits < _MIN_RSA_BITS:
            raise WeakKeyError(f"an RSA key of {bits} bits is too weak; at least 2048 required")
        exponent = private_key.public_key().public_numbers().e
        if exponent < _MIN_RSA_EXPONENT or exponent % 2 == 0:
            raise WeakKeyError("the RSA public exponent must be odd and at least 65537")
        template = _RSA_TEMPLATES.get((bits, bool(allow_decrypt)))
        if template is None:
            raise ServiceKeyRefused(f"keyless takes RSA keys of 2048 or 3072 bits, not {bits}")
        return template
    if allow_decrypt:
        raise ServiceKeyRefused("only RSA keys can decrypt; allow_decrypt needs an RSA key")
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        curve = private_key.curve
        if curve.key_size < 256:
            raise WeakKeyError(f"the curve {curve.name} ({curve.key_size} bits) is too weak")
        ec_template = _EC_TEMPLATES.get(curve.name)
        if ec_template is None:
            raise ServiceKeyRefused(f"keyless takes P-256 and P-384 keys, not {curve.name}")
        return ec_template
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return TLS_ED25519
    raise ServiceKeyRefused(f"keyless does not serve {type(private_key).__name__} keys")


def key_material(private_key: PrivateKey) -> bytes:
    """``private_key`` in its ``TLS_*`` template's secret format (what
    :meth:`~keybroker.keys.Keyset.import_secret_material` takes): the raw 32 bytes of
    an Ed25519 key, unencrypted PKCS#8 DER for RSA and ECDSA. The caller hands it
    straight to the import and keeps no copy."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.private_bytes_raw()
    return private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_from_material(template: str, material: bytes) -> PrivateKey:
    """The inverse of :func:`key_material` for a version of ``template`` (a key server
    turns what :meth:`~keybroker.keys.Keyset.export_secret_material` gave it into a key
    object with this). :class:`ServiceKeyRefused` for anything else."""
    if template not in TLS_KEY_TYPES:
        raise ServiceKeyRefused(f"{template} is not a keyless TLS key template")
    try:
        if TLS_KEY_TYPES[template].key_type == "ed25519":
            return ed25519.Ed25519PrivateKey.from_private_bytes(material)
        key = serialization.load_der_private_key(material, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ServiceKeyRefused(f"the material is not a {template} key") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ServiceKeyRefused(f"the material is not a {template} key")
    return key


def public_key_of(template: str, public_key: bytes) -> PublicKey:
    """A stored version's public key (raw for Ed25519, SubjectPublicKeyInfo DER otherwise)."""
    try:
        if TLS_KEY_TYPES[template].key_type == "ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(public_key)
        key = serialization.load_der_public_key(public_key)
    except (KeyError, ValueError, UnsupportedAlgorithm):
        raise DecodeError(f"not a {template} public key") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise DecodeError(f"not a {template} public key")
    return key


def check_chain(private_key: PrivateKey, chain: bytes) -> x509.Certificate:
    """The leaf (first) certificate of the PEM ``chain``, checked to be for ``private_key``.

    :class:`ServiceKeyRefused` if the chain does not parse, or its first
    certificate is for another key or is not for TLS servers (an EKU without
    serverAuth).
    """
    if len(chain) > MAX_INPUT_SIZE:
        raise ServiceKeyRefused(f"a certificate chain is at most {MAX_INPUT_SIZE} bytes")
    try:
        leaf = load_certificates(chain)[0]
    except KeybrokerError:
        raise ServiceKeyRefused("the chain is not a PEM certificate bundle") from None
    if ski_of(_public(leaf)) != ski_of(private_key.public_key()):
        raise ServiceKeyRefused("the chain's first certificate is not for this key")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return leaf
    if x509.oid.ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise ServiceKeyRefused("the chain's first certificate is not for TLS servers (EKU)")
    return leaf


def _public(cert: x509.Certificate) -> PublicKey:
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ServiceKeyRefused("the chain's first certificate has a key keyless does not serve")
    return key


# -- what the log records --------------------------------------------------------------


@dataclass(frozen=True)
class ServiceKeyUploaded(Event):
    """A service's TLS key became ``version`` of its keyless keyset.

    ``ski`` names the key (RFC 5280 method 1, what edges send); ``replaced`` lists
    the versions holding the same key that were disabled because its policy changed;
    ``certificate_sha256`` is the leaf certificate it was uploaded with, if any.
    """

    LABEL: ClassVar[str] = message_label("keybroker/log/entry/keyless/service-key-uploaded", 1)
    at_ms: int
    service: str
    keyset: str
    version: int
    key_id: int
    template: str
    ski: bytes
    allow_decrypt: bool
    replaced: tuple[int, ...]
    certificate_sha256: bytes | None


KEYLESS_EVENTS: Final[dict[str, type[Event]]] = {ServiceKeyUploaded.LABEL: ServiceKeyUploaded}


def decode_keyless_event(entry: bytes) -> Event:
    """The keyless event in a log entry; :class:`DecodeError` if it is not one."""
    label, _ = decode(tuple(KEYLESS_EVENTS), entry)
    return KEYLESS_EVENTS[label].decode(entry)


# -- what operators and key servers see ---------------------------------------------------


@dataclass(frozen=True)
class ServiceKeyVersion:
    """One version of a service keyset: public facts and the key's policy."""

    version: int
    key_id: int
    state: str
    template: str
    #: ``None`` for a version whose template is not a ``TLS_*`` one.
    key_type: str | None
    allow_decrypt: bool
    #: The key's SKI; ``None`` when the version is not a TLS key.
    ski: bytes | None


@dataclass(frozen=True)
class KeyServerStatus:
    """A key server holding a service keyset, and the versions it acknowledged since."""

    principal: PrincipalId
    status: str
    acked: tuple[int, ...]


@dataclass(frozen=True)
class ServiceKeyInfo:
    """Everything about one service's keys (no key material)."""

    service: str
    keyset: str
    versions: tuple[ServiceKeyVersion, ...]
    #: Principals with an active ``use`` grant, and their status (``active``, ``revoked``).
    edges: tuple[tuple[PrincipalId, str], ...]
    key_servers: tuple[KeyServerStatus, ...]

    @property
    def served(self) -> tuple[ServiceKeyVersion, ...]:
        """The versions key servers hold and serve (primary and enabled TLS keys)."""
        return tuple(v for v in self.versions if v.state in SERVED_STATES and v.ski is not None)


@dataclass(frozen=True)
class UploadResult:
    """What :meth:`ServiceKeys.upload` did (public facts only)."""

    service: str
    keyset: str
    version: ServiceKeyVersion
    #: The keyset was made by this upload.
    created: bool
    #: Versions of the same key disabled because its policy changed.
    replaced: tuple[int, ...]
    #: Key servers the new version was delivered to.
    delivered_to: tuple[PrincipalId, ...]
    certificate_sha256: bytes | None = None


@dataclass(frozen=True)
class HoldResult:
    """The key server's ``hold`` grant and the deliveries :meth:`ServiceKeys.hold` made."""

    grant: GrantInfo
    #: ``(version, delivery id)`` of each delivery on its way to the key server.
    deliveries: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class KeyServerKey:
    """One key a key server holds, as it needs to know it."""

    version: int
    key_id: int
    state: str
    template: str
    key_type: str
    allow_decrypt: bool
    ski: bytes


@dataclass(frozen=True)
class KeyServerKeyset:
    """One keyless keyset a key server holds: its served keys and who may use them."""

    keyset: str
    service: str
    keys: tuple[KeyServerKey, ...]
    #: Active principals with an active ``use`` grant on the keyset.
    edges: tuple[PrincipalId, ...] = field(default=())


# -- the operations -------------------------------------------------------------------


def _version(template: str, public_key: bytes | None, **facts: Any) -> ServiceKeyVersion:
    kind = TLS_KEY_TYPES.get(template)
    ski = None
    if kind is not None and public_key is not None:
        try:
            ski = ski_of(public_key_of(template, public_key))
        except DecodeError:
            ski = None
    return ServiceKeyVersion(
        template=template,
        key_type=None if kind is None else kind.key_type,
        allow_decrypt=kind is not None and kind.allow_decrypt,
        ski=ski,
        **facts,
    )


class ServiceKeys:
    """Keyless operations on a :class:`~keybroker.broker.Broker` (the trusted party's side).

    Stateless, like the broker: any number of these, in any number of replicas,
    may work on one database.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._ctx: BrokerContext = broker.context

    def __repr__(self) -> str:
        return f"ServiceKeys({self._broker!r})"

    # -- upload ----------------------------------------------------------------------

    def upload(
        self,
        service: str,
        key: bytes | PrivateKey,
        *,
        allow_decrypt: bool = False,
        chain: bytes | None = None,
        password: bytes | None = None,
        delivery_ttl: timedelta = DEFAULT_DELIVERY_TTL,
    ) -> UploadResult:
        """Make ``key`` (PEM/DER bytes or a key object) the primary of ``keyless/<service>``.

        See the module docstring for what happens and what is logged. Raises
        :class:`ServiceKeyRefused` or :class:`WeakKeyError` for a key (or ``chain``)
        it does not take, :class:`Conflict` if the key is already a served version
        with this policy; nothing changes then.
        """
        name = service_keyset(service)
        if isinstance(key, bytes | bytearray):
            private_key = load_service_key(bytes(key), password=password)
        elif isinstance(
            key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        ):
            private_key = key
        else:
            raise ServiceKeyRefused(f"keyless does not serve {type(key).__name__} keys")
        template = tls_template(private_key, allow_decrypt=allow_decrypt)
        leaf = None if chain is None else check_chain(private_key, chain)
        ski = ski_of(private_key.public_key())
        ctx = self._ctx
        now = ctx.now()
        with ctx.store.transaction() as conn:
            ctx.store.lock(conn, f"keyless/upload/{name}")
            exists = conn.execute(
                sa.select(keysets.c.id).where(keysets.c.name == name)
            ).scalar_one_or_none()
            if exists is None:
                keyset = Keyset(name, Purpose.SIGN)
                added = keyset.import_secret_material(
                    template, key_material(private_key), SECRET_ACCESS, now=now
                )
                info = keyset.promote(added.version, now=now)
                ctx.keysets.create(keyset, conn=conn)
                events: list[Event] = [
                    KeysetCreated(
                        at_ms=to_ms(now),
                        keyset=name,
                        purpose=Purpose.SIGN.value,
                        template=template.name,
                        version=info.version,
                        key_id=info.key_id,
                    )
                ]
                replaced: tuple[int, ...] = ()
            else:
                info, replaced, events = self._add_version(conn, name, template, private_key, now)
            fingerprint_ = None if leaf is None else fingerprint(leaf)
            events.append(
                ServiceKeyUploaded(
                    at_ms=to_ms(now),
                    service=service,
                    keyset=name,
                    version=info.version,
                    key_id=info.key_id,
                    template=template.name,
                    ski=ski,
                    allow_decrypt=TLS_KEY_TYPES[template.name].allow_decrypt,
                    replaced=replaced,
                    certificate_sha256=fingerprint_,
                )
            )
            delivered: list[PrincipalId] = []
            for holder in _active_holders(conn, name):
                _, sent = deliver_in(ctx, conn, name, info.version, holder, delivery_ttl, now)
                events += sent
                delivered.append(holder)
            record(ctx, conn, events)
        kind = TLS_KEY_TYPES[template.name]
        logger.info(
            "uploaded %s key %s as %s v%d (allow_decrypt=%s), delivered to %d key server(s)",
            kind.key_type,
            ski.hex(),
            name,
            info.version,
            kind.allow_decrypt,
            len(delivered),
        )
        return UploadResult(
            service=service,
            keyset=name,
            version=ServiceKeyVersion(
                version=info.version,
                key_id=info.key_id,
                state=info.state.value,
                template=template.name,
                key_type=kind.key_type,
                allow_decrypt=kind.allow_decrypt,
                ski=ski,
            ),
            created=exists is None,
            replaced=replaced,
            delivered_to=tuple(delivered),
            certificate_sha256=fingerprint_,
        )

    def _add_version(
        self,
        conn: Connection,
        name: str,
        template: KeyTemplate,
        private_key: PrivateKey,
        now: datetime,
    ) -> tuple[KeyVersionInfo, tuple[int, ...], list[Event]]:
        """Add ``private_key`` to the existing keyset ``name`` and promote it; disable the
        served versions holding the same key under the other policy."""
        stored = self._ctx.keysets.load(name, conn=conn)
        keyset = stored.keyset
        if keyset.purpose is not Purpose.SIGN:
            raise Conflict(f"{name!r} is a {keyset.purpose.value} keyset, not a keyless one")
        ski = ski_of(private_key.public_key())
        same_key: list[int] = []
        for v in keyset.versions:
            if v.state in (KeyState.DISABLED, KeyState.DESTROYED) or v.public_key is None:
                continue
            if v.template.name not in TLS_KEY_TYPES:
                continue
            if ski_of(public_key_of(v.template.name, v.public_key)) != ski:
                continue
            if v.template == template:
                raise Conflict(f"this key is already version {v.version} of {name!r}")
            same_key.append(v.version)
        previous = keyset.primary
        added = keyset.import_secret_material(
            template, key_material(private_key), SECRET_ACCESS, now=now
        )
        info = keyset.promote(added.version, now=now)
        events: list[Event] = [
            KeyVersionAdded(
                at_ms=to_ms(now),
                keyset=name,
                version=added.version,
                key_id=added.key_id,
                template=template.name,
            ),
            KeyPromoted(
                at_ms=to_ms(now),
                keyset=name,
                version=info.version,
                key_id=info.key_id,
                previous_primary=None if previous is None else previous.version,
            ),
        ]
        for number in same_key:
            old = keyset.disable(number, now=now)
            events.append(
                KeyDisabled(at_ms=to_ms(now), keyset=name, version=number, key_id=old.key_id)
            )
        self._ctx.keysets.save(stored, conn=conn)
        for number in same_key:
            events += fail_sent(
                conn, now, "key version disabled", keyset_id=stored.id, version=number
            )
        return info, tuple(same_key), events

    # -- grants -------------------------------------------------------------------------

    def grant_edge(self, service: str, edge: PrincipalId | str) -> GrantInfo:
        """Let ``edge`` use the service's keys (an active principal; idempotent)."""
        return self._broker.grant(principal_id(edge), service_keyset(service), GrantMode.USE)

    def revoke_edge(self, service: str, edge: PrincipalId | str) -> GrantInfo:
        """End ``edge``'s ``use`` grant; :class:`NotFound` if it has none."""
        return self._broker.revoke_grant(principal_id(edge), service_keyset(service), GrantMode.USE)

    def hold(
        self,
        service: str,
        key_server: PrincipalId | str,
        *,
        delivery_ttl: timedelta = DEFAULT_DELIVERY_TTL,
    ) -> HoldResult:
        """Let ``key_server`` (a ``service`` principal) hold the service's keys, and deliver
        each served version it has not acknowledged since its ``hold`` grant was made.

        Idempotent: a delivery already on its way is returned, not repeated.
        """
        pid = principal_id(key_server)
        if pid.kind is not PrincipalKind.SERVICE:
            raise AuthorizationError(
                f"key servers are service principals (service/<name>); {pid} cannot hold keys"
            )
        name = service_keyset(service)
        granted = self._broker.grant(pid, name, GrantMode.HOLD)
        ctx = self._ctx
        now = ctx.now()
        sent: list[tuple[int, str]] = []
        with ctx.store.transaction() as conn:
            who = require_row(conn, pid)
            what = conn.execute(sa.select(keysets.c.id).where(keysets.c.name == name)).scalar_one()
            served = conn.execute(
                sa.select(key_versions.c.version)
                .where(
                    key_versions.c.keyset_id == what,
                    key_versions.c.state.in_(SERVED_STATES),
                )
                .order_by(key_versions.c.version)
            ).scalars()
            acked = set(
                conn.execute(
                    sa.select(deliveries.c.version).where(
                        deliveries.c.principal_id == who.id,
                        deliveries.c.keyset_id == what,
                        deliveries.c.state == "acked",
                        deliveries.c.created_at >= _ms(granted.created_at),
                    )
                ).scalars()
            )
            events: list[Event] = []
            for version in [v for v in served if v not in acked]:
                envelope, more = deliver_in(ctx, conn, name, version, pid, delivery_ttl, now)
                events += more
                sent.append((version, envelope.delivery_id))
            record(ctx, conn, events)
        logger.info("%s holds %s; %d delivery(ies) on their way", pid, name, len(sent))
        return HoldResult(granted, tuple(sent))

    def release(self, service: str, key_server: PrincipalId | str) -> list[GrantInfo]:
        """End ``key_server``'s ``hold`` grant (failing its outstanding deliveries) and its
        ``use`` grant if it has one; :class:`NotFound` if it has neither."""
        pid, name = principal_id(key_server), service_keyset(service)
        revoked: list[GrantInfo] = []
        for mode in (GrantMode.HOLD, GrantMode.USE):
            try:
                revoked.append(self._broker.revoke_grant(pid, name, mode))
            except NotFound:
                continue
        if not revoked:
            raise NotFound(f"{pid} has no active grant on {name!r}")
        return revoked

    # -- reading --------------------------------------------------------------------------

    def list_services(self) -> list[ServiceKeyInfo]:
        """Every keyless service keyset, by name: versions, edges and key servers."""
        with self._ctx.store.snapshot() as conn:
            return _service_infos(conn, keysets.c.name.startswith(KEYSET_PREFIX, autoescape=True))

    def show(self, service: str) -> ServiceKeyInfo:
        """One service's keys; :class:`NotFound` if it has no keyset."""
        name = service_keyset(service)
        with self._ctx.store.snapshot() as conn:
            found = _service_infos(conn, keysets.c.name == name)
        if not found:
            raise NotFound(f"no keyless keyset {name!r}")
        return found[0]

    def key_server_view(self, principal: PrincipalId | str) -> list[KeyServerKeyset]:
        """What the key server ``principal`` needs to authorise edges: for each keyless
        keyset it holds, the SKI and policy of each served key, and the active principals
        with a ``use`` grant.

        :class:`AuthorizationError` if it holds none (it is not a key server: nobody
        else may read this).
        """
        pid = principal_id(principal)
        with self._ctx.store.snapshot() as conn:
            who = require_row(conn, pid)
            held = list(
                conn.execute(
                    sa.select(keysets.c.id, keysets.c.name)
                    .join(grants, grants.c.keyset_id == keysets.c.id)
                    .where(
                        grants.c.principal_id == who.id,
                        grants.c.mode == GrantMode.HOLD.value,
                        grants.c.revoked_at.is_(None),
                        keysets.c.name.startswith(KEYSET_PREFIX, autoescape=True),
                    )
                    .order_by(keysets.c.name)
                )
            )
            if who.status != ACTIVE or not held:
                raise AuthorizationError(f"{pid} holds no keyless keys")
            ids = [h.id for h in held]
            versions = _versions(conn, ids, served_only=True)
            users: dict[str, list[PrincipalId]] = {i: [] for i in ids}
            for row in conn.execute(
                sa.select(grants.c.keyset_id, principals.c.kind, principals.c.name)
                .join(principals, principals.c.id == grants.c.principal_id)
                .where(
                    grants.c.keyset_id.in_(ids),
                    grants.c.mode == GrantMode.USE.value,
                    grants.c.revoked_at.is_(None),
                    principals.c.status == ACTIVE,
                )
                .order_by(principals.c.kind, principals.c.name)
            ):
                users[row.keyset_id].append(PrincipalId(PrincipalKind(row.kind), row.name))
        out: list[KeyServerKeyset] = []
        for head in held:
            keys = tuple(
                KeyServerKey(
                    version=v.version,
                    key_id=v.key_id,
                    state=v.state,
                    template=v.template,
                    key_type=v.key_type,
                    allow_decrypt=v.allow_decrypt,
                    ski=v.ski,
                )
                for v in versions[head.id]
                if v.ski is not None and v.key_type is not None
            )
            out.append(
                KeyServerKeyset(
                    keyset=head.name,
                    service=service_of(head.name),
                    keys=keys,
                    edges=tuple(dict.fromkeys(users[head.id])),
                )
            )
        return out


def _ms(when: datetime) -> datetime:
    """``when`` truncated to the millisecond, the precision deliveries are stored with."""
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def _active_holders(conn: Connection, name: str) -> list[PrincipalId]:
    """Active principals with an HPKE key and an active ``hold`` grant on ``name``."""
    rows = conn.execute(
        sa.select(principals.c.kind, principals.c.name)
        .join(grants, grants.c.principal_id == principals.c.id)
        .join(keysets, keysets.c.id == grants.c.keyset_id)
        .where(
            keysets.c.name == name,
            grants.c.mode == GrantMode.HOLD.value,
            grants.c.revoked_at.is_(None),
            principals.c.status == ACTIVE,
            principals.c.hpke_public_key.is_not(None),
        )
        .order_by(principals.c.kind, principals.c.name)
    )
    return list(dict.fromkeys(PrincipalId(PrincipalKind(r.kind), r.name) for r in rows))


def _versions(
    conn: Connection, keyset_ids: Sequence[str], *, served_only: bool = False
) -> dict[str, list[ServiceKeyVersion]]:
    query = sa.select(
        key_versions.c.keyset_id,
        key_versions.c.version,
        key_versions.c.key_id,
        key_versions.c.state,
        key_versions.c.template,
        key_versions.c.public_key,
    ).where(key_versions.c.keyset_id.in_(list(keyset_ids)))
    if served_only:
        query = query.where(key_versions.c.state.in_(SERVED_STATES))
    out: dict[str, list[ServiceKeyVersion]] = {i: [] for i in keyset_ids}
    for r in conn.execute(query.order_by(key_versions.c.keyset_id, key_versions.c.version)):
        out[r.keyset_id].append(
            _version(
                r.template,
                None if r.public_key is None else bytes(r.public_key),
                version=r.version,
                key_id=r.key_id,
                state=r.state,
            )
        )
    return out


def _service_infos(conn: Connection, where: sa.ColumnElement[bool]) -> list[ServiceKeyInfo]:
    heads = list(
        conn.execute(sa.select(keysets.c.id, keysets.c.name).where(where).order_by(keysets.c.name))
    )
    if not heads:
        return []
    ids = [h.id for h in heads]
    versions = _versions(conn, ids)
    edges: dict[str, list[tuple[PrincipalId, str]]] = {i: [] for i in ids}
    holders: dict[str, list[tuple[PrincipalId, str, str, datetime]]] = {i: [] for i in ids}
    for g in conn.execute(
        sa.select(
            grants.c.keyset_id,
            grants.c.mode,
            grants.c.created_at,
            principals.c.id.label("row_id"),
            principals.c.kind,
            principals.c.name,
            principals.c.status,
        )
        .join(principals, principals.c.id == grants.c.principal_id)
        .where(grants.c.keyset_id.in_(ids), grants.c.revoked_at.is_(None))
        .order_by(principals.c.kind, principals.c.name, grants.c.created_at)
    ):
        pid = PrincipalId(PrincipalKind(g.kind), g.name)
        if g.mode == GrantMode.USE.value:
            edges[g.keyset_id].append((pid, g.status))
        else:
            holders[g.keyset_id].append((pid, g.status, g.row_id, g.created_at))
    acked: dict[tuple[str, str], list[tuple[int, datetime]]] = {}
    for d in conn.execute(
        sa.select(
            deliveries.c.keyset_id,
            deliveries.c.principal_id,
            deliveries.c.version,
            deliveries.c.created_at,
        ).where(deliveries.c.keyset_id.in_(ids), deliveries.c.state == "acked")
    ):
        acked.setdefault((d.keyset_id, d.principal_id), []).append((d.version, d.created_at))
    out = []
    for head in heads:
        servers = tuple(
            KeyServerStatus(
                principal=pid,
                status=status,
                acked=tuple(
                    sorted(
                        {v for v, at in acked.get((head.id, row_id), []) if at >= _ms(granted_at)}
                    )
                ),
            )
            for pid, status, row_id, granted_at in holders[head.id]
        )
        out.append(
            ServiceKeyInfo(
                service=service_of(head.name),
                keyset=head.name,
                versions=tuple(versions[head.id]),
                edges=tuple(dict.fromkeys(edges[head.id])),
                key_servers=servers,
            )
        )
    return out


def edges_of(infos: Iterable[KeyServerKeyset]) -> dict[bytes, frozenset[PrincipalId]]:
    """SKI → the principals that may use that key, over every keyset in ``infos``."""
    out: dict[bytes, set[PrincipalId]] = {}
    for keyset in infos:
        for key in keyset.keys:
            out.setdefault(key.ski, set()).update(keyset.edges)
    return {ski: frozenset(who) for ski, who in out.items()}
