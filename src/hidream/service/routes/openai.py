"""OpenAI-compatible images API: `POST /v1/images/generations` and `POST /v1/images/edits`.

Both routes build a `schemas.GenerateImageRequest` and submit it like the native route, so every rule
and message is the native one, spoken with OpenAI's field names (`n`, `size`, `image`). Like OpenAI's,
they answer when the images are ready (a wait bounded by `HIDREAM_SYNC_TIMEOUT_S`), and every error they
give is OpenAI's `{"error": {"message", "type", "param", "code"}}`: the app's envelope handlers never see
one, because the routes check the key themselves and turn each ServiceError into that shape.
Before a route runs, the app's body-size middleware (413) and routing (404, 405) still answer with the
native envelope.
"""

import base64
import calendar
import hashlib
import json
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from sqlalchemy.exc import OperationalError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from hidream.rules import (
    MAX_AREA,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_GUIDANCE,
    MIN_SIDE,
    MULTIPLE,
    RANDOM_SEED,
)
from hidream.service import schemas
from hidream.service.context import ApiContext, context_of
from hidream.service.errors import BadRequest, PayloadTooLarge, ServiceError
from hidream.service.fetch import ImageInfo, check_image
from hidream.service.submission import fingerprint, idempotency_key, submit, wait_for
from hidream.sizes import SIZE_PRESETS

log = logging.getLogger("hidream.api")
ResponseFormat = Literal["url", "b64_json"]

# OpenAI fields that mean nothing here: accepted and ignored, so clients that send them work unchanged.
IGNORED = ("quality", "style", "user", "background", "moderation", "output_compression", "input_fidelity",
           "safety_identifier", "partial_images")
NATIVE_NAMES = {"n": "num_images"}  # OpenAI name -> GenerateImageRequest field, where they differ
OPENAI_NAMES = {"num_images": "n", "image_size": "size", "reference_image_urls": "image"}  # for messages
PASSED = ("model", "prompt", "n", "output_format", "seed", "num_inference_steps", "guidance_scale", "loras",
          "snap_to_native", "refine_prompt", "layout_boxes", "seam_smoothing", "cache")
FORM_INTEGERS = ("n", "seed", "num_inference_steps", "output_compression", "partial_images")
SQUARE = math.isqrt(MAX_AREA)
SIZE_RULE = (f'must be "auto", "WxH" with sides from {MIN_SIDE} to {MAX_SIDE} (rounded to multiples of '
             f"{MULTIPLE}) and at most {SQUARE}x{SQUARE} pixels, or one of {', '.join(SIZE_PRESETS)}")
# status -> OpenAI error type and the default code
KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "payload_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}
# The openai package retries 409 and 5xx by default; a retried POST here would queue the work again.
NOT_RETRIED = (409, 500, 504)
PARAM = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])?(?:\.[A-Za-z_]+)?): ")  # `n: `, `loras[0].path: `


# --- the shapes (for /openapi.json; the field list doubles as the set of known names) ----------------------


class OpenAIImageParams(BaseModel):
    """The fields of both routes; the edits route takes them as multipart form fields beside `image`."""

    model_config = ConfigDict(extra="forbid")  # documents what check_fields enforces: no other field

    model: str | None = Field(None, description="a served model id or alias; default: the first served id")
    prompt: str = Field(min_length=1, max_length=schemas.MAX_PROMPT,
                        description="what to draw, or how to edit the image(s)")
    n: int | None = Field(None, ge=1, le=4, description="number of images; default 1")
    size: str | None = Field(None, pattern=schemas.SIZE_PATTERN.replace("^(", "^(auto|"),
                             description=f"size {SIZE_RULE}; default auto: the default preset, or with "
                                         "exactly one image to edit, that image's aspect ratio")
    response_format: ResponseFormat | None = Field(None, description="default url (signed, expiring)")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="default png")
    seed: int | None = Field(None, ge=RANDOM_SEED, le=MAX_SEED,
                             description="extension: 0 to 2^32-1, or -1 (the default) for random")
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                            description="extension: 1 to 100; default the recipe's")
    guidance_scale: float | None = Field(None, ge=MIN_GUIDANCE, le=MAX_GUIDANCE,
                                         description="extension: 1.0 to 20.0 (1.0: no guidance); default the recipe's")
    snap_to_native: bool | None = Field(
        None, description="extension: generate at the native size nearest the aspect asked for (the official "
                          "code's snapping); the response's size is the one made")
    seam_smoothing: schemas.SeamSmoothingRequest | None = Field(
        None, description="extension: patch seam smoothing on the late steps, {} for the defaults")
    cache: Literal["off", "fast"] | None = Field(
        None, description="extension: step caching, off (the default) or fast (quicker, approximate)")
    layout_boxes: list[list[float]] | None = Field(
        None, description="extension, edits only: one box [x1, y1, x2, y2] per image (fractions of the output): "
                          "where each goes")
    refine_prompt: bool | None = Field(
        None, description="extension: rewrite the prompt with the service's prompt refiner first; each image's "
                          "revised_prompt is what was drawn")
    stream: Literal[False] | None = Field(None, description="only false: streaming is not supported")
    loras: list[schemas.LoraRef] | None = Field(
        None, max_length=schemas.MAX_LORAS,
        description=f"extension: LoRAs for this request, [{{\"path\": NAME_OR_URL, \"scale\": 1.0}}, ...] "
                    f"(GET /api/v1/loras lists the names); at most {schemas.MAX_LORAS}")


