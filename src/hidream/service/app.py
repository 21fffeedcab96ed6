"""The HTTP API, assembled: the routers, the context they share, and domain errors turned into envelopes, once."""

import asyncio
import logging
import secrets
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hidream.service import schemas
from hidream.service.context import ApiContext, envelope
from hidream.service.errors import ServiceError, TooManyRequests
from hidream.service.janitor import Janitor
from hidream.service.routes import (
    catalog,
    fal,
    files,
    health,
    media,
    openai,
    playground,
    predictions,
    refine,
    replicate,
    wavespeed,
)
from hidream.service.settings import Settings
from hidream.service.storage import Storage
from hidream.service.store import Store
from hidream.service.webhooks import WebhookSender
from hidream.service.worker import Worker

log = logging.getLogger("hidream.api")
ROUTERS = (predictions.router, media.router, catalog.router, files.router, openai.router, refine.router,
           wavespeed.router, replicate.router, fal.router, health.router, playground.router)


class BodyLimit:
    """ASGI middleware: 413 for a request body over the cap, whether declared or streamed.

    The body is read here, up to the cap, and replayed to the app.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = envelope(None, 413, f"body: larger than {self.max_bytes:,} bytes")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def webhook_body(ctx: ApiContext, row: dict[str, Any]) -> dict[str, Any]:
    """What a finished task's webhook carries: the shape of the API that made it (Replicate's prediction, fal's
    result message), else the native prediction."""
    surface = row["input"].get("surface")
    if surface == replicate.SURFACE:
        return replicate.render(ctx, row)
    if surface == fal.SURFACE:
        return fal.webhook_body(ctx, row)
    return ctx.renderer.one(row)


def add_error_handlers(app: FastAPI) -> None:
    """Every error of a native route becomes the envelope with its status (the OpenAI routes shape their own)."""

    @app.exception_handler(ServiceError)
    async def _service_error(_req: Request, err: ServiceError):
        resp = envelope(None, err.status, err.message)
        if isinstance(err, TooManyRequests):
            resp.headers["Retry-After"] = str(err.retry_after)
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, err: RequestValidationError):
        return envelope(None, 400, schemas.validation_message(list(err.errors()), schemas.QUERY_RULES))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, err: StarletteHTTPException):
        resp = envelope(None, err.status_code, str(err.detail))
        resp.headers.update(err.headers or {})  # a 405 carries Allow
        return resp

    @app.exception_handler(OperationalError)
    async def _database_down(_req: Request, err: OperationalError):
        log.warning("database unavailable: %s", str(err.orig or err).splitlines()[0][:200])
        resp = envelope(None, 503, "the database is unavailable; retry shortly")
        resp.headers["Retry-After"] = "5"
        return resp

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, err: Exception):
        rid = secrets.token_hex(6)
        log.exception("request %s failed", rid)
        return envelope(None, 500, f"internal error (request id {rid})")


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The generated schema, less FastAPI's 422 responses (validation failures here are 400s), with the
    request body's schema and the served model ids."""
    if app.openapi_schema is None:
        ctx: ApiContext = app.state.ctx
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in spec["paths"].values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        body = schemas.GenerateImageRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        served = [*ctx.settings.model_ids, *ctx.settings.aliases]
        body["properties"]["model"]["enum"] = served
        components["GenerateImageRequest"] = body
        for route in ("/v1/images/generations", "/v1/images/edits"):  # inline schemas of the OpenAI routes
            for media in spec["paths"][route]["post"]["requestBody"]["content"].values():
                media["schema"]["properties"]["model"]["enum"] = served
        app.openapi_schema = spec
    return app.openapi_schema


def create_app(settings: Settings, store: Store, storage: Storage, worker: Worker | None = None) -> FastAPI:
    """The API over a store and a storage; with `worker`, it runs in a thread for the app's lifetime."""
    ctx = ApiContext.build(settings, store, storage, worker)
    sender = WebhookSender(settings, store, lambda row: webhook_body(ctx, row), ctx.policy)
    janitor = Janitor(store, storage)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = None
        if worker is not None:
            thread = threading.Thread(target=worker.run, name="worker", daemon=True)
            thread.start()
        background = [asyncio.create_task(sender.run(), name="webhooks"),
                      asyncio.create_task(janitor.run(), name="janitor")]
        yield
        sender.stop()
        janitor.stop()
        await asyncio.gather(*background)
        if worker is not None and thread is not None:
            worker.stop()  # the running task stops at its next step and goes back to the queue
            await run_in_threadpool(thread.join)

    # FastAPIOffline: /docs and /redoc from files in the package, so they work with no network.
    app = FastAPIOffline(title="HiDream O1 image API", version="1.5", lifespan=lifespan,
                         description="The HiDream O1 1.5 image API, self-hosted on the open HiDream-O1-Image weights.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.state.ctx = ctx
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    playground.mount_static(app)
    app.openapi = lambda: openapi_schema(app)
    return app
