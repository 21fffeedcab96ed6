"""Prompt refinement on its own: `POST /api/v1/prompt/refine` gives the refiner's rewrite of a prompt."""

import json

from fastapi import APIRouter, Request
from pydantic import ValidationError

from hidream.refine import refine_async
from hidream.service import schemas
from hidream.service.context import Ctx, Key, envelope
from hidream.service.errors import BadGateway, BadRequest, GatewayTimeout, Unavailable

router = APIRouter()


@router.post("/api/v1/prompt/refine", response_model=schemas.RefineEnvelope,
             responses={s: {"model": schemas.ErrorEnvelope} for s in (400, 401, 502, 503, 504)},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/RefineRequest"}}}}})
async def refine_prompt(request: Request, ctx: Ctx, key_id: Key):
    """The prompt refiner's rewrite of `prompt` for `mode`, as `refine_prompt: true` would draw it: 503 when the
    service has no refiner, 504 when it did not answer in time, 502 when its answer could not be used."""
    try:
        raw = json.loads(await request.body())
    except ValueError as err:
        raise BadRequest(f"body: malformed JSON ({err})") from None
    if isinstance(raw, dict) and (unknown := sorted(set(raw) - set(schemas.REFINE_RULES))):
        raise BadRequest(f"{unknown[0]}: unknown field (allowed: {', '.join(schemas.REFINE_RULES)})")
    try:
        body = schemas.RefineRequest.model_validate(raw)
    except ValidationError as err:
        raise BadRequest(schemas.validation_message(err, schemas.REFINE_RULES)) from None
    config = ctx.settings.refiner
    if config is None:
        raise Unavailable("this service has no prompt refiner (its operator sets HIDREAM_REFINE_URL)")
    result = await refine_async(config, body.prompt, body.mode)
    if result.refined is None:
        raise (GatewayTimeout if result.failure == "timeout" else BadGateway)(result.reason or "no refinement")
    return envelope({"prompt": body.prompt, "refined_prompt": result.refined, "mode": body.mode})
