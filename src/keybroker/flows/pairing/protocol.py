"""The pairing state machines (sans-IO): messages, ``now`` and randomness in; events out.

Everything that decides how a pairing moves lives in this file. A driver feeds
each received frame to :meth:`Controller.receive` / :meth:`Device.receive`,
sends every :class:`Send` it gets back, and reports the other events. No
sockets, no clock, no ``os.urandom`` here (records are sealed by the keys
module, which draws its own AEAD nonces).

The exchange (A = controller, B = device; the patent's claim in order: A gets
B's certificate, verifies it on the basis of its identification info, and only
then sends the common key encrypted under B's key)::

    Controller                                         Device
    START ──start──► EXPECT_PROOF                      EXPECT_HELLO
          Hello(nonce_A) ─────────────────────────────►     │ Hello
                                                            ▼
                     EXPECT_PROOF ◄──── DeviceProof ─── EXPECT_KEY
      verify (verification.py) ─┬─ fails ─► REFUSED: Refusal ──► REFUSED
                                └─ passes ─► EXPECT_CONFIRMATION:
          KeyDelivery(seal(common key, info = cert hash + transcript)) ──►│
                                                                          ▼ open, install
              EXPECT_CONFIRMATION ◄── KeyConfirmation(MAC(transcript)) ─ PAIRED
         MAC ok ─► PAIRED;  MAC bad ─► REFUSED
    PAIRED ◄──── Record(seq, AEAD under the common key) ────► PAIRED

Re-pairing (after the common keyset rotated, or to talk again) is the same
exchange with every check again; the controller adds to its KeyDelivery the
version the device was given and a MAC under it (the *continuity proof*, over
:class:`~.messages.ContinuityInput`: this transcript and the sealed delivery). A
device that holds a key (``held``) accepts a new one only with that proof and
only for the same keyset at the same or a newer version; otherwise it answers
with a Refusal (``not-continuous``, ``stale-version``) and keeps what it holds.
Once the new key opens it replaces the old one: a device holds one version.

Rules the tables and the classes keep:

* The only code path that seals the common key runs after
  :func:`~keybroker.flows.pairing.verification.verify_device` returned; on a
  refusal A sends a :class:`Refusal` (reason code, detail) and nothing else.
* The seal's ``info`` is the SHA-256 of the exact certificate and of the
  transcript so far (Hello, DeviceProof), so a KeyDelivery cannot be opened for
  another certificate or replayed into another session.
* Key confirmation is a MAC under a key derived from the delivered key
  (:meth:`keybroker.keys.Keyset.prove_possession`) over the transcript including
  the KeyDelivery.
* Records carry a sequence number; the AAD binds transcript, sender and seq, so
  a record cannot be replayed, reordered or reflected to its sender.
* Anything not in a table is invalid: the machine moves to ``ERROR`` and raises
  :class:`~keybroker.errors.RemoteProtocolError` (the peer's fault) or
  :class:`~keybroker.errors.LocalProtocolError` (the caller's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from keybroker.encoding import Message
from keybroker.errors import (
    CryptoError,
    DecodeError,
    KeybrokerError,
    KeysetError,
    LocalProtocolError,
    RemoteProtocolError,
)
from keybroker.flows.pairing.code import PairingCode
from keybroker.flows.pairing.messages import (
    MAX_RECORD_PLAINTEXT,
    NONCE_SIZE,
    ConfirmationInput,
    ContinuityInput,
    DeviceProof,
    Hello,
    KeyConfirmation,
    KeyDelivery,
    Record,
    RecordAad,
    Refusal,
    SealInfo,
    decode_wire,
)
from keybroker.flows.pairing.refusals import (
    EXPLANATIONS,
    KeyConfirmationFailed,
    NotContinuous,
    RefusalReason,
    StaleVersion,
    parse_reason,
    reason_of,
)
from keybroker.flows.pairing.verification import (
    DevicePolicy,
    VerifiedDevice,
    proof_to_be_signed,
    verify_device,
)
from keybroker.keys import (
    AES256_GCM,
    CertificateKey,
    Keyset,
    KeyState,
    Purpose,
    transport_scheme,
)
from keybroker.pki import DeviceIdentity, certificate_der, fingerprint, public_key_fingerprint

Rng = Callable[[int], bytes]


class ControllerState(StrEnum):
    START = "START"
    EXPECT_PROOF = "EXPECT_PROOF"
    EXPECT_CONFIRMATION = "EXPECT_CONFIRMATION"
    PAIRED = "PAIRED"
    REFUSED = "REFUSED"
    ERROR = "ERROR"


class DeviceState(StrEnum):
    EXPECT_HELLO = "EXPECT_HELLO"
    EXPECT_KEY = "EXPECT_KEY"
    PAIRED = "PAIRED"
    REFUSED = "REFUSED"
    ERROR = "ERROR"


#: Local inputs (the rest are received message types).
START: Final = "start"
SEND: Final = "send"

Input = type[Message] | str

#: (state, input) → the states it may lead to; the first is the success path.
CONTROLLER_TRANSITIONS: Final[dict[tuple[ControllerState, Input], tuple[ControllerState, ...]]] = {
    (ControllerState.START, START): (ControllerState.EXPECT_PROOF,),
    (ControllerState.EXPECT_PROOF, DeviceProof): (
        ControllerState.EXPECT_CONFIRMATION,
        ControllerState.REFUSED,
    ),
    (ControllerState.EXPECT_PROOF, Refusal): (ControllerState.REFUSED,),
    (ControllerState.EXPECT_CONFIRMATION, KeyConfirmation): (
        ControllerState.PAIRED,
        ControllerState.REFUSED,
    ),
    (ControllerState.EXPECT_CONFIRMATION, Refusal): (ControllerState.REFUSED,),
    (ControllerState.PAIRED, Record): (ControllerState.PAIRED,),
    (ControllerState.PAIRED, SEND): (ControllerState.PAIRED,),
}

DEVICE_TRANSITIONS: Final[dict[tuple[DeviceState, Input], tuple[DeviceState, ...]]] = {
    (DeviceState.EXPECT_HELLO, Hello): (DeviceState.EXPECT_KEY,),
    (DeviceState.EXPECT_KEY, KeyDelivery): (DeviceState.PAIRED, DeviceState.REFUSED),
    (DeviceState.EXPECT_KEY, Refusal): (DeviceState.REFUSED,),
    (DeviceState.PAIRED, Record): (DeviceState.PAIRED,),
    (DeviceState.PAIRED, SEND): (DeviceState.PAIRED,),
}


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Bytes for the driver to send as one frame."""

    data: bytes = field(repr=False)


