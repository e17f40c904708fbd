"""RFC 9457 problem details: every error the API answers is ``application/problem+json``.

``type`` is the stable URI of the error's branch of :mod:`keybroker.errors`
(``KeybrokerError.type_uri``); ``title`` names the type and never varies;
``detail`` says what happened in this occurrence. The few failures that
happen before keybroker code runs (unknown route, wrong method, malformed or
invalid body, too large a body, missing credentials) get types of their own,
defined here as branches of the same tree.

Server errors (5xx) never carry the exception's message: it may name
internals (a table, a driver error). They are logged with their traceback
server-side instead. Validation errors list where and why the body was
refused, but never echo the value sent: it may have been a token.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from keybroker.errors import (
    AuthorizationError,
    KeybrokerError,
    NotFound,
    RemoteProtocolError,
    StoreError,
)

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"

logger = logging.getLogger("keybroker.api")


# -- problem types of the HTTP layer itself ---------------------------------------------


class Unauthenticated(AuthorizationError):
    """No credentials, or credentials that do not verify (admin token, RFC 9421 signature)."""

    problem = "authentication"
    status = 401


class Replayed(Unauthenticated):
    """A signature nonce this principal used already."""

    problem = "authentication/replayed"


class MalformedRequest(RemoteProtocolError):
    """A body that is not JSON (or not parseable at all)."""

    problem = "request/malformed"


class InvalidRequest(RemoteProtocolError):
    """A well-formed request whose fields break the schema (unknown field, wrong type...)."""

    problem = "request/validation"
    status = 422

    def __init__(self, message: str, *, errors: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(message)
        self.errors = [dict(e) for e in errors]


class PayloadTooLarge(RemoteProtocolError):
    problem = "request/too-large"
    status = 413


class MethodNotAllowed(RemoteProtocolError):
    problem = "request/method-not-allowed"
    status = 405


class Unavailable(StoreError):
    """The database cannot be reached (health check)."""

    problem = "unavailable"
    status = 503


class InternalError(KeybrokerError):
    problem = "internal"
    status = 500


# -- the documents --------------------------------------------------------------------


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(title="Problem")

    type: str = Field(description="Stable URI naming the kind of problem")
    title: str = Field(description="Short summary of the problem type; the same every time")
    status: int = Field(ge=100, le=599, description="The HTTP status code")
    detail: str = Field(description="What went wrong this time")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: ('body', 'field', ...) or ('query', ...)")
    msg: str
    type: str


class ValidationProblem(Problem):
    """A problem with the fields that failed validation (values are never echoed)."""

    model_config = ConfigDict(title="ValidationProblem")

    errors: list[FieldError]


def _title(error: KeybrokerError) -> str:
    # "CertificateExpired" -> "Certificate expired": fixed per type, as RFC 9457 §3.1.3 asks.
    words = re.findall(r"[A-Z][a-z0-9]*|[a-z0-9]+", type(error).__name__)
    text = " ".join(words).lower()
    return text[:1].upper() + text[1:]


def problem_body(error: KeybrokerError, *, detail: str | None = None) -> dict[str, Any]:
    status = error.status
    if detail is None:
        detail = str(error) if status < 500 else HTTPStatus(status).phrase.lower()
    body: dict[str, Any] = {
        "type": error.type_uri,
        "title": _title(error),
        "status": status,
        "detail": detail or HTTPStatus(status).phrase,
    }
    if isinstance(error, InvalidRequest):
        body["errors"] = error.errors
    return body


def problem_response(
    error: KeybrokerError,
    *,
    detail: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    body = problem_body(error, detail=detail)
    if extra:
        body.update(extra)
    return JSONResponse(
        body, status_code=error.status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


def _auth_headers(error: KeybrokerError) -> dict[str, str] | None:
    if isinstance(error, Unauthenticated):
        # RFC 9110 §11.6.1 asks for a challenge on 401; RFC 9421 §5.1 lets us name
        # what a signature must cover.
        return {
            "WWW-Authenticate": 'Bearer realm="keybroker"',
            "Accept-Signature": (
                'sig=("@method" "@target-uri" "content-digest");created;nonce;tag="keybroker"'
            ),
        }
    return None


def _field_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        loc = [p if isinstance(p, int) else str(p) for p in e.get("loc", ())]
        out.append({"loc": loc, "msg": str(e.get("msg", "invalid")), "type": str(e.get("type"))})
    return out


# -- handlers -------------------------------------------------------------------------


async def _keybroker_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KeybrokerError)
    if exc.status >= 500:
        logger.error(
            "%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc
        )
    return problem_response(exc, headers=_auth_headers(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return problem_response(MalformedRequest("the request body is not valid JSON"))
    return problem_response(
        InvalidRequest("the request does not match the schema", errors=_field_errors(errors))
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    error: KeybrokerError
    if status == 404:
        error = NotFound(f"no route {request.url.path}")
    elif status == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    elif status == 400:
        error = MalformedRequest("the request body could not be parsed")
    elif status == 422:
        error = InvalidRequest("the request does not match the schema")
    else:
        error = InternalError() if status >= 500 else RemoteProtocolError(HTTPStatus(status).phrase)
        error.status = status
    return problem_response(error, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error(
        "%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc
    )
    return problem_response(InternalError("internal error"))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(KeybrokerError, _keybroker_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status a problem it may answer with.

    The content is filled in by :func:`keybroker.api.app.openapi_document`
    (every 4xx/5xx is ``application/problem+json``).
    """
    return {s: {"description": HTTPStatus(s).phrase} for s in sorted({*statuses, 500})}
