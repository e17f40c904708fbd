"""Signing requests as a principal (RFC 9421), the client half of
:mod:`keybroker.api.signatures`.

The ``http-message-signatures`` library builds the signature base
(``prepare``) and writes ``Signature-Input``/``Signature`` (``apply``); the
signature itself is made by the identity keyset's handle, so the private key
never leaves :mod:`keybroker.keys`. Handles prefix their output with the
5-byte key-id header (``keybroker.keys.handles``); it is checked and removed,
and an ECDSA signature is converted from DER to the ``r || s`` form RFC 9421
§3.3.4 requires.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime

import httpx
from http_message_signatures import HTTPMessageSigner, algorithms

from keybroker.api.signatures import REQUIRED_COMPONENTS, TAG
from keybroker.errors import ConfigurationError
from keybroker.keys import ECDSA_P256, ED25519, Keyset


class RequestSigner:
    """Signs each request with a principal's identity keyset (Ed25519 or P-256)."""

    def __init__(self, principal: str, identity: Keyset, clock: Callable[[], datetime]) -> None:
        primary = identity.primary
        if primary is None:
            raise ConfigurationError("the identity keyset has no primary key")
        if primary.template == ED25519:
            self._algorithm: type[algorithms.HTTPSignatureAlgorithm] = algorithms.ED25519
        elif primary.template == ECDSA_P256:
            self._algorithm = algorithms.ECDSA_P256_SHA256
        else:
            raise ConfigurationError("identity keys are Ed25519 or ECDSA P-256")
        self._principal = principal
        self._handle = identity.signer()
        self._clock = clock

    def __repr__(self) -> str:
        return f"RequestSigner({self._principal!r}, {self._algorithm.algorithm_id})"

    def __call__(self, request: httpx.Request) -> None:
        signer = HTTPMessageSigner(signature_algorithm=self._algorithm)
        body = request.content
        prepared = signer.prepare(
            request,
            key_id=self._principal,
            created=self._clock(),
            nonce=secrets.token_urlsafe(24),
            tag=TAG,
            label="sig",
            covered_component_ids=REQUIRED_COMPONENTS,
            # With a body, the library adds Content-Digest (RFC 9530, SHA-256) and covers it.
            body=body if body else None,
        )
        # RFC 9421 names the key in ``keyid``: the signature is the algorithm's own bytes.
        signature = self._handle.sign_unprefixed(prepared.signature_base)
        if self._algorithm is algorithms.ECDSA_P256_SHA256:
            signature = algorithms.ECDSA_P256_SHA256.signature_from_der(signature)
        signer.apply(request, prepared, signature)