@dataclass(frozen=True)
class DevicePaired:
    """(Controller) the device passed every check, received the key and confirmed it."""

    identity: DeviceIdentity
    certificate_sha256: bytes
    keyset: str
    version: int


@dataclass(frozen=True)
class KeyInstalled:
    """(Device) the common key arrived, opened and was confirmed to the controller."""

    keyset: str
    version: int
    key_id: int


@dataclass(frozen=True)
class PairingRefused:
    """A refusal: ``by_us`` if this side refused, otherwise the peer's Refusal."""

    reason: RefusalReason
    detail: str
    by_us: bool

    @property
    def explanation(self) -> str:
        return EXPLANATIONS[self.reason]


@dataclass(frozen=True)
class MessageReceived:
    """An authenticated, decrypted application message (``repr`` shows only its size)."""

    plaintext: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"MessageReceived({len(self.plaintext)} bytes)"


Event = Send | DevicePaired | KeyInstalled | PairingRefused | MessageReceived


# -- the transcript --------------------------------------------------------------------------


class Transcript:
    """SHA-256 over every handshake message, each length-prefixed, in the order sent."""

    __slots__ = ("_hash",)

    def __init__(self) -> None:
        self._hash = hashes.Hash(hashes.SHA256())

    def add(self, message: bytes) -> None:
        self._hash.update(len(message).to_bytes(4, "big"))
        self._hash.update(message)

    def digest(self) -> bytes:
        return self._hash.copy().finalize()


