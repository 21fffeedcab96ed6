"""Small tensor functions of the decoder: RMSNorm, interleaved 3-axis mRoPE, attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: statistics in float32, scale applied in the input's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    """Default RoPE inverse frequencies, [head_dim/2] float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def mrope_cos_sin(positions: Tensor, inv_freq: Tensor, section: list[int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for 3-axis positions [3, B, S] -> two [B, S, head_dim] tensors.

    Frequencies are interleaved T,H,W,T,H,W,...: index i takes the H axis when i % 3 == 1 and
    i < 3*section[1], the W axis when i % 3 == 2 and i < 3*section[2], else the T axis.
    """
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [3, B, S, D/2]
    mixed = freqs[0].clone()
    for axis in (1, 2):
        idx = slice(axis, section[axis] * 3, 3)
        mixed[..., idx] = freqs[axis, ..., idx]
    emb = torch.cat([mixed, mixed], dim=-1)  # [B, S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, S, D]; cos/sin: [B, S, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """Scaled dot-product attention with grouped key/value heads.

    q: [B, H, Sq, D]; k, v: [B, KVH, Sk, D]; mask: bool [B or 1, 1, Sq, Sk], True = may attend.
    """
    if k.shape[1] != q.shape[1]:
        # Expanding keeps every SDPA backend available (enable_gqa rules some out).
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0 / math.sqrt(q.shape[-1]))
