"""Layout boxes: where each reference goes in the output, as the official pipeline conditions on them.

A request gives one box per reference, `(x1, y1, x2, y2)` in 0-1 relative coordinates of the output (the
official code takes `[x1, x2, y1, y2]`; `official_order` converts). The model sees the layout the way it was
trained to: a black image of the output's size with each box drawn as a coloured frame (the largest box first,
in the first colour, the frames thinner down the list), each reference with an inner border in its box's
colour, and the layout image appended as one more reference (counted in the references' sizing rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

from hidream.engine.errors import InvalidRequestError

MAX_BOXES = 5
# The frame colours, in the order boxes of decreasing area take them (the official layout's palette).
COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (0, 180, 0), (0, 0, 255), (204, 180, 0), (255, 0, 255),
    (0, 255, 255), (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 0),
)
FRAME_FRACTION = 0.05  # the largest box's frame, of the output's geometric mean side
MIN_FRAME = 5
BORDER_FRACTION = 0.04  # a reference's border, of its own geometric mean side
BOX_RULE = "must be [x1, y1, x2, y2] with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 (fractions of the output)"

Box = tuple[float, float, float, float]


def official_order(box: Sequence[float]) -> Box:
    """(x1, y1, x2, y2) of a box in the official code's [x1, x2, y1, y2] order."""
    x1, x2, y1, y2 = box
    return (x1, y1, x2, y2)


def check_boxes(boxes: Sequence[Sequence[float]], count: int, field: str = "layout") -> list[Box]:
    """The boxes as floats; InvalidRequestError naming `field` (or `field[i]`) for a broken rule: 1 to
    MAX_BOXES boxes, as many as references, each inside the image with a positive area."""
    if not 1 <= len(boxes) <= MAX_BOXES:
        raise InvalidRequestError(field, f"must be 1 to {MAX_BOXES} boxes, one per reference (got {len(boxes)})")
    if len(boxes) != count:
        raise InvalidRequestError(field, f"must have one box per reference image: {count} reference"
                                         f"{'s' if count != 1 else ''}, {len(boxes)} box{'es' if len(boxes) != 1 else ''}")
    out = []
    for i, box in enumerate(boxes):
        values = list(box) if isinstance(box, Sequence) and not isinstance(box, str) else None
        if values is None or len(values) != 4 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise InvalidRequestError(f"{field}[{i}]", f"{BOX_RULE} (got {box!r})")
        x1, y1, x2, y2 = (float(v) for v in values)
        if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
            raise InvalidRequestError(f"{field}[{i}]", f"{BOX_RULE} (got {box!r})")
        out.append((x1, y1, x2, y2))
    return out


def pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """The box in pixels of a width x height image: scaled, rounded half to even, kept inside the image."""
    x1, y1, x2, y2 = box
    xs = sorted((x1 * width, x2 * width))
    ys = sorted((y1 * height, y2 * height))
    px1, px2 = (max(0, min(width - 1, round(v))) for v in xs)
    py1, py2 = (max(0, min(height - 1, round(v))) for v in ys)
    return px1, py1, px2, py2


def check_pixel_boxes(boxes: Sequence[Box], width: int, height: int, field: str = "layout") -> None:
    """InvalidRequestError naming `field[i]` for a box too small to keep an area at this output size."""
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = pixel_box(box, width, height)
        if x2 <= x1 or y2 <= y1:
            raise InvalidRequestError(f"{field}[{i}]", f"is too small for a {width}x{height} output: it has no area "
                                                       f"once in pixels ({x1}, {y1}, {x2}, {y2})")


def draw_layout(boxes: Sequence[Box], width: int, height: int) -> tuple[Image.Image, list[tuple[int, int, int]]]:
    """The layout image (black, each box a coloured frame) and the colour of each box, in request order."""
    edge = math.sqrt(width * height)
    widest = int(edge * FRAME_FRACTION)
    step = max(1, widest // MAX_BOXES)
    pixels = [pixel_box(b, width, height) for b in boxes]
    order = sorted(range(len(pixels)), key=lambda i: -(pixels[i][2] - pixels[i][0]) * (pixels[i][3] - pixels[i][1]))
    image = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    colours: list[tuple[int, int, int]] = [COLOURS[0]] * len(pixels)
    for rank, i in enumerate(order):  # the largest first: its frame the widest
        colours[i] = COLOURS[rank % len(COLOURS)]
        draw.rectangle(list(pixels[i]), outline=colours[i], width=max(widest - rank * step, MIN_FRAME))
    return image, colours


def add_border(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """A copy of `image` with an inner border of `colour`, BORDER_FRACTION of its geometric mean side wide."""
    out = image.convert("RGB").copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    for t in range(int(math.sqrt(w * h) * BORDER_FRACTION)):
        draw.rectangle([t, t, w - 1 - t, h - 1 - t], outline=colour)
    return out
