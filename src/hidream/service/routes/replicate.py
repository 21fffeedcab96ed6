"""Replicate's HTTP API (`/v1/models/{owner}/{name}/predictions`, `/v1/predictions`, `/v1/files`), so the
official `replicate` SDK works by changing its base URL.

The tasks are the native ones (keys, validation, billing, idempotency, rate limits): a prediction made here
reads the same through `/api/v1/model/prediction/{id}`. What differs is Replicate's shape: a prediction
object with `status` starting / processing / succeeded / failed / canceled and `output` (the image URLs),
`Prefer: wait` to wait for it, errors as problem details (`{"title", "detail", "status"}`, 422 for input the
model does not take), files uploaded as multipart `content`, and webhooks that receive that same object.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError

from hidream.service import schemas
from hidream.service.context import ApiContext
from hidream.service.errors import BadRequest, NotFound, ServiceError
from hidream.service.routes import provider
from hidream.service.routes.media import store_form_image
from hidream.service.routes.provider import retry_headers
from hidream.service.submission import fingerprint, idempotency_key, owned, submit, wait_for

router = APIRouter()

SURFACE = "replicate"  # a task's input["surface"]: its webhook gets Replicate's prediction object
# Replicate's model names for HiDream-O1 -> the variant each is (a deployment serves one; the other is a 404).
MODELS = {"hidream-ai/hidream-o1-image": "full", "hidream-ai/hidream-o1-image-dev": "dev"}
PASSED = ("prompt", "seed", "output_format", "num_inference_steps", "guidance_scale", "keep_original_aspect",
          "snap_to_native", "seam_smoothing", "cache", "loras", "num_images")
KNOWN = tuple(sorted((*PASSED, "width", "height", "image", "images", "num_outputs", "aspect_ratio")))
BODY_FIELDS = ("input", "webhook", "webhook_events_filter", "stream", "version")
DEFAULT_WAIT_S = 60  # `Prefer: wait` without a number: Replicate's 60 s
TITLES = {400: "Bad request", 401: "Unauthenticated", 404: "Not found", 409: "Conflict", 413: "Payload too large",
          422: "Invalid input", 429: "Too many requests", 503: "Service unavailable"}
JSON_OBJECT = TypeAdapter(dict[str, Any])


class InvalidInput(BadRequest):
    """Input the model does not take: Replicate's 422."""

    status = 422


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Replicate's error: an RFC 7807 problem (`replicate.exceptions.ReplicateError` reads `detail`)."""
    return JSONResponse({"title": TITLES.get(status, "Internal server error"), "detail": detail, "status": status},
                        status_code=status, headers=headers, media_type="application/problem+json")


def error_shape(err: ServiceError) -> JSONResponse:
    """Replicate's error for `err`: a problem, 422 for input the model cannot take."""
    return problem(422 if isinstance(err, BadRequest) else err.status, err.message, retry_headers(err))


async def answer(ctx: ApiContext, request: Request, work: Callable[[str], Awaitable[JSONResponse]]) -> JSONResponse:
    return await provider.answer(ctx, request, work, error_shape)


def served_model(ctx: ApiContext, owner: str, name: str) -> str:
    """The served model id of a Replicate model name (theirs, or a served id or alias); NotFound otherwise."""
    model = f"{owner}/{name}"
    ours = ctx.settings.resolve_model_id(model)
    if ours is not None:
        return ours
    if MODELS.get(model) == ctx.settings.served_variant:
        return ctx.settings.model_ids[0]
    served = [m for m, v in MODELS.items() if v == ctx.settings.served_variant]
    raise NotFound(f"model {model[:120]!r} is not served here (served: {', '.join(served)})")


def to_request(ctx: ApiContext, body: dict[str, Any], model_id: str) -> schemas.GenerateImageRequest:
    """The native request of a Replicate prediction body; errors name Replicate's fields (`input.width`)."""
    unknown = sorted(set(body) - set(BODY_FIELDS))
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown field (allowed: {', '.join(BODY_FIELDS)})")
    inp = body.get("input")
    if not isinstance(inp, dict):
        raise InvalidInput("input: is required: an object of the model's inputs (prompt, width, height, image, ...)")
    unknown = sorted(set(inp) - set(KNOWN))
    if unknown:
        raise InvalidInput(f"input.{unknown[0]}: unknown input (allowed: {', '.join(KNOWN)})")
    if body.get("stream"):
        raise InvalidInput("stream: streaming output is not supported; poll the prediction or use a webhook")
    events = body.get("webhook_events_filter")
    if events is not None and (not isinstance(events, list) or set(events) - {"completed"}):
        raise InvalidInput(f"webhook_events_filter: only [\"completed\"] is sent here (got {events!r})")
    native: dict[str, Any] = {k: v for k, v in inp.items() if k in PASSED} | {"model": model_id}
    if "num_outputs" in inp:
        native["num_images"] = inp["num_outputs"]
    if ("width" in inp) != ("height" in inp):
        raise InvalidInput("input.width: width and height go together (or leave both out for the default size)")
    if "width" in inp:
        native["image_size"] = {"width": inp["width"], "height": inp["height"]}
    if "aspect_ratio" in inp:
        raise InvalidInput("input.aspect_ratio: not supported: give width and height")
    if "image" in inp and "images" in inp:
        raise InvalidInput("input.image: give image or images, not both")
    images = [inp["image"]] if isinstance(inp.get("image"), str) else inp.get("images", inp.get("image"))
    if images is not None:
        native["reference_image_urls"] = images
    if body.get("webhook") is not None:
        native["webhook_url"] = body["webhook"]
    return provider.native_request(native, lambda message: theirs(message, inp))


