"""The application factory and its OpenAPI document."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware import Middleware
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry

from keybroker import __version__
from keybroker.api.auth import ApiContext
from keybroker.api.middleware import DeliveryStates, Metrics
from keybroker.api.problems import (
    PROBLEM_MEDIA_TYPE,
    Problem,
    ValidationProblem,
    install_handlers,
)
from keybroker.api.rotation_loop import RotationLoop
from keybroker.api.routes import (
    deliveries,
    enrolment,
    grants,
    holdings,
    keyless,
    keysets,
    log,
    pairing,
    principals,
    pushauth,
    rotation,
    system,
)
from keybroker.api.settings import ApiSettings
from keybroker.api.signatures import NonceCache
from keybroker.broker import Broker
from keybroker.flows.pushauth.server import PushAuthServer

logger = logging.getLogger("keybroker.api")

#: How long start-up waits for the push answers subscription before serving anyway.
ANSWERS_STARTUP_SECONDS = 10

DESCRIPTION = """\
The keybroker trusted party over HTTPS.

* **Operators** send `Authorization: Bearer <admin token>` (made by `keybroker init`).
* **Principals** sign every request with their enrolled identity key, per RFC 9421
  HTTP Message Signatures: `keyid` is the principal id, `tag="keybroker"`, covering
  `@method`, `@target-uri` and (with a body) `content-digest` (RFC 9530), with
  `created` and a single-use `nonce`.
* Every error is an RFC 9457 `application/problem+json` document whose `type` is
  stable.
"""


def _operation_id(route: APIRoute) -> str:
    return route.name


async def _until_listening(listening: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Wait until the push answers listener is subscribed (phones are told to publish
    there as soon as the API is up); if it fails first, raise its error. After
    ``ANSWERS_STARTUP_SECONDS`` serve anyway: it keeps trying, and phones whose answer
    on the bus is not taken post it over HTTPS."""
    waiting = asyncio.ensure_future(listening.wait())
    done, _ = await asyncio.wait(
        {waiting, task}, timeout=ANSWERS_STARTUP_SECONDS, return_when=asyncio.FIRST_COMPLETED
    )
    waiting.cancel()
    if task in done:
        task.result()
    elif not done:
        logger.warning(
            "not yet subscribed to the push answers topic after %d s; serving anyway",
            ANSWERS_STARTUP_SECONDS,
        )


def create_app(broker: Broker, settings: ApiSettings | None = None) -> FastAPI:
    """The API for ``broker``. Holds no state of its own beyond caches that may be lost:
    any number of these, in any number of processes, may serve one database."""
    settings = settings or ApiSettings()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(DeliveryStates(broker.store))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx: ApiContext = app.state.keybroker
        if settings.bus_url is not None:
            from keybroker.api.wakeups import BusWakeups

            ctx.wakeups = await BusWakeups.start(settings.bus_url, settings.wake_topic, ctx.waker)
        if settings.bus_url is not None:
            from keybroker.bus import open_bus

            ctx.push_bus = await open_bus(settings.bus_url)
            listening = asyncio.Event()
            app.state.push_answers = asyncio.create_task(
                pushauth.listen_for_answers(ctx, ctx.push_bus, listening),
                name="pushauth-answers",
            )
            await _until_listening(listening, app.state.push_answers)
        if settings.rotation_interval > 0:
            app.state.rotation_loop = RotationLoop(ctx, settings.rotation_interval).start()
        try:
            yield
        finally:
            if app.state.rotation_loop is not None:
                await app.state.rotation_loop.close()
                app.state.rotation_loop = None
            if ctx.wakeups is not None:
                await ctx.wakeups.close()
                ctx.wakeups = None
            if app.state.push_answers is not None:
                app.state.push_answers.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await app.state.push_answers
                app.state.push_answers = None
            if ctx.push_bus is not None:
                await ctx.push_bus.close()
                ctx.push_bus = None

    app = FastAPI(
        lifespan=lifespan,
        title=settings.title,
        version=__version__,
        description=DESCRIPTION,
        redirect_slashes=False,
        generate_unique_id_function=_operation_id,
        middleware=[
            Middleware(Metrics, registry=registry),
            Middleware(
                rotation.TopologyBodyLimit,
                store=broker.store,
                max_bytes=settings.max_body_bytes,
                max_topology_bytes=settings.max_topology_bytes,
            ),
        ],
    )
    app.state.keybroker = ApiContext(
        broker=broker,
        settings=settings,
        nonces=NonceCache(broker.store, settings.signature_max_skew),
        pushauth=PushAuthServer(broker, settings.push_policy),
    )
    app.state.metrics = registry
    app.state.rotation_loop = None
    app.state.push_answers = None
    install_handlers(app)
    routers = (
        system,
        enrolment,
        principals,
        keysets,
        grants,
        deliveries,
        holdings,
        log,
        rotation,
        keyless,
        pushauth,
        pairing,
    )
    for module in routers:
        app.include_router(module.router)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    return app


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with every 4xx/5xx answer as ``application/problem+json``
    and the two credentials described as security schemes."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    ref = "#/components/schemas/{model}"
    for model in (Problem, ValidationProblem):
        schema = model.model_json_schema(ref_template=ref)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    # FastAPI's own 422 schema is replaced by ValidationProblem everywhere.
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            for code, response in responses.items():
                if str(code)[0] in "45":
                    name = "ValidationProblem" if str(code) == "422" else "Problem"
                    response["content"] = {
                        PROBLEM_MEDIA_TYPE: {"schema": {"$ref": ref.format(model=name)}}
                    }
    components["securitySchemes"] = {
        "adminToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "Operator credential created by `keybroker init` (`kbadm_…`).",
        },
        "httpSignature": {
            "type": "apiKey",
            "in": "header",
            "name": "Signature",
            "description": (
                "RFC 9421 HTTP Message Signature (with its `Signature-Input` header) by the "
                "principal's enrolled identity key; see the API description for the profile."
            ),
        },
    }
    app.openapi_schema = doc
    return doc
