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
from hidream.engine.model import DecoderLayer, HiDreamO1, VisualInjection
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


def layout(example: Example) -> tuple:
    """What examples must share to be stacked into one forward: their token and patch positions (so their
    text lengths, where their image tokens are, their target and reference sizes)."""
    branch = example.denoiser.cond.branches[0]
    return (branch.text_positions.numpy().tobytes(), branch.gen_positions.numpy().tobytes(),
            example.denoiser.cond.refs is not None)


def batched_flow_matching_loss(examples: Sequence[Example], generator: torch.Generator, shift: float = 1.0) -> Tensor:
    """The mean of `flow_matching_loss` over `examples` (without caption dropout), with the same draws in the
    same order, in one forward per group of examples of one `layout` (their rows stacked: [B, S, hidden])."""
    draws = [(shifted(torch.rand((), generator=generator), shift),
              e.noise_scale * torch.randn((1, 3, e.height, e.width), generator=generator)) for e in examples]
    groups: dict[tuple, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(layout(example), []).append(i)
    total = torch.zeros(())
    for rows in groups.values():
        part = [examples[i] for i in rows]
        x0 = torch.cat([e.x0 for e in part])  # [B, L, 3072]
        sigma = torch.stack([draws[i][0] for i in rows]).to(x0.device)  # [B]
        noise = img.patchify(torch.cat([draws[i][1] for i in rows])).to(x0.device)  # [B, L, 3072]
        total = total + len(rows) * _stacked_loss(part, x0, sigma, noise).to(total.device)
    return total / len(examples)


def _stacked_loss(examples: list[Example], x0: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """The x0-MSE of examples of one layout, the Denoiser's "full" forward on their stacked rows."""
    denoiser = examples[0].denoiser
    model, conds = denoiser.model, [e.denoiser.cond for e in examples]
    s = sigma[:, None, None]
    z = ((1 - s) * x0 + s * noise).to(denoiser.dtype)
    refs = None if conds[0].refs is None else torch.cat([c.refs for c in conds])  # [B, L_ref, 3072]
    gen = model.embed_generation((1.0 - sigma).to(denoiser.device), z if refs is None else torch.cat([z, refs], 1))
    text = torch.cat([c.text_embeds[0] for c in conds])  # [B, T, hidden]
    n = text.shape[1]
    visual = None
    if conds[0].visual[0] is not None:  # DeepStack rows in the mask's row-major order
        visual = VisualInjection(torch.cat([c.visual[0].positions for c in conds]),
                                 [torch.cat(f) for f in zip(*(c.visual[0].features for c in conds), strict=True)])
    cos, sin = denoiser.groups[0][2]  # the layout's, broadcast over the rows
    h = model.forward_full(torch.cat([text, gen], dim=1), cos, sin, n, visual)[:, n + 1:n + 1 + conds[0].target_len]
    return F.mse_loss(model.predict(h).float(), x0)


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
