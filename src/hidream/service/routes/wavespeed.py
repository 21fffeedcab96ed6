"""The WaveSpeed protocol (`/api/v3`), so the official `wavespeed` SDK works by changing its base URL.

Submit `POST /api/v3/{model}` (`wavespeed-ai/hidream-o1-image/text-to-image`, `.../edit`, and the `-dev`
models), poll `GET /api/v3/predictions/{id}/result`, upload through `POST /api/v3/media/uploads` (a ticket:
the SDK then PUTs the file to the URL it names) and get a webhook with `?webhook=URL`. The envelope is the
native one (`{code, message, data}`) and so is the prediction, so everything else (keys, validation, billing,
idempotency, rate limits, webhooks) is the native API's: a task submitted here reads the same through
`/api/v1/model/prediction/{id}`, and the other way round.
"""

from __future__ import annotations

import mimetypes
import secrets
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import IntegrityError

from hidream.service import schemas
from hidream.service.context import ApiContext, Ctx, Key, envelope
from hidream.service.errors import BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge
from hidream.service.fetch import check_image
from hidream.service.routes import provider
from hidream.service.submission import EXTENSIONS, fingerprint, idempotency_key, owned, submit, wait_for

router = APIRouter()

# WaveSpeed's HiDream-O1 model ids -> the variant each is (a deployment serves one; the other is a 404).
MODELS = {"wavespeed-ai/hidream-o1-image": "full", "wavespeed-ai/hidream-o1-image-dev": "dev"}
TASKS = ("text-to-image", "edit")
# WaveSpeed's field -> ours; the others are native fields, passed as they are.
RENAMED = {"size": "image_size", "images": "reference_image_urls"}
PASSED = ("prompt", "seed", "output_format", "enable_sync_mode", "enable_base64_output", "num_inference_steps",
          "guidance_scale", "num_images", "keep_original_aspect", "snap_to_native", "seam_smoothing", "cache",
          "loras")
KNOWN = tuple(sorted((*RENAMED, *PASSED)))
UPLOAD_TTL_S = 3600  # how long an upload ticket's PUT URL stays good
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
JSON_OBJECT = TypeAdapter(dict[str, Any])


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        return JSON_OBJECT.validate_json(await request.body() or b"{}")
    except ValidationError as err:
        raise BadRequest(schemas.validation_message(err)) from None


def served_model(ctx: ApiContext, model: str) -> tuple[str, str]:
    """(the served model id, the task) of a WaveSpeed model path; NotFound naming the ones served here."""
    base, _, task = model.strip("/").rpartition("/")
    ours = [f"{name}/{t}" for name, variant in MODELS.items() if variant == ctx.settings.served_variant
            for t in TASKS]
    if MODELS.get(base) != ctx.settings.served_variant or task not in TASKS:
        raise NotFound(f"model {model[:120]!r} is not served here (served: {', '.join(ours)})")
    return ctx.settings.model_ids[0], task


def to_request(fields: dict[str, Any], model_id: str, task: str, webhook: str | None) -> schemas.GenerateImageRequest:
    """The native request of a WaveSpeed body; 400s name WaveSpeed's fields."""
    unknown = sorted(set(fields) - set(KNOWN))
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field (allowed: {', '.join(KNOWN)})")
    images = fields.get("images")
    if task == "text-to-image" and images:
        raise BadRequest("images: the text-to-image model takes no images; send them to the edit model")
    if task == "edit" and not images:
        raise BadRequest("images: is required by the edit model: 1 to 10 image URLs (http, https, data: or "
                         "from /api/v3/media/uploads)")
    native = {RENAMED.get(k, k): v for k, v in fields.items()} | {"model": model_id}
    if webhook is not None:
        native["webhook_url"] = webhook
    return provider.native_request(native, theirs)


def theirs(message: str) -> str:
    """A native `field: rule` message with the field as WaveSpeed names it (`size`, `images[0]`)."""
    for name, ours in RENAMED.items():
        if message.startswith(ours):
            return name + message[len(ours):]
    return message


def render(ctx: ApiContext, row: dict[str, Any]) -> dict[str, Any]:
    """The prediction, its `urls.get` the WaveSpeed result route."""
    data = ctx.renderer.one(row)
    data["urls"] = dict(data["urls"], get=f"{ctx.settings.base_url}/api/v3/predictions/{row['id']}/result")
    return data


