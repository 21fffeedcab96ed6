"""The training objective of HiDream-O1: its own flow matching in pixel space, on the sampler's code.

A training example is what a generation request becomes before its first step (`Engine.conditioning`:
the prompt's tokens, the references' ViT tokens and clean patches, sized by `images.prepare_references`)
plus the clean target x0 in patches. One draw of the objective, for an example of `n` references:

    sigma ~ U(0, 1), then the flow shift s: sigma = s * sigma / (1 + (s - 1) * sigma)  (s = 1: none)
    noise = noise_scale * N(0, I)          the scale the engine's recipe for n references starts from
                                           (8.0 for the full model, 7.5 for Dev's flash recipe)
    z = (1 - sigma) * x0 + sigma * noise   in the model's dtype, as the sampler's latent is
    x0_pred = Denoiser(z, 1 - sigma)       mode "full": the whole sequence of the conditional branch
    loss = mean((x0_pred - x0) ** 2)       over the target's patches (never the references')

The model predicts x0, and the loss is on x0 unweighted (musubi-tuner's HiDream-O1 trainer, with the
uniform timesteps the technical report gives for post-training). A velocity loss on the same prediction
(DiffSynth-Studio, ai-toolkit) is this loss weighted by 1 / sigma**2, which with noise 8x the image's
scale puts nearly all the weight on the last few percent of the schedule.

Caption dropout (off unless asked, as in those trainers' HiDream-O1 examples): with probability p a draw
uses the guidance's unconditional prompt " " (the references kept) instead of the caption, so the branch
classifier-free guidance subtracts learns the LoRA's change too. There is no guidance in training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from hidream.engine import images as img
from hidream.engine.model import DecoderLayer, HiDreamO1
from hidream.engine.sampling import Denoiser
from hidream.engine.sequence import UNCONDITIONAL_PROMPT
from hidream.rules import MULTIPLE, size_problem
from hidream.sizes import fit_size

if TYPE_CHECKING:
    from hidream.engine.pipeline import Engine


@dataclass
class Example:
    """One training pair, ready for the objective: the request's conditioning and the clean target."""

    denoiser: Denoiser  # the conditional branch, mode "full"
    x0: Tensor  # [1, L, 3072] float32 on the model's device, in [-1, 1]
    width: int
    height: int
    noise_scale: float
    unconditional: Denoiser | None = None  # the prompt " " with the same references (caption dropout)


def target_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) a width x height image trains at: its aspect, 32-pixel multiples, area <= resolution**2
    (the engine's own reference sizing); ValueError naming the rule it breaks otherwise."""
    try:
        w, h = fit_size(width, height, resolution)
    except ValueError:
        raise ValueError(f"a {width}x{height} image is too thin for {resolution}x{resolution} "
                         f"(a side would be under {MULTIPLE} pixels)") from None
    problem = size_problem(w, h)
    if problem is not None:
        raise ValueError(f"a {width}x{height} image becomes {w}x{h} at {resolution}x{resolution}, whose "
                         f"{problem[0]} {problem[1]}")
    return w, h


def make_example(engine: Engine, image: Image.Image, caption: str, references: Sequence[Image.Image] = (),
                 resolution: int = 512, caption_dropout: bool = False, trainable: bool = False) -> Example:
    """The example of a target image, its caption and references, as `engine.generate` would see the request
    (caption, target size, references) before its first step; the target is resized and centre-cropped to
    its training size. caption_dropout: also the unconditional branch. trainable: the conditioning keeps its
    graph, so the token table and the ViT train too (full-parameter training; use the example once)."""
    width, height = target_size(image.width, image.height, resolution)
    target = img.fit_to_area(image, resolution)
    assert target.size == (width, height), (target.size, width, height)
    _, _, refs, refs_vit = img.prepare_references(list(references), width, height, False, field="references")
    # A frozen base model's conditioning needs no graph.
    with contextlib.nullcontext() if trainable else torch.no_grad():
        cond = engine.conditioning([caption], width, height, refs, refs_vit)
        uncond = engine.conditioning([UNCONDITIONAL_PROMPT], width, height, refs, refs_vit) if caption_dropout \
            else None
    x0 = img.patchify(img.to_tensor(target)[None]).to(engine.device, torch.float32)
    return Example(Denoiser(engine.model, cond, mode="full"), x0, width, height,
                   engine.recipe(len(refs)).noise_scale,
                   Denoiser(engine.model, uncond, mode="full") if uncond is not None else None)


def shifted(sigma: Tensor, shift: float) -> Tensor:
    """The flow-matching time shift (the schedules' own), towards noise for shift > 1."""
    return sigma if shift == 1.0 else shift * sigma / (1 + (shift - 1) * sigma)


def flow_matching_loss(example: Example, generator: torch.Generator, shift: float = 1.0,
                       caption_dropout: float = 0.0) -> Tensor:
    """One draw of the objective (module docstring) for `example`: a float32 scalar with a graph to the
    trainable parameters. sigma, the noise and the dropout come from `generator` (a CPU one), in that order."""
    denoiser = example.denoiser
    sigma = shifted(torch.rand((), generator=generator), shift)
    noise = example.noise_scale * torch.randn((1, 3, example.height, example.width), generator=generator)
    if caption_dropout > 0.0 and float(torch.rand((), generator=generator)) < caption_dropout:
        if example.unconditional is None:
            raise ValueError("caption dropout needs examples made with caption_dropout=True")
        denoiser = example.unconditional
    x0 = example.x0
    z = ((1 - sigma) * x0 + sigma * img.patchify(noise).to(x0.device)).to(denoiser.dtype)
    x0_pred = denoiser(z, (1.0 - sigma).to(denoiser.device))  # [1, L, 3072]
    return F.mse_loss(x0_pred.float(), x0)


def _checkpointed_layer(layer: DecoderLayer, h: Tensor, cos: Tensor, sin: Tensor, attend, keep=None) -> Tensor:
    """DecoderLayer.forward whose activations are recomputed in the backward pass instead of kept."""
    return checkpoint(DecoderLayer.forward, layer, h, cos, sin, attend, keep, use_reentrant=False)


@contextlib.contextmanager
def layer_checkpointing(model: HiDreamO1, enabled: bool = True) -> Iterator[None]:
    """Within: every decoder layer of the model's loops (the one `step_layer`) checkpointed, when enabled."""
    if not enabled:
        yield
        return
    had = "step_layer" in model.__dict__
    previous = model.__dict__.get("step_layer")
    model.step_layer = _checkpointed_layer
    try:
        yield
    finally:
        if had:
            model.step_layer = previous
        else:
            del model.step_layer
