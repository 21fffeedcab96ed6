"""Predictions: submit (`generateImage`), read, list, cancel, and the live progress stream."""

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from hidream.service import schemas
from hidream.service.context import TERMINAL, ApiContext, Ctx, Key, envelope
from hidream.service.errors import BadRequest, NotFound
from hidream.service.predictions import progress_of
from hidream.service.storage import discard_task_files
from hidream.service.submission import (
    fingerprint,
    idempotency_key,
    owned,
    submit,
    wait_for,
)

CANCEL_WAIT_S = 5.0  # how long a cancel of a running prediction waits for its worker to stop
STREAM_POLL_S = 0.2  # how often the progress stream reads the prediction (from the database: any replica)
KEEPALIVE_S = 15.0
ERRORS = {status: {"model": schemas.ErrorEnvelope} for status in (400, 401, 404, 409, 413, 429, 503)}

router = APIRouter()


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: ERRORS[s] for s in statuses}


@router.post("/api/v1/model/generateImage", response_model=schemas.PredictionEnvelope,
             responses=_errors(400, 401, 409, 413, 429, 503),
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/GenerateImageRequest"}}}}})
async def generate_image(request: Request, ctx: Ctx, key_id: Key):
    """Submit a generation; poll `urls.get`, or set enable_sync_mode to wait for the result."""
    # The body is parsed here, after the key was checked: no key is a 401 whatever the body.
    idem = idempotency_key(request)
    try:
        body = schemas.GenerateImageRequest.model_validate_json(await request.body())
    except ValidationError as err:
        raise BadRequest(schemas.validation_message(err)) from None
    idempotency = (idem, fingerprint("generateImage", body.model_dump(mode="json"))) if idem else None
    row = await submit(ctx, key_id, body, idempotency=idempotency)
    if body.enable_sync_mode:
        row = await wait_for(ctx, row["id"], ctx.settings.sync_timeout_s)
    return envelope(await run_in_threadpool(ctx.renderer.one, row))


@router.get("/api/v1/model/prediction/{prediction_id}", response_model=schemas.PredictionEnvelope,
            responses=_errors(401, 404))
def get_prediction(prediction_id: str, ctx: Ctx, key_id: Key):
    """A prediction of this key; another key's id is 404, as an unknown one."""
    row = ctx.store.get_task(prediction_id, key_id)
    if row is None:
        raise NotFound(f"prediction {prediction_id[:64]!r} not found")
    return envelope(ctx.renderer.one(row))


@router.post("/api/v1/model/prediction/{prediction_id}/cancel", response_model=schemas.PredictionEnvelope,
             responses=_errors(401, 404))
async def cancel_prediction(prediction_id: str, ctx: Ctx, key_id: Key):
    """Cancel: a queued prediction never runs, a running one stops at its next step; either ends
    `failed` with error `canceled` and nothing is charged. A finished one is left as it is (the message
    says so)."""
    what = await run_in_threadpool(ctx.store.cancel, prediction_id, key_id)
    if what is None:
        raise NotFound(f"prediction {prediction_id[:64]!r} not found")
    message = "success"
    if what == "requested":
        row = await wait_for(ctx, prediction_id, CANCEL_WAIT_S)
        if row["status"] not in TERMINAL:
            message = "cancel requested: the prediction stops at its next step"
    else:
        row = await owned(ctx, prediction_id, key_id)
        if what == "canceled":  # it never ran: its references are of no use any more
            await run_in_threadpool(discard_task_files, ctx.storage, prediction_id, False)
        if what in TERMINAL:
            message = f"prediction already {what}; nothing to cancel"
    return envelope(await run_in_threadpool(ctx.renderer.one, row), message=message)


@router.get("/api/v1/model/prediction/{prediction_id}/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "Server-Sent Events: status, progress, preview, done"},
                       **_errors(400, 401, 404)})
async def stream_prediction(prediction_id: str, ctx: Ctx, key_id: Key, request: Request, previews: bool = True):
    """Live progress as Server-Sent Events: `status` on each change, `progress` (step, total, eta_s)
    on each step, `preview` (a low-resolution data: URI) when the worker makes one, and `done` with the
    final prediction, which ends the stream. It reads the database, so any replica serves it."""
    first = await owned(ctx, prediction_id, key_id)
    return StreamingResponse(events(ctx, first, request, previews), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def events(ctx: ApiContext, row: dict[str, Any], request: Request, previews: bool) -> AsyncIterator[str]:
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
            yield event("done", await run_in_threadpool(ctx.renderer.one, row))
            return
        if loop.time() - last_sent >= KEEPALIVE_S:
            last_sent = loop.time()
            yield ": keep-alive\n\n"
        await asyncio.sleep(STREAM_POLL_S)
        if await request.is_disconnected():
            return  # the prediction goes on; only this stream ends
        row = await run_in_threadpool(ctx.store.get_task, row["id"])


@router.get("/api/v1/predictions", response_model=schemas.PredictionListEnvelope, responses=_errors(400, 401))
def list_predictions(ctx: Ctx, key_id: Key, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                     cursor: str | None = None):
    """This key's predictions, newest first; pass `next_cursor` back as `cursor` for the next page."""
    before = None
    if cursor:
        try:
            at, _, tid = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
            before = (datetime.fromisoformat(at), tid)
        except ValueError:
            raise BadRequest("cursor: not a cursor this API returned") from None
    rows = ctx.store.list_tasks(key_id, limit, before)
    next_cursor = None
    if len(rows) == limit:
        last = rows[-1]
        next_cursor = base64.urlsafe_b64encode(f"{last['created_at'].isoformat()}|{last['id']}".encode()).decode()
    return envelope({"items": ctx.renderer.many(rows), "next_cursor": next_cursor})