KNOWN = frozenset(OpenAIImageParams.model_fields) | frozenset(IGNORED)


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = Field(None, description="with refine_prompt: the refiner's rewrite, what was drawn")


class OpenAIImagesResponse(BaseModel):
    created: int = Field(description="when the images were completed, Unix seconds")
    data: list[OpenAIImage]
    output_format: str
    size: str = Field(description="WxH as generated")
    id: str = Field(description="extension: the prediction id (GET /api/v1/model/prediction/{id})")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    prediction_id: str | None = Field(None, description="extension: on 409 canceled, 500 failed and 504")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


# --- errors -------------------------------------------------------------------------------------------------


class OpenAIError(ServiceError):
    """An error with its status, OpenAI `code` and extras given per instance."""

    def __init__(self, status: int, message: str, code: str | None = None, *, prediction_id: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.prediction_id, self.retry_after = status, code, prediction_id, retry_after


def openai_message(message: str) -> str:
    """A native `field: rule` message with the field as OpenAI names it (num_images -> n, ...)."""
    field, sep, rest = message.partition(": ")
    base = field.split("[", 1)[0]
    if sep and base in OPENAI_NAMES:
        return f"{OPENAI_NAMES[base]}{field[len(base):]}{sep}{rest}"
    return message


def error_response(err: ServiceError) -> JSONResponse:
    """`err` in OpenAI's shape; `param` is the field a 4xx message starts with."""
    message = openai_message(err.message)
    kind, default_code = KINDS.get(err.status, ("server_error", "server_error"))
    match = PARAM.match(message) if 400 <= err.status < 500 else None
    error: dict[str, Any] = {"message": message, "type": kind,
                             "param": match.group(1) if match and match.group(1) != "body" else None,
                             "code": getattr(err, "code", None) or default_code}
    if (prediction_id := getattr(err, "prediction_id", None)) is not None:
        error["prediction_id"] = prediction_id  # extension: the prediction to poll or look at
    headers = {}
    if (retry_after := getattr(err, "retry_after", None)) is not None:
        headers["Retry-After"] = str(retry_after)
    if err.status in NOT_RETRIED:
        headers["x-should-retry"] = "false"
    return JSONResponse({"error": error}, status_code=err.status, headers=headers)


# --- requests -----------------------------------------------------------------------------------------------


def check_fields(fields: dict[str, Any]) -> None:
    """400 for an unknown field, or for `stream` asked for."""
    unknown = sorted(set(fields) - KNOWN)
    if unknown:
        raise OpenAIError(400, f"{unknown[0]}: unknown field (allowed: {', '.join(sorted(KNOWN))})",
                          "unknown_parameter")
    if fields.get("stream") is not None and fields["stream"] is not False:
        raise OpenAIError(400, "stream: streaming is not supported; leave it out (the response waits for the "
                               "images) or follow the prediction's progress stream", "unsupported_parameter")


def size_fields(size: Any, images: int) -> dict[str, Any]:
    """The native size fields for OpenAI's `size` ("auto" with one image keeps that image's aspect)."""
    if size == "auto":
        return {"keep_original_aspect": True} if images == 1 else {}
    if isinstance(size, str):
        try:
            schemas.resolve_size(size)
            return {"image_size": size}
        except BadRequest:
            pass
    raise BadRequest(f"size: {SIZE_RULE} (got {size!r})")


def to_request(fields: dict[str, Any], default_model: str, images: int) -> tuple[schemas.GenerateImageRequest,
                                                                                ResponseFormat]:
    """The native request for OpenAI's fields (None meaning absent), and the response format asked for."""
    given = {k: v for k, v in fields.items() if v is not None}
    check_fields(given)
    response_format = given.get("response_format", "url")
    if response_format not in ("url", "b64_json"):
        raise BadRequest(f"response_format: must be url or b64_json (got {response_format!r})")
    native = {NATIVE_NAMES.get(k, k): v for k, v in given.items() if k in PASSED}
    native.setdefault("model", default_model)
    native |= size_fields(given.get("size", "auto"), images)
    try:
        return schemas.GenerateImageRequest.model_validate(native), response_format
    except ValidationError as err:
        raise BadRequest(schemas.validation_message(err)) from None


JSON_OBJECT = TypeAdapter(dict[str, Any])


async def json_fields(request: Request) -> dict[str, Any]:
    """The request's JSON object."""
    try:
        return JSON_OBJECT.validate_json(await request.body())
    except ValidationError as err:
        raise BadRequest(schemas.validation_message(err)) from None


def form_value(name: str, value: str | UploadFile) -> Any:
    """A multipart field's value, typed as JSON would give it (the text as is where it does not parse)."""
    if not isinstance(value, str):
        raise BadRequest(f"{name}: must be a form field, not a file")
    text = value.strip()
    if name in FORM_INTEGERS and re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if name == "guidance_scale":
        try:
            return float(text)
        except ValueError:
            return value
    if name in ("stream", "snap_to_native", "refine_prompt") and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if name in ("layout_boxes", "seam_smoothing"):  # likewise
        try:
            return json.loads(text)
        except ValueError:
            raise BadRequest(f"{name}: must be JSON text: {schemas.RULES[name]} (got {value[:80]!r})") from None
    if name == "loras":  # a form field holds text: the array as JSON
        try:
            return json.loads(text)
        except ValueError:
            raise BadRequest(f"loras: must be a JSON array of {{\"path\", \"scale\"}} objects "
                             f"(got {value[:80]!r})") from None
    return value


async def read_images(files: list[Any], api: ApiContext) -> list[tuple[bytes, ImageInfo, str]]:
    """Each uploaded image's bytes, checked to decode within the caps, with the name it was sent as."""
    if not files:
        raise BadRequest("image: is required (1 to 10 images, as multipart files `image` or `image[]`)")
    if len(files) > schemas.MAX_REFERENCES:
        raise BadRequest(f"image: at most {schemas.MAX_REFERENCES} images (got {len(files)})")
    out = []
    for i, file in enumerate(files):
        field = "image" if len(files) == 1 else f"image[{i}]"
        if not isinstance(file, UploadFile):
            raise BadRequest(f"{field}: must be a file (a multipart part with a filename), not a text field")
        data = await file.read(api.settings.max_upload_bytes + 1)
        if len(data) > api.settings.max_upload_bytes:
            raise PayloadTooLarge(f"{field}: larger than {api.settings.max_upload_bytes:,} bytes")
        info = await run_in_threadpool(check_image, data, api.policy, field)
        out.append((data, info, (file.filename or "image")[:200]))
    return out


# --- responses ----------------------------------------------------------------------------------------------


def images_response(api: ApiContext, row: dict[str, Any], response_format: ResponseFormat) -> dict[str, Any]:
    """OpenAI's response for a completed task (blocking: it may read the images from storage)."""
    inp = row["input"]
    if response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(api.storage.get(key)).decode()} for key in row["outputs"]]
    else:
        data = [{"url": url} for url in api.renderer.one(row)["outputs"]]
    if "refined_prompt" in inp:  # OpenAI's own field for the prompt its model rewrote
        data = [item | {"revised_prompt": inp["refined_prompt"]} for item in data]
    return {"created": calendar.timegm(row["completed_at"].utctimetuple()), "data": data,
            "output_format": inp["output_format"], "size": f"{inp['width']}x{inp['height']}", "id": row["id"]}


