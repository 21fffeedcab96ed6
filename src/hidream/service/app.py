"""The HTTP API: routes, auth, the response envelope; domain errors become status codes here, once."""

import asyncio
import base64
import hashlib
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.formparsers import MultiPartException
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from hidream.service import schemas
from hidream.service.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from hidream.service.fetch import FetchPolicy, ImageInfo, check_image, check_target, decode_data_uri, fetch_image
from hidream.service.predictions import MIME, Renderer, progress_of
from hidream.service.settings import Settings
from hidream.service.storage import Storage, UrlSigner
from hidream.service.store import IdempotentReplay, Limits, Store
from hidream.service.webhooks import WebhookSender, key_secret
from hidream.service.worker import Worker
from hidream.sizes import fit_size

log = logging.getLogger("hidream.api")
EXTENSIONS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
KEEP_ASPECT_SIDE = 2048
CANCEL_WAIT_S = 5.0  # how long a cancel of a running prediction waits for its worker to stop
STREAM_POLL_S = 0.2  # how often the progress stream reads the prediction (from the database: any replica)
KEEPALIVE_S = 15.0
TERMINAL = ("completed", "failed")
STATIC = Path(__file__).parent / "static"  # the web playground: plain files, no build step


def envelope(data: Any, status: int = 200, message: str = "success", **extra: Any) -> JSONResponse:
    return JSONResponse({"code": status, "message": message, "data": data, **extra}, status_code=status)


class BodyLimit:
    """ASGI middleware: 413 for a request body over the cap, whether declared or streamed.

    The body is read here, up to the cap, and replayed to the app.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = JSONResponse({"code": 413, "message": f"body: larger than {self.max_bytes:,} bytes",
                                "data": None}, status_code=413)
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


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key header, checked; None without one."""
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    if not 1 <= len(value) <= 255 or not all(32 <= ord(ch) < 127 for ch in value):
        raise BadRequest("Idempotency-Key: must be 1 to 255 printable ASCII characters")
    return value


