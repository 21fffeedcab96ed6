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

DEFAULT_SIZE = "landscape_4_3"
# On the demo checkpoint (random weights, noise out) a small size keeps every example a matter of seconds
# on a CPU: the CLI uses it when no --size is given and the playground preselects it.
DEMO_SIZE = (512, 512)

SIZE_RULE = (f"each side a multiple of {MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}, and at most "
             f"{math.isqrt(MAX_AREA)}x{math.isqrt(MAX_AREA)} = {MAX_AREA:,} pixels")
STEPS_RULE = f"must be an integer from 1 to {MAX_STEPS}"
GUIDANCE_RULE = f"must be a number from {MIN_GUIDANCE} to {MAX_GUIDANCE} (1.0 means no guidance)"
SEED_RULE = f"must be an integer from 0 to {MAX_SEED}, or {RANDOM_SEED} for random"
IMAGES_RULE = f"must be an integer from 1 to {MAX_IMAGES}"


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
