"""RFC 9162 §2.1 Merkle tree hashing, proof generation and proof verification. No I/O.

Nodes are named by ``(level, idx)``: the *complete* subtree of ``2**level``
leaves ``[idx * 2**level, (idx + 1) * 2**level)``; level 0 is a leaf hash. A
complete subtree never changes once its last leaf is appended, so a store can
keep each one as an immutable row (``keybroker.store.schema.log_nodes``).

Every hash a proof needs is either such a node or the hash of an incomplete
right-edge range, and such a range is itself the right fold of O(log n)
complete nodes (RFC 9162 §2.1.1 splits ``n`` at the largest power of two below
it, which is exactly the binary decomposition of ``n``). So proof generation
works in two steps: plan which nodes are needed (pure), ask a
:data:`NodeReader` for all of them at once (one database query), then combine.

Verification follows RFC 9162 §2.1.3.2 and §2.1.4.2 literally. Any proof that
does not verify, including one of the wrong length, with a hash of the wrong
size or for an index outside the tree, raises :class:`~keybroker.errors.CryptoError`
and says no more: which check failed is of no use to an honest peer.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from keybroker.errors import CryptoError, LocalProtocolError

HASH_SIZE = 32

#: MTH({}) = HASH() — RFC 9162 §2.1.1.
EMPTY_ROOT = hashlib.sha256(b"").digest()

#: Tree sizes are BIGINT in the store; 2**63 leaves bound every proof at 64 hashes.
MAX_TREE_SIZE = (1 << 63) - 1
MAX_PROOF_HASHES = 64

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

NodeId = tuple[int, int]
"""``(level, idx)`` of a complete subtree; see the module docstring."""

NodeReader = Callable[[Collection[NodeId]], Mapping[NodeId, bytes]]
"""Returns the hash of every requested complete subtree (level 0: the leaf hash)."""


def leaf_hash(entry: bytes) -> bytes:
    """MTH({d(0)}) = SHA-256(0x00 || d(0)) — RFC 9162 §2.1.1."""
    return hashlib.sha256(_LEAF_PREFIX + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right) — RFC 9162 §2.1.1."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (``n >= 2``): RFC 9162's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaves(entries: Sequence[bytes]) -> bytes:
    """MTH(D[n]) by the recursive definition of RFC 9162 §2.1.1.

    The reference implementation: O(n) hashes and memory. Use it in tests and
    for small trees; the store computes roots from stored nodes instead.
    """
    return _mth([leaf_hash(e) for e in entries])


def _mth(hashes: Sequence[bytes]) -> bytes:
    if not hashes:
        return EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return node_hash(_mth(hashes[:k]), _mth(hashes[k:]))


# ---------------------------------------------------------------------------
# Ranges and the complete subtrees they are made of
# ---------------------------------------------------------------------------


def range_nodes(start: int, end: int) -> list[NodeId]:
    """The complete subtrees, left to right, whose right fold is MTH(D[start:end]).

    ``start`` must be a multiple of a power of two at least ``end - start``, which
    holds for every range RFC 9162's recursive definitions produce.
    """
    width = end - start
    if width <= 0 or start % (1 << (width - 1).bit_length()):
        raise LocalProtocolError(f"[{start}, {end}) is not a subtree range")
    nodes: list[NodeId] = []
    cursor = start
    for level in range(width.bit_length() - 1, -1, -1):
        if width >> level & 1:
            nodes.append((level, cursor >> level))
            cursor += 1 << level
    return nodes


def fold(hashes: Sequence[bytes]) -> bytes:
    """Right fold: node_hash(h0, node_hash(h1, ... node_hash(h[-2], h[-1]))).

    Applied to :func:`range_nodes` hashes this is MTH of the range.
    """
    if not hashes:
        return EMPTY_ROOT
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def frontier(size: int) -> list[NodeId]:
    """The right edge of a tree of ``size`` leaves: the complete subtrees that make up its root."""
    return range_nodes(0, size) if size else []


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTHs form PATH(index, D[size]) (RFC 9162 §2.1.3.1), leaf to root."""
    _check_sizes(size)
    if not 0 <= index < size:
        raise LocalProtocolError("leaf index outside the tree")
    ranges: list[tuple[int, int]] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
    ranges.reverse()
    return ranges


def consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTHs form PROOF(old_size, D[new_size]) (RFC 9162 §2.1.4.1).

    Empty when ``old_size`` is 0 or equal to ``new_size``: every tree extends
    the empty tree, and a tree is consistent with itself.
    """
    _check_sizes(old_size, new_size)
    if old_size > new_size:
        raise LocalProtocolError("old tree is larger than the new one")
    if old_size in (0, new_size):
        return []
    # SUBPROOF(m, D[start:start+n], b), unrolled; each step records the sibling.
    ranges: list[tuple[int, int]] = []
    m, n, start, have_old_root = old_size, new_size, 0, True
    while m != n:
        k = _split(n)
        if m <= k:
            ranges.append((start + k, start + n))
            n = k
        else:
            ranges.append((start, start + k))
            start, m, n, have_old_root = start + k, m - k, n - k, False
    if not have_old_root:
        ranges.append((start, start + n))
    ranges.reverse()
    return ranges


def _check_sizes(*sizes: int) -> None:
    for size in sizes:
        if not 0 <= size <= MAX_TREE_SIZE:
            raise LocalProtocolError("tree size out of range")


# ---------------------------------------------------------------------------
# Generation from stored nodes
# ---------------------------------------------------------------------------


def nodes_for(ranges: Iterable[tuple[int, int]]) -> list[list[NodeId]]:
    """The complete subtrees each range is made of (see :func:`range_nodes`)."""
    return [range_nodes(start, end) for start, end in ranges]


def hashes_for(ranges: Sequence[tuple[int, int]], read: NodeReader) -> list[bytes]:
    """MTH of each range, reading every node needed with one call to ``read``."""
    plan = nodes_for(ranges)
    # Called even when nothing is wanted, so a store can check the tree exists at all.
    got = read({node for nodes in plan for node in nodes})
    try:
        return [fold([got[node] for node in nodes]) for nodes in plan]
    except KeyError as exc:
        raise LocalProtocolError(f"node reader did not return node {exc.args[0]}") from None


def inclusion_proof(index: int, size: int, read: NodeReader) -> list[bytes]:
    """PATH(index, D[size]) of RFC 9162 §2.1.3.1 from stored complete subtrees."""
    return hashes_for(inclusion_ranges(index, size), read)


def consistency_proof(old_size: int, new_size: int, read: NodeReader) -> list[bytes]:
    """PROOF(old_size, D[new_size]) of RFC 9162 §2.1.4.1 from stored complete subtrees."""
    return hashes_for(consistency_ranges(old_size, new_size), read)


def root_hash(size: int, read: NodeReader) -> bytes:
    """MTH(D[size]) from stored complete subtrees (O(log size) of them)."""
    _check_sizes(size)
    return hashes_for([(0, size)], read)[0] if size else EMPTY_ROOT


# ---------------------------------------------------------------------------
# Appending: the compact range of the right edge
# ---------------------------------------------------------------------------

FrontierHashes = list[tuple[int, bytes]]
"""``(level, hash)`` of each :func:`frontier` node, left to right (levels strictly decreasing)."""


def append_leaves(
    size: int, edge: FrontierHashes, leaf_hashes: Iterable[bytes]
) -> tuple[FrontierHashes, list[tuple[int, int, bytes]]]:
    """Append leaves to a tree known only by its right edge.

    Returns the new right edge and every complete subtree of level >= 1 that
    the new leaves complete, as ``(level, idx, hash)``. Merging equal-level
    neighbours is the binary-counter construction of RFC 9162 §2.1.1's MTH for
    power-of-two widths; the result is the same tree as :func:`root_from_leaves`.
    """
    if [level for level, _ in edge] != [level for level, _ in frontier(size)]:
        raise LocalProtocolError("right edge does not match the tree size")
    stack = list(edge)
    completed: list[tuple[int, int, bytes]] = []
    n = size
    for h in leaf_hashes:
        stack.append((0, h))
        n += 1
        while len(stack) >= 2 and stack[-1][0] == stack[-2][0]:
            level, right = stack.pop()
            _, left = stack.pop()
            parent = node_hash(left, right)
            # The new node ends at leaf n - 1, so it is the (n >> (level + 1)) - 1'th of its level.
            completed.append((level + 1, (n >> (level + 1)) - 1, parent))
            stack.append((level + 1, parent))
    return stack, completed


def edge_root(edge: FrontierHashes) -> bytes:
    """MTH of the tree whose right edge is ``edge``."""
    return fold([h for _, h in edge])


# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------


def _hash_ok(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _size_ok(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TREE_SIZE


def _proof_ok(proof: object) -> bool:
    return (
        isinstance(proof, (list, tuple))
        and len(proof) <= MAX_PROOF_HASHES
        and all(_hash_ok(p) for p in proof)
    )


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf`` (a leaf *hash*) is leaf ``index`` of the tree ``(tree_size, root)``.

    RFC 9162 §2.1.3.2, step by step. Returns None or raises :class:`CryptoError`.
    """
    if not (
        _hash_ok(leaf)
        and _hash_ok(root)
        and _size_ok(index)
        and _size_ok(tree_size)
        and _proof_ok(proof)
    ):
        raise CryptoError()
    # 1. leaf_index >= tree_size fails.
    if index >= tree_size:
        raise CryptoError()
    # 2.-3.
    fn, sn, r = index, tree_size - 1, leaf
    # 4.
    for p in proof:
        if sn == 0:
            raise CryptoError()
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    # 5.
    if sn != 0 or not hmac.compare_digest(r, root):
        raise CryptoError()


def verify_consistency(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> None:
    """Check that the tree ``(new_size, new_root)`` extends ``(old_size, old_root)``.

    RFC 9162 §2.1.4.2 for ``0 < old_size < new_size``. The RFC leaves the
    trivial cases to the reader; like transparency-dev/merkle we accept only
    an *empty* proof for them, and additionally require that a size-0 tree has
    the empty root and that equal sizes have equal roots. Returns None or
    raises :class:`CryptoError`.
    """
    if not (
        _hash_ok(old_root)
        and _hash_ok(new_root)
        and _size_ok(old_size)
        and _size_ok(new_size)
        and _proof_ok(proof)
    ):
        raise CryptoError()
    if old_size > new_size:
        raise CryptoError()
    if old_size in (0, new_size):
        expected_old = EMPTY_ROOT if old_size == 0 else new_root
        if proof or not hmac.compare_digest(old_root, expected_old):
            raise CryptoError()
        return
    path = list(proof)
    # 1.
    if not path:
        raise CryptoError()
    # 2.
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    # 3.
    fn, sn = old_size - 1, new_size - 1
    # 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        if sn == 0:
            raise CryptoError()
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # 7. Compare both roots before deciding, so timing does not say which one differed.
    old_ok = hmac.compare_digest(fr, old_root)
    new_ok = hmac.compare_digest(sr, new_root)
    if not (old_ok and new_ok and sn == 0):
        raise CryptoError()
