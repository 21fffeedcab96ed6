"""The rules and defaults of a generation request, defined once: the engine, the CLI and the API use these.

Each rule is a number here and one sentence (`RULES`), so every error message and every help text says the
same thing. The API's field names are the keys of `RULES`; the CLI and the engine name their own fields and
reuse the sentences.
"""

from __future__ import annotations

import math

MULTIPLE = 32  # the patch size: every side is a multiple of it
MIN_SIDE, MAX_SIDE = 64, 4096
MAX_AREA = 2048 * 2048  # 4,194,304 pixels: the native sizes' budget
MAX_PROMPT = 5000
MAX_REFERENCES = 10
MAX_STEPS = 100
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 20.0  # 1.0: no classifier-free guidance (one branch)
MAX_SEED = 2**32 - 1
RANDOM_SEED = -1  # the default: a fresh seed per request, echoed back
MAX_IMAGES = 4
# Each LoRA adds a low-rank branch to every layer it targets, run at every step of every image: the cap
# bounds what one request costs a worker (community workflows stack two or three).
MAX_LORAS = 8
MAX_LORA_SCALE = 10.0  # a scale from -10 to 10; negative subtracts the LoRA's change

DEFAULT_SIZE = "landscape_4_3"
# The demo model's size (it was trained at 256x256; the random demo checkpoint is as quick there): the CLI
# uses it when no --size is given on the demo model and the playground preselects it.
DEMO_SIZE = (256, 256)

SIZE_RULE = (f"each side a multiple of {MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}, and at most "
             f"{math.isqrt(MAX_AREA)}x{math.isqrt(MAX_AREA)} = {MAX_AREA:,} pixels")
STEPS_RULE = f"must be an integer from 1 to {MAX_STEPS}"
GUIDANCE_RULE = f"must be a number from {MIN_GUIDANCE} to {MAX_GUIDANCE} (1.0 means no guidance)"
SEED_RULE = f"must be an integer from 0 to {MAX_SEED}, or {RANDOM_SEED} for random"
IMAGES_RULE = f"must be an integer from 1 to {MAX_IMAGES}"
LORAS_RULE = (f"at most {MAX_LORAS} LoRAs (each adds work to every step; stack fewer, or merge them into one "
              "file)")
LORA_SCALE_RULE = f"must be a finite number from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}"


def lora_scale_ok(value: float) -> bool:
    return math.isfinite(value) and -MAX_LORA_SCALE <= value <= MAX_LORA_SCALE


def size_problem(width: int, height: int) -> tuple[str, str] | None:
    """(field, rule) of the first way width x height breaks the size rule, or None for a valid output size."""
    for name, value in (("width", width), ("height", height)):
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or value % MULTIPLE or not MIN_SIDE <= value <= MAX_SIDE:
            return name, f"must be a multiple of {MULTIPLE} from {MIN_SIDE} to {MAX_SIDE} (got {value!r})"
    if width * height > MAX_AREA:
        side = math.isqrt(MAX_AREA)
        return "size", f"must be at most {side}x{side} = {MAX_AREA:,} pixels (got {width}x{height} = {width * height:,})"
    return None


def guidance_ok(value: float) -> bool:
    return math.isfinite(value) and MIN_GUIDANCE <= value <= MAX_GUIDANCE