@router.post("/api/v3/media/uploads", tags=["wavespeed"])
async def upload_ticket(request: Request, ctx: Ctx, key_id: Key):
    """An upload ticket: PUT the file's bytes to `data.upload.url` (with its headers), then pass
    `data.download_url` in `images`."""
    fields = await _json_object(request)
    filename, size = fields.get("filename"), fields.get("size")
    if not isinstance(filename, str) or not filename.strip():
        raise BadRequest("filename: is required (the file's name)")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise BadRequest(f"size: must be the file's size in bytes, an integer above 0 (got {size!r})")
    if size > ctx.settings.max_upload_bytes:
        raise PayloadTooLarge(f"size: larger than {ctx.settings.max_upload_bytes:,} bytes")
    content_type = fields.get("content_type") or mimetypes.guess_type(filename)[0]
    if content_type not in IMAGE_TYPES:
        raise BadRequest(f"content_type: must be image/png, image/jpeg or image/webp (got {content_type!r})")
    blob = f"uploads/{secrets.token_hex(16)}.{EXTENSIONS[IMAGE_TYPES[content_type]]}"
    expires = int(time.time()) + UPLOAD_TTL_S
    claim = _claim(blob, key_id, size, content_type)
    url = (f"{ctx.settings.base_url}/api/v3/media/uploads/{blob.removeprefix('uploads/')}?key={key_id}"
           f"&size={size}&expires={expires}&signature={ctx.signer.mac(claim, expires)}")
    return envelope({"upload": {"method": "PUT", "url": url, "headers": {"Content-Type": content_type}},
                     "download_url": ctx.signer.url(blob), "filename": filename, "size": size,
                     "content_type": content_type})


def _claim(blob: str, key_id: str, size: int, content_type: str) -> str:
    return f"wavespeed-upload\n{blob}\n{key_id}\n{size}\n{content_type}"


@router.put("/api/v3/media/uploads/{name}", tags=["wavespeed"])
async def upload_put(name: str, request: Request, ctx: Ctx, key: str, size: int, expires: str, signature: str):
    """The upload a ticket allows: its signature stands for the key; the bytes must be the image it declared."""
    blob = f"uploads/{name}"
    content_type = next((t for t, f in IMAGE_TYPES.items() if name.endswith("." + EXTENSIONS[f])), "")
    if not ctx.signer.verify(_claim(blob, key, size, content_type), expires, signature):
        raise Forbidden("this upload URL is not valid or has expired: ask /api/v3/media/uploads for another")
    data = await request.body()
    if len(data) != size:
        raise BadRequest(f"body: the ticket is for {size:,} bytes, not {len(data):,}")
    info = await run_in_threadpool(check_image, data, ctx.policy, "file")
    if info.content_type != content_type:
        raise BadRequest(f"file: the ticket is for {content_type}, but the bytes are {info.content_type}")

    def persist() -> None:
        try:
            ctx.store.add_upload(blob, key, content_type, len(data))
        except IntegrityError:
            raise Conflict("this upload URL was used already: ask /api/v3/media/uploads for another") from None
        try:
            ctx.storage.put(blob, data)
        except BaseException:
            ctx.store.remove_upload(blob)
            raise

    await run_in_threadpool(persist)
    return envelope(None)


@router.get("/api/v3/predictions/{prediction_id}/result", tags=["wavespeed"])
@router.get("/api/v3/predictions/{prediction_id}", tags=["wavespeed"])
async def prediction_result(prediction_id: str, ctx: Ctx, key_id: Key):
    """A prediction of this key, as `POST /api/v3/{model}` returned it, now."""
    return envelope(await run_in_threadpool(render, ctx, await owned(ctx, prediction_id, key_id)))


@router.post("/api/v3/{model:path}", tags=["wavespeed"])
async def submit_task(model: str, request: Request, ctx: Ctx, key_id: Key, webhook: str | None = None):
    """Submit to a WaveSpeed model id; `enable_sync_mode` waits for the result."""
    model_id, task = served_model(ctx, model)
    idem = idempotency_key(request)
    body = to_request(await _json_object(request), model_id, task, webhook)
    idempotency = (idem, fingerprint(f"wavespeed:{task}", body.model_dump(mode="json"))) if idem else None
    try:
        row = await submit(ctx, key_id, body, idempotency=idempotency, reference_field="images",
                           extra_input={"surface": "wavespeed"})
    except BadRequest as err:  # the checks past the schema's (the size rule, a reference that cannot be used)
        err.message = theirs(err.message)
        raise
    if body.enable_sync_mode:
        row = await wait_for(ctx, row["id"], ctx.settings.sync_timeout_s)
    return envelope(await run_in_threadpool(render, ctx, row))
