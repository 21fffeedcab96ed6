"""How well a model follows the demo world's prompts: a fixed held-out set per mode, drawn through
`Engine.generate`, read back by the world's evaluator (`hidream.world.score`).

Shared by the trainer's evaluations (`hidream.demo_model`), `benchmarks/demo_model.py` (100 prompts per mode,
and any lossy speed-up's accuracy and PSNR against the exact path) and the accuracy tests.

The figures, per mode (percentages of the set):
  text-to-image    background, colour (the subject's), shape, position, all four
  edit             changed (the field the instruction names is as asked), kept (every other field as in the
                   reference), all (both), and each field
  personalization  colours (each object's colour from its reference, in order), shapes, count, background, all
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from hidream import world

MODES = ("t2i", "edit", "personalize")
MODE_NAMES = {"t2i": "text-to-image", "edit": "edit", "personalize": "personalization"}
EVAL_SEED = 1234
_FIELDS = ("background", "colour", "shape", "position")


@dataclass
class Sample:
    """One example of the world: the mode, the prompt, the target scene, the reference scenes."""

    mode: str
    prompt: str
    target: world.Scene
    references: list[world.Scene] = field(default_factory=list)


def draw(rng: random.Random, split: str, mode: str) -> Sample:
    """A sample of `mode` from the world's split."""
    if mode == "t2i":
        scene = world.sample_t2i(rng, split=split)
        return Sample(mode, world.prompt_of(scene), scene)
    if mode == "edit":
        ref, instruction, target = world.sample_edit(rng, split=split)
        return Sample(mode, instruction, target, [ref])
    refs, prompt, target = world.sample_personalize(rng, rng.choice((2, 3)), split=split)
    return Sample(mode, prompt, target, list(refs))


def held_out_set(count: int, seed: int = EVAL_SEED, modes: Sequence[str] = MODES) -> list[Sample]:
    """A fixed set of `count` held-out samples (combinations never trained on) per mode; each mode's draws
    depend on (seed, mode) alone, so a smaller set is the start of a larger one."""
    samples = []
    for mode in modes:
        rng = random.Random(f"hidream-demo-eval/{seed}/{mode}")
        samples += [draw(rng, "eval", mode) for _ in range(count)]
    return samples


def generate(engine, samples: Sequence[Sample], size: int = 256, **request) -> list[Image.Image]:
    """Each sample drawn by `engine.generate` at size x size with seed = its index among the samples of its
    mode (so a smaller set draws exactly the start of a larger one) and the other GenerationRequest fields in
    `request` (none: the recipe's steps and guidance)."""
    from hidream.engine.pipeline import GenerationRequest

    images, seen = [], Counter()
    for s in samples:
        refs = [world.render(r, size) for r in s.references]
        req = GenerationRequest(s.prompt, width=size, height=size, references=refs, seed=seen[s.mode], **request)
        seen[s.mode] += 1
        images.append(engine.generate(req).images[0])
    return images


def score(sample: Sample, image: Image.Image) -> dict[str, bool]:
    """The evaluator's reading of one image against its sample; edits also get `changed` and `kept`."""
    result = world.score(sample.target, image)
    if sample.mode == "edit":
        edit = world.parse(sample.prompt)
        assert isinstance(edit, world.Edit), sample.prompt
        changed = {"colour": "colour", "background": "background", "shape": "shape",
                   "position": "position"}[edit.action]
        result = {"changed": result[changed], "kept": all(result[f] for f in _FIELDS if f != changed),
                  **{f: result[f] for f in _FIELDS}, "all": result["all"]}
    return result


def accuracy(samples: Sequence[Sample], images: Sequence[Image.Image]) -> dict[str, dict[str, float]]:
    """Per mode present: each figure's percentage."""
    results: dict[str, list[dict[str, bool]]] = {}
    for sample, image in zip(samples, images, strict=True):
        results.setdefault(sample.mode, []).append(score(sample, image))
    return {mode: world.accuracy(rows) for mode, rows in results.items()}


def psnr(a: Sequence[Image.Image], b: Sequence[Image.Image]) -> float:
    """PSNR (dB) of the uint8 pixels of two image lists, over all their pixels; inf when identical."""
    x = np.concatenate([np.asarray(i, dtype=np.float64).ravel() for i in a])
    y = np.concatenate([np.asarray(i, dtype=np.float64).ravel() for i in b])
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# The benchmark's headline figures and their targets (issue 14): (mode, figure, target %).
TARGETS = (("t2i", "background", 90), ("t2i", "colour", 90), ("t2i", "shape", 80), ("t2i", "position", 80),
           ("edit", "all", 80), ("personalize", "colours", 75))


def headline(acc: dict[str, dict[str, float]]) -> list[tuple[str, str, float, int]]:
    """(mode, figure, percentage, target) of the targets' figures that `acc` has."""
    return [(m, f, acc[m][f], t) for m, f, t in TARGETS if m in acc and f in acc[m]]
