"""RFC 9162 transparency log: Merkle tree hashing and proofs, signed tree heads, the stored log.

* :mod:`keybroker.log.merkle` — pure tree hashing, proof generation from stored
  subtrees, and proof verification (RFC 9162 §2.1).
* :mod:`keybroker.log.sth` — :class:`SignedTreeHead`, the proof messages, and the
  :class:`TreeHeadSigner` the log signs with.
* :mod:`keybroker.log.store_log` — :class:`TransparencyLog`, the log in the store.
"""

from __future__ import annotations

from keybroker.log.merkle import (
    EMPTY_ROOT,
    leaf_hash,
    node_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)
from keybroker.log.sth import (
    ConsistencyProof,
    Ed25519TreeHeadSigner,
    InclusionProof,
    SignedTreeHead,
    TreeHeadSigner,
)
from keybroker.log.store_log import TransparencyLog

__all__ = [
    "EMPTY_ROOT",
    "ConsistencyProof",
    "Ed25519TreeHeadSigner",
    "InclusionProof",
    "SignedTreeHead",
    "TransparencyLog",
    "TreeHeadSigner",
    "leaf_hash",
    "node_hash",
    "root_from_leaves",
    "verify_consistency",
    "verify_inclusion",
]
