"""Model configuration: the checkpoint's stock Qwen3-VL config, checked, plus the sampling recipes."""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hidream.engine.errors import CheckpointError
from hidream.rules import NOISE_DEFAULTS

if TYPE_CHECKING:  # imported where used: the recipes serve the API process too, which needs no model
    from transformers import Qwen3VLConfig

log = logging.getLogger("hidream.engine")

PATCH_SIZE = 32
# Target and reference patch grids are placed at this mRoPE offset, past any text.
IMAGE_POSITION_OFFSET = 4096
TIMESTEP_TOKEN = "<|tms_token|>"
BEGIN_IMAGE_TOKEN = "<|boi_token|>"
VISION_END_TOKEN = "<|vision_end|>"
# A single file's metadata entry naming its variant (full | dev).
VARIANT_KEY = "hidream.variant"

Variant = Literal["full", "dev"]
SchedulerName = Literal["unipc", "flash", "euler"]


@dataclass(frozen=True)
class Recipe:
    """How one checkpoint variant samples: the official defaults, per mode (or a request's, resolved)."""

    variant: Variant
    steps: int
    guidance: float
    shift: float
    scheduler: SchedulerName
    noise_scale: float  # the initial noise's scale (every scheduler), and flash's first re-noise
    noise_scale_end: float  # flash: the last step's re-noise scale (linear in between)
    noise_clip_std: float = 0.0  # flash: re-noise clipped at this many standard deviations (0: no clip)
    # Dev: the distilled fixed timesteps when `steps` equals their count.
    fixed_timesteps: bool = False
    # One model timestep per step (sigma t/1000, then 0): an explicit list, or Dev's fixed one; None: the
    # scheduler's own schedule for `steps` and `shift`.
    timesteps: tuple[int, ...] | None = None

    def with_scheduler(self, scheduler: SchedulerName) -> Recipe:
        """This recipe on `scheduler`, with that scheduler's noise settings: noise follows the scheduler."""
        scale, end, clip = NOISE_DEFAULTS[scheduler]
        return replace(self, scheduler=scheduler, noise_scale=scale, noise_scale_end=end, noise_clip_std=clip)


FULL_RECIPE = Recipe("full", steps=50, guidance=5.0, shift=3.0, scheduler="unipc", noise_scale=8.0, noise_scale_end=8.0)
DEV_RECIPE = Recipe(
    "dev", steps=28, guidance=1.0, shift=1.0, scheduler="flash",
    noise_scale=7.5, noise_scale_end=7.5, noise_clip_std=2.5, fixed_timesteps=True,
)


def recipe_for(variant: Variant, num_references: int) -> Recipe:
    """The official recipe for a variant and mode (0 refs: text-to-image, 1: edit, 2+: personalization)."""
    if variant == "dev":
        if num_references == 1:
            # The official Dev editing default: plain flow-matching Euler (its noise: 8, no clip), same timesteps.
            return DEV_RECIPE.with_scheduler("euler")
        return DEV_RECIPE
    if num_references >= 2:
        # The official personalization examples all run the full model with shift 1.
        return replace(FULL_RECIPE, shift=1.0)
    return FULL_RECIPE


def _file_variant(file: Path) -> tuple[Variant, str]:
    """A single file's variant: its metadata's `hidream.variant` (what `hidream convert` writes), else a
    `dev` word in its name (`hidream_o1_image_dev_bf16.safetensors`, `HiDream-O1-Image-Dev.safetensors`)."""
    from hidream.engine.tensorfile import read_header

    try:
        stated = read_header(file).metadata.get(VARIANT_KEY)
    except CheckpointError:  # unreadable: the loader says why
        stated = None
    if stated in ("full", "dev"):
        return stated, f"the file's metadata {VARIANT_KEY}"  # type: ignore[return-value]
    words = re.split(r"[^a-z0-9]+", file.stem.lower())
    return ("dev" if "dev" in words else "full"), f"the file name {file.name}"


def detect_variant(checkpoint: Path) -> Variant:
    """Guess the variant from the directory name, as published (`HiDream-O1-Image-Dev`), or a single file's
    metadata or name.

    A Hugging Face cache snapshot (`models--HiDream-ai--HiDream-O1-Image-Dev/snapshots/<hash>`) is named by
    its repository's directory.
    """
    return _detect(checkpoint)[0]


def _detect(checkpoint: Path) -> tuple[Variant, str]:
    if checkpoint.suffix == ".safetensors" and not checkpoint.is_dir():
        return _file_variant(checkpoint)
    path = checkpoint.resolve()
    name = path.parent.parent.name if path.parent.name == "snapshots" else path.name
    return ("dev" if name.lower().endswith("-dev") else "full"), f"the directory name {path.name}"


