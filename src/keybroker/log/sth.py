"""Signed tree heads and the proof messages that travel with them.

A :class:`SignedTreeHead` is the log's commitment: "my tree of ``tree_size``
leaves has root ``root_hash``", signed with Ed25519. The signature covers the
canonical encoding of the unsigned fields under its own label
(``keybroker/log/tree-head-tbs/v1``), so neither a whole tree-head message nor
any other keybroker message can be passed off as the signed bytes (domain
separation, as RFC 9162 §4.10 does with its ``TreeHeadSignature`` structure).

``decode()`` of every message here also checks the values, not only the types:
sizes in range, hashes of 32 bytes, proofs no longer than any tree allows. A
peer's garbage therefore stops at :class:`~keybroker.errors.DecodeError`;
``verify()`` answers only :class:`~keybroker.errors.CryptoError`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keybroker.encoding import Message, encode, message_label
from keybroker.errors import CryptoError, DecodeError
from keybroker.log import merkle

TREE_HEAD_LABEL = message_label("keybroker/log/tree-head", 1)
TREE_HEAD_TBS_LABEL = message_label("keybroker/log/tree-head-tbs", 1)
INCLUSION_PROOF_LABEL = message_label("keybroker/log/inclusion-proof", 1)
CONSISTENCY_PROOF_LABEL = message_label("keybroker/log/consistency-proof", 1)

#: ``tree_heads.key_id`` is VARCHAR(64).
MAX_KEY_ID_LENGTH = 64
ED25519_SIGNATURE_SIZE = 64

# The largest message here (a 64-hash proof) is about 2.3 KB; refuse anything bigger unparsed.
_MAX_SIZE = 8 * 1024


class TreeHeadSigner(Protocol):
    """What the log needs from its key; ``keybroker.keys`` will provide a keyset-backed one."""

    @property
    def key_id(self) -> str: ...

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature over ``data``."""
        ...


class Ed25519TreeHeadSigner:
    """The simple adapter: a ``cryptography`` Ed25519 private key and a key id."""

    def __init__(self, private_key: Ed25519PrivateKey, key_id: str | None = None) -> None:
        self._private_key = private_key
        self._key_id = key_id if key_id is not None else key_id_for(private_key.public_key())

    def __repr__(self) -> str:
        return f"Ed25519TreeHeadSigner(key_id={self._key_id!r})"

    @property
    def key_id(self) -> str:
        return self._key_id

    def public_key(self) -> Ed25519PublicKey:
        return self._private_key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data)


def key_id_for(public_key: Ed25519PublicKey) -> str:
    """A default key id: the first 16 bytes of SHA-256 over the raw public key, in hex."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def _public_key(key: Ed25519PublicKey | bytes) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PublicKey):
        return key
    try:
        return Ed25519PublicKey.from_public_bytes(bytes(key))
    except (TypeError, ValueError):
        raise CryptoError() from None


def _is_size(value: int) -> bool:
    return 0 <= value <= merkle.MAX_TREE_SIZE


def _is_hash(value: bytes) -> bool:
    return len(value) == merkle.HASH_SIZE


@dataclass(frozen=True)
class SignedTreeHead(Message):
    """RFC 9162 §4.10's tree head, signed by the log (``verify()`` with its public key)."""

    LABEL = TREE_HEAD_LABEL

    tree_size: int
    root_hash: bytes
    timestamp_ms: int
    key_id: str
    signature: bytes

    @staticmethod
    def signed_bytes(tree_size: int, root_hash: bytes, timestamp_ms: int, key_id: str) -> bytes:
        """The exact bytes the signature covers."""
        return encode(
            TREE_HEAD_TBS_LABEL,
            {
                "tree_size": tree_size,
                "root_hash": root_hash,
                "timestamp_ms": timestamp_ms,
                "key_id": key_id,
            },
        )

    @classmethod
    def sign(
        cls, signer: TreeHeadSigner, tree_size: int, root_hash: bytes, timestamp_ms: int
    ) -> Self:
        tbs = cls.signed_bytes(tree_size, root_hash, timestamp_ms, signer.key_id)
        return cls(tree_size, root_hash, timestamp_ms, signer.key_id, signer.sign(tbs))

    def verify(self, public_key: Ed25519PublicKey | bytes) -> None:
        """Check the log's signature. Returns None or raises :class:`CryptoError`."""
        key = _public_key(public_key)
        if not self._well_formed():
            raise CryptoError()
        tbs = self.signed_bytes(self.tree_size, self.root_hash, self.timestamp_ms, self.key_id)
        try:
            key.verify(self.signature, tbs)
        except InvalidSignature:
            raise CryptoError() from None

    def _well_formed(self) -> bool:
        return (
            _is_size(self.tree_size)
            and _is_hash(self.root_hash)
            and 0 <= self.timestamp_ms < (1 << 63)
            and 0 < len(self.key_id) <= MAX_KEY_ID_LENGTH
            and len(self.signature) == ED25519_SIGNATURE_SIZE
        )

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = _MAX_SIZE) -> Self:
        head = super().decode(data, max_size=min(max_size, _MAX_SIZE))
        if not head._well_formed():
            raise DecodeError(f"{cls.LABEL}: field out of range")
        return head


@dataclass(frozen=True)
class InclusionProof(Message):
    """RFC 9162 §2.1.3: leaf ``leaf_index`` is in the tree of ``tree_size`` leaves."""

    LABEL = INCLUSION_PROOF_LABEL

    leaf_index: int
    tree_size: int
    hashes: tuple[bytes, ...]

    def verify(self, leaf_hash: bytes, tree_head: SignedTreeHead) -> None:
        """Check the proof against a tree head whose signature the caller has verified.

        The head's size must be the proof's: a proof is for one tree size only.
        """
        if tree_head.tree_size != self.tree_size:
            raise CryptoError()
        merkle.verify_inclusion(
            leaf_hash, self.leaf_index, self.tree_size, self.hashes, tree_head.root_hash
        )

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = _MAX_SIZE) -> Self:
        proof = super().decode(data, max_size=min(max_size, _MAX_SIZE))
        if not (
            _is_size(proof.leaf_index)
            and _is_size(proof.tree_size)
            and len(proof.hashes) <= merkle.MAX_PROOF_HASHES
            and all(_is_hash(h) for h in proof.hashes)
        ):
            raise DecodeError(f"{cls.LABEL}: field out of range")
        return proof


@dataclass(frozen=True)
class ConsistencyProof(Message):
    """RFC 9162 §2.1.4: the tree of ``new_size`` leaves extends the one of ``old_size``."""

    LABEL = CONSISTENCY_PROOF_LABEL

    old_size: int
    new_size: int
    hashes: tuple[bytes, ...]

    def verify(self, old_head: SignedTreeHead, new_head: SignedTreeHead) -> None:
        """Check the proof between two tree heads whose signatures the caller has verified."""
        if (old_head.tree_size, new_head.tree_size) != (self.old_size, self.new_size):
            raise CryptoError()
        merkle.verify_consistency(
            self.old_size, self.new_size, self.hashes, old_head.root_hash, new_head.root_hash
        )

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = _MAX_SIZE) -> Self:
        proof = super().decode(data, max_size=min(max_size, _MAX_SIZE))
        if not (
            _is_size(proof.old_size)
            and _is_size(proof.new_size)
            and len(proof.hashes) <= merkle.MAX_PROOF_HASHES
            and all(_is_hash(h) for h in proof.hashes)
        ):
            raise DecodeError(f"{cls.LABEL}: field out of range")
        return proof
