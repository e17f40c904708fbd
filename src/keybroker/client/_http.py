"""The SDK's one HTTP connection: httpx over TLS pinned to the broker CA, problems as errors.

Every non-2xx answer is an RFC 9457 problem; :func:`raise_for_problem` turns
its ``type`` back into the :mod:`keybroker.errors` class the server raised (or
the API's own, :mod:`keybroker.api.problems`), so a caller catches
``AuthorizationError`` on either side of the wire. Network failures become
:class:`~keybroker.errors.TransportError`.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

import keybroker.api.problems  # noqa: F401  (registers the API's problem types below)
from keybroker import __version__
from keybroker.errors import (
    ConfigurationError,
    KeybrokerError,
    RemoteProtocolError,
    TransportError,
)

DEFAULT_TIMEOUT: Final = 30.0
_M = TypeVar("_M", bound=BaseModel)

#: Called with each request just before it is sent (to sign it).
RequestHook = Callable[[httpx.Request], None]


def _subclasses(cls: type[KeybrokerError]) -> Iterator[type[KeybrokerError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


def _problem_classes() -> dict[str, type[KeybrokerError]]:
    out: dict[str, type[KeybrokerError]] = {}
    for cls in _subclasses(KeybrokerError):
        # Every class in the tree takes its message as the one positional argument.
        out.setdefault(cls("").type_uri, cls)
    return out


_PROBLEMS: Final = _problem_classes()


def raise_for_problem(response: httpx.Response) -> None:
    """Return if ``response`` succeeded; raise the error its problem document names."""
    if response.is_success:
        return
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        cls: type[KeybrokerError] = TransportError if status >= 500 else RemoteProtocolError
        raise cls(f"HTTP {status} without a problem document")
    cls = _PROBLEMS.get(body["type"], TransportError if status >= 500 else RemoteProtocolError)
    detail = body.get("detail")
    error = cls(detail if isinstance(detail, str) else f"HTTP {status}")
    error.add_note(f"HTTP {status} {body['type']}")
    raise error


def ssl_context(ca_pem: bytes | str) -> ssl.SSLContext:
    """Trust exactly the broker CA (not the system store), hostnames checked."""
    text = ca_pem.decode("ascii") if isinstance(ca_pem, bytes) else ca_pem
    try:
        return ssl.create_default_context(cadata=text)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigurationError("the broker CA certificate is not valid PEM") from exc


class Connection:
    """One ``httpx.AsyncClient`` to the broker. ``transport`` replaces the network (tests)."""

    def __init__(
        self,
        url: str,
        ca_pem: bytes | str | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if ca_pem is None and transport is None:
            raise ConfigurationError("the broker CA certificate is needed to pin TLS")
        verify: ssl.SSLContext | bool = ssl_context(ca_pem) if ca_pem is not None else True
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url,
            verify=verify,
            transport=transport,
            timeout=timeout,
            follow_redirects=False,
            headers={"user-agent": f"keybroker-sdk/{__version__}"},
        )

    def __repr__(self) -> str:
        return f"Connection({self.url!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        hook: RequestHook | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        content = None
        all_headers = dict(headers or {})
        if body is not None:
            content = json.dumps(body.model_dump(mode="json"), separators=(",", ":")).encode()
            all_headers["content-type"] = "application/json"
        request = self._http.build_request(
            method,
            path,
            content=content,
            params={k: v for k, v in (params or {}).items() if v is not None},
            headers=all_headers,
            timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        if hook is not None:
            hook(request)
        try:
            response = await self._http.send(request)
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {path}: {type(exc).__name__}") from exc
        raise_for_problem(response)
        return response

    async def call(
        self,
        model: type[_M],
        method: str,
        path: str,
        **kwargs: Any,
    ) -> _M:
        response = await self.send(method, path, **kwargs)
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise RemoteProtocolError(
                f"{method} {path}: the broker answered an unexpected document"
            ) from exc

    async def text(self, path: str) -> str:
        return (await self.send("GET", path)).text