def choose_variant(checkpoint: Path, override: Variant | None = None) -> Variant:
    """`override` (--variant) when given, else the detected variant; says which at INFO."""
    if override is not None:
        log.info("variant %s (from --variant)", override)
        return override
    variant, why = _detect(checkpoint)
    log.info("variant %s (from %s; --variant overrides)", variant, why)
    return variant


@dataclass(frozen=True)
class ModelSpec:
    """The checkpoint's Qwen3-VL config and the token ids the engine relies on."""

    config: Qwen3VLConfig
    image_token_id: int
    vision_start_token_id: int

    @property
    def text(self):  # transformers' Qwen3VLTextConfig
        return self.config.text_config

    @property
    def vision(self):  # transformers' Qwen3VLVisionConfig
        return self.config.vision_config

    @property
    def head_dim(self) -> int:
        return int(getattr(self.text, "head_dim", None) or self.text.hidden_size // self.text.num_attention_heads)

    @property
    def mrope_section(self) -> list[int]:
        return list(self.text.rope_parameters.get("mrope_section", [24, 20, 20]))

    @property
    def rope_theta(self) -> float:
        return float(self.text.rope_parameters["rope_theta"])


def _need(cond: bool, field: str, rule: str) -> None:
    if not cond:
        raise CheckpointError(f"config.json: {field}: {rule}")


def spec_from_config(config: Qwen3VLConfig) -> ModelSpec:
    """Check that a Qwen3-VL config describes a model this engine can serve."""
    _need(config.model_type == "qwen3_vl", "model_type", f"must be 'qwen3_vl' (got {config.model_type!r})")
    text, vision = config.text_config, config.vision_config
    _need(text is not None and vision is not None, "text_config/vision_config", "both are required")
    _need(text.hidden_size % 4 == 0, "text_config.hidden_size", "must be divisible by 4 (the patch bottleneck)")
    _need(text.num_attention_heads % text.num_key_value_heads == 0, "text_config.num_key_value_heads",
          "must divide num_attention_heads")
    rope = text.rope_parameters or {}
    _need(rope.get("rope_type", "default") == "default", "text_config.rope_scaling.rope_type",
          f"must be 'default' (got {rope.get('rope_type')!r})")
    _need("rope_theta" in rope, "text_config.rope_theta", "is required")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    section = rope.get("mrope_section", [24, 20, 20])
    _need(len(section) == 3 and sum(section) * 2 == head_dim, "text_config.rope_scaling.mrope_section",
          f"must be 3 numbers summing to head_dim/2 = {head_dim // 2} (got {section})")
    _need(vision.out_hidden_size == text.hidden_size, "vision_config.out_hidden_size",
          f"must equal text_config.hidden_size ({text.hidden_size})")
    _need(len(vision.deepstack_visual_indexes) <= text.num_hidden_layers, "vision_config.deepstack_visual_indexes",
          "cannot feed more decoder layers than there are")
    for field in ("image_token_id", "vision_start_token_id"):
        _need(isinstance(getattr(config, field, None), int), field, "is required")
    return ModelSpec(config=config, image_token_id=config.image_token_id,
                     vision_start_token_id=config.vision_start_token_id)


def read_config(checkpoint: Path) -> dict:
    """`config.json` of a checkpoint directory, as a dict that names a qwen3_vl model."""
    path = checkpoint / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: not a HiDream-O1 checkpoint (no config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot be read as JSON ({err})") from err
    if not isinstance(raw, dict) or raw.get("model_type") != "qwen3_vl":
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: model_type: must be 'qwen3_vl' (got {got!r}); not a HiDream-O1 checkpoint")
    return raw


def spec_from_dict(raw: dict, where: Path | str) -> ModelSpec:
    """The checked spec of a config.json dict; errors name `where` it came from."""
    if raw.get("model_type") != "qwen3_vl":
        raise CheckpointError(f"{where}: model_type: must be 'qwen3_vl' (got {raw.get('model_type')!r}); "
                              "not a HiDream-O1 checkpoint")
    from transformers import Qwen3VLConfig

    try:
        config = Qwen3VLConfig.from_dict(copy.deepcopy(raw))  # it edits the dict it is given
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{where}: not a valid Qwen3-VL config ({err})") from err
    return spec_from_config(config)


def load_spec(checkpoint: Path) -> ModelSpec:
    """Read and check `config.json` of a checkpoint directory."""
    return spec_from_dict(read_config(checkpoint), checkpoint / "config.json")
