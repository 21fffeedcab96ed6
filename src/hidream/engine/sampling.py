"""The denoising loop: x0 prediction per guidance branch, velocity, guidance, one solver step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from hidream.engine.errors import GenerationCanceled
from hidream.engine.layers import mrope_cos_sin, rope_inv_freq
from hidream.engine.model import HiDreamO1, KVBuffer, VisualInjection
from hidream.engine.schedulers import Sampler, Schedule
from hidream.engine.seams import SeamSmoothing, smoothed
from hidream.engine.sequence import Branch
from hidream.engine.stepcache import StepCache

# The smallest sigma the velocity is divided by.
T_EPS = 0.001

Mode = Literal["cached", "full"]
# progress(step, total, preview): step counts from 1; preview() gives the current x0 estimate, [1, L, 3072].
ProgressFn = Callable[[int, int, Callable[[], Tensor]], None]


@dataclass
class Conditioning:
    """What stays constant across steps for one request: per branch (conditional first) text
    embeddings and DeepStack features, and the clean reference patches."""

    branches: list[Branch]
    text_embeds: list[Tensor]  # [1, T_b, hidden]
    visual: list[VisualInjection | None]
    refs: Tensor | None  # [1, L_ref, 3072]
    target_len: int


class Denoiser:
    """Predicts the target's x0 for every branch: [n_branches, L, 3072].

    mode "cached": each branch's text runs once into its own K/V buffer; every step runs the
    generation tokens only, the branches' GEMMs batched in one forward when `batch` (attention stays
    per branch, so no padding and no mask).
    mode "full": the whole sequence of each branch every step, one branch at a time (the reference).
    """

    def __init__(self, model: HiDreamO1, cond: Conditioning, mode: Mode = "cached", batch: bool = True) -> None:
        self.model, self.cond, self.mode = model, cond, mode
        spec = model.spec
        self.dtype = model.model.language_model.embed_tokens.weight.dtype
        self.device = model.model.x_embedder.proj2.weight.device  # embed_tokens may be on the host
        inv_freq = rope_inv_freq(spec.head_dim, spec.rope_theta)
        self._rope = lambda pos: mrope_cos_sin(pos.to(self.device), inv_freq, spec.mrope_section, self.dtype)
        # (branch rows, their K/V buffers (None: full recompute), RoPE cos/sin of the rows' tokens)
        self.groups: list[tuple[list[int], list[KVBuffer] | None, tuple[Tensor, Tensor]]] = []
        if mode == "full":
            for b in cond.branches:
                pos = torch.cat([b.text_positions, b.gen_positions], dim=2)
                self.groups.append(([len(self.groups)], None, self._rope(pos)))
            return
        buffers = []
        for b, emb, vis in zip(cond.branches, cond.text_embeds, cond.visual, strict=True):
            buffer = model.new_buffer(emb.shape[1], b.gen_positions.shape[2])
            model.prefill(emb, *self._rope(b.text_positions), vis, buffer)
            buffers.append(buffer)
        gen_rope = [self._rope(b.gen_positions) for b in cond.branches]
        if batch and len(buffers) > 1:
            cos = torch.cat([c for c, _ in gen_rope])
            sin = torch.cat([s for _, s in gen_rope])
            self.groups.append((list(range(len(buffers))), buffers, (cos, sin)))
        else:
            for i, (buffer, rope) in enumerate(zip(buffers, gen_rope, strict=True)):
                self.groups.append(([i], [buffer], rope))

    def __call__(self, z: Tensor, t: Tensor, cache: StepCache | None = None) -> Tensor:
        """z: [1, L, 3072] noisy target; t: 0-d float32 (1 - sigma), best on the model's device.
        cache: the run's step cache (hidream.engine.stepcache), begun for this step; None: every layer."""
        cond = self.cond
        patches = z if cond.refs is None else torch.cat([z, cond.refs], dim=1)
        outs: list[Tensor] = []
        for g, (rows, buffers, (cos, sin)) in enumerate(self.groups):
            key = (cache, g) if cache is not None else None
            n = len(rows)
            gen = self.model.embed_generation(t.reshape(1).expand(n).to(self.device), patches.expand(n, -1, -1))
            if buffers is not None:
                keep = 1 + cond.target_len if cond.refs is not None else None
                h = self.model.forward_generation(gen, cos, sin, buffers, keep, key)[:, 1:1 + cond.target_len]
            else:
                (i,) = rows
                text = cond.text_embeds[i]
                h = torch.cat([text, gen], dim=1)
                h = self.model.forward_full(h, cos, sin, text.shape[1], cond.visual[i], key)
                h = h[:, text.shape[1] + 1:text.shape[1] + 1 + cond.target_len]
            outs.append(self.model.predict(h))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def velocity(x0: Tensor, z: Tensor, sigma: Tensor, guidance: float) -> Tensor:
    """v = (x0 - z) / sigma per branch, then classifier-free guidance v_u + g (v_c - v_u): [1, L, 3072] float32."""
    v = (x0.float() - z.float()) / sigma
    if v.shape[0] == 1:
        return v
    return v[1:2] + guidance * (v[0:1] - v[1:2])


def denoise(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    z: Tensor,
    schedule: Schedule,
    sampler: Sampler,
    guidance: float,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    seams: tuple[SeamSmoothing, int, int] | None = None,
    cache: StepCache | None = None,
) -> Tensor:
    """Run every step of `schedule` from the initial noise `z` ([1, L, 3072]); returns the final patches.
    seams: (settings, width, height): patch seam smoothing (`hidream.engine.seams`) on the steps it covers.
    cache: a fresh StepCache for this run (`hidream.engine.stepcache`): the denoiser may reuse on some steps
    (a denoiser that takes no cache runs every layer)."""
    dtype = z.dtype
    total = len(schedule.timesteps)
    # On the latent's device before the loop: nothing in it waits for the device.
    sigmas = torch.tensor(schedule.timesteps, dtype=torch.float32).div(1000.0).to(z.device)
    if hasattr(sampler, "to"):
        sampler.to(z.device)
    for i in range(total):
        if should_cancel is not None and should_cancel():
            raise GenerationCanceled(f"canceled before step {i + 1} of {total}")
        t = sigmas[i]
        if cache is not None:
            cache.begin(i, total)
            x0 = denoiser(z, (1.0 - t), cache=cache)
        else:
            x0 = denoiser(z, (1.0 - t))
        if seams is not None and seams[0].active(i, total):
            x0 = smoothed(denoiser, z, (1.0 - t), x0, seams[1], seams[2], seams[0].passes)
        v = velocity(x0, z, t.clamp_min(T_EPS), guidance)
        z = sampler.step(-v, z.float()).to(dtype)
        if progress is not None:
            progress(i + 1, total, lambda x0=x0: x0[:1])
    return z
