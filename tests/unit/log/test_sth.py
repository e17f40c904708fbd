"""Signed tree heads and the proof messages: signatures, canonical encoding, strict decoding."""

from __future__ import annotations

import dataclasses

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keybroker.encoding import encode
from keybroker.errors import CryptoError, DecodeError
from keybroker.log import merkle
from keybroker.log.sth import (
    ConsistencyProof,
    Ed25519TreeHeadSigner,
    InclusionProof,
    SignedTreeHead,
    TreeHeadSigner,
)

ROOT = merkle.root_from_leaves([b"a", b"b", b"c"])


@pytest.fixture
def signer() -> Ed25519TreeHeadSigner:
    return Ed25519TreeHeadSigner(Ed25519PrivateKey.generate(), "log-key-1")


def test_signer_satisfies_protocol(signer: Ed25519TreeHeadSigner) -> None:
    s: TreeHeadSigner = signer
    assert s.key_id == "log-key-1"


def test_default_key_id_is_derived_from_public_key() -> None:
    key = Ed25519PrivateKey.generate()
    a, b = Ed25519TreeHeadSigner(key), Ed25519TreeHeadSigner(key)
    assert a.key_id == b.key_id and len(a.key_id) == 32
    assert Ed25519TreeHeadSigner(Ed25519PrivateKey.generate()).key_id != a.key_id


def test_repr_shows_key_id_only(signer: Ed25519TreeHeadSigner) -> None:
    assert repr(signer) == "Ed25519TreeHeadSigner(key_id='log-key-1')"


def test_sign_verify_roundtrip(signer: Ed25519TreeHeadSigner) -> None:
    head = SignedTreeHead.sign(signer, 3, ROOT, 1_700_000_000_000)
    head.verify(signer.public_key())
    raw = signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    head.verify(raw)
    again = SignedTreeHead.decode(head.encode())
    assert again == head
    again.verify(signer.public_key())


def test_signature_covers_tbs_label_not_the_message(signer: Ed25519TreeHeadSigner) -> None:
    head = SignedTreeHead.sign(signer, 3, ROOT, 5)
    tbs = SignedTreeHead.signed_bytes(3, ROOT, 5, "log-key-1")
    assert cbor2.loads(tbs)[0] == "keybroker/log/tree-head-tbs/v1"
    assert cbor2.loads(head.encode())[0] == "keybroker/log/tree-head/v1"
    signer.public_key().verify(head.signature, tbs)


@pytest.mark.parametrize(
    "change",
    [
        {"tree_size": 4},
        {"root_hash": bytes(32)},
        {"timestamp_ms": 6},
        {"key_id": "log-key-2"},
        {"signature": bytes(64)},
    ],
)
def test_tampered_head_fails(signer: Ed25519TreeHeadSigner, change: dict[str, object]) -> None:
    head = SignedTreeHead.sign(signer, 3, ROOT, 5)
    tampered = dataclasses.replace(head, **change)  # type: ignore[arg-type]
    with pytest.raises(CryptoError):
        tampered.verify(signer.public_key())


def test_flipped_signature_bits_fail(signer: Ed25519TreeHeadSigner) -> None:
    head = SignedTreeHead.sign(signer, 3, ROOT, 5)
    for i in range(0, 64 * 8, 37):
        sig = bytearray(head.signature)
        sig[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CryptoError):
            dataclasses.replace(head, signature=bytes(sig)).verify(signer.public_key())


def test_wrong_or_malformed_key_fails(signer: Ed25519TreeHeadSigner) -> None:
    head = SignedTreeHead.sign(signer, 3, ROOT, 5)
    keys: list[Ed25519PublicKey | bytes] = [
        Ed25519PrivateKey.generate().public_key(),
        b"\x00" * 31,
        b"",
        bytes(32),
    ]
    for key in keys:
        with pytest.raises(CryptoError):
            head.verify(key)


def _head_body(**change: object) -> dict[str, object]:
    body: dict[str, object] = {
        "tree_size": 3,
        "root_hash": ROOT,
        "timestamp_ms": 5,
        "key_id": "k",
        "signature": bytes(64),
    }
    body.update(change)
    return body


