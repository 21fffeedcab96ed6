"""The denoising loop: x0 prediction per guidance branch, velocity, guidance, one solver step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from hidream.engine.errors import GenerationCanceled
from hidream.engine.layers import mrope_cos_sin, rope_inv_freq
from hidream.engine.model import HiDreamO1, TextCache, VisualInjection
from hidream.engine.schedulers import Sampler, Schedule
from hidream.engine.sequence import Branch

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

    mode "cached": text keys/values computed once, generation tokens only at each step, branches
    batched in one forward when `batch` (text padded to one length, padding masked out).
    mode "full": the whole sequence of each branch every step, one branch at a time (the reference).
    """

    def __init__(self, model: HiDreamO1, cond: Conditioning, mode: Mode = "cached", batch: bool = True) -> None:
        self.model, self.cond, self.mode = model, cond, mode
        spec = model.spec
        self.dtype = model.model.language_model.embed_tokens.weight.dtype
        self.device = model.model.language_model.embed_tokens.weight.device
        inv_freq = rope_inv_freq(spec.head_dim, spec.rope_theta)
        self._rope = lambda pos: mrope_cos_sin(pos.to(self.device), inv_freq, spec.mrope_section, self.dtype)
        self.groups: list[tuple[list[int], TextCache | None, tuple[Tensor, Tensor]]] = []
        if mode == "full":
            for b in cond.branches:
                pos = torch.cat([b.text_positions, b.gen_positions], dim=2)
                self.groups.append(([len(self.groups)], None, self._rope(pos)))
            return
        caches = []
        for b, emb, vis in zip(cond.branches, cond.text_embeds, cond.visual, strict=True):
            cos, sin = self._rope(b.text_positions)
            caches.append(model.prefill(emb, cos, sin, vis))
        gen_rope = [self._rope(b.gen_positions) for b in cond.branches]
        if batch and len(caches) > 1:
            cos = torch.cat([c for c, _ in gen_rope])
            sin = torch.cat([s for _, s in gen_rope])
            self.groups.append((list(range(len(caches))), _stack_caches(caches), (cos, sin)))
        else:
            for i, (cache, rope) in enumerate(zip(caches, gen_rope, strict=True)):
                self.groups.append(([i], cache, rope))

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        """z: [1, L, 3072] noisy target; t: 0-d float32 (1 - sigma)."""
        cond = self.cond
        patches = z if cond.refs is None else torch.cat([z, cond.refs], dim=1)
        outs: list[Tensor] = []
        for rows, cache, (cos, sin) in self.groups:
            n = len(rows)
            gen = self.model.embed_generation(t.reshape(1).expand(n).to(self.device), patches.expand(n, -1, -1))
            if cache is not None:
                h = self.model.forward_generation(gen, cos, sin, cache)[:, 1:1 + cond.target_len]
            else:
                (i,) = rows
                text = cond.text_embeds[i]
                h = torch.cat([text, gen], dim=1)
                h = self.model.forward_full(h, cos, sin, text.shape[1], cond.visual[i])
                h = h[:, text.shape[1] + 1:text.shape[1] + 1 + cond.target_len]
            outs.append(self.model.predict(h))
        return torch.cat(outs)


def _stack_caches(caches: list[TextCache]) -> TextCache:
    """Right-pad each branch's keys/values to the longest text and stack them as one batch."""
    longest = max(c.length for c in caches)
    keys, values = [], []
    for layer in range(len(caches[0].keys)):
        keys.append(torch.cat([F.pad(c.keys[layer], (0, 0, 0, longest - c.length)) for c in caches]))
        values.append(torch.cat([F.pad(c.values[layer], (0, 0, 0, longest - c.length)) for c in caches]))
    device = caches[0].keys[0].device
    mask = torch.stack([torch.arange(longest, device=device) < c.length for c in caches])
    return TextCache(keys, values, mask if any(c.length < longest for c in caches) else None)


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
) -> Tensor:
    """Run every step of `schedule` from the initial noise `z` ([1, L, 3072]); returns the final patches."""
    dtype = z.dtype
    total = len(schedule.timesteps)
    for i, step_t in enumerate(schedule.timesteps):
        if should_cancel is not None and should_cancel():
            raise GenerationCanceled(f"canceled before step {i + 1} of {total}")
        t = torch.tensor(step_t, dtype=torch.float32) / 1000.0
        x0 = denoiser(z, (1.0 - t))
        v = velocity(x0, z, t.clamp_min(T_EPS).to(z.device), guidance)
        z = sampler.step(-v, z.float()).to(dtype)
        if progress is not None:
            progress(i + 1, total, lambda x0=x0: x0[:1])
    return z