async def finish(api: ApiContext, row: dict[str, Any], response_format: ResponseFormat) -> JSONResponse:
    """Wait (bounded) for the task to end; its images, or the error that says why there are none."""
    timeout = api.settings.sync_timeout_s
    row = await wait_for(api, row["id"], timeout)
    task_id = row["id"]
    if row["status"] == "completed":
        return JSONResponse(await run_in_threadpool(images_response, api, row, response_format))
    if row["status"] == "failed" and row["error"] == "canceled":
        raise OpenAIError(409, f"prediction {task_id} was canceled before it completed", "canceled",
                          prediction_id=task_id)
    if row["status"] == "failed":
        raise OpenAIError(500, row["error"] or "the generation failed", "generation_failed", prediction_id=task_id)
    poll = (await run_in_threadpool(api.renderer.one, row))["urls"]["get"]
    raise OpenAIError(504, f"prediction {task_id} is still {row['status']} after {timeout:g} s; it goes on: "
                           f"GET {poll} for its result", "timeout", prediction_id=task_id)


async def answer(api: ApiContext, request: Request, work: Callable[[str], Awaitable[JSONResponse]]) -> JSONResponse:
    """Check the key (401 whatever the body), run `work(key_id)`; any error in OpenAI's shape."""
    try:
        key_id = await run_in_threadpool(api.key_for_header, request.headers.get("authorization"))
        return await work(key_id)
    except ServiceError as err:
        return error_response(err)
    except OperationalError as err:
        log.warning("database unavailable: %s", str(err.orig or err).splitlines()[0][:200])
        return error_response(OpenAIError(503, "the database is unavailable; retry shortly", retry_after=5))
    except Exception:
        rid = secrets.token_hex(6)
        log.exception("request %s failed", rid)
        return error_response(OpenAIError(500, f"internal error (request id {rid})"))