@pytest.mark.parametrize(
    "change",
    [
        {"tree_size": -1},
        {"tree_size": 1 << 63},
        {"root_hash": bytes(31)},
        {"root_hash": bytes(33)},
        {"timestamp_ms": -1},
        {"key_id": ""},
        {"key_id": "k" * 65},
        {"signature": bytes(63)},
        {"tree_size": "3"},
    ],
)
def test_decode_rejects_out_of_range_heads(change: dict[str, object]) -> None:
    data = encode("keybroker/log/tree-head/v1", _head_body(**change))
    with pytest.raises(DecodeError):
        SignedTreeHead.decode(data)


def test_decode_rejects_garbage() -> None:
    good = encode("keybroker/log/tree-head/v1", _head_body())
    SignedTreeHead.decode(good)
    for data in [good + b"\x00", good[:-1], b"", b"\xff" * 10, bytes(9000)]:
        with pytest.raises(DecodeError):
            SignedTreeHead.decode(data)
    with pytest.raises(DecodeError):
        SignedTreeHead.decode(encode("keybroker/log/tree-head-tbs/v1", _head_body()))


def test_proof_messages_roundtrip_and_verify(signer: Ed25519TreeHeadSigner) -> None:
    entries = [b"a", b"b", b"c", b"d", b"e"]
    nodes = {(0, i): merkle.leaf_hash(e) for i, e in enumerate(entries)}
    for level in (1, 2):
        for idx in range(len(entries) >> level):
            nodes[(level, idx)] = merkle.node_hash(
                nodes[(level - 1, 2 * idx)], nodes[(level - 1, 2 * idx + 1)]
            )

    def read(ids: object) -> dict[tuple[int, int], bytes]:
        return {i: nodes[i] for i in ids}  # type: ignore[attr-defined]

    old = SignedTreeHead.sign(signer, 3, merkle.root_from_leaves(entries[:3]), 1)
    new = SignedTreeHead.sign(signer, 5, merkle.root_from_leaves(entries), 2)

    inc = InclusionProof(1, 5, tuple(merkle.inclusion_proof(1, 5, read)))
    assert InclusionProof.decode(inc.encode()) == inc
    inc.verify(merkle.leaf_hash(b"b"), new)
    with pytest.raises(CryptoError):
        inc.verify(merkle.leaf_hash(b"b"), old)  # a proof is for one tree size
    with pytest.raises(CryptoError):
        inc.verify(merkle.leaf_hash(b"c"), new)

    con = ConsistencyProof(3, 5, tuple(merkle.consistency_proof(3, 5, read)))
    assert ConsistencyProof.decode(con.encode()) == con
    con.verify(old, new)
    with pytest.raises(CryptoError):
        con.verify(new, old)
    with pytest.raises(CryptoError):
        ConsistencyProof(2, 5, con.hashes).verify(old, new)


@pytest.mark.parametrize(
    ("cls", "body"),
    [
        (InclusionProof, {"leaf_index": -1, "tree_size": 5, "hashes": []}),
        (InclusionProof, {"leaf_index": 0, "tree_size": 5, "hashes": [bytes(31)]}),
        (InclusionProof, {"leaf_index": 0, "tree_size": 5, "hashes": [bytes(32)] * 65}),
        (InclusionProof, {"leaf_index": 0, "tree_size": 5, "hashes": ["x"]}),
        (ConsistencyProof, {"old_size": 1, "new_size": 1 << 63, "hashes": []}),
        (ConsistencyProof, {"old_size": 1, "new_size": 2, "hashes": [bytes(33)]}),
        (ConsistencyProof, {"old_size": 1, "new_size": 2}),
    ],
)
def test_proof_decode_rejects_out_of_range(
    cls: type[InclusionProof | ConsistencyProof], body: dict[str, object]
) -> None:
    with pytest.raises(DecodeError):
        cls.decode(encode(cls.LABEL, body))