def _sha256(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def _confirmation_challenge(transcript_sha256: bytes) -> bytes:
    return ConfirmationInput(transcript_sha256=transcript_sha256).encode()


def _record_aad(transcript_sha256: bytes, sender: str, seq: int) -> bytes:
    return RecordAad(transcript_sha256=transcript_sha256, sender=sender, seq=seq).encode()


class _Records:
    """Sequence-numbered AEAD records under the common key, in both directions."""

    __slots__ = ("_aead", "_in", "_keyset", "_out", "_peer", "_self", "_transcript", "_version")

    def __init__(
        self, keyset: Keyset, version: int, transcript_sha256: bytes, me: str, peer: str
    ) -> None:
        self._keyset = keyset
        self._version = version
        self._aead = keyset.aead()
        self._transcript = transcript_sha256
        self._self, self._peer = me, peer
        self._out = 0
        self._in = 0

    def seal(self, plaintext: bytes) -> bytes:
        if len(plaintext) > MAX_RECORD_PLAINTEXT:
            raise LocalProtocolError(f"a record carries at most {MAX_RECORD_PLAINTEXT} bytes")
        primary = self._keyset.primary
        if primary is None or primary.version != self._version:
            # The peer holds only the version delivered: never send under another one.
            raise LocalProtocolError("the common keyset's primary changed during the session")
        seq = self._out
        self._out += 1
        aad = _record_aad(self._transcript, self._self, seq)
        return Record(seq=seq, ciphertext=self._aead.encrypt(plaintext, aad)).encode()

    def open(self, record: Record) -> bytes:
        if record.seq != self._in:
            raise RemoteProtocolError(f"record {record.seq} out of order (expected {self._in})")
        aad = _record_aad(self._transcript, self._peer, record.seq)
        plaintext = self._aead.decrypt(record.ciphertext, aad)
        self._in += 1
        return plaintext


def _sending_keyset(common: Keyset, version: int) -> Keyset:
    """``common`` itself when ``version`` is its primary (records go out under the primary,
    so under the version delivered): the usual case, and free. Otherwise a private copy
    whose primary is ``version``, made through the keys module's at-rest format under a
    throwaway KEK, so no key bytes are handled here."""
    if common.version(version).state is KeyState.PRIMARY:
        return common
    kek = Keyset.generate("pairing/scratch-kek", AES256_GCM).aead()
    copy = Keyset.from_wrapped(common.name, common.purpose, common.wrapped_versions(kek), kek)
    copy.promote(version)
    return copy


def _continuity_challenge(
    transcript_sha256: bytes, keyset: str, version: int, sealed: bytes
) -> bytes:
    return ContinuityInput(
        transcript_sha256=transcript_sha256,
        keyset=keyset,
        version=version,
        sealed_sha256=_sha256(sealed),
    ).encode()


def _refusal(reason: RefusalReason, detail: str) -> list[Event]:
    message = Refusal(reason=reason.value, detail=detail[:500])
    return [Send(message.encode()), PairingRefused(reason, message.detail, by_us=True)]


def _peer_refusal(message: Refusal) -> list[Event]:
    return [PairingRefused(parse_reason(message.reason), message.detail[:500], by_us=False)]


# -- controller (A) ---------------------------------------------------------------------------


class Controller:
    """Device A: verifies a device against a pairing code, then sends it the common key.

    ``common`` is the common keyset (an ``aead`` keyset the controller holds);
    ``version`` the version to deliver; ``previous``, when re-pairing a device, the
    version it was given before (the controller must still hold it: it proves so).
    """

    def __init__(
        self,
        *,
        expected: PairingCode,
        policy: DevicePolicy,
        common: Keyset,
        version: int,
        rng: Rng,
        name: str = "controller",
        previous: int | None = None,
    ) -> None:
        if common.purpose is not Purpose.AEAD:
            raise LocalProtocolError("the common key must be an aead keyset")
        if previous is not None:
            if previous < 1:
                raise LocalProtocolError("versions start at 1")
            common.version(previous)  # KeysetError if we no longer hold it
        common = _sending_keyset(common, version)  # KeysetError now, not mid-handshake
        self.previous = previous
        self.expected = expected
        self.policy = policy
        self.state = ControllerState.START
        self.device: VerifiedDevice | None = None
        self.refusal: PairingRefused | None = None
        self._common = common
        self._version = version
        self._rng = rng
        self._name = name
        self._nonce = b""
        self._hello_sha256 = b""
        self._transcript = Transcript()
        self._records: _Records | None = None

    def __repr__(self) -> str:
        return f"Controller({self.state.value}, expecting {self.expected.identity})"

    def _move(self, event: Input, outcome: int = 0) -> None:
        targets = CONTROLLER_TRANSITIONS.get((self.state, event))
        if targets is None:
            name = event if isinstance(event, str) else event.__name__
            self.state = ControllerState.ERROR
            if isinstance(event, str):
                raise LocalProtocolError(f"controller cannot {name} in this state")
            raise RemoteProtocolError(f"unexpected {name} from the device")
        self.state = targets[outcome]

    def start(self) -> list[Event]:
        """The Hello that opens a pairing."""
        self._move(START)
        nonce = self._rng(NONCE_SIZE)
        if len(nonce) != NONCE_SIZE:
            raise LocalProtocolError("rng returned the wrong number of bytes")
        self._nonce = nonce
        hello = Hello(controller=self._name, nonce=nonce).encode()
        self._hello_sha256 = _sha256(hello)
        self._transcript.add(hello)
        return [Send(hello)]

    def receive(self, data: bytes, now: datetime) -> list[Event]:
        """One frame from the device. Peer garbage: ERROR and RemoteProtocolError."""
        try:
            message = decode_wire(data)
        except DecodeError:
            self.state = ControllerState.ERROR
            raise
        if isinstance(message, Refusal):
            self._move(Refusal)
            events = _peer_refusal(message)
            self.refusal = events[0]  # type: ignore[assignment]
            return events
        if isinstance(message, DeviceProof):
            return self._on_proof(message, data, now)
        if isinstance(message, KeyConfirmation):
            return self._on_confirmation(message, data)
        if isinstance(message, Record):
            self._move(Record)
            assert self._records is not None
            try:
                return [MessageReceived(self._records.open(message))]
            except KeybrokerError:
                self.state = ControllerState.ERROR
                raise
        self._move(type(message))
        raise AssertionError("unreachable: every other type is outside the table")

    def send(self, plaintext: bytes) -> list[Event]:
        """An application message to the paired device, under the common key."""
        self._move(SEND)
        assert self._records is not None
        return [Send(self._records.seal(plaintext))]

    def _refuse(self, reason: RefusalReason, detail: str) -> list[Event]:
        events = _refusal(reason, detail)
        self.refusal = events[1]  # type: ignore[assignment]
        return events

    def _on_proof(self, proof: DeviceProof, data: bytes, now: datetime) -> list[Event]:
        self._move(DeviceProof)  # to EXPECT_CONFIRMATION, unless refused below
        try:
            device = verify_device(
                proof,
                nonce=self._nonce,
                hello_sha256=self._hello_sha256,
                expected=self.expected,
                policy=self.policy,
                now=now,
            )
        except KeybrokerError as exc:
            self.state = ControllerState.REFUSED
            return self._refuse(reason_of(exc), str(exc))
        # Verified: only now does the common key leave A, sealed to this exact
        # certificate's key and bound to this session's transcript.
        self.device = device
        self._transcript.add(data)
        info = SealInfo(
            certificate_sha256=device.certificate_sha256,
            transcript_sha256=self._transcript.digest(),
        ).encode()
        public_key = device.leaf.public_key()
        sealed = self._common.seal_version_to_certificate_key(self._version, public_key, info=info)
        continuity = b""
        if self.previous is not None:
            challenge = _continuity_challenge(
                self._transcript.digest(), self._common.name, self._version, sealed
            )
            continuity = self._common.prove_possession(self.previous, challenge)
        delivery = KeyDelivery(
            keyset=self._common.name,
            version=self._version,
            scheme=transport_scheme(public_key).value,
            sealed=sealed,
            previous_version=self.previous or 0,
            continuity=continuity,
        ).encode()
        self._transcript.add(delivery)
        return [Send(delivery)]

    def _on_confirmation(self, confirmation: KeyConfirmation, data: bytes) -> list[Event]:
        self._move(KeyConfirmation)
        transcript = self._transcript.digest()
        try:
            self._common.verify_possession(
                self._version, _confirmation_challenge(transcript), confirmation.mac
            )
        except CryptoError:
            self.state = ControllerState.REFUSED
            exc = KeyConfirmationFailed("the key confirmation MAC does not verify")
            return self._refuse(reason_of(exc), str(exc))
        self._transcript.add(data)
        self._records = _Records(
            self._common, self._version, self._transcript.digest(), "controller", "device"
        )
        assert self.device is not None
        return [
            DevicePaired(
                identity=self.device.identity,
                certificate_sha256=self.device.certificate_sha256,
                keyset=self._common.name,
                version=self._version,
            )
        ]


# -- device (B) -------------------------------------------------------------------------------


class Device:
    """Device B: proves it holds its certified key, receives the common key, confirms it.

    ``chain`` is the device certificate first, then its intermediates; ``held`` the
    common key it was paired with before (None: not paired, any controller that
    passes its checks may give it a key). After a pairing :attr:`keyset` holds the
    one version received, to pass as ``held`` to the next session's machine.
    """

    def __init__(
        self,
        *,
        key: CertificateKey,
        chain: Sequence[x509.Certificate],
        rng: Rng,
        held: Keyset | None = None,
    ) -> None:
        if not chain:
            raise LocalProtocolError("a device needs its certificate")
        if public_key_fingerprint(chain[0].public_key()) != public_key_fingerprint(
            key.public_key()
        ):
            raise LocalProtocolError("the device key does not match its certificate")
        if held is not None and held.primary is None:
            raise LocalProtocolError("a held common key needs its primary version")
        self.state = DeviceState.EXPECT_HELLO
        self.held = held
        self.keyset: Keyset | None = None
        self.refusal: PairingRefused | None = None
        self._key = key
        self._chain = [certificate_der(c) for c in chain]
        self._certificate_sha256 = fingerprint(chain[0])
        self._rng = rng
        self._transcript = Transcript()
        self._records: _Records | None = None

    def __repr__(self) -> str:
        return f"Device({self.state.value})"

    def _move(self, event: Input) -> None:
        targets = DEVICE_TRANSITIONS.get((self.state, event))
        if targets is None:
            name = event if isinstance(event, str) else event.__name__
            self.state = DeviceState.ERROR
            if isinstance(event, str):
                raise LocalProtocolError(f"device cannot {name} in this state")
            raise RemoteProtocolError(f"unexpected {name} from the controller")
        self.state = targets[0]

    def receive(self, data: bytes, now: datetime) -> list[Event]:
        """One frame from the controller. Peer garbage: ERROR and RemoteProtocolError."""
        try:
            message = decode_wire(data)
        except DecodeError:
            self.state = DeviceState.ERROR
            raise
        if isinstance(message, Hello):
            return self._on_hello(data)
        if isinstance(message, Refusal):
            self._move(Refusal)
            events = _peer_refusal(message)
            self.refusal = events[0]  # type: ignore[assignment]
            return events
        if isinstance(message, KeyDelivery):
            return self._on_delivery(message, data, now)
        if isinstance(message, Record):
            self._move(Record)
            assert self._records is not None
            try:
                return [MessageReceived(self._records.open(message))]
            except KeybrokerError:
                self.state = DeviceState.ERROR
                raise
        self._move(type(message))
        raise AssertionError("unreachable: every other type is outside the table")

    def send(self, plaintext: bytes) -> list[Event]:
        self._move(SEND)
        assert self._records is not None
        return [Send(self._records.seal(plaintext))]

    def _on_hello(self, data: bytes) -> list[Event]:
        self._move(Hello)
        hello = Hello.decode(data)
        device_nonce = self._rng(NONCE_SIZE)
        tbs = proof_to_be_signed(_sha256(data), device_nonce, self._chain)
        proof = DeviceProof(
            controller_nonce=hello.nonce,
            device_nonce=device_nonce,
            chain=list(self._chain),
            signature=self._key.sign(tbs),
        ).encode()
        self._transcript.add(data)
        self._transcript.add(proof)
        return [Send(proof)]

    def _on_delivery(self, delivery: KeyDelivery, data: bytes, now: datetime) -> list[Event]:
        self._move(KeyDelivery)
        if delivery.scheme != self._key.scheme.value:
            self.state = DeviceState.ERROR
            raise RemoteProtocolError("key delivered with a scheme this key does not use")
        if self.held is not None:
            try:
                self._check_continuity(delivery)
            except (NotContinuous, StaleVersion) as exc:
                self.state = DeviceState.REFUSED
                events = _refusal(reason_of(exc), str(exc))
                self.refusal = events[1]  # type: ignore[assignment]
                return events
        info = SealInfo(
            certificate_sha256=self._certificate_sha256,
            transcript_sha256=self._transcript.digest(),
        ).encode()
        try:
            keyset = Keyset(delivery.keyset, Purpose.AEAD)
            installed = keyset.install_version_sealed_to_certificate_key(
                delivery.sealed, self._key, info=info, now=now
            )
            if installed.version != delivery.version:
                raise DecodeError("delivered version differs from the one announced")
            keyset.promote(installed.version, now=now)
        except (CryptoError, KeysetError, DecodeError) as exc:
            self.state = DeviceState.ERROR
            raise RemoteProtocolError("the key delivery does not open for this device") from exc
        self._transcript.add(data)
        mac = keyset.prove_possession(
            installed.version, _confirmation_challenge(self._transcript.digest())
        )
        confirmation = KeyConfirmation(mac=mac).encode()
        self._transcript.add(confirmation)
        self.keyset = keyset
        self._records = _Records(
            keyset, installed.version, self._transcript.digest(), "device", "controller"
        )
        return [
            Send(confirmation),
            KeyInstalled(keyset=keyset.name, version=installed.version, key_id=installed.key_id),
        ]

    def _check_continuity(self, delivery: KeyDelivery) -> None:
        """A paired device's rule: the same keyset, proof of the version held, no going back."""
        held = self.held
        assert held is not None and held.primary is not None
        have = held.primary.version
        if delivery.previous_version != have:
            raise NotContinuous(f"paired with {held.name} v{have}; no proof of holding it")
        challenge = _continuity_challenge(
            self._transcript.digest(), delivery.keyset, delivery.version, delivery.sealed
        )
        try:
            held.verify_possession(have, challenge, delivery.continuity)
        except CryptoError:
            raise NotContinuous(
                f"the proof of holding {held.name} v{have} does not verify"
            ) from None
        if delivery.keyset != held.name:
            raise NotContinuous(f"paired for keyset {held.name}, offered {delivery.keyset}")
        if delivery.version < have:
            raise StaleVersion(f"offered v{delivery.version}; holds v{have}")