def theirs(message: str, inp: dict[str, Any]) -> str:
    """A native `field: rule` message with the field as the Replicate request named it (`input.width`, ...)."""
    names = {"image_size": "input.width", "reference_image_urls": "input.images", "webhook_url": "webhook",
             "num_images": "input.num_outputs" if "num_outputs" in inp else "input.num_images"}
    field, sep, rest = message.partition(": ")
    base = field.split("[", 1)[0]
    if not sep or base.startswith(("input.", "webhook")):
        return message
    return f"{names.get(base, 'input.' + base)}{field[len(base):]}{sep}{rest}"


STATUSES = {"created": "starting", "processing": "processing", "completed": "succeeded", "failed": "failed"}


def render(ctx: ApiContext, row: dict[str, Any]) -> dict[str, Any]:
    """A task as Replicate's prediction object (blocking: base64 outputs read the storage)."""
    data = ctx.renderer.one(row)
    base = f"{ctx.settings.base_url}/v1/predictions/{row['id']}"
    status = "canceled" if row["status"] == "failed" and row["error"] == "canceled" else STATUSES[row["status"]]
    times = data.get("timings") or {}
    metrics = {"predict_time": times["inference"] / 1000} if times.get("inference") else {}
    return {"id": row["id"], "model": row["input"].get("replicate_model", row["model"]), "version": row["model"],
            "input": data["input"], "output": data["outputs"] if status == "succeeded" else None,
            "logs": "", "error": (data["error"] or None) if status == "failed" else None, "status": status,
            "created_at": data["created_at"], "started_at": data["started_at"], "completed_at": data["completed_at"],
            "urls": {"get": base, "cancel": f"{base}/cancel"}, "metrics": metrics}


def _wait_seconds(prefer: str | None, cap: float) -> float:
    """`Prefer: wait` (60 s) or `Prefer: wait=N` -> how long the create waits; 0 without one."""
    for part in (prefer or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value) if value else DEFAULT_WAIT_S
            except ValueError:
                raise InvalidInput(f"Prefer: wait must be wait or wait=SECONDS (got {prefer[:40]!r})") from None
            return max(0.0, min(seconds, cap))
    return 0.0


@router.post("/v1/models/{owner}/{name}/predictions", tags=["replicate"], status_code=201)
async def create_prediction(owner: str, name: str, request: Request) -> JSONResponse:
    """Create a prediction of a model; `Prefer: wait` holds the response until it ends (60 s, or `wait=N`)."""
    ctx: ApiContext = request.app.state.ctx

    async def work(key_id: str) -> JSONResponse:
        model_id = served_model(ctx, owner, name)
        try:
            body = JSON_OBJECT.validate_json(await request.body())
        except ValidationError as err:
            raise InvalidInput(schemas.validation_message(err)) from None
        native = to_request(ctx, body, model_id)
        wait_s = _wait_seconds(request.headers.get("prefer"), ctx.settings.sync_timeout_s)
        idem = idempotency_key(request)
        idempotency = (idem, fingerprint("replicate", native.model_dump(mode="json"))) if idem else None
        try:
            row = await submit(ctx, key_id, native, idempotency=idempotency, reference_field="input.images",
                               extra_input={"surface": SURFACE, "replicate_model": f"{owner}/{name}"})
        except BadRequest as err:  # the checks past the schema's (the size rule, a reference that cannot be used)
            raise InvalidInput(theirs(err.message, body["input"])) from None
        if wait_s > 0:
            row = await wait_for(ctx, row["id"], wait_s)
        return JSONResponse(await run_in_threadpool(render, ctx, row), status_code=201)

    return await answer(ctx, request, work)


@router.get("/v1/predictions/{prediction_id}", tags=["replicate"])
async def get_prediction(prediction_id: str, request: Request) -> JSONResponse:
    """A prediction of this key, in Replicate's shape (whatever surface made it)."""
    ctx: ApiContext = request.app.state.ctx

    async def work(key_id: str) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(render, ctx, await owned(ctx, prediction_id, key_id)))

    return await answer(ctx, request, work)


@router.post("/v1/predictions/{prediction_id}/cancel", tags=["replicate"])
async def cancel_prediction(prediction_id: str, request: Request) -> JSONResponse:
    """Cancel: queued, it never runs; running, it stops at its next step (`canceled`, nothing charged)."""
    ctx: ApiContext = request.app.state.ctx

    async def work(key_id: str) -> JSONResponse:
        what = await run_in_threadpool(ctx.store.cancel, prediction_id, key_id)
        if what is None:
            raise NotFound(f"prediction {prediction_id[:64]!r} not found")
        row = await owned(ctx, prediction_id, key_id)
        if what == "requested":
            row = await wait_for(ctx, prediction_id, 5.0)
        return JSONResponse(await run_in_threadpool(render, ctx, row))

    return await answer(ctx, request, work)


@router.post("/v1/files", tags=["replicate"], status_code=201)
async def create_file(request: Request) -> JSONResponse:
    """Upload an image (multipart field `content`) to pass as an input; `urls.get` is what the input takes."""
    ctx: ApiContext = request.app.state.ctx

    async def work(key_id: str) -> JSONResponse:
        up = await store_form_image(ctx, request, key_id, "content")
        created = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        return JSONResponse({
            "id": up.blob.removeprefix("uploads/").split(".")[0], "name": up.filename,
            "content_type": up.content_type, "size": len(up.data),
            "etag": hashlib.md5(up.data).hexdigest(),  # noqa: S324 (an etag, not a secret)
            "checksums": {"sha256": hashlib.sha256(up.data).hexdigest()}, "metadata": {}, "created_at": created,
            "expires_at": None, "urls": {"get": ctx.signer.url(up.blob)}}, status_code=201)

    return await answer(ctx, request, work)

