"""What every router uses: security requirements for the OpenAPI document, paths."""

from __future__ import annotations

from typing import Any, Final

#: ``openapi_extra`` of routes an operator calls (Authorization: Bearer <admin token>).
ADMIN: Final[dict[str, Any]] = {"security": [{"adminToken": []}]}
#: ``openapi_extra`` of routes a principal calls with an RFC 9421 signature.
SIGNED: Final[dict[str, Any]] = {"security": [{"httpSignature": []}]}
#: Either of the two.
EITHER: Final[dict[str, Any]] = {"security": [{"adminToken": []}, {"httpSignature": []}]}
#: No credential at all.
PUBLIC: Final[dict[str, Any]] = {"security": []}
