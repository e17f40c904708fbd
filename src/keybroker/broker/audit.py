"""Checking the transparency log the way a CT monitor does.

:func:`verify_log` checks the latest signed tree head under the log's public
key and, given a head seen earlier, that the log only grew since (an RFC 9162
§2.1.4 consistency proof): a log that rewrote or dropped history, or forked to
show someone a different tree, fails here. With ``full=True`` it also
recomputes the root from every entry, the check an auditor holding the whole
log can make.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keybroker.errors import CryptoError
from keybroker.log import merkle
from keybroker.log.sth import ConsistencyProof, SignedTreeHead
from keybroker.log.store_log import TransparencyLog

_BATCH: Final = 1024


def verify_log(
    log: TransparencyLog,
    public_key: Ed25519PublicKey | bytes,
    *,
    previous: SignedTreeHead | None = None,
    full: bool = False,
) -> SignedTreeHead:
    """Return the latest tree head once it checks out; :class:`CryptoError` otherwise.

    Keep the returned head and pass it as ``previous`` next time.
    """
    head = log.tree_head()
    head.verify(public_key)
    if previous is not None:
        previous.verify(public_key)
        if previous.tree_size > head.tree_size:
            raise CryptoError()
        hashes = log.consistency_proof(previous.tree_size, head.tree_size)
        ConsistencyProof(previous.tree_size, head.tree_size, tuple(hashes)).verify(previous, head)
    if full and merkle.edge_root(_edge(log, head.tree_size)) != head.root_hash:
        raise CryptoError()
    return head


def _edge(log: TransparencyLog, size: int) -> merkle.FrontierHashes:
    edge: merkle.FrontierHashes = []
    for start in range(0, size, _BATCH):
        end = min(start + _BATCH, size)
        leaves = [merkle.leaf_hash(e) for e in log.entries(start, end)]
        edge, _ = merkle.append_leaves(start, edge, leaves)
    return edge
