"""Image I/O, reference sizing and pixel <-> patch conversion, matching the official HiDream-O1 pipeline."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import einops
import numpy as np
import torch
from PIL import Image

from hidream.engine.errors import InvalidRequestError
from hidream.rules import MULTIPLE, size_problem
from hidream.engine.layout import add_border, check_boxes, check_pixel_boxes, draw_layout
from hidream.sizes import fit_size, native_size

PATCH_SIZE = MULTIPLE
CONDITION_IMAGE_SIZE = 384
KEEP_ASPECT_SIDE = 2048

# Only the everyday raster formats: some Pillow plugins (EPS runs Ghostscript) are unsafe on untrusted input.
_ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF", "AVIF")


def _open_formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open."""
    Image.init()
    return tuple(f for f in _ALLOWED_FORMATS if f in Image.OPEN)


def load_image(source: str | os.PathLike | bytes | Image.Image, field: str) -> Image.Image:
    """Decode a path, encoded bytes or PIL image into a fully loaded RGB image."""
    if isinstance(source, Image.Image):
        try:
            return source.convert("RGB")
        except OSError as e:  # a lazily opened image can still fail to decode here
            raise InvalidRequestError(field, f"the given image cannot be decoded ({e})") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        what, fp = "the image data", io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        what = f"image file {os.fspath(source)!r}"
        try:
            fp = open(source, "rb")
        except OSError as e:
            raise InvalidRequestError(field, f"cannot read {what}: {e.strerror or e}") from None
    else:
        raise InvalidRequestError(field, f"expected a path, bytes or PIL image, got {type(source).__name__}")
    formats = _open_formats()
    with fp:
        try:
            with Image.open(fp, formats=formats) as img:
                limit = Image.MAX_IMAGE_PIXELS
                # Pillow only warns between 1x and 2x its limit; treat the warning zone as an error too.
                if limit and img.width * img.height > limit:
                    raise Image.DecompressionBombError(f"{img.width}x{img.height} exceeds {limit} pixels")
                img.load()  # decode now so truncated or corrupt data fails here, not mid-generation
                return img.convert("RGB")
        except Image.UnidentifiedImageError:
            rule = f"{what} is not an image in a supported format ({', '.join(formats)})"
            raise InvalidRequestError(field, rule) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InvalidRequestError(field, f"{what} is too large to decode safely ({e})") from None
        except MemoryError:
            raise
        except Exception as e:  # Pillow raises many types on bad data (OSError, SyntaxError, struct.error...)
            raise InvalidRequestError(field, f"{what} is not a readable image ({e})") from None


def fit_to_area(img: Image.Image, side: int, multiple: int = PATCH_SIZE) -> Image.Image:
    """Resize and centre-crop to the largest `multiple`-aligned size with area <= side**2."""
    new_w, new_h = fit_size(img.width, img.height, side, multiple)
    # Cheap BOX halving first, so the BICUBIC step never downsamples by more than ~2x.
    while min(img.size) >= 2 * side:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    width, height = img.size
    s1, s2 = width / new_w, height / new_h
    if s1 < s2:  # relatively taller than the target: match width, crop top and bottom
        tall = round(height / s1)
        img = img.resize((new_w, tall), resample=Image.BICUBIC)
        top = (tall - new_h) // 2
        return img.crop((0, top, new_w, top + new_h))
    wide = round(width / s2)
    img = img.resize((wide, new_h), resample=Image.BICUBIC)
    left = (wide - new_w) // 2
    return img.crop((left, 0, left + new_w, new_h))


def reference_side(count: int, width: int, height: int) -> int:
    """Side of the square area budget for each of `count` references on a width x height target."""
    longest = max(width, height)
    if count == 1:
        return longest
    if count == 2:
        return longest * 48 // 64
    if count <= 4:
        return longest // 2
    if count <= 8:
        return longest * 24 // 64
    return longest // 4


def condition_side(count: int) -> int:
    """Side of the area budget for each reference's vision-encoder copy."""
    if count <= 4:
        return CONDITION_IMAGE_SIZE
    if count <= 8:
        return CONDITION_IMAGE_SIZE * 48 // 64
    return CONDITION_IMAGE_SIZE // 2


def condition_size(side: int, ratio: float) -> tuple[int, int]:
    """(width, height) with aspect `ratio`, area about side**2, each floored to a multiple of 32."""
    width = math.sqrt(side * side * ratio)
    height = width / ratio
    return int(width / 32) * 32, int(height / 32) * 32


@dataclass(frozen=True)
class ReferencePlan:
    """What `prepare_references` makes of references of given sizes: all sizes are (width, height)."""

    width: int  # the output's, which keep_original_aspect takes from the reference
    height: int
    side: int  # each reference's area budget is side**2
    sizes: list[tuple[int, int]]  # each reference in the generation sequence
    vit_sizes: list[tuple[int, int]]  # each reference's copy for the vision encoder


