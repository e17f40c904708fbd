"""keybroker.api: the broker's HTTP surface (FastAPI over ASGI).

``create_app(broker, settings)`` builds the application; one router per
resource lives in :mod:`keybroker.api.routes`. Operators authenticate with an
admin bearer token (:mod:`keybroker.api.admin`, created by ``keybroker
init`` through :func:`create_admin_credential`); principals sign every request
per RFC 9421 (:mod:`keybroker.api.signatures`, which says why not mTLS).
Errors are RFC 9457 problem documents (:mod:`keybroker.api.problems`);
request bodies are size-limited before any handler runs
(:mod:`keybroker.api.middleware`). Wire formats are in
:mod:`keybroker.api.schemas`, which the SDK (:mod:`keybroker.client`) shares.

The app keeps nothing that matters in memory: admin credentials and the
signature nonce cache are database tables, so N replicas serve one database.
"""

from keybroker.api.admin import (
    create_admin_credential,
    revoke_admin_credentials,
    verify_admin_token,
)
from keybroker.api.app import create_app
from keybroker.api.settings import ApiSettings

__all__ = [
    "ApiSettings",
    "create_admin_credential",
    "create_app",
    "revoke_admin_credentials",
    "verify_admin_token",
]
