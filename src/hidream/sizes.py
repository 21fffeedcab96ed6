"""Output sizes: the named presets, custom `WxH` sizes, and the reference-fitting rule of the official code."""

from __future__ import annotations

import math
import re

from hidream.engine.errors import InvalidRequestError
from hidream.rules import MULTIPLE, SIZE_RULE, size_problem

# width, height
SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (2048, 2048),
    "square": (1024, 1024),
    "portrait_4_3": (1728, 2304),
    "portrait_16_9": (1440, 2560),
    "landscape_4_3": (2304, 1728),
    "landscape_16_9": (2560, 1440),
}
# The 11 sizes the model was trained at (about 4 MP each), in the official code's order (`models/utils.py`),
# which breaks ties between equally near aspects: the first wins.
NATIVE_SIZES: tuple[tuple[int, int], ...] = (
    (2048, 2048), (2304, 1728), (1728, 2304), (2560, 1440), (1440, 2560), (2496, 1664), (1664, 2496),
    (3104, 1312), (1312, 3104), (2304, 1792), (1792, 2304),
)
SIZE_HELP = (f"one of {', '.join(SIZE_PRESETS)}, or WxH (also W*H) with {SIZE_RULE}; custom sides are "
             f"rounded to multiples of {MULTIPLE}")

_CUSTOM = re.compile(r"^\s*(\d{1,6})\s*[x*X×]\s*(\d{1,6})\s*$")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def resolve_size(value: str | tuple[int, int], field: str = "size") -> tuple[int, int]:
    """(width, height) of a preset name, a `WxH` / `W*H` string or a (W, H) pair.

    Custom sides are rounded to the nearest multiple of 32, then checked against the size rule;
    InvalidRequestError naming `field` and the value given otherwise.
    """
    if isinstance(value, str) and value.strip() in SIZE_PRESETS:
        return SIZE_PRESETS[value.strip()]
    if isinstance(value, str):
        match = _CUSTOM.match(value)
        pair = (int(match.group(1)), int(match.group(2))) if match else None
    else:
        pair = tuple(value) if isinstance(value, tuple | list) and len(value) == 2 else None
    if pair is not None and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10**6 for v in pair):
        width, height = (round(v / MULTIPLE) * MULTIPLE for v in pair)
        if size_problem(width, height) is None:
            return width, height
    raise InvalidRequestError(field, f"must be {SIZE_HELP} (got {_shown(value)})")


def native_size(width: int, height: int) -> tuple[int, int]:
    """The native size (`NATIVE_SIZES`) whose aspect ratio is nearest width/height, as the official code snaps
    every request: the absolute difference of the ratios w/h, the first on a tie (so 512x512 gives 2048x2048)."""
    ratio = width / height
    return min(NATIVE_SIZES, key=lambda size: abs(size[0] / size[1] - ratio))  # min keeps the first on a tie


def fit_size(width: int, height: int, side: int, multiple: int = MULTIPLE) -> tuple[int, int]:
    """The official reference sizing: the largest `multiple`-aligned size of the image's aspect with
    area <= side**2 (after the integer halvings that precede it); ValueError if a side would be 0."""
    if side <= 0:
        raise ValueError(f"side must be positive, got {side}")
    while min(width, height) >= 2 * side:
        width, height = width // 2, height // 2
    area = side * side
    scale = math.sqrt(area / (width * height))
    sw, sh = width * scale, height * scale
    candidates = [
        (round(sw) // multiple * multiple, round(sh) // multiple * multiple),
        (round(sw) // multiple * multiple, math.floor(sh) // multiple * multiple),
        (math.floor(sw) // multiple * multiple, round(sh) // multiple * multiple),
        (math.floor(sw) // multiple * multiple, math.floor(sh) // multiple * multiple),
    ]
    candidates.sort(key=lambda s: s[0] * s[1], reverse=True)
    new_w, new_h = next((s for s in candidates if s[0] * s[1] <= area), candidates[-1])
    if new_w == 0 or new_h == 0:
        raise ValueError(f"a {width}x{height} image cannot fit {multiple}-pixel multiples at side {side}")
    return new_w, new_h
