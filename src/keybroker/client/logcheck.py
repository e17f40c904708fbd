"""Checking the broker's transparency log from outside, the way a CT monitor does.

Nothing the broker says about its log is taken on trust: every tree head's
signature is checked against the log key pinned at enrolment (or given by the
caller), every inclusion and consistency proof is recomputed here with
:mod:`keybroker.log.merkle` (RFC 9162 §2.1.3.2 / §2.1.4.2). Keep the head
:meth:`LogClient.check` returns and pass it back next time: a log that
rewrote, dropped or forked its history fails there.
"""

from __future__ import annotations

from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel

from keybroker.api import schemas
from keybroker.client._http import Connection, RequestHook
from keybroker.errors import CryptoError
from keybroker.log import merkle
from keybroker.log.sth import ConsistencyProof, InclusionProof, SignedTreeHead

_M = TypeVar("_M", bound=BaseModel)


def _public_key(raw: bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    if isinstance(raw, Ed25519PublicKey):
        return raw
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise CryptoError() from None


class LogClient:
    """Reads and verifies the log through the API (as an operator or a principal)."""

    def __init__(
        self,
        connection: Connection,
        public_key: bytes | Ed25519PublicKey,
        *,
        headers: dict[str, str] | None = None,
        hook: RequestHook | None = None,
    ) -> None:
        self._conn = connection
        self._key = _public_key(public_key)
        self._headers = headers
        self._hook = hook

    def __repr__(self) -> str:
        return f"LogClient({self._conn.url!r})"

    async def _get(self, model: type[_M], path: str, **params: int | None) -> _M:
        return await self._conn.call(
            model, "GET", path, params=params, headers=self._headers, hook=self._hook
        )

    async def tree_head(self, tree_size: int | None = None) -> SignedTreeHead:
        """The latest signed tree head (or the one at ``tree_size``), signature checked."""
        out = await self._get(schemas.TreeHeadOut, "/v1/log/tree-head", tree_size=tree_size)
        head = SignedTreeHead(
            tree_size=out.tree_size,
            root_hash=out.root_hash,
            timestamp_ms=out.timestamp_ms,
            key_id=out.key_id,
            signature=out.signature,
        )
        head.verify(self._key)
        if tree_size is not None and head.tree_size != tree_size:
            raise CryptoError()
        return head

    async def entries(self, start: int, end: int) -> list[bytes]:
        out = await self._get(schemas.LogEntries, "/v1/log/entries", start=start, end=end)
        if out.start != start or len(out.entries) != end - start:
            raise CryptoError()
        return list(out.entries)

    async def verify_inclusion(self, index: int, head: SignedTreeHead) -> bytes:
        """Fetch entry ``index``, prove it is in ``head``'s tree; return the entry."""
        head.verify(self._key)
        (entry,) = await self.entries(index, index + 1)
        out = await self._get(
            schemas.InclusionProofOut,
            "/v1/log/proofs/inclusion",
            index=index,
            tree_size=head.tree_size,
        )
        InclusionProof(out.leaf_index, out.tree_size, tuple(out.hashes)).verify(
            merkle.leaf_hash(entry), head
        )
        return entry

    async def verify_consistency(self, old: SignedTreeHead, new: SignedTreeHead) -> None:
        """Prove ``new``'s tree extends ``old``'s (RFC 9162 §2.1.4)."""
        old.verify(self._key)
        new.verify(self._key)
        if old.tree_size > new.tree_size:
            raise CryptoError()
        out = await self._get(
            schemas.ConsistencyProofOut,
            "/v1/log/proofs/consistency",
            first=old.tree_size,
            second=new.tree_size,
        )
        ConsistencyProof(out.old_size, out.new_size, tuple(out.hashes)).verify(old, new)

    async def check(self, previous: SignedTreeHead | None = None) -> SignedTreeHead:
        """The latest head, verified, and proven consistent with ``previous`` if given."""
        head = await self.tree_head()
        if previous is not None:
            await self.verify_consistency(previous, head)
        return head
