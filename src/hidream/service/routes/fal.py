"""fal's queue and run protocols, so the official `fal-client` SDK works by pointing its hosts here.

`fal-client` builds `https://{FAL_RUN_HOST}/{app}` (run: the result in the response) and
`https://{FAL_QUEUE_RUN_HOST}/{app}` (queue: a request id, then `.../requests/{id}/status`, the result at
`.../requests/{id}`, `PUT .../requests/{id}/cancel`). With `FAL_RUN_HOST=HOST:PORT/fal/run` and
`FAL_QUEUE_RUN_HOST=HOST:PORT/fal/queue` those are the routes below; the SDK speaks only https, so the server
needs a certificate (`serve --tls-cert --tls-key`). Apps: `fal-ai/hidream-o1-image` (text-to-image) and
`fal-ai/hidream-o1-image/edit`, `-dev` for Dev. Keys go as fal's `Authorization: Key <key>` (Bearer works too).
The tasks are the native ones: a request made here reads the same through `/api/v1/model/prediction/{id}`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError

from hidream.service import schemas
from hidream.service.context import TERMINAL, ApiContext
from hidream.service.errors import BadRequest, NotFound, ServiceError
from hidream.service.routes import provider
from hidream.service.routes.provider import retry_headers
from hidream.service.submission import fingerprint, idempotency_key, owned, submit, wait_for

router = APIRouter()

SURFACE = "fal"
RUN, QUEUE = "/fal/run", "/fal/queue"
APPS = {"fal-ai/hidream-o1-image": "full", "fal-ai/hidream-o1-image-dev": "dev"}
TASKS = {"": "text-to-image", "edit": "edit"}
RENAMED = {"image_urls": "reference_image_urls", "image_url": "reference_image_urls"}
PASSED = ("prompt", "image_size", "num_inference_steps", "guidance_scale", "seed", "num_images", "output_format",
          "keep_original_aspect", "snap_to_native", "seam_smoothing", "cache", "loras")
IGNORED = ("enable_safety_checker",)  # no safety checker runs here: `has_nsfw_concepts` is all false
KNOWN = tuple(sorted((*PASSED, *RENAMED, *IGNORED, "sync_mode")))
JSON_OBJECT = TypeAdapter(dict[str, Any])


def problem(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    """fal's error body: `{"detail": ...}` (the SDK's FalClientHTTPError carries it)."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def invalid(message: str) -> JSONResponse:
    """A 422 as fal's apps answer one: a list of `{loc, msg, type}`, `loc` naming the field."""
    field, sep, rule = message.partition(": ")
    loc = ["body", *field.replace("]", "").replace("[", ".").split(".")] if sep else ["body"]
    return problem(422, [{"loc": loc, "msg": message, "type": "value_error"}])


def error_shape(err: ServiceError) -> JSONResponse:
    """fal's error for `err`: the 422 list for input that cannot be used, else `{"detail": message}`."""
    return invalid(err.message) if isinstance(err, BadRequest) else problem(err.status, err.message,
                                                                             retry_headers(err))


async def answer(ctx: ApiContext, request: Request, work: Callable[[str], Awaitable[JSONResponse]]) -> JSONResponse:
    """Keys as fal sends them, `Authorization: Key <key>` (Bearer works too)."""
    header = request.headers.get("authorization") or ""
    scheme, _, token = header.strip().partition(" ")
    return await provider.answer(ctx, request, work, error_shape,
                                 f"Bearer {token}" if scheme.lower() == "key" else (header or None))


def served_app(ctx: ApiContext, app: str) -> tuple[str, str, str]:
    """(served model id, task, the app's owner/alias) of a fal app id; NotFound naming the served ones."""
    parts = app.strip("/").split("/")
    base, path = "/".join(parts[:2]), "/".join(parts[2:])
    ours = [f"{name}{'/' + p if p else ''}" for name, v in APPS.items() if v == ctx.settings.served_variant
            for p in TASKS]
    if APPS.get(base) != ctx.settings.served_variant or path not in TASKS:
        raise NotFound(f"app {app[:120]!r} is not served here (served: {', '.join(ours)})")
    return ctx.settings.model_ids[0], TASKS[path], base


