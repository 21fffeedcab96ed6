"""Uploads: `uploadMedia` keeps an image under a signed URL that `reference_image_urls` accepts."""

import secrets
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from hidream.service import schemas
from hidream.service.context import ApiContext, Ctx, Key, envelope
from hidream.service.errors import BadRequest, PayloadTooLarge
from hidream.service.fetch import check_image
from hidream.service.submission import EXTENSIONS

router = APIRouter()


@router.post("/api/v1/model/uploadMedia", response_model=schemas.UploadEnvelope,
             responses={s: {"model": schemas.ErrorEnvelope} for s in (400, 401, 413)},
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file"],
                 "properties": {"file": {"type": "string", "format": "binary"}}}}}}})
async def upload_media(request: Request, ctx: Ctx, key_id: Key):
    """Upload a PNG, JPEG or WebP image (20 MB, 40 megapixels at most) to use as a reference."""
    url = ctx.signer.url((await store_form_image(ctx, request, key_id, "file")).blob)
    return envelope({"url": url}, url=url)


@dataclass(frozen=True)
class StoredImage:
    blob: str  # the storage key (under uploads/)
    data: bytes
    content_type: str
    filename: str  # as the upload named it


async def store_form_image(ctx: ApiContext, request: Request, key_id: str, field: str) -> StoredImage:
    """The multipart file field `field` of `request`, checked as an image and kept under `uploads/` with its
    upload row (none without the other). BadRequest / PayloadTooLarge name `field`."""
    try:
        form = await request.form(max_files=1, max_fields=10)
    except (HTTPException, MultiPartException, ValueError) as err:
        raise BadRequest(f"{field}: the body is not a valid multipart/form-data upload ({err})") from None
    file = form.get(field)
    if not isinstance(file, UploadFile):
        raise BadRequest(f"{field}: is required (a multipart/form-data field named '{field}' holding the image)")
    data = await file.read(ctx.settings.max_upload_bytes + 1)
    if len(data) > ctx.settings.max_upload_bytes:
        raise PayloadTooLarge(f"{field}: larger than {ctx.settings.max_upload_bytes:,} bytes")
    info = await run_in_threadpool(check_image, data, ctx.policy, field)
    blob = f"uploads/{secrets.token_hex(16)}.{EXTENSIONS[info.format]}"

    def persist() -> None:
        ctx.storage.put(blob, data)
        try:
            ctx.store.add_upload(blob, key_id, info.content_type, len(data))
        except BaseException:
            ctx.storage.delete(blob)  # no row: no file
            raise

    await run_in_threadpool(persist)
    return StoredImage(blob, data, info.content_type, (file.filename or "file")[:200])