def plan_references(sizes: Sequence[tuple[int, int]], width: int, height: int, keep_original_aspect: bool,
                    *, field: str = "images", snap_to_native: bool = False,
                    layout: Sequence[Sequence[float]] | None = None, layout_field: str = "layout") -> ReferencePlan:
    """The sizes of every reference and of the output, checked without touching a pixel (so a service can
    refuse a request before it is queued); InvalidRequestError naming `field[i]` for an unusable reference.
    snap_to_native: the output is the native size nearest the aspect asked for (`sizes.native_size`), that
    aspect being the reference's with keep_original_aspect (one reference); the references are sized for it.
    layout: one box per reference (`hidream.engine.layout`), InvalidRequestError naming `layout_field` for a
    broken rule; the layout image is one more reference, of the output's size, in the plan's last place."""
    count = len(sizes)
    keep = keep_original_aspect and count == 1
    boxes = None if layout is None else check_boxes(layout, count, layout_field)
    if boxes is not None and keep:
        raise InvalidRequestError(layout_field, "cannot be combined with keep_original_aspect: the boxes are "
                                                "fractions of an output size given in advance")
    if snap_to_native:
        width, height = native_size(*(sizes[0] if keep else (width, height)))
        keep = False
    if boxes is not None:
        check_pixel_boxes(boxes, width, height, layout_field)
        sizes, count = [*sizes, (width, height)], count + 1
    side = KEEP_ASPECT_SIDE if keep else reference_side(count, width, height)
    fitted = []
    for i, (w, h) in enumerate(sizes):
        try:
            size = fit_size(w, h, side)
            if boxes is not None and i < len(boxes):  # the official layout path fits a bordered reference again
                size = fit_size(*size, side)
            fitted.append(size)
        except ValueError:
            raise InvalidRequestError(f"{field}[{i}]", f"a {w}x{h} image is too small or thin for a {side}px "
                                                       f"budget (a side would be under {PATCH_SIZE} pixels)") from None
    if keep:
        width, height = fitted[0]
        if (problem := size_problem(width, height)) is not None:
            w, h = sizes[0]
            raise InvalidRequestError(f"{field}[0]", f"with keep_original_aspect a {w}x{h} image gives a "
                                                     f"{width}x{height} output, whose {problem[0]} {problem[1]}")
    vit_sizes = []
    for i, (w, h) in enumerate(fitted):
        cond_w, cond_h = condition_size(condition_side(count), w / h)
        if cond_w == 0 or cond_h == 0:
            raise InvalidRequestError(f"{field}[{i}]", f"a {sizes[i][0]}x{sizes[i][1]} image has too extreme an "
                                                       f"aspect ratio (its {w}x{h} copy cannot be encoded)")
        vit_sizes.append((cond_w, cond_h))
    return ReferencePlan(width, height, side, fitted, vit_sizes)


def prepare_references(
    images: Sequence[Image.Image],
    width: int,
    height: int,
    keep_original_aspect: bool,
    *,
    field: str = "images",
    snap_to_native: bool = False,
    layout: Sequence[Sequence[float]] | None = None,
    layout_field: str = "layout",
) -> tuple[int, int, list[Image.Image], list[Image.Image]]:
    """Size the references for the target (`plan_references`); returns (width, height, refs_resized, refs_for_vit).
    With `layout`: each reference bordered in its box's colour, then the layout image (`draw_layout`)."""
    plan = plan_references([img.size for img in images], width, height, keep_original_aspect, field=field,
                           snap_to_native=snap_to_native, layout=layout, layout_field=layout_field)
    refs = [fit_to_area(img, plan.side) for img in images]
    if layout is not None:
        # As the official layout path: each fitted reference bordered, then fitted once more (which is not always
        # the same size: the first fit's rounding changes the aspect a little), and the layout image fitted.
        drawn, colours = draw_layout(check_boxes(layout, len(images), layout_field), plan.width, plan.height)
        refs = [fit_to_area(add_border(ref, colour), plan.side) for ref, colour in zip(refs, colours, strict=True)]
        refs.append(fit_to_area(drawn, plan.side))
    for_vit = [ref.resize(size, resample=Image.LANCZOS) for ref, size in zip(refs, plan.vit_sizes, strict=True)]
    return plan.width, plan.height, refs, for_vit


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> [3, H, W] float32 in [-1, 1], bit-identical to the official torchvision transform."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    x = einops.rearrange(x, "H W C -> C H W").to(torch.float32)
    # torchvision's ToDtype(scale=True) multiplies by 1/255 instead of dividing; they differ in the last bit.
    x = x.mul_(1.0 / 255)
    half = torch.tensor([0.5], dtype=torch.float32)
    return x.sub_(half).div_(half)


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] pixels -> [B, (H/32)*(W/32), 3*32*32] patch tokens, channel-major inside a patch."""
    return einops.rearrange(x, "B C (H p1) (W p2) -> B (H W) (C p1 p2)", p1=PATCH_SIZE, p2=PATCH_SIZE)


def unpatchify(z: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H/32)*(W/32), 3*32*32] patch tokens -> [B, 3, H, W] pixels."""
    if height % PATCH_SIZE or width % PATCH_SIZE:
        raise ValueError(f"{width}x{height} is not a multiple of {PATCH_SIZE}")
    return einops.rearrange(
        z,
        "B (H W) (C p1 p2) -> B C (H p1) (W p2)",
        H=height // PATCH_SIZE,
        W=width // PATCH_SIZE,
        p1=PATCH_SIZE,
        p2=PATCH_SIZE,
    )


def to_pil(x: torch.Tensor) -> Image.Image:
    """[3, H, W] tensor in [-1, 1] -> RGB image, rounding half to even like the official code.

    (x + 1) / 2 is taken in x's own dtype, as the official code does with its bf16 latents.
    """
    scaled = ((x.detach() + 1) / 2).cpu().float().numpy().transpose(1, 2, 0) * 255
    return Image.fromarray(np.round(np.clip(scaled, 0, 255)).astype(np.uint8)).convert("RGB")


def check_size(width: int, height: int) -> None:
    """Reject a target size that breaks the size rule (`hidream.rules`), naming width, height or size."""
    problem = size_problem(width, height)
    if problem is not None:
        raise InvalidRequestError(*problem)
