"""Submitting a generation: what the schema cannot check, the references, then one task row.

Every surface (the native route, the OpenAI routes) builds a `GenerateImageRequest` and calls `submit`, so
the rules, the messages, billing, limits and idempotency are the same whichever way a request came in.
LoRAs are checked (and downloaded) by `hidream.service.loras`, last, as the largest fetch.
Everything the engine would refuse is refused here, before anything is stored: a request that is queued
runs. Reference files are written before the task row (the worker reads them); a failure in between
deletes them, and `Store.sweep_orphan_references` removes what a killed process left.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from hidream.engine.errors import InvalidRequestError
from hidream.engine.images import plan_references
from hidream.engine.seams import SeamSmoothing
from hidream.refine import Refinement, refine_async
from hidream.rules import MAX_SEED, mode_of, sampling_problem
from hidream.service import loras, schemas
from hidream.service.context import TERMINAL, ApiContext
from hidream.service.errors import BadRequest, NotFound, Unavailable
from hidream.service.fetch import (
    ImageInfo,
    check_image,
    check_target,
    decode_data_uri,
    fetch_image,
)
from hidream.service.settings import Settings
from hidream.service.store import IdempotentReplay

EXTENSIONS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
Reference = tuple[bytes, ImageInfo]


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


def owns(ctx: ApiContext, blob: str, key_id: str) -> bool:
    """Whether `blob` is this key's upload, or an output of one of its predictions (to edit it further)."""
    if blob.startswith("uploads/"):
        return ctx.store.upload_owner(blob) == key_id
    if blob.startswith("outputs/"):
        row = ctx.store.get_task(blob.split("/")[1], key_id)
        return row is not None and blob in row["outputs"]
    return False


async def reference(ctx: ApiContext, url: str, field: str, key_id: str) -> Reference:
    """The bytes of one reference image, checked to decode within the caps."""
    if url.startswith("data:"):
        data = decode_data_uri(url, ctx.policy, field)
    elif (blob := ctx.signer.key_of(url)) is not None:
        if not await run_in_threadpool(owns, ctx, blob, key_id):
            raise BadRequest(f"{field}: {url[:200]} is not a file this API key uploaded or generated")
        data = await run_in_threadpool(ctx.storage.get, blob)
    elif url.startswith(("http://", "https://")):
        data = await fetch_image(url, ctx.policy, field)
    else:
        raise BadRequest(f"{field}: must be an http(s) URL, a data: URI or a URL from uploadMedia "
                         f"(got {url[:80]!r})")
    return data, await run_in_threadpool(check_image, data, ctx.policy, field)


def check_sampling(settings: Settings, body: schemas.GenerateImageRequest, num_references: int) -> None:
    """The sampling extensions' rules across fields (the schema checks each alone): num_inference_steps
    against timesteps, and the flash-only noise fields against the scheduler the request samples with."""
    problem = sampling_problem(
        settings.recipe_scheduler(num_references), scheduler=body.scheduler, steps=body.num_inference_steps,
        timesteps=body.timesteps, noise_scale=body.noise_scale, noise_scale_end=body.noise_scale_end,
        noise_clip_std=body.noise_clip_std)
    if problem is not None:
        field, rule = problem
        raise BadRequest(f"{'num_inference_steps' if field == 'steps' else field}: {rule}")


def output_size(body: schemas.GenerateImageRequest, width: int, height: int, references: list[Reference],
                field: str = "reference_image_urls") -> tuple[int, int]:
    """The output's (width, height) for the requested size, after the engine's reference checks (BadRequest naming
    `field[i]` for a reference it would refuse), so that a queued task never fails on its input."""
    try:
        plan = plan_references([(info.width, info.height) for _, info in references], width, height,
                               body.keep_original_aspect, field=field, snap_to_native=body.snap_to_native,
                               layout=body.layout_boxes, layout_field="layout_boxes")
    except InvalidRequestError as err:
        raise BadRequest(str(err)) from None
    return plan.width, plan.height


