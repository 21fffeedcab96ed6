"""Uploads: `uploadMedia` keeps an image under a signed URL that `reference_image_urls` accepts."""

import secrets

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from hidream.service import schemas
from hidream.service.context import Ctx, Key, envelope
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
    try:
        form = await request.form(max_files=1, max_fields=10)
    except (HTTPException, MultiPartException, ValueError) as err:
        raise BadRequest(f"file: the body is not a valid multipart/form-data upload ({err})") from None
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise BadRequest("file: is required (a multipart/form-data field named 'file' holding the image)")
    data = await file.read(ctx.settings.max_upload_bytes + 1)
    if len(data) > ctx.settings.max_upload_bytes:
        raise PayloadTooLarge(f"file: larger than {ctx.settings.max_upload_bytes:,} bytes")
    info = await run_in_threadpool(check_image, data, ctx.policy, "file")
    blob = f"uploads/{secrets.token_hex(16)}.{EXTENSIONS[info.format]}"

    def persist() -> None:
        ctx.storage.put(blob, data)
        try:
            ctx.store.add_upload(blob, key_id, info.content_type, len(data))
        except BaseException:
            ctx.storage.delete(blob)  # no row: no file
            raise

    await run_in_threadpool(persist)
    url = ctx.signer.url(blob)
    return envelope({"url": url}, url=url)