def theirs(message: str) -> str:
    field, sep, rest = message.partition(": ")
    base = field.split("[", 1)[0]
    return f"image_urls{field[len(base):]}{sep}{rest}" if sep and base == "reference_image_urls" else message


def to_request(fields: dict[str, Any], model_id: str, task: str, webhook: str | None) -> schemas.GenerateImageRequest:
    unknown = sorted(set(fields) - set(KNOWN))
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field (allowed: {', '.join(KNOWN)})")
    if "image_url" in fields and "image_urls" in fields:
        raise BadRequest("image_url: give image_url or image_urls, not both")
    images = [fields["image_url"]] if "image_url" in fields else fields.get("image_urls")
    if task == "text-to-image" and images:
        raise BadRequest("image_urls: the text-to-image app takes no images; send them to its /edit")
    if task == "edit" and not images:
        raise BadRequest("image_urls: is required by the edit app: 1 to 10 image URLs (https, or data: URIs)")
    native = {k: v for k, v in fields.items() if k in PASSED} | {"model": model_id}
    if images is not None:
        native["reference_image_urls"] = images
    if fields.get("sync_mode"):  # fal's way to have the images inline, as data: URIs
        native["enable_base64_output"] = True
    if webhook is not None:
        native["webhook_url"] = webhook
    return provider.native_request(native, theirs)


async def _submit(ctx: ApiContext, request: Request, key_id: str, app: str) -> tuple[dict[str, Any], str]:
    model_id, task, base = served_app(ctx, app)
    try:
        fields = JSON_OBJECT.validate_json(await request.body() or b"{}")
    except ValidationError as err:
        raise BadRequest(schemas.validation_message(err)) from None
    body = to_request(fields, model_id, task, request.query_params.get("fal_webhook"))
    idem = idempotency_key(request)
    idempotency = (idem, fingerprint(f"fal:{task}", body.model_dump(mode="json"))) if idem else None
    try:
        row = await submit(ctx, key_id, body, idempotency=idempotency, reference_field="image_urls",
                           extra_input={"surface": SURFACE, "fal_app": base})
    except BadRequest as err:  # the checks past the schema's (the size rule, a reference that cannot be used)
        raise BadRequest(theirs(err.message)) from None
    return row, base


def result(ctx: ApiContext, row: dict[str, Any]) -> dict[str, Any]:
    """A completed task as fal's image apps give it (blocking: base64 outputs read the storage)."""
    data, inp = ctx.renderer.one(row), row["input"]
    mime = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}[inp["output_format"]]
    images = [{"url": url, "width": inp["width"], "height": inp["height"], "content_type": mime}
              for url in data["outputs"]]
    times = data.get("timings") or {}
    return {"images": images, "seed": inp["seed"], "prompt": inp["prompt"],
            "has_nsfw_concepts": [False] * len(images),
            "timings": {"inference": times["inference"] / 1000} if times.get("inference") else {}}


def _urls(ctx: ApiContext, base: str, request_id: str) -> dict[str, str]:
    at = f"{ctx.settings.base_url}{QUEUE}/{base}/requests/{request_id}"
    return {"response_url": at, "status_url": f"{at}/status", "cancel_url": f"{at}/cancel"}


def webhook_body(ctx: ApiContext, row: dict[str, Any]) -> dict[str, Any]:
    """What fal's `fal_webhook` receives: the request id, OK with the result or ERROR with why."""
    if row["status"] == "completed":
        return {"request_id": row["id"], "gateway_request_id": row["id"], "status": "OK",
                "payload": result(ctx, row), "error": None}
    return {"request_id": row["id"], "gateway_request_id": row["id"], "status": "ERROR", "payload": None,
            "error": row["error"] or "the generation failed"}


