"""Output sizes: the API's named presets and custom `WxH` strings."""

from __future__ import annotations

import math
import re

from hidream.engine.errors import InvalidRequestError

# width, height
SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (2048, 2048),
    "square": (1024, 1024),
    "portrait_4_3": (1728, 2304),
    "portrait_16_9": (1440, 2560),
    "landscape_4_3": (2304, 1728),
    "landscape_16_9": (2560, 1440),
}

_CUSTOM = re.compile(r"^\s*(\d{1,5})\s*[x*X×]\s*(\d{1,5})\s*$")


def parse_size(value: str, field: str = "size") -> tuple[int, int]:
    """A preset name or `WxH` / `W*H` -> (width, height); sizes are not snapped, only parsed."""
    if value in SIZE_PRESETS:
        return SIZE_PRESETS[value]
    match = _CUSTOM.match(value)
    if not match:
        names = ", ".join(SIZE_PRESETS)
        raise InvalidRequestError(field, f"must be a preset ({names}) or WxH such as 1024x768 (got {value!r})")
    return int(match.group(1)), int(match.group(2))


def fit_size(width: int, height: int, side: int, multiple: int = 32) -> tuple[int, int]:
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
