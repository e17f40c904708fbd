"""Wire formats of ``/v1/keyless`` (S5 keyless TLS), shared with the key server's SDK.

The conventions of :mod:`keybroker.api.schemas` hold, except that an SKI is
written as 40 lower-case hex digits, as key servers, edges and operators write
it everywhere else (``openssl x509 -text`` shows it so). Like
:mod:`keybroker.api.schemas`, this module needs pydantic only.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import Field

from keybroker.api.schemas import Response

#: An SKI (RFC 5280 §4.2.1.2 method 1: SHA-1 of the subjectPublicKey), in hex.
SKI_PATTERN: Final = r"^[0-9a-f]{40}$"
SkiHex = Annotated[
    str, Field(pattern=SKI_PATTERN, examples=["5f2a0c0e9d8b7a6f5e4d3c2b1a0f9e8d7c6b5a49"])
]


class KeylessKeyOut(Response):
    """One served key (a primary or enabled version) and its policy."""

    version: int
    key_id: int
    state: str = Field(description="primary or enabled")
    template: str = Field(description="the version's TLS_* key template")
    key_type: str = Field(description="rsa-2048, rsa-3072, ecdsa-p256, ecdsa-p384 or ed25519")
    ski: SkiHex
    allow_decrypt: bool = Field(description="whether RSA_DECRYPT is allowed with this key")


class KeylessKeysetOut(Response):
    """One keyless keyset the calling key server holds, and who may use its keys."""

    keyset: str
    service: str
    keys: list[KeylessKeyOut]
    edges: list[str] = Field(description="active principals with a `use` grant on the keyset")


class KeylessKeys(Response):
    keysets: list[KeylessKeysetOut]
