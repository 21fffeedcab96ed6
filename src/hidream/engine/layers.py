"""Small tensor functions of the decoder: RMSNorm, a dtype-following Linear, interleaved 3-axis mRoPE, attention.

Activations are laid out [B, S, H, D] (batch, tokens, heads, head_dim): what FlashAttention takes, and
what a K/V buffer is written in token by token. SDPA gets transposed views.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

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


class Linear(nn.Linear):
    """nn.Linear that casts its input to the weight's dtype, as autocast does.

    With bf16 weights and a float32 residual stream (`bf16-fp32acc`) the GEMM runs in bf16 and its
    bf16 output is added to the float32 stream by the caller; with one dtype throughout it is nn.Linear.
    """

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the GEMM's input and output (an fp8 layer's weight is stored in another)."""
        return self.weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def fuse_linears(parts: list[nn.Linear]) -> Linear | None:
    """One Linear computing every part's output side by side (outputs concatenated in order).

    fp8 parts give one Fp8Linear with their rows and scales concatenated; fp8 beside plain parts, or fp8
    parts of different compute dtypes, give None: such a group stays unfused.
    """
    from hidream.engine.fp8 import Fp8Linear, fuse_fp8  # fp8.py builds on this module

    fp8 = [isinstance(p, Fp8Linear) for p in parts]
    if any(fp8):
        return fuse_fp8(parts) if all(fp8) else None  # type: ignore[arg-type]
    first = parts[0]
    bias = first.bias is not None
    fused = Linear(first.in_features, sum(p.out_features for p in parts), bias=bias,
                   device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if bias:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused.requires_grad_(first.weight.requires_grad)


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
    """x: [B, S, H, D]; cos/sin: [B, S, D]."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


FlashFn = Callable[[Tensor, Tensor, Tensor, bool], Tensor]


@functools.cache
def flash_kernel() -> FlashFn | None:
    """FlashAttention 3, else 2, when installed (`pip install hidream[flash]`); None otherwise."""
    try:
        from flash_attn_interface import flash_attn_func as fa3  # FlashAttention 3 (Hopper)

        def run3(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
            out = fa3(q, k, v, causal=causal)
            return out[0] if isinstance(out, tuple) else out

        return run3
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func as fa2

        return lambda q, k, v, causal: fa2(q, k, v, causal=causal)
    except ImportError:
        return None


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """Scaled dot-product attention with grouped key/value heads, never a mask.

    q: [B, Sq, H, D]; k, v: [B, Sk, KVH, D] -> [B, Sq, H, D]. `causal` aligns the top left (Sq == Sk).
    FlashAttention on CUDA when installed; otherwise SDPA with `enable_gqa` (no expanded copies
    of K/V), whose mask-free calls are eligible for its flash kernel.
    """
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        flash = flash_kernel()
        if flash is not None:
            return flash(q, k, v, causal)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=causal, scale=1.0 / math.sqrt(q.shape[-1]), enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)
