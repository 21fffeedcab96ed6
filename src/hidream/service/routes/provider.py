"""What the other providers' API surfaces (Replicate, fal, WaveSpeed) share: the key check with errors in the
provider's own shape, and the native request built from their fields with messages that use their names."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from hidream.service import schemas
from hidream.service.context import ApiContext
from hidream.service.errors import BadRequest, ServiceError, Unavailable

log = logging.getLogger("hidream.api")
ErrorShape = Callable[[ServiceError], JSONResponse]


def retry_headers(err: ServiceError) -> dict[str, str] | None:
    retry = getattr(err, "retry_after", None)
    return {"Retry-After": str(retry)} if retry is not None else None


async def answer(ctx: ApiContext, request: Request, work: Callable[[str], Awaitable[JSONResponse]],
                 shape: ErrorShape, authorization: str | None = None) -> JSONResponse:
    """Check the key (`authorization`, else the request's header: a 401 whatever the body), then
    `work(key_id)`; every error, the database's and unexpected ones included, through `shape`."""
    try:
        header = authorization if authorization is not None else request.headers.get("authorization")
        key_id = await run_in_threadpool(ctx.key_for_header, header)
        return await work(key_id)
    except ServiceError as err:
        return shape(err)
    except OperationalError as err:
        log.warning("database unavailable: %s", str(err.orig or err).splitlines()[0][:200])
        down = Unavailable("the database is unavailable; retry shortly")
        down.retry_after = 5  # type: ignore[attr-defined]
        return shape(down)
    except Exception:
        rid = secrets.token_hex(6)
        log.exception("request %s failed", rid)
        return shape(ServiceError(f"internal error (request id {rid})"))


def native_request(native: dict[str, Any], theirs: Callable[[str], str]) -> schemas.GenerateImageRequest:
    """The native request of these fields; a BadRequest whose message names the field as `theirs` says."""
    try:
        return schemas.GenerateImageRequest.model_validate(native)
    except ValidationError as err:
        raise BadRequest(theirs(schemas.validation_message(err))) from None