@router.post(RUN + "/{app:path}", tags=["fal"])
async def run_app(app: str, request: Request) -> JSONResponse:
    """fal's run: submit and wait (at most HIDREAM_SYNC_TIMEOUT_S); the result."""
    ctx: ApiContext = request.app.state.ctx

    async def work(key_id: str) -> JSONResponse:
        row, _ = await _submit(ctx, request, key_id, app)
        row = await wait_for(ctx, row["id"], ctx.settings.sync_timeout_s)
        return await _result_or_error(ctx, row)

    return await answer(ctx, request, work)


async def _result_or_error(ctx: ApiContext, row: dict[str, Any]) -> JSONResponse:
    if row["status"] == "completed":
        return JSONResponse(await run_in_threadpool(result, ctx, row))
    if row["status"] == "failed":
        # canceled: 400, not 409, which fal-client retries
        return problem(400 if row["error"] == "canceled" else 500, row["error"] or "the generation failed")
    return problem(400, f"request {row['id']} is still {'IN_QUEUE' if row['status'] == 'created' else 'IN_PROGRESS'}")


@router.get(QUEUE + "/{owner}/{alias}/requests/{request_id}/status", tags=["fal"])
async def request_status(owner: str, alias: str, request_id: str, request: Request) -> JSONResponse:
    """IN_QUEUE (with its position), IN_PROGRESS, or COMPLETED (with `error` when it failed)."""
    ctx: ApiContext = request.app.state.ctx

    async def work(key_id: str) -> JSONResponse:
        row = await owned(ctx, request_id, key_id)
        urls = _urls(ctx, f"{owner}/{alias}", request_id)
        if row["status"] == "created":
            position = await run_in_threadpool(ctx.store.queue_position, request_id)
            return JSONResponse({"status": "IN_QUEUE", "queue_position": position, **urls}, status_code=202)
        if row["status"] not in TERMINAL:
            return JSONResponse({"status": "IN_PROGRESS", "logs": [], **urls}, status_code=202)
        failed = row["status"] == "failed"
        times = (await run_in_threadpool(ctx.renderer.one, row)).get("timings") or {}
        metrics = {"inference_time": times["inference"] / 1000} if times.get("inference") else {}
        return JSONResponse({"status": "COMPLETED", "logs": [], "metrics": metrics, **urls,
                             "error": row["error"] if failed else None,
                             "error_type": ("canceled" if row["error"] == "canceled" else "generation_failed")
                             if failed else None})

    return await answer(ctx, request, work)


@router.get(QUEUE + "/{owner}/{alias}/requests/{request_id}", tags=["fal"])
async def request_result(owner: str, alias: str, request_id: str, request: Request) -> JSONResponse:
    """The result of a completed request; an error while it is not done, or when it failed."""
    ctx: ApiContext = request.app.state.ctx

    async def work(key_id: str) -> JSONResponse:
        return await _result_or_error(ctx, await owned(ctx, request_id, key_id))

    return await answer(ctx, request, work)


@router.put(QUEUE + "/{owner}/{alias}/requests/{request_id}/cancel", tags=["fal"])
async def cancel_request(owner: str, alias: str, request_id: str, request: Request) -> JSONResponse:
    """Cancel: 202 CANCELLATION_REQUESTED (queued: it never runs; running: it stops at its next step), or 400
    ALREADY_COMPLETED."""
    ctx: ApiContext = request.app.state.ctx

    async def work(key_id: str) -> JSONResponse:
        what = await run_in_threadpool(ctx.store.cancel, request_id, key_id)
        if what is None:
            raise NotFound(f"request {request_id[:64]!r} not found")
        if what in ("completed", "failed"):
            return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    return await answer(ctx, request, work)


@router.post(QUEUE + "/{app:path}", tags=["fal"])
async def queue_submit(app: str, request: Request) -> JSONResponse:
    """fal's queue: submit; poll `status_url`, read `response_url`, `PUT cancel_url`."""
    ctx: ApiContext = request.app.state.ctx

    async def work(key_id: str) -> JSONResponse:
        row, base = await _submit(ctx, request, key_id, app)
        position = await run_in_threadpool(ctx.store.queue_position, row["id"])
        return JSONResponse({"request_id": row["id"], "gateway_request_id": row["id"], **_urls(ctx, base, row["id"]),
                             "queue_position": position})

    return await answer(ctx, request, work)
