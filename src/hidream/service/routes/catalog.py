"""What a key can ask about the service and itself: the served models, its usage, its webhook secret."""

from fastapi import APIRouter

from hidream.service import schemas
from hidream.service.context import Ctx, Key, envelope
from hidream.service.webhooks import key_secret

router = APIRouter()
UNAUTHORIZED = {401: {"model": schemas.ErrorEnvelope}}


@router.get("/api/v1/models", response_model=schemas.ModelsEnvelope, responses=UNAUTHORIZED)
def models(ctx: Ctx, key_id: Key):
    """The served model ids, their aliases, parameters and price, and whether they run the demo checkpoint."""
    settings = ctx.settings
    params, demo = schemas.parameter_schema(*settings.recipe_defaults), settings.model is None
    return envelope([{"id": m, "aliases": [a for a, t in settings.aliases.items() if t == m],
                      "price_per_image_usd": settings.price_usd, "demo": demo,
                      "suggested": schemas.suggested_values(demo), "parameters": params}
                     for m in settings.model_ids])


@router.get("/api/v1/usage", response_model=schemas.UsageEnvelope, responses=UNAUTHORIZED)
def get_usage(ctx: Ctx, key_id: Key):
    """Images charged to this key and the amount, in total and per day (UTC)."""
    u = ctx.store.usage(key_id)
    return envelope({"images": u["images"], "amount_usd": u["micro_usd"] / 1e6,
                     "days": [{"date": d["date"], "images": d["images"], "amount_usd": d["micro_usd"] / 1e6}
                              for d in u["days"]]})


@router.get("/api/v1/webhook/secret", response_model=schemas.WebhookSecretEnvelope, responses=UNAUTHORIZED)
def webhook_secret(ctx: Ctx, key_id: Key):
    """This key's webhook signing secret: verify `HiDream-Webhook-Signature` with it."""
    return envelope({"secret": key_secret(ctx.settings.signing_secret(), key_id)})