async def submit(ctx: ApiContext, key_id: str, body: schemas.GenerateImageRequest,
                 references: list[Reference] | None = None, shown_urls: list[str] | None = None,
                 idempotency: tuple[str, str] | None = None, reference_field: str = "reference_image_urls",
                 extra_input: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate what the schema cannot, store the references and queue the task; its row.

    `extra_input`: kept in the task's input as well (another API surface's marks, e.g. its model name).

    `references` None: fetch body.reference_image_urls. With `idempotency` (key, request hash) already
    used by this API key: the first request's task, and nothing is fetched or stored.
    """
    settings, store, storage = ctx.settings, ctx.store, ctx.storage
    if ctx.worker is not None and ctx.worker.load_error is not None:
        raise Unavailable(f"no model loaded: {ctx.worker.load_error}")
    model = settings.resolve_model_id(body.model)
    if model is None:
        served = ", ".join([*settings.model_ids, *settings.aliases])
        raise BadRequest(f"model: must be one of {served} (got {body.model!r})")
    width, height = schemas.resolve_size(body.image_size)  # before any fetch: a bad size costs nothing
    check_sampling(settings, body, len(body.reference_image_urls) if references is None else len(references))
    if body.seam_smoothing is not None and \
            (problem := SeamSmoothing(**body.seam_smoothing.model_dump()).problem()) is not None:
        raise BadRequest(f"seam_smoothing: {problem}")
    if body.refine_prompt and settings.refiner is None:
        raise BadRequest("refine_prompt: this service has no prompt refiner (its operator sets HIDREAM_REFINE_URL); "
                         "leave refine_prompt out")
    if idempotency is not None:  # a replay costs no fetch
        earlier = await run_in_threadpool(store.idempotent_task, key_id, *idempotency)
        if earlier is not None:
            return earlier
    if body.webhook_url is not None:
        await check_target(body.webhook_url, ctx.policy, "webhook_url")
    if references is None:
        references = list(await asyncio.gather(*(reference(ctx, u, f"{reference_field}[{i}]", key_id)
                                                 for i, u in enumerate(body.reference_image_urls))))
        shown_urls = [u if not u.startswith("data:") else f"data: URI ({len(u):,} characters)"
                      for u in body.reference_image_urls]
    width, height = output_size(body, width, height, references, reference_field)
    # Last, as the largest fetch (a LoRA directory's names are checked before any download).
    lora_set = await loras.resolve(body.loras, settings, ctx.policy, storage)
    try:
        # The refinement last of all: a request refused for its input, or by a limit, costs no call to the refiner.
        refinement = None
        if body.refine_prompt:
            await run_in_threadpool(store.check_limits, key_id, ctx.limits)
            refinement = await refine_async(settings.refiner, body.prompt, mode_of(len(references)))
        return await run_in_threadpool(_persist, ctx, key_id, body, model, width, height, references, shown_urls,
                                       idempotency, lora_set, refinement, extra_input)
    finally:
        await run_in_threadpool(lora_set.discard)  # downloads that were not kept: the request failed


def _persist(ctx: ApiContext, key_id: str, body: schemas.GenerateImageRequest, model: str, width: int, height: int,
             references: list[Reference], shown_urls: list[str] | None, idempotency: tuple[str, str] | None,
             lora_set: loras.LoraSet, refinement: Refinement | None = None,
             extra_input: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task's input, then its files and its row (blocking); a failure removes the files again."""
    settings, store, storage = ctx.settings, ctx.store, ctx.storage
    seed = body.seed if body.seed >= 0 else secrets.randbelow(MAX_SEED + 1)
    mode = mode_of(len(references))
    task_id = secrets.token_hex(16)
    ref_keys = [f"references/{task_id}/{i}.{EXTENSIONS[info.format]}" for i, (_, info) in enumerate(references)]
    steps, guidance = settings.recipe_defaults
    if body.timesteps is not None:
        steps = len(body.timesteps)
    unset = {name for name in schemas.EXTENSIONS if getattr(body, name) is None}  # stored only when given
    inp = body.model_dump(exclude={"model", "image_size", "webhook_url", "loras", "snap_to_native", "refine_prompt",
                                   "cache", *unset}) | {
        "image_size": body.image_size if isinstance(body.image_size, str) else body.image_size.model_dump(),
        "width": width, "height": height, "seed": seed, "mode": mode, "reference_image_urls": shown_urls or [],
        "num_inference_steps": body.num_inference_steps or steps,
        "guidance_scale": guidance if body.guidance_scale is None else body.guidance_scale}
    if lora_set.loras:  # stored only when given, so other predictions look as they did
        inp["loras"] = lora_set.echo()
    if body.snap_to_native:  # likewise; width and height are the native size made
        inp["snap_to_native"] = True
    if body.cache != "off":  # likewise
        inp["cache"] = body.cache
    inp |= extra_input or {}
    if refinement is not None:  # both texts kept: `prompt` as given, `refined_prompt` what is drawn
        inp["refine_prompt"] = True
        if refinement.refined is not None:
            inp["refined_prompt"] = refinement.refined
        if refinement.warning:
            inp["warnings"] = [refinement.warning]
    try:
        for key, (data, _) in zip(ref_keys, references, strict=True):
            storage.put(key, data)
        lora_set.keep()  # the downloads, where the worker finds them by sha256
        return store.insert_task(key_id, model, inp, ref_keys, settings.max_queue, task_id=task_id,
                                 webhook_url=body.webhook_url, idempotency=idempotency, limits=ctx.limits)
    except IdempotentReplay as replay:  # a concurrent request with the same key got there first
        delete_all(storage, ref_keys)  # (the LoRA downloads stay: that request's task may use them)
        return store.get_task(replay.task_id)
    except BaseException:
        delete_all(storage, ref_keys)  # a rejected request leaves nothing behind
        lora_set.undo()
        raise


def delete_all(storage: Any, keys: list[str]) -> None:
    for key in keys:
        storage.delete(key)


async def wait_for(ctx: ApiContext, task_id: str, timeout_s: float) -> dict[str, Any]:
    """The task's row once it ended, or as it is when `timeout_s` ran out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        row = await run_in_threadpool(ctx.store.get_task, task_id)
        if row["status"] in TERMINAL or loop.time() >= deadline:
            return row
        await asyncio.sleep(0.05)


async def owned(ctx: ApiContext, prediction_id: str, key_id: str) -> dict[str, Any]:
    """This key's prediction row; NotFound for an unknown id and for another key's alike."""
    row = await run_in_threadpool(ctx.store.get_task, prediction_id, key_id)
    if row is None:
        raise NotFound(f"prediction {prediction_id[:64]!r} not found")
    return row
