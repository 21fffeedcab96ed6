"""Patch seam smoothing: late in sampling, the x0 prediction averaged over patch grids shifted by part of a patch.

HiDream-O1 predicts each 32-pixel patch from its own token, and the full model's most common artifact is a
visible grid at those borders. On the steps of a chosen part of the schedule, the latent is also rolled by a
fraction of a patch (half a patch for 2 passes; half a patch on each axis for 4; and quarter-patch offsets too
for 8), predicted, rolled back, and all the predictions are averaged: each border then sits inside another
pass's patch. The rolled passes wrap the image around its edges, so within a patch and a bit of each edge the
natural grid's prediction is kept, ramping to the average further in. References stay where they are (an
edit's reference is not rolled), and the same seed gives the same image.

The cost: `passes - 1` extra forwards on each step it is on (`extra_forwards`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hidream.engine import images as img

PATCH = img.PATCH_SIZE
FEATHER = 8  # pixels over which the average takes over, past the edge strip of one patch
SHIFTS: dict[int, tuple[tuple[int, int], ...]] = {  # (dy, dx) of each pass; the first is the natural grid
    2: ((0, 0), (PATCH // 2, PATCH // 2)),
    4: ((0, 0), (PATCH // 2, 0), (0, PATCH // 2), (PATCH // 2, PATCH // 2)),
    8: ((0, 0), (PATCH // 2, 0), (0, PATCH // 2), (PATCH // 2, PATCH // 2),
        (PATCH // 4, PATCH // 4), (3 * PATCH // 4, PATCH // 4), (PATCH // 4, 3 * PATCH // 4),
        (3 * PATCH // 4, 3 * PATCH // 4)),
}
PASSES = tuple(SHIFTS)
RULE = (f"start and end: fractions of the schedule with 0 <= start < end <= 1; passes: one of "
        f"{', '.join(map(str, PASSES))}")


@dataclass(frozen=True)
class SeamSmoothing:
    """On the steps i (from 0) of a `total`-step schedule with start <= i / total < end: `passes` predictions."""

    start: float = 0.8
    end: float = 1.0
    passes: int = 2

    def problem(self) -> str | None:
        """What is wrong with these settings (RULE), or None."""
        ok = (all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                  for v in (self.start, self.end)) and 0 <= self.start < self.end <= 1
              and self.passes in SHIFTS and not isinstance(self.passes, bool))
        return None if ok else f"{RULE} (got start {self.start!r}, end {self.end!r}, passes {self.passes!r})"

    def active(self, step: int, total: int) -> bool:
        return self.start * total <= step < self.end * total

    def steps_on(self, total: int) -> int:
        return sum(self.active(i, total) for i in range(total))

    def extra_forwards(self, total: int) -> int:
        """Forwards of the model this adds to a `total`-step generation (each of every guidance branch)."""
        return self.steps_on(total) * (self.passes - 1)


def edge_weight(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """[H, W]: 0 within one patch of an edge (where rolled passes wrap around), rising to 1 over FEATHER pixels."""
    def ramp(n: int) -> Tensor:
        d = torch.arange(n, device=device, dtype=torch.float32)
        return ((torch.minimum(d, n - 1 - d) - PATCH) / FEATHER).clamp(0, 1)

    return ramp(height)[:, None] * ramp(width)[None, :]


def smoothed(denoiser: Callable[[Tensor, Tensor], Tensor], z: Tensor, t: Tensor, x0: Tensor, width: int,
             height: int, passes: int) -> Tensor:
    """x0 ([B, L, 3072], the natural grid's prediction for z) blended with its average over the shifted grids."""
    image = img.unpatchify(z, height, width)  # [1, 3, H, W]
    preds = [img.unpatchify(x0, height, width).float()]
    for dy, dx in SHIFTS[passes][1:]:
        rolled = img.patchify(torch.roll(image, shifts=(dy, dx), dims=(-2, -1)))
        back = torch.roll(img.unpatchify(denoiser(rolled, t), height, width), shifts=(-dy, -dx), dims=(-2, -1))
        preds.append(back.float())
    mean = torch.stack(preds).mean(dim=0)
    w = edge_weight(height, width, mean.device)
    out = preds[0] * (1 - w) + mean * w
    return img.patchify(out).to(x0.dtype)


def grid_ratio(image, patch: int = PATCH) -> float:
    """How visible the patch grid is: the mean squared step between neighbouring pixels across the patch
    borders (rows and columns k*patch-1 | k*patch), over the same inside the patches. About 1 with no grid;
    above it, seams. `image`: a PIL image or an [H, W(, C)] array."""
    import numpy as np

    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 2:
        a = a[..., None]
    ratios = []
    for axis in (0, 1):
        d = np.diff(a, axis=axis) ** 2  # d[k] is the step between pixel k and k + 1 along `axis`
        n = d.shape[axis]
        border = np.zeros(n, dtype=bool)
        border[patch - 1::patch] = True
        on = np.take(d, np.flatnonzero(border), axis=axis).mean()
        off = np.take(d, np.flatnonzero(~border), axis=axis).mean()
        ratios.append(on / off if off > 0 else (1.0 if on == 0 else float("inf")))
    return float(np.mean(ratios))
