"""Request and response shapes of the API, and the validation messages that name field and rule."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hidream import sizes
from hidream.engine.errors import InvalidRequestError
from hidream.prompts import control_token_in
from hidream.rules import (
    CACHE_MODES,
    CACHE_RULE,
    DEFAULT_SIZE,
    DEMO_SIZE,
    GUIDANCE_RULE,
    IMAGES_RULE,
    LORA_SCALE_RULE,
    LORAS_RULE,
    MAX_AREA,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_LORA_SCALE,
    MAX_LORAS,
    MAX_NOISE_CLIP_STD,
    MAX_NOISE_SCALE,
    MAX_PROMPT,
    MAX_REFERENCES,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MAX_TIMESTEP,
    MIN_GUIDANCE,
    MIN_SIDE,
    MODES,
    MULTIPLE,
    NOISE_CLIP_STD_RULE,
    NOISE_DEFAULTS,
    NOISE_SCALE_END_RULE,
    NOISE_SCALE_RULE,
    RANDOM_SEED,
    SCHEDULER_RULE,
    SCHEDULERS,
    SEED_RULE,
    SIZE_RULE,
    STEPS_RULE,
    TIMESTEPS_RULE,
)
from hidream.engine.layout import MAX_BOXES
from hidream.engine.seams import PASSES as SEAM_PASSES
from hidream.engine.seams import RULE as SEAM_RULE
from hidream.engine.seams import SeamSmoothing
from hidream.sizes import NATIVE_SIZES, SIZE_PRESETS

RULES = {
    "model": "is required: one of the ids GET /api/v1/models lists",
    "prompt": f"must be a string of 1 to {MAX_PROMPT:,} characters, not only whitespace",
    "image_size": (f"must be one of {', '.join(SIZE_PRESETS)}, or \"W*H\", \"WxH\" or "
                   f"{{\"width\": W, \"height\": H}} with {SIZE_RULE} (custom sides are rounded to "
                   f"multiples of {MULTIPLE})"),
    "num_inference_steps": STEPS_RULE,
    "guidance_scale": GUIDANCE_RULE,
    "output_format": "must be png, jpeg or webp",
    "seed": SEED_RULE,
    "reference_image_urls": f"must be a list of 0 to {MAX_REFERENCES} URLs (http, https, data: or from uploadMedia)",
    "keep_original_aspect": "must be true or false",
    "snap_to_native": "must be true or false",
    "refine_prompt": "must be true or false",
    "cache": CACHE_RULE,
    "seam_smoothing": "must be an object {\"start\", \"end\", \"passes\"} (each optional): " + SEAM_RULE,
    "layout_boxes": f"must be a list of 1 to {MAX_BOXES} boxes [x1, y1, x2, y2], one per reference image, "
                    "fractions of the output with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1",
    "num_images": IMAGES_RULE,
    "enable_sync_mode": "must be true or false",
    "enable_base64_output": "must be true or false",
    "webhook_url": "must be an http or https URL of at most 2,048 characters",
    # extensions of the hosted contract: the sampling recipe's settings
    "scheduler": SCHEDULER_RULE,
    "timesteps": TIMESTEPS_RULE,
    "noise_scale": NOISE_SCALE_RULE,
    "noise_scale_end": NOISE_SCALE_END_RULE,
    "noise_clip_std": NOISE_CLIP_STD_RULE,
    "loras": f"must be a list of {{\"path\", \"scale\"}} objects, {LORAS_RULE}",
}
# A LoRA entry's fields: `loras[0].path: <rule>`.
LORA_RULES = {
    "path": "must be a LoRA file name that GET /api/v1/loras lists, or an https URL where the service takes them",
    "scale": LORA_SCALE_RULE,
}
# The extensions' fields: stored in a task's input only when given, so other predictions look as they did.
EXTENSIONS = ("scheduler", "timesteps", "noise_scale", "noise_scale_end", "noise_clip_std", "layout_boxes",
              "seam_smoothing")
Timestep = Annotated[int, Field(ge=1, le=MAX_TIMESTEP)]
_FLASH, _PLAIN = NOISE_DEFAULTS["flash"], NOISE_DEFAULTS["unipc"]


# What a size string looks like (the numbers must still meet the size rule); documentation for /openapi.json.
SIZE_PATTERN = "^(" + "|".join(SIZE_PRESETS) + r"|\s*[0-9]{1,6}\s*[xX*]\s*[0-9]{1,6}\s*)$"
# Each side is rounded to the nearest multiple of 32 (halves to even) before the rule: 48 becomes 64, 4112 4096.
SIDE_SCHEMA = {"minimum": MIN_SIDE - MULTIPLE // 2, "maximum": MAX_SIDE + MULTIPLE // 2,
               "description": f"rounded to the nearest multiple of {MULTIPLE}, which must be {MIN_SIDE} to {MAX_SIDE}"}


def _size_pattern(schema: dict[str, Any]) -> None:
    for kind in schema.get("anyOf", []):
        if kind.get("type") == "string":
            kind["pattern"] = SIZE_PATTERN


class SizeObject(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    width: int = Field(json_schema_extra=SIDE_SCHEMA)
    height: int = Field(json_schema_extra=SIDE_SCHEMA)


class LoraRef(BaseModel):
    """One LoRA of a request: which file, and how strongly it applies."""

    model_config = ConfigDict(extra="forbid", strict=True)
    path: str = Field(min_length=1, max_length=2048,
                      description="a file name GET /api/v1/loras lists, or an https URL where the service allows "
                                  "them (HIDREAM_LORA_URLS)")
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE,
                         description="the LoRA's weight: 1.0 as trained, 0 none, negative subtracts it")

    @field_validator("scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("not finite")
        return v


class SeamSmoothingRequest(BaseModel):
    """seam_smoothing: the part of the schedule it covers and the passes on each of its steps."""

    model_config = ConfigDict(extra="forbid", strict=True)

    start: float = Field(SeamSmoothing.start, ge=0, lt=1, description="the fraction of the steps where it turns on")
    end: float = Field(SeamSmoothing.end, gt=0, le=1, description="the fraction where it turns off")
    passes: int = Field(SeamSmoothing.passes, description="predictions per step it covers: 2, 4 or 8 (the natural "
                                                          "grid and passes - 1 shifted ones)")


class GenerateImageRequest(BaseModel):
    """POST /api/v1/model/generateImage."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT)
    image_size: str | SizeObject = Field(DEFAULT_SIZE, json_schema_extra=_size_pattern)
    # None: the served recipe's default (50 and 5.0 for the full model, 28 and 1.0 for Dev)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=MIN_GUIDANCE, le=MAX_GUIDANCE)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    seed: int = Field(RANDOM_SEED, ge=RANDOM_SEED, le=MAX_SEED)
    reference_image_urls: list[str] = Field(default_factory=list, max_length=MAX_REFERENCES)
    keep_original_aspect: bool = False
    snap_to_native: bool = Field(
        False, description="extension: generate at the native size (one of the 11 the model was trained at, "
                           "about 4 MP) nearest the aspect asked for (image_size, or the reference's with "
                           "keep_original_aspect), as the official code always does; the prediction's "
                           "input.width and input.height say what was made")
    seam_smoothing: SeamSmoothingRequest | None = Field(
        None, description="extension: average the late steps' predictions over patch grids shifted by part of a "
                          "patch, against the 32-pixel grid seams; {} for the defaults (the last 20% of the steps, "
                          "2 passes: one extra forward on each)")
    cache: Literal["off", "fast"] = Field(
        "off", description="extension: step caching; fast skips all but the first decoder layer on the steps where "
                           "that layer's change since the last full step is small, reusing the rest's output "
                           "(quicker, approximate); off runs every layer, as the official code")
    layout_boxes: list[list[float | int]] | None = Field(
        None, max_length=MAX_BOXES,
        description="extension: where each reference goes, one box [x1, y1, x2, y2] per reference image (the "
                    "same index), fractions of the output (0-1); drawn for the model as the official layout "
                    "conditioning")
    refine_prompt: bool = Field(
        False, description="extension: rewrite the prompt into a detailed one with the service's prompt refiner "
                           "(an OpenAI-compatible chat model) before generating; input.refined_prompt is what was "
                           "drawn, and a refiner that fails leaves the prompt as given with a warning")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    enable_sync_mode: bool = False
    enable_base64_output: bool = False
    # The pattern is documentation (the check itself is fetch.check_target's, with its own messages).
    webhook_url: str | None = Field(None, min_length=1, max_length=2048,
                                    json_schema_extra={"pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#\\s]+"},
                                    description="POST the final prediction there (a public http(s) address)")
    # Extensions: None means the served recipe's (and the noise settings of the scheduler it samples with).
    scheduler: Literal[SCHEDULERS] | None = Field(  # type: ignore[valid-type]
        None, description="extension: the sampler; default the recipe's (unipc full; flash dev, euler for a dev "
                          "edit). The noise defaults follow it")
    timesteps: list[Timestep] | None = Field(
        None, min_length=1, max_length=MAX_STEPS,
        description=f"extension: an explicit schedule for any scheduler, model timesteps strictly decreasing from "
                    f"{MAX_TIMESTEP} to 1, one per step (sigma t/1000), e.g. [999, 857, 515, 110]; "
                    "num_inference_steps must then be absent or their count")
    noise_scale: float | None = Field(
        None, gt=0, le=MAX_NOISE_SCALE,
        description=f"extension: the initial noise's scale, and flash's first re-noise; default {_FLASH[0]:g} "
                    f"flash, {_PLAIN[0]:g} unipc and euler")
    noise_scale_end: float | None = Field(
        None, ge=0, le=MAX_NOISE_SCALE,
        description=f"extension, flash only: the last step's re-noise scale (linear from noise_scale); default "
                    f"{_FLASH[1]:g}")
    noise_clip_std: float | None = Field(
        None, ge=0, le=MAX_NOISE_CLIP_STD,
        description=f"extension, flash only: the re-noise clipped at this many standard deviations (0: none); "
                    f"default {_FLASH[2]:g}")
    loras: list[LoraRef] = Field(
        default_factory=list, max_length=MAX_LORAS,
        description=f"extension: LoRAs applied to this request only, each with its scale; {LORAS_RULE}")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("blank")
        if (token := control_token_in(v)) is not None:
            raise ValueError(f"must not contain the model's control token {token}")
        return v

    @field_validator("guidance_scale", "noise_scale", "noise_scale_end", "noise_clip_std")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("not finite")
        return v

    @field_validator("timesteps")
    @classmethod
    def _decreasing(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(a <= b for a, b in zip(v, v[1:])):
            raise ValueError("not strictly decreasing")
        return v


def resolve_size(value: str | SizeObject) -> tuple[int, int]:
    """(width, height) of a preset or a custom size rounded to multiples of 32; BadRequest naming image_size."""
    from hidream.service.errors import BadRequest

    try:
        return sizes.resolve_size(value if isinstance(value, str) else (value.width, value.height), "image_size")
    except InvalidRequestError:
        shown = value if isinstance(value, str) else value.model_dump()
        raise BadRequest(f"image_size: {RULES['image_size']} (got {_shown(shown)})") from None


def _shown(value: Any) -> str:
    if isinstance(value, str) and len(value) > 60:
        return f"a string of {len(value):,} characters"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Query parameters' rules, for the messages of the routes that take them.
QUERY_RULES = {"limit": "must be an integer from 1 to 100", "previews": "must be true or false"}


def validation_message(err: ValidationError | list[dict[str, Any]], extra_rules: dict[str, str] | None = None) -> str:
    """The first problem as `field: rule (got value)`."""
    errors = err.errors() if isinstance(err, ValidationError) else err
    e = errors[0]
    loc = list(e.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    kind = e.get("type", "")
    if kind == "json_invalid":
        return f"body: malformed JSON ({e.get('ctx', {}).get('error', 'cannot parse')})"
    if not loc:
        return "body: must be a JSON object with the request's fields"
    name = str(loc[0])
    field = name + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
    if name == "loras" and len(loc) > 1:
        return _lora_message(loc, kind, e)
    if name == "seam_smoothing" and len(loc) > 1:
        inner = f"seam_smoothing.{loc[1]}"
        if kind == "extra_forbidden":
            return f"{inner}: unknown field (allowed: start, end, passes)"
        return f"{inner}: {SEAM_RULE} (got {_shown(e.get('input'))})"
    if kind == "extra_forbidden":
        return f"{field}: unknown field (allowed: {', '.join(RULES)})"
    if kind == "missing":
        return f"{field}: is required"
    rule = (extra_rules or {}).get(name) or RULES.get(name, e.get("msg", "is invalid"))
    if name == "prompt" and "control token" in e.get("msg", ""):
        rule = e["msg"].removeprefix("Value error, ")
    if name == "reference_image_urls" and len(loc) > 1:
        rule = "must be a URL string (http, https, data: or from uploadMedia)"
    if name == "image_size" and len(loc) > 1:
        return f"image_size: {rule} (got {_shown(e.get('input'))})"  # the union's first error has the whole value
    return f"{field}: {rule} (got {_shown(e.get('input'))})"


def _lora_message(loc: list[Any], kind: str, e: dict[str, Any]) -> str:
    """A problem inside `loras`: `loras[1].scale: rule (got 11)`, `loras[0]: unknown field ...`."""
    field = f"loras[{loc[1]}]" + "".join(f".{p}" for p in loc[2:3])
    if kind == "extra_forbidden":
        return f"{field}: unknown field (allowed: {', '.join(LORA_RULES)})"
    if kind == "missing":
        return f"{field}: is required"
    if len(loc) == 2:
        return f"{field}: must be an object {{\"path\": ..., \"scale\": ...}} (got {_shown(e.get('input'))})"
    return f"{field}: {LORA_RULES.get(str(loc[2]), e.get('msg', 'is invalid'))} (got {_shown(e.get('input'))})"


Status = Literal["created", "processing", "completed", "failed"]


class Progress(BaseModel):
    step: int
    total: int
    eta_s: float | None = None


class WebhookAttempt(BaseModel):
    at: str
    status_code: int | None
    error: str
    duration_ms: int


class Webhook(BaseModel):
    url: str
    state: Literal["waiting", "pending", "delivered", "failed"]
    attempts: list[WebhookAttempt]


class Timings(BaseModel):
    inference: int | None = None


class Urls(BaseModel):
    get: str


class Prediction(BaseModel):
    id: str
    model: str
    status: Status
    input: dict[str, Any]
    outputs: list[str]
    urls: Urls
    has_nsfw_contents: list[bool]
    error: str
    created_at: str | None
    started_at: str | None
    completed_at: str | None
    timings: Timings
    progress: Progress | None = None
    webhook: Webhook | None = None
    warnings: list[str] = []  # what did not go as asked, though the prediction went on (a refiner that failed)


class Envelope(BaseModel):
    code: int
    message: str
    data: Any


class PredictionEnvelope(Envelope):
    data: Prediction


class PredictionList(BaseModel):
    items: list[Prediction]
    next_cursor: str | None


class PredictionListEnvelope(Envelope):
    data: PredictionList


class UploadData(BaseModel):
    url: str


class UploadEnvelope(Envelope):
    url: str
    data: UploadData


class ModelWorker(BaseModel):
    id: str
    device: str = Field(description="e.g. cuda:0, cpu; unknown when the engine does not say")
    precision: str | None = Field(description="bf16, bf16-fp32acc or fp32; null when the worker does not say")
    quantize: str | None = Field(description="fp8: fp8 weights; null: none (or the worker does not say)")
    offload: str | None = Field(description="none, or layers: decoder layers streamed from host memory; null "
                                            "when the worker does not say")
    variant: str | None = Field(description="the recipe the worker's checkpoint runs: full or dev")


class ModelInfo(BaseModel):
    id: str
    aliases: list[str]
    price_per_image_usd: float
    demo: bool = Field(description="true: the demo model (a tiny model trained on coloured shapes, see "
                                   "`demo_world`)")
    demo_world: dict[str, Any] | None = Field(None, description="on the demo model: what it knows (colours, "
                                              "shapes, positions, the prompt grammar per mode, example prompts, "
                                              "its size); null on other checkpoints")
    suggested: dict[str, Any] = Field(description="values to preselect instead of the defaults (the demo's "
                                                  "small size); empty on real weights")
    parameters: dict[str, Any]
    workers: list[ModelWorker] = Field(default_factory=list, description="the live workers that serve this "
                                       "model (a heartbeat within three beats, not stopping), oldest first")


class ModelsEnvelope(Envelope):
    data: list[ModelInfo]


class LoraFile(BaseModel):
    name: str = Field(description="what a request's loras[i].path names")
    size_bytes: int
    format: str | None = Field(description="peft, kohya or lokr; null when the file cannot be used")
    modules: int | None = Field(description="how many of the model's layers it changes")
    ranks: list[int] | None = Field(description="its ranks (one for most files)")
    error: str | None = Field(None, description="why the file cannot be used, if it cannot")


class LorasEnvelope(Envelope):
    data: list[LoraFile]


class UsageDay(BaseModel):
    date: str
    images: int
    amount_usd: float


class Usage(BaseModel):
    images: int
    amount_usd: float
    days: list[UsageDay]


class UsageEnvelope(Envelope):
    data: Usage


class WebhookSecret(BaseModel):
    secret: str


class WebhookSecretEnvelope(Envelope):
    data: WebhookSecret


class ErrorEnvelope(Envelope):
    data: None = None


REFINE_RULES = {"prompt": RULES["prompt"], "mode": f"must be one of {', '.join(MODES)}"}


class RefineRequest(BaseModel):
    """POST /api/v1/prompt/refine."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT)
    mode: Literal[MODES] = Field(  # type: ignore[valid-type]
        "text-to-image", description="what the prompt is for: the edit and personalization modes keep it an "
                                     "instruction about the reference images")

    _not_blank = field_validator("prompt")(GenerateImageRequest._not_blank.__func__)


class Refined(BaseModel):
    prompt: str = Field(description="the prompt as given")
    refined_prompt: str = Field(description="the refiner's rewrite")
    mode: str


class RefineEnvelope(Envelope):
    data: Refined


def suggested_values(demo: bool) -> dict[str, Any]:
    """Values a client may preselect instead of the defaults: on the demo model its own size (seconds on a
    CPU); nothing on real weights. The defaults stay the contract's either way."""
    return {"image_size": {"width": DEMO_SIZE[0], "height": DEMO_SIZE[1]}} if demo else {}


def parameter_schema(steps: int = 50, guidance: float = 5.0) -> dict[str, Any]:
    """What GET /api/v1/models tells a client about each field: type, default, range."""
    return {
        "prompt": {"type": "string", "required": True, "max_length": MAX_PROMPT},
        "image_size": {"type": "string|object", "default": DEFAULT_SIZE,
                       "presets": {k: {"width": w, "height": h} for k, (w, h) in SIZE_PRESETS.items()},
                       "custom": {"min_side": MIN_SIDE, "max_side": MAX_SIDE, "max_pixels": MAX_AREA,
                                  "multiple_of": MULTIPLE}},
        "num_inference_steps": {"type": "integer", "default": steps, "minimum": 1, "maximum": MAX_STEPS},
        "guidance_scale": {"type": "number", "default": guidance, "minimum": MIN_GUIDANCE, "maximum": MAX_GUIDANCE},
        "output_format": {"type": "string", "default": "png", "enum": ["png", "jpeg", "webp"]},
        "seed": {"type": "integer", "default": RANDOM_SEED, "minimum": RANDOM_SEED, "maximum": MAX_SEED},
        "reference_image_urls": {"type": "array", "default": [], "max_items": MAX_REFERENCES},
        "keep_original_aspect": {"type": "boolean", "default": False},
        "refine_prompt": {"type": "boolean", "default": False, "extension": True, "available": False},
        "seam_smoothing": {"type": "object", "default": None, "extension": True,
                           "fields": {"start": {"type": "number", "default": SeamSmoothing.start},
                                      "end": {"type": "number", "default": SeamSmoothing.end},
                                      "passes": {"type": "integer", "default": SeamSmoothing.passes,
                                                 "enum": list(SEAM_PASSES)}}},
        "cache": {"type": "string", "default": "off", "enum": list(CACHE_MODES), "extension": True},
        "layout_boxes": {"type": "array", "default": None, "min_items": 1, "max_items": MAX_BOXES, "extension": True,
                         "items": "[x1, y1, x2, y2], fractions of the output, one per reference"},
        "snap_to_native": {"type": "boolean", "default": False, "extension": True,
                           "sizes": [{"width": w, "height": h} for w, h in NATIVE_SIZES]},
        "num_images": {"type": "integer", "default": 1, "minimum": 1, "maximum": MAX_IMAGES},
        "enable_sync_mode": {"type": "boolean", "default": False},
        "enable_base64_output": {"type": "boolean", "default": False},
        "webhook_url": {"type": "string", "default": None, "max_length": 2048},
        # extensions; None: the recipe's for the mode (and the noise settings of its scheduler)
        "scheduler": {"type": "string", "default": None, "enum": list(SCHEDULERS), "extension": True},
        "timesteps": {"type": "array", "default": None, "min_items": 1, "max_items": MAX_STEPS, "minimum": 1,
                      "maximum": MAX_TIMESTEP, "extension": True},
        "noise_scale": {"type": "number", "default": None, "exclusive_minimum": 0, "maximum": MAX_NOISE_SCALE,
                        "scheduler_defaults": {k: v[0] for k, v in NOISE_DEFAULTS.items()}, "extension": True},
        "noise_scale_end": {"type": "number", "default": None, "minimum": 0, "maximum": MAX_NOISE_SCALE,
                            "scheduler_defaults": {"flash": _FLASH[1]}, "extension": True},
        "noise_clip_std": {"type": "number", "default": None, "minimum": 0, "maximum": MAX_NOISE_CLIP_STD,
                           "scheduler_defaults": {"flash": _FLASH[2]}, "extension": True},
        "loras": {"type": "array", "default": [], "max_items": MAX_LORAS, "extension": True,
                  "items": {"path": {"type": "string", "required": True},
                            "scale": {"type": "number", "default": 1.0, "minimum": -MAX_LORA_SCALE,
                                      "maximum": MAX_LORA_SCALE}}},
    }
