"""RFC 9162 proofs: honest ones verify; any change to proof, index, size or root fails."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keybroker.errors import CryptoError
from keybroker.log import merkle
from keybroker.log.merkle import NodeId

MAX_SIZE = 300
SETTINGS = settings(max_examples=150, deadline=None)

# Distinct entries, so no two different ranges share a hash by coincidence of content.
ENTRIES = [b"leaf-%d" % i for i in range(MAX_SIZE)]


@cache
def nodes() -> dict[NodeId, bytes]:
    out: dict[NodeId, bytes] = {}
    hashes = [merkle.leaf_hash(e) for e in ENTRIES]
    level = 0
    while hashes:
        out.update({(level, i): h for i, h in enumerate(hashes)})
        hashes = [
            merkle.node_hash(hashes[2 * i], hashes[2 * i + 1]) for i in range(len(hashes) // 2)
        ]
        level += 1
    return out


def read(ids: object) -> dict[NodeId, bytes]:
    return {i: nodes()[i] for i in ids}  # type: ignore[attr-defined]


@cache
def root(size: int) -> bytes:
    return merkle.root_from_leaves(ENTRIES[:size])


def leaf(i: int) -> bytes:
    return merkle.leaf_hash(ENTRIES[i])


@st.composite
def index_and_size(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, MAX_SIZE))
    return draw(st.integers(0, size - 1)), size


@st.composite
def two_sizes(draw: st.DrawFn) -> tuple[int, int]:
    new = draw(st.integers(1, MAX_SIZE))
    return draw(st.integers(1, new)), new


def flip(proof: list[bytes], which: int, bit: int) -> list[bytes]:
    out = list(proof)
    h = bytearray(out[which])
    h[bit // 8] ^= 1 << (bit % 8)
    out[which] = bytes(h)
    return out


@SETTINGS
@given(index_and_size(), st.data())
def test_inclusion_proofs_verify_and_resist_tampering(
    case: tuple[int, int], data: st.DataObject
) -> None:
    index, size = case
    proof = merkle.inclusion_proof(index, size, read)
    merkle.verify_inclusion(leaf(index), index, size, proof, root(size))

    if proof:
        which = data.draw(st.integers(0, len(proof) - 1), label="hash")
        bit = data.draw(st.integers(0, 255), label="bit")
        with pytest.raises(CryptoError):
            merkle.verify_inclusion(leaf(index), index, size, flip(proof, which, bit), root(size))

    other_index = (
        data.draw(st.integers(0, size - 1).filter(lambda i: i != index), label="index")
        if size > 1
        else None
    )
    if other_index is not None:
        with pytest.raises(CryptoError):
            merkle.verify_inclusion(leaf(index), other_index, size, proof, root(size))
        with pytest.raises(CryptoError):
            merkle.verify_inclusion(leaf(other_index), index, size, proof, root(size))

    # Another size, checked against that size's true root.
    other_size = data.draw(
        st.integers(index + 1, MAX_SIZE).filter(lambda n: n != size), label="size"
    )
    with pytest.raises(CryptoError):
        merkle.verify_inclusion(leaf(index), index, other_size, proof, root(other_size))

    with pytest.raises(CryptoError):
        merkle.verify_inclusion(leaf(index), index, size, proof, root(size - 1))


@SETTINGS
@given(two_sizes(), st.data())
def test_consistency_proofs_verify_and_resist_tampering(
    case: tuple[int, int], data: st.DataObject
) -> None:
    old, new = case
    proof = merkle.consistency_proof(old, new, read)
    merkle.verify_consistency(old, new, proof, root(old), root(new))

    if proof:
        which = data.draw(st.integers(0, len(proof) - 1), label="hash")
        bit = data.draw(st.integers(0, 255), label="bit")
        with pytest.raises(CryptoError):
            merkle.verify_consistency(old, new, flip(proof, which, bit), root(old), root(new))

    # Other sizes, each checked against its true root.
    other_old = (
        data.draw(st.integers(1, new).filter(lambda m: m != old), label="old") if new > 1 else None
    )
    if other_old is not None:
        with pytest.raises(CryptoError):
            merkle.verify_consistency(other_old, new, proof, root(other_old), root(new))
    other_new = data.draw(st.integers(old, MAX_SIZE).filter(lambda n: n != new), label="new")
    with pytest.raises(CryptoError):
        merkle.verify_consistency(old, other_new, proof, root(old), root(other_new))

    # Wrong roots: a tree that does not extend the old one, or a different old tree.
    with pytest.raises(CryptoError):
        merkle.verify_consistency(
            old, new, proof, root(old), merkle.node_hash(root(new), root(new))
        )
    if old > 1:
        with pytest.raises(CryptoError):
            merkle.verify_consistency(old, new, proof, root(old - 1), root(new))


@SETTINGS
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12))
def test_appending_in_any_batches_gives_the_same_tree(batches: list[int]) -> None:
    size = 0
    edge: merkle.FrontierHashes = []
    for wanted in batches:
        k = min(wanted, MAX_SIZE - size)
        edge, completed = merkle.append_leaves(size, edge, [leaf(i) for i in range(size, size + k)])
        for level, idx, h in completed:
            assert nodes()[(level, idx)] == h
        size += k
        assert merkle.edge_root(edge) == root(size)
