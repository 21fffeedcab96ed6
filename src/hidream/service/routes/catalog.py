"""What a key can ask about the service and itself: the served models and LoRAs, its usage, its webhook secret."""

from fastapi import APIRouter

from hidream.service import loras, schemas
from hidream.service.context import Ctx, Key, envelope
from hidream.service.webhooks import key_secret
from hidream.service.worker import ENGINE_FACTS, stale_after_s

router = APIRouter()
UNAUTHORIZED = {401: {"model": schemas.ErrorEnvelope}}


@router.get("/api/v1/models", response_model=schemas.ModelsEnvelope, responses=UNAUTHORIZED)
def models(ctx: Ctx, key_id: Key):
    """The served model ids, their aliases, parameters and price, whether they run the demo model (and what it
    knows), and the live workers serving each, with how their engines run (device, precision, quantize, offload)."""
    settings = ctx.settings
    world = settings.demo_world
    params, demo = schemas.parameter_schema(*settings.recipe_defaults), world is not None
    params["refine_prompt"]["available"] = settings.refiner is not None
    live = ctx.store.live_workers(stale_after_s(settings.lease_s))
    return envelope([{"id": m, "aliases": [a for a, t in settings.aliases.items() if t == m],
                      "price_per_image_usd": settings.price_usd, "demo": demo, "demo_world": world,
                      "suggested": schemas.suggested_values(demo), "parameters": params,
                      "workers": [_worker(w) for w in live if m in w["models"]]}
                     for m in settings.model_ids])


def _worker(row: dict) -> dict:
    """A workers row as the models route lists it."""
    engine = row.get("engine") or {}
    return {"id": row["id"], "device": row["device"]} | {name: engine.get(name) for name in ENGINE_FACTS}


@router.get("/api/v1/loras", response_model=schemas.LorasEnvelope, responses=UNAUTHORIZED)
def list_loras(ctx: Ctx, key_id: Key):
    """The LoRA files a request may name in `loras[i].path` (HIDREAM_LORA_DIR), by name: size, key format,
    how many layers each changes, its ranks; a file that cannot be used is listed with its `error`. Empty
    when the service serves no LoRA directory."""
    return envelope(loras.listing(ctx.settings))


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
