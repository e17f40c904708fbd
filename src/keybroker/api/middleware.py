"""Two pure ASGI middlewares: request body limit, and Prometheus request metrics.

The body limit is enforced before any application code reads a byte: a
``Content-Length`` above the limit is refused at once, and a body without one
(chunked) is buffered only up to the limit — past it the request is refused
and the rest never read. Either way the answer is a 413 problem and nothing
reached a handler, so nothing changed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keybroker.api.problems import PayloadTooLarge, problem_response
from keybroker.store.engine import Store
from keybroker.store.schema import DELIVERY_STATES, deliveries

_UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # Disconnected before the body ended: let the app see that.
                await self.app(scope, _replay([], message, receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], None, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            PayloadTooLarge(f"request bodies are limited to {self.max_bytes} bytes"),
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(messages: list[Message], last: Message | None, receive: Receive) -> Receive:
    pending = list(messages) + ([last] if last is not None else [])

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()  # http.disconnect, for long-polls that watch for it

    return replay


class Metrics:
    """Counts and times requests by method, route template and status."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "keybroker_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "keybroker_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template",
            ["method", "route"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            # Route templates, never raw paths: one series per endpoint, whatever is asked.
            label = getattr(route, "path", _UNMATCHED) if route is not None else _UNMATCHED
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.requests.labels(method, label, str(status)).inc()
            self.latency.labels(method, label).observe(time.perf_counter() - started)


class DeliveryStates(Collector):
    """``keybroker_deliveries{state}``: counted in the database at scrape time, so every
    replica reports the same numbers."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("keybroker_deliveries", "Deliveries by state", labels=["state"])
        with self._store.snapshot() as conn:
            rows = conn.execute(
                sa.select(deliveries.c.state, sa.func.count()).group_by(deliveries.c.state)
            )
            counts = {str(state): int(n) for state, n in rows}
        for state in DELIVERY_STATES:
            family.add_metric([state], float(counts.get(state, 0)))
        yield family

    def describe(self) -> Iterable[Metric]:
        # Registering must not query the database.
        return [GaugeMetricFamily("keybroker_deliveries", "Deliveries by state", labels=["state"])]
