"""Output sizes: the API's named presets and custom `WxH` strings."""

from __future__ import annotations

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
