"""Stored images, served through the signed, expiring URLs the API gives out (local storage)."""

from fastapi import APIRouter
from fastapi.responses import Response

from hidream.service import schemas
from hidream.service.context import Ctx
from hidream.service.errors import NotFound
from hidream.service.predictions import MIME

router = APIRouter()


@router.get("/files/{key:path}", response_class=Response,
            responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
                       404: {"model": schemas.ErrorEnvelope}})
def files(key: str, ctx: Ctx, expires: str = "", signature: str = ""):
    """A stored image, through the signed, expiring URL the API gave out."""
    if not ctx.signer.verify(key, expires, signature):
        raise NotFound("file not found or link expired")
    data = ctx.storage.get(key)
    return Response(data, media_type=MIME.get(key.rsplit(".", 1)[-1], "application/octet-stream"),
                    headers={"Cache-Control": "private, max-age=3600"})