# --- the routes ---------------------------------------------------------------------------------------------


def _docs(content_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The route's OpenAPI: its request body and OpenAI-shaped responses."""
    errors = {status: {"model": OpenAIErrorResponse} for status in (400, 401, 409, 413, 429, 500, 503, 504)}
    return {"response_model": OpenAIImagesResponse, "responses": errors, "tags": ["OpenAI-compatible"],
            "openapi_extra": {"requestBody": {"required": True, "content": {content_type: {"schema": schema}}}}}


def _params_schema(multipart: bool = False, **required: Any) -> dict[str, Any]:
    """The request's JSON schema: OpenAIImageParams, the ignored fields, and `required` ones more.

    A multipart form cannot carry a null: there, an optional field is one left out, so null is not offered.
    """
    # LoraRef is a component already (GenerateImageRequest's, see app.openapi_schema)
    schema = OpenAIImageParams.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    if multipart:
        for prop in schema["properties"].values():
            kinds = [k for k in prop.pop("anyOf", []) if k != {"type": "null"}]
            if len(kinds) == 1:
                prop |= kinds[0]
            elif kinds:
                prop["anyOf"] = kinds
            if prop.get("default", "") is None:
                del prop["default"]
    if multipart:
        schema["properties"]["loras"] = {"type": "string", "description": "extension: the loras array as JSON "
                                         "text, e.g. [{\"path\": \"style.safetensors\", \"scale\": 0.8}]"}
    schema["properties"] |= {name: {"description": "accepted and ignored"} for name in IGNORED} | required
    schema["required"] = [*schema.get("required", []), *required]
    return schema


router = APIRouter()
FILES = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
         "maxItems": schemas.MAX_REFERENCES,
         "description": f"1 to {schemas.MAX_REFERENCES} PNG, JPEG or WebP images (also accepted as image[])"}


@router.post("/v1/images/generations", **_docs("application/json", _params_schema()))
async def openai_generations(request: Request) -> JSONResponse:
    """OpenAI's images.generate: text-to-image, answered when the images are ready."""
    api = context_of(request)

    async def work(key_id: str) -> JSONResponse:
        idem = idempotency_key(request)
        fields = await json_fields(request)
        body, response_format = to_request(fields, api.settings.model_ids[0], images=0)
        idempotency = (idem, fingerprint("openai.generations", fields)) if idem else None
        row = await submit(api, key_id, body, references=[], shown_urls=[], idempotency=idempotency)
        return await finish(api, row, response_format)

    return await answer(api, request, work)


@router.post("/v1/images/edits", **_docs("multipart/form-data", _params_schema(multipart=True, image=FILES)))
async def openai_edits(request: Request) -> JSONResponse:
    """OpenAI's images.edit: one image edits it, 2 to 10 personalize; answered when the images are ready."""
    api = context_of(request)

    async def work(key_id: str) -> JSONResponse:
        idem = idempotency_key(request)
        try:
            form = await request.form(max_files=schemas.MAX_REFERENCES + 1, max_fields=100)
        except (StarletteHTTPException, MultiPartException, ValueError) as err:
            raise BadRequest(f"body: not a valid multipart/form-data request ({err})") from None
        if "mask" in form:
            raise OpenAIError(400, "mask: masks are not supported; describe the edit in the prompt",
                              "unsupported_parameter")
        uploads = [*form.getlist("image"), *form.getlist("image[]")]
        fields = {k: form_value(k, v) for k, v in form.multi_items() if k not in ("image", "image[]")}
        body, response_format = to_request(fields, api.settings.model_ids[0], images=len(uploads))
        images = await read_images(uploads, api)
        digests = [hashlib.sha256(data).hexdigest() for data, _, _ in images]
        idempotency = (idem, fingerprint("openai.edits", fields | {"image": digests})) if idem else None
        row = await submit(api, key_id, body, references=[(data, info) for data, info, _ in images],
                           shown_urls=[f"upload: {name} ({len(data):,} bytes)" for data, _, name in images],
                           idempotency=idempotency, reference_field="image")
        return await finish(api, row, response_format)

    return await answer(api, request, work)
