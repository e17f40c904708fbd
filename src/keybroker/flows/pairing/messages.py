"""Pairing messages: frozen dataclasses in the canonical encoding (:mod:`keybroker.encoding`).

On the wire (controller A, device B)::

    A → B  Hello            controller name, 32-byte nonce
    B → A  DeviceProof      echoed nonce, device nonce, certificate chain (DER, leaf
                            first), signature over ProofToBeSigned
    A → B  KeyDelivery      keyset, version, scheme, the version sealed to B's key and,
                            when re-pairing, the version B holds and a MAC under it
                            (the continuity proof)
           or Refusal       reason code and detail: nothing else leaves A
    B → A  KeyConfirmation  MAC over the transcript under the delivered key
           or Refusal       (re-pairing) B refuses a key that does not continue its own
    A ↔ B  Record           seq, AEAD ciphertext under the common key

The other types are never sent: they are the bytes that get signed
(ProofToBeSigned), bound into the seal (SealInfo) or authenticated with each
record (RecordAad, ConfirmationInput, ContinuityInput). Each has its own label, so a signature
or MAC over one can never be taken for another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Final

from keybroker.encoding import Message, decode, message_label
from keybroker.errors import DecodeError

NONCE_SIZE: Final = 32
#: Most certificates a DeviceProof may carry (what max_intermediates allows is
#: checked later, with its own refusal reason; this only bounds the work).
MAX_CHAIN_CERTIFICATES: Final = 8
MAX_CERTIFICATE_SIZE: Final = 16 * 1024
#: Largest frame either side reads, in bytes.
MAX_FRAME: Final = 256 * 1024
MAX_RECORD_PLAINTEXT: Final = 64 * 1024


def _label(name: str) -> str:
    return message_label(f"keybroker/pairing/{name}", 1)


@dataclass(frozen=True)
class Hello(Message):
    LABEL: ClassVar[str] = _label("hello")
    controller: str
    nonce: bytes

    def check(self) -> None:
        if len(self.nonce) != NONCE_SIZE or not 0 < len(self.controller) <= 200:
            raise DecodeError("hello: bad nonce or controller name")


@dataclass(frozen=True)
class DeviceProof(Message):
    LABEL: ClassVar[str] = _label("device-proof")
    controller_nonce: bytes
    device_nonce: bytes
    chain: list[bytes]
    signature: bytes = field(repr=False)

    def check(self) -> None:
        if len(self.controller_nonce) != NONCE_SIZE or len(self.device_nonce) != NONCE_SIZE:
            raise DecodeError("device proof: nonces are 32 bytes")
        if not 0 < len(self.chain) <= MAX_CHAIN_CERTIFICATES:
            raise DecodeError(f"device proof: 1 to {MAX_CHAIN_CERTIFICATES} certificates")
        if any(len(der) > MAX_CERTIFICATE_SIZE for der in self.chain):
            raise DecodeError("device proof: certificate too large")
        if not 0 < len(self.signature) <= 1024:
            raise DecodeError("device proof: bad signature length")


@dataclass(frozen=True)
class ProofToBeSigned(Message):
    """What the device signs: this session's hello, its own nonce and its chain."""

    LABEL: ClassVar[str] = _label("proof-tbs")
    hello_sha256: bytes
    device_nonce: bytes
    chain_sha256: bytes


@dataclass(frozen=True)
class KeyDelivery(Message):
    LABEL: ClassVar[str] = _label("key-delivery")
    keyset: str
    version: int
    scheme: str
    sealed: bytes = field(repr=False)
    #: Re-pairing: the version the device was given before (0: a first pairing) and
    #: a MAC under that version over :class:`ContinuityInput`.
    previous_version: int = 0
    continuity: bytes = field(default=b"", repr=False)

    def check(self) -> None:
        if self.previous_version < 0 or len(self.continuity) > 64:
            raise DecodeError("key delivery: bad continuity proof")
        if (self.previous_version == 0) != (not self.continuity):
            raise DecodeError("key delivery: a continuity proof needs its version, and back")


@dataclass(frozen=True)
class SealInfo(Message):
    """The HPKE ``info`` / OAEP label: the exact certificate and this session's transcript."""

    LABEL: ClassVar[str] = _label("seal-info")
    certificate_sha256: bytes
    transcript_sha256: bytes


@dataclass(frozen=True)
class ConfirmationInput(Message):
    """The challenge the device's key-confirmation MAC covers."""

    LABEL: ClassVar[str] = _label("confirmation-input")
    transcript_sha256: bytes


@dataclass(frozen=True)
class ContinuityInput(Message):
    """What a re-pairing controller MACs under the version the device holds: this
    session's transcript (Hello, DeviceProof) and the delivery it vouches for."""

    LABEL: ClassVar[str] = _label("continuity-input")
    transcript_sha256: bytes
    keyset: str
    version: int
    sealed_sha256: bytes


@dataclass(frozen=True)
class KeyConfirmation(Message):
    LABEL: ClassVar[str] = _label("key-confirmation")
    mac: bytes = field(repr=False)


@dataclass(frozen=True)
class Record(Message):
    LABEL: ClassVar[str] = _label("record")
    seq: int
    ciphertext: bytes = field(repr=False)


@dataclass(frozen=True)
class RecordAad(Message):
    LABEL: ClassVar[str] = _label("record-aad")
    transcript_sha256: bytes
    sender: str
    seq: int


@dataclass(frozen=True)
class Refusal(Message):
    LABEL: ClassVar[str] = _label("refusal")
    reason: str
    detail: str


#: Every message type that travels, by label.
WIRE_TYPES: Final[dict[str, type[Message]]] = {
    cls.LABEL: cls for cls in (Hello, DeviceProof, KeyDelivery, KeyConfirmation, Record, Refusal)
}


def decode_wire(data: bytes) -> Message:
    """Any message that travels; :class:`DecodeError` for anything else."""
    label, _ = decode(tuple(WIRE_TYPES), data, max_size=MAX_FRAME)
    message = WIRE_TYPES[label].decode(data, max_size=MAX_FRAME)
    check = getattr(message, "check", None)
    if check is not None:
        check()
    return message