def fingerprint(route: str, body: dict[str, Any]) -> str:
    """What a replay must match to get the first request's prediction: the route and the parsed body."""
    return hashlib.sha256(json.dumps([route, body], sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class ApiContext:
    """What a group of routes needs from the app: other modules' routes (the OpenAI ones) get this."""

    settings: Settings
    store: Store
    storage: Storage
    signer: UrlSigner
    policy: FetchPolicy
    renderer: Renderer
    # submit(key_id, body, references, shown_urls, idempotency) -> the task row (a replay's, if any);
    # references None: fetch body.reference_image_urls.
    submit: Callable[..., Awaitable[dict[str, Any]]]
    wait_for: Callable[[str, float], Awaitable[dict[str, Any]]]
    key_for_token: Callable[[str | None], str]  # the key id, or Unauthorized


# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at definition time.
def create_app(settings: Settings, store: Store, storage: Storage, worker: Worker | None = None) -> FastAPI:
    """The API over a store and a storage; with `worker`, it runs in a thread for the app's lifetime."""
    signer = UrlSigner(settings.signing_secret(), settings.base_url, settings.url_ttl_s)
    policy = FetchPolicy(timeout_s=settings.fetch_timeout_s, max_bytes=settings.max_upload_bytes,
                         max_pixels=settings.max_upload_pixels, allow_networks=settings.fetch_allow)

    renderer = Renderer(settings, store, storage, signer)
    render = renderer.one
    sender = WebhookSender(settings, store, render, policy)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = None
        if worker is not None:
            thread = threading.Thread(target=worker.run, name="worker", daemon=True)
            thread.start()
        sending = asyncio.create_task(sender.run(), name="webhooks")
        yield
        sender.stop()
        await sending
        if worker is not None and thread is not None:
            worker.stop()  # the running task stops at its next step and goes back to the queue
            await run_in_threadpool(thread.join)

    app = FastAPI(title="HiDream O1 image API", version="1.5", lifespan=lifespan,
                  description="The HiDream O1 1.5 image API, self-hosted on the open HiDream-O1-Image weights.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.state.settings, app.state.store, app.state.storage, app.state.worker = settings, store, storage, worker

    @app.exception_handler(ServiceError)
    async def _service_error(_req: Request, err: ServiceError):
        headers = {"Retry-After": str(err.retry_after)} if isinstance(err, TooManyRequests) else None
        resp = envelope(None, err.status, err.message)
        if headers:
            resp.headers.update(headers)
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, err: RequestValidationError):
        return envelope(None, 400, schemas.validation_message(list(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, err: StarletteHTTPException):
        return envelope(None, err.status_code, str(err.detail))

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

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")

    def key_for_token(token: str | None) -> str:
        if token is None or not token.strip():
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        key_id = store.key_for_token(token.strip())
        if key_id is None:
            raise Unauthorized("invalid or revoked API key")
        return key_id

    def api_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        return key_for_token(credentials.credentials if credentials is not None else None)

    Key = Annotated[str, Depends(api_key)]

    def owns(blob: str, key_id: str) -> bool:
        """Whether `blob` is this key's upload, or an output of one of its predictions (to edit it further)."""
        if blob.startswith("uploads/"):
            return store.upload_owner(blob) == key_id
        if blob.startswith("outputs/"):
            row = store.get_task(blob.split("/")[1], key_id)
            return row is not None and blob in row["outputs"]
        return False

    async def reference(url: str, field: str, key_id: str) -> tuple[bytes, ImageInfo]:
        """The bytes of one reference image, checked to decode within the caps."""
        if url.startswith("data:"):
            data = decode_data_uri(url, policy, field)
        elif (blob := signer.key_of(url)) is not None:
            if not await run_in_threadpool(owns, blob, key_id):
                raise BadRequest(f"{field}: {url[:200]} is not a file this API key uploaded or generated")
            data = await run_in_threadpool(storage.get, blob)
        elif url.startswith(("http://", "https://")):
            data = await fetch_image(url, policy, field)
        else:
            raise BadRequest(f"{field}: must be an http(s) URL, a data: URI or a URL from uploadMedia "
                             f"(got {url[:80]!r})")
        return data, await run_in_threadpool(check_image, data, policy, field)

    @app.post("/api/v1/model/generateImage", response_model=schemas.PredictionEnvelope,
              responses={400: {"model": schemas.ErrorEnvelope}, 401: {"model": schemas.ErrorEnvelope},
                         413: {"model": schemas.ErrorEnvelope}, 429: {"model": schemas.ErrorEnvelope}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/GenerateImageRequest"}}}}})
    async def generate_image(request: Request, key_id: Key):
        """Submit a generation; poll `urls.get`, or set enable_sync_mode to wait for the result."""
        # The body is parsed here, after the key was checked: no key is a 401 whatever the body.
        idem = idempotency_key(request)
        try:
            body = schemas.GenerateImageRequest.model_validate_json(await request.body())
        except ValidationError as err:
            raise BadRequest(schemas.validation_message(err)) from None
        idempotency = (idem, fingerprint("generateImage", body.model_dump(mode="json"))) if idem else None
        row = await submit(key_id, body, idempotency=idempotency)
        if body.enable_sync_mode:
            row = await wait_for(row["id"], settings.sync_timeout_s)
        return envelope(await run_in_threadpool(render, row))

    async def submit(key_id: str, body: schemas.GenerateImageRequest,
                     references: list[tuple[bytes, ImageInfo]] | None = None, shown_urls: list[str] | None = None,
                     idempotency: tuple[str, str] | None = None) -> dict[str, Any]:
        """Validate what the schema cannot, store the references and queue the task; its row.

        With `idempotency` (key, request hash) already used by this API key: the first request's task.
        """
        if worker is not None and worker.load_error is not None:
            raise Unavailable(f"no model loaded: {worker.load_error}")
        model = settings.resolve_model_id(body.model)
        if model is None:
            served = ", ".join([*settings.model_ids, *settings.aliases])
            raise BadRequest(f"model: must be one of {served} (got {body.model!r})")
        try:
            width, height = schemas.resolve_size(body.image_size)
        except ValueError:
            raise BadRequest(f"image_size: {schemas.RULES['image_size']}") from None
        if idempotency is not None:  # a replay costs no fetch
            earlier = await run_in_threadpool(store.idempotent_task, key_id, *idempotency)
            if earlier is not None:
                return earlier
        if body.webhook_url is not None:
            await check_target(body.webhook_url, policy, "webhook_url")
        if references is None:
            references = list(await asyncio.gather(*(reference(u, f"reference_image_urls[{i}]", key_id)
                                                     for i, u in enumerate(body.reference_image_urls))))
            shown_urls = [u if not u.startswith("data:") else f"data: URI ({len(u):,} characters)"
                          for u in body.reference_image_urls]
        refs = [data for data, _ in references]
        if body.keep_original_aspect and len(references) == 1:
            try:
                width, height = fit_size(references[0][1].width, references[0][1].height, KEEP_ASPECT_SIDE)
            except ValueError:
                raise BadRequest("reference_image_urls[0]: its aspect ratio is too extreme for "
                                 "keep_original_aspect (a side would be under 32 pixels)") from None
        seed = body.seed if body.seed >= 0 else secrets.randbelow(schemas.MAX_SEED + 1)
        mode = ("text-to-image", "edit")[len(refs)] if len(refs) < 2 else "personalization"
        task_id = secrets.token_hex(16)
        ref_keys = [f"references/{task_id}/{i}.{EXTENSIONS[info.format]}" for i, (_, info) in enumerate(references)]
        steps, guidance = settings.recipe_defaults
        inp = body.model_dump(exclude={"model", "image_size", "webhook_url"}) | {
            "image_size": body.image_size if isinstance(body.image_size, str) else body.image_size.model_dump(),
            "width": width, "height": height, "seed": seed, "mode": mode, "reference_image_urls": shown_urls or [],
            "num_inference_steps": body.num_inference_steps or steps,
            "guidance_scale": guidance if body.guidance_scale is None else body.guidance_scale}

        def persist() -> dict[str, Any]:
            for key, data in zip(ref_keys, refs, strict=True):
                storage.put(key, data)
            try:
                return store.insert_task(key_id, model, inp, ref_keys, settings.max_queue, task_id=task_id,
                                         webhook_url=body.webhook_url, idempotency=idempotency, limits=limits)
            except IdempotentReplay as replay:  # a concurrent request with the same key got there first
                for key in ref_keys:
                    storage.delete(key)
                return store.get_task(replay.task_id)
            except BaseException:
                for key in ref_keys:  # a rejected request leaves nothing behind
                    storage.delete(key)
                raise

        return await run_in_threadpool(persist)

    limits = Limits(settings.rate_per_minute, settings.max_concurrent)

    async def wait_for(task_id: str, timeout_s: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            row = await run_in_threadpool(store.get_task, task_id)
            if row["status"] in TERMINAL or loop.time() >= deadline:
                return row
            await asyncio.sleep(0.05)

    async def owned(prediction_id: str, key_id: str) -> dict[str, Any]:
        row = await run_in_threadpool(store.get_task, prediction_id, key_id)
        if row is None:
            raise NotFound(f"prediction {prediction_id[:64]!r} not found")
        return row

    @app.get("/api/v1/model/prediction/{prediction_id}", response_model=schemas.PredictionEnvelope,
             responses={401: {"model": schemas.ErrorEnvelope}, 404: {"model": schemas.ErrorEnvelope}})
    def get_prediction(prediction_id: str, key_id: Key):
        """A prediction of this key; another key's id is 404, as an unknown one."""
        row = store.get_task(prediction_id, key_id)
        if row is None:
            raise NotFound(f"prediction {prediction_id[:64]!r} not found")
        return envelope(render(row))

    @app.post("/api/v1/model/prediction/{prediction_id}/cancel", response_model=schemas.PredictionEnvelope,
              responses={401: {"model": schemas.ErrorEnvelope}, 404: {"model": schemas.ErrorEnvelope}})
    async def cancel_prediction(prediction_id: str, key_id: Key):
        """Cancel: a queued prediction never runs, a running one stops at its next step; either ends
        `failed` with error `canceled` and nothing is charged. A finished one is left as it is (the message
        says so)."""
        what = await run_in_threadpool(store.cancel, prediction_id, key_id)
        if what is None:
            raise NotFound(f"prediction {prediction_id[:64]!r} not found")
        message = "success"
        if what == "requested":
            row = await wait_for(prediction_id, CANCEL_WAIT_S)
            if row["status"] not in TERMINAL:
                message = "cancel requested: the prediction stops at its next step"
        else:
            row = await owned(prediction_id, key_id)
            if what in TERMINAL:
                message = f"prediction already {what}; nothing to cancel"
        return envelope(await run_in_threadpool(render, row), message=message)

    @app.get("/api/v1/model/prediction/{prediction_id}/stream", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "Server-Sent Events: status, progress, preview, done"},
                        401: {"model": schemas.ErrorEnvelope}, 404: {"model": schemas.ErrorEnvelope}})
    async def stream_prediction(prediction_id: str, key_id: Key, request: Request, previews: bool = True):
        """Live progress as Server-Sent Events: `status` on each change, `progress` (step, total, eta_s)
        on each step, `preview` (a low-resolution data: URI) when the worker makes one, and `done` with the
        final prediction, which ends the stream. It reads the database, so any replica serves it."""
        first = await owned(prediction_id, key_id)
        return StreamingResponse(events(first, request, previews), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(row: dict[str, Any], request: Request, previews: bool) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        status = progress = preview_step = None
        last_sent = loop.time()

        def event(name: str, data: Any) -> str:
            nonlocal last_sent
            last_sent = loop.time()
            return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

        while True:
            if row["status"] != status:
                status = row["status"]
                yield event("status", {"status": status})
            now_progress = progress_of(row)
            if now_progress is not None and (progress is None or now_progress["step"] != progress["step"]):
                progress = now_progress
                yield event("progress", now_progress)
            if previews and row.get("preview") and row.get("preview_step") != preview_step:
                preview_step = row["preview_step"]
                yield event("preview", {"step": preview_step, "image": row["preview"]})
            if status in TERMINAL:
                yield event("done", await run_in_threadpool(render, row))
                return
            if loop.time() - last_sent >= KEEPALIVE_S:
                last_sent = loop.time()
                yield ": keep-alive\n\n"
            await asyncio.sleep(STREAM_POLL_S)
            if await request.is_disconnected():
                return  # the prediction goes on; only this stream ends
            row = await run_in_threadpool(store.get_task, row["id"])

    @app.get("/api/v1/webhook/secret", response_model=schemas.WebhookSecretEnvelope,
             responses={401: {"model": schemas.ErrorEnvelope}})
    def webhook_secret(key_id: Key):
        """This key's webhook signing secret: verify `HiDream-Webhook-Signature` with it."""
        return envelope({"secret": key_secret(settings.signing_secret(), key_id)})

    @app.get("/api/v1/predictions", response_model=schemas.PredictionListEnvelope,
             responses={400: {"model": schemas.ErrorEnvelope}, 401: {"model": schemas.ErrorEnvelope}})
    def list_predictions(key_id: Key, limit: Annotated[int, Query(ge=1, le=100)] = 20, cursor: str | None = None):
        """This key's predictions, newest first; pass `next_cursor` back as `cursor` for the next page."""
        before = None
        if cursor:
            try:
                at, _, tid = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
                before = (datetime.fromisoformat(at), tid)
            except ValueError:
                raise BadRequest("cursor: not a cursor this API returned") from None
        rows = store.list_tasks(key_id, limit, before)
        next_cursor = None
        if len(rows) == limit:
            last = rows[-1]
            next_cursor = base64.urlsafe_b64encode(f"{last['created_at'].isoformat()}|{last['id']}".encode()).decode()
        return envelope({"items": renderer.many(rows), "next_cursor": next_cursor})

    @app.post("/api/v1/model/uploadMedia", response_model=schemas.UploadEnvelope,
              responses={400: {"model": schemas.ErrorEnvelope}, 401: {"model": schemas.ErrorEnvelope},
                         413: {"model": schemas.ErrorEnvelope}},
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["file"],
                  "properties": {"file": {"type": "string", "format": "binary"}}}}}}})
    async def upload_media(request: Request, key_id: Key):
        """Upload a PNG, JPEG or WebP image (20 MB, 40 megapixels at most) to use as a reference."""
        try:
            form = await request.form(max_files=1, max_fields=10)
        except (StarletteHTTPException, MultiPartException, ValueError) as err:
            raise BadRequest(f"file: the body is not a valid multipart/form-data upload ({err})") from None
        file = form.get("file")
        if not isinstance(file, StarletteUploadFile):
            raise BadRequest("file: is required (a multipart/form-data field named 'file' holding the image)")
        data = await file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise PayloadTooLarge(f"file: larger than {settings.max_upload_bytes:,} bytes")
        info = await run_in_threadpool(check_image, data, policy, "file")
        blob = f"uploads/{secrets.token_hex(16)}.{EXTENSIONS[info.format]}"

        def persist() -> None:
            storage.put(blob, data)
            store.add_upload(blob, key_id, info.content_type, len(data))

        await run_in_threadpool(persist)
        url = signer.url(blob)
        return envelope({"url": url}, url=url)

    @app.get("/api/v1/models", response_model=schemas.ModelsEnvelope)
    def models(key_id: Key):
        """The served model ids, their aliases, parameters and price."""
        params = schemas.parameter_schema(*settings.recipe_defaults)
        return envelope([{"id": m, "aliases": [a for a, t in settings.aliases.items() if t == m],
                          "price_per_image_usd": settings.price_usd, "parameters": params}
                         for m in settings.model_ids])

    @app.get("/api/v1/usage", response_model=schemas.UsageEnvelope)
    def get_usage(key_id: Key):
        """Images charged to this key and the amount, in total and per day (UTC)."""
        u = store.usage(key_id)
        return envelope({"images": u["images"], "amount_usd": u["micro_usd"] / 1e6,
                         "days": [{"date": d["date"], "images": d["images"], "amount_usd": d["micro_usd"] / 1e6}
                                  for d in u["days"]]})

    @app.get("/files/{key:path}", include_in_schema=True, response_class=Response,
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}})
    def files(key: str, expires: str = "", signature: str = ""):
        """A stored image, through the signed, expiring URL the API gave out."""
        if not signer.verify(key, expires, signature):
            raise NotFound("file not found or link expired")
        data = storage.get(key)
        return Response(data, media_type=MIME.get(key.rsplit(".", 1)[-1], "application/octet-stream"),
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/", include_in_schema=False)
    def playground():
        """The web playground (static files in the package)."""
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/livez", include_in_schema=False)
    async def livez():
        """200 while the process serves requests; it checks nothing else (a liveness probe)."""
        return envelope({"alive": True})

    @app.get("/readyz", include_in_schema=False)
    @app.get("/healthz", include_in_schema=False)
    def readyz():
        """200 when the database answers and the in-process worker, if any, has its model; else 503 naming why."""
        state = worker.state.value if worker else None
        if worker is not None and worker.load_error is not None:
            return envelope({"ready": False, "worker": state}, 503, f"no model loaded: {worker.load_error}")
        try:
            store.ping()
        except Exception as err:
            log.warning("readiness: the database does not answer (%s)", err)
            reason = (str(err).strip().splitlines() or [""])[0][:200]
            return envelope({"ready": False, "worker": state}, 503,
                            f"database unreachable: {type(err).__name__}: {reason}")
        return envelope({"ready": True, "worker": state})

    def openapi() -> dict[str, Any]:
        """The generated schema, less FastAPI's 422 responses: validation failures here are 400s."""
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in spec["paths"].values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            schemas_ = spec.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas_.pop(name, None)
            body = schemas.GenerateImageRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas_.update(body.pop("$defs", {}))
            schemas_["GenerateImageRequest"] = body
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    app.state.api = ApiContext(settings, store, storage, signer, policy, renderer, submit, wait_for, key_for_token)
    from hidream.service.openai_api import add_openai_routes  # here: that module imports this one
    add_openai_routes(app, app.state.api)
    return app