def steps_ok(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_STEPS


def seed_ok(value: object, random_allowed: bool = True) -> bool:
    low = RANDOM_SEED if random_allowed else 0
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_SEED


def images_ok(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_IMAGES


# --- the sampling recipe's knobs (extensions of the hosted contract) ---------------------------------------

# Step caching (hidream.engine.stepcache): off, as the official code, or fast (most of the decoder skipped on
# the steps where its first layer barely changes: quicker, and approximate).
CACHE_MODES = ("off", "fast")
CACHE_RULE = "must be one of off, fast"

SCHEDULERS = ("unipc", "flash", "euler")
MAX_TIMESTEP = 1000  # the model's training timesteps: t / 1000 is the step's sigma
MAX_NOISE_SCALE = 100.0
MAX_NOISE_CLIP_STD = 10.0
# The noise settings follow the scheduler, whatever the mode or variant (the official code): flash re-noises
# every step, from noise_scale to noise_scale_end, the noise clipped at noise_clip_std standard deviations;
# unipc and euler only use noise_scale, for the initial noise. (noise_scale, noise_scale_end, noise_clip_std):
NOISE_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "flash": (7.5, 7.5, 2.5),
    "unipc": (8.0, 8.0, 0.0),
    "euler": (8.0, 8.0, 0.0),
}

SCHEDULER_RULE = "must be unipc, flash or euler"
TIMESTEPS_RULE = (f"must be a list of 1 to {MAX_STEPS} strictly decreasing integers from 1 to {MAX_TIMESTEP} "
                  "(each step's sigma is t/1000)")
NOISE_SCALE_RULE = f"must be a number above 0 and at most {MAX_NOISE_SCALE:g}"
NOISE_SCALE_END_RULE = f"must be a number from 0 to {MAX_NOISE_SCALE:g}"
NOISE_CLIP_STD_RULE = f"must be a number from 0 to {MAX_NOISE_CLIP_STD:g} (0: no clipping)"


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def scheduler_ok(value: object) -> bool:
    return value in SCHEDULERS


def timesteps_ok(value: object) -> bool:
    if isinstance(value, str | bytes) or not hasattr(value, "__len__") or not 1 <= len(value) <= MAX_STEPS:
        return False
    ts = list(value)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= MAX_TIMESTEP for t in ts):
        return False
    return all(a > b for a, b in zip(ts, ts[1:]))


def noise_scale_ok(value: object) -> bool:
    return _number(value) and 0.0 < value <= MAX_NOISE_SCALE


def noise_scale_end_ok(value: object) -> bool:
    return _number(value) and 0.0 <= value <= MAX_NOISE_SCALE


def noise_clip_std_ok(value: object) -> bool:
    return _number(value) and 0.0 <= value <= MAX_NOISE_CLIP_STD


def _shown(value: object) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def sampling_problem(recipe_scheduler: str, *, scheduler: object = None, steps: object = None,
                     shift: object = None, timesteps: object = None, noise_scale: object = None,
                     noise_scale_end: object = None, noise_clip_std: object = None) -> tuple[str, str] | None:
    """(field, rule) of the first sampling setting that breaks a rule, in the engine's names, or None.

    None means absent (the recipe's default). `recipe_scheduler` is the scheduler the request's mode samples
    with when it asks for none. steps, shift and guidance are checked on their own elsewhere; here only how
    they meet an explicit timesteps list.
    """
    if scheduler is not None and not scheduler_ok(scheduler):
        return "scheduler", f"{SCHEDULER_RULE} (got {_shown(scheduler)})"
    if timesteps is not None:
        if not timesteps_ok(timesteps):
            return "timesteps", f"{TIMESTEPS_RULE} (got {_shown(timesteps)})"
        if steps is not None and steps != len(timesteps):  # type: ignore[arg-type]
            return "steps", f"must equal the number of timesteps ({len(timesteps)}) or be left out (got {steps!r})"
        if shift is not None:
            return "shift", "has no effect with explicit timesteps (each step's sigma is t/1000); leave it out"
    for name, value, ok, rule in (("noise_scale", noise_scale, noise_scale_ok, NOISE_SCALE_RULE),
                                  ("noise_scale_end", noise_scale_end, noise_scale_end_ok, NOISE_SCALE_END_RULE),
                                  ("noise_clip_std", noise_clip_std, noise_clip_std_ok, NOISE_CLIP_STD_RULE)):
        if value is not None and not ok(value):
            return name, f"{rule} (got {_shown(value)})"
    chosen = scheduler or recipe_scheduler
    for name, value in (("noise_scale_end", noise_scale_end), ("noise_clip_std", noise_clip_std)):
        if value is not None and chosen != "flash":
            return name, (f"is used only by the flash scheduler (this request samples with {chosen}); ask for "
                          "the flash scheduler or leave it out")
    return None


MODES = ("text-to-image", "edit", "personalization")  # what 0, 1 and 2 or more references make


def mode_of(num_references: int) -> str:
    """The generation mode of a request with that many references."""
    return MODES[min(num_references, 2)]
