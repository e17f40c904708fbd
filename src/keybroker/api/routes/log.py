"""The transparency log: signed tree heads, entries, inclusion and consistency proofs.

Readable by operators and by any enrolled principal (the entries name
principals, keysets and grants: metadata the broker does not publish to the
world). The log's Ed25519 public key is public, so clients can pin it at
enrolment and check every tree head themselves.
"""

from __future__ import annotations

from typing import Annotated, Final

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import APIRouter, Query

from keybroker.api.auth import AnyReader, Context
from keybroker.api.problems import InvalidRequest, documented
from keybroker.api.routes._common import EITHER, PUBLIC
from keybroker.api.schemas import (
    ConsistencyProofOut,
    InclusionProofOut,
    LogEntries,
    LogPublicKey,
    TreeHeadOut,
)
from keybroker.log.merkle import MAX_TREE_SIZE
from keybroker.log.sth import key_id_for

router = APIRouter(tags=["log"])

#: Most entries one request returns.
MAX_ENTRIES: Final = 1000
Size = Annotated[int, Query(ge=0, le=MAX_TREE_SIZE)]


@router.get(
    "/v1/log/public-key",
    response_model=LogPublicKey,
    responses=documented(),
    openapi_extra=PUBLIC,
    summary="The Ed25519 key that signs tree heads",
)
def public_key(ctx: Context) -> LogPublicKey:
    key = ctx.broker.log_public_key
    return LogPublicKey(
        algorithm="ed25519",
        key_id=key_id_for(key),
        public_key=key.public_bytes(Encoding.Raw, PublicFormat.Raw),
        public_key_pem=key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode(),
    )


@router.get(
    "/v1/log/tree-head",
    response_model=TreeHeadOut,
    responses=documented(401, 403, 404, 422),
    openapi_extra=EITHER,
    summary="The latest signed tree head, or the one at exactly `tree_size`",
)
def tree_head(ctx: Context, _: AnyReader, tree_size: Size | None = None) -> TreeHeadOut:
    head = ctx.broker.log.tree_head(tree_size)
    return TreeHeadOut(
        tree_size=head.tree_size,
        root_hash=head.root_hash,
        timestamp_ms=head.timestamp_ms,
        key_id=head.key_id,
        signature=head.signature,
    )


@router.get(
    "/v1/log/entries",
    response_model=LogEntries,
    responses=documented(400, 401, 403, 404, 422),
    openapi_extra=EITHER,
    summary=f"Entries `start` to `end - 1` (at most {MAX_ENTRIES})",
)
def entries(ctx: Context, _: AnyReader, start: Size, end: Size) -> LogEntries:
    if not start <= end <= start + MAX_ENTRIES:
        raise InvalidRequest(
            f"need start <= end <= start + {MAX_ENTRIES}",
            errors=[{"loc": ["query", "end"], "msg": "out of range", "type": "value_error"}],
        )
    return LogEntries(start=start, entries=ctx.broker.log.entries(start, end))


@router.get(
    "/v1/log/proofs/inclusion",
    response_model=InclusionProofOut,
    responses=documented(401, 403, 404, 422),
    openapi_extra=EITHER,
    summary="RFC 9162 §2.1.3 inclusion proof of entry `index` in the tree of `tree_size`",
)
def inclusion_proof(ctx: Context, _: AnyReader, index: Size, tree_size: Size) -> InclusionProofOut:
    hashes = ctx.broker.log.inclusion_proof(index, tree_size)
    return InclusionProofOut(leaf_index=index, tree_size=tree_size, hashes=hashes)


@router.get(
    "/v1/log/proofs/consistency",
    response_model=ConsistencyProofOut,
    responses=documented(401, 403, 404, 422),
    openapi_extra=EITHER,
    summary="RFC 9162 §2.1.4 consistency proof between trees of `first` and `second` entries",
)
def consistency_proof(ctx: Context, _: AnyReader, first: Size, second: Size) -> ConsistencyProofOut:
    hashes = ctx.broker.log.consistency_proof(first, second)
    return ConsistencyProofOut(old_size=first, new_size=second, hashes=hashes)
