"""fp8 (e4m3) weights with float32 scales for the decoder's linears, swapped in at load time.

A weight [out, in] is stored as float8_e4m3fn with one absmax scale per output row: w ≈ w8 * scale[:, None].
`Fp8Linear` computes in two ways:
- upcast (everywhere): the layer's weight is dequantized to the compute dtype just before its GEMM, so
  memory holds fp8 weights and one layer's upcast at a time; the GEMM is the ordinary one;
- scaled matmul (CUDA with compute capability 8.9+, bf16): `torch._scaled_mm` on fp8 operands, the input
  quantized per row on the fly, the weight's row scales applied in the epilogue.
State dict names are ComfyUI's "fp8 scaled" ones: `X.weight` (fp8) and `X.weight_scale`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hidream.engine.layers import Linear

if TYPE_CHECKING:
    from hidream.engine.model import HiDreamO1

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
MATMUL_ENV = "HIDREAM_FP8_MATMUL"  # "0": always the upcast path
# None: the scaled matmul where `scaled_mm_supported`; True/False force it on or off (tests, the benchmark).
SCALED_MM: bool | None = None


def _absmax_quantize(t: Tensor, per_row: bool) -> tuple[Tensor, Tensor]:
    """t [rows, cols] -> (fp8 [rows, cols], float32 scale [rows] or []); zero rows get scale 1."""
    tf = t.float()
    amax = tf.abs().amax(dim=1) if per_row else tf.abs().amax()
    scale = amax / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = tf / (scale[:, None] if per_row else scale)
    return q.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_weight(w: Tensor, per_row: bool = True) -> tuple[Tensor, Tensor]:
    """Absmax fp8: (w8 [out, in] float8_e4m3fn, scale float32 [out] or []) with w ≈ w8.float() * scale[:, None]."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight takes a [out, in] weight, got shape {list(w.shape)}")
    return _absmax_quantize(w, per_row)


def dequantize(w8: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """w8 [out, in] times its scale ([], [out] or [out, 1]), in `dtype` (the product is taken in `dtype`)."""
    s = scale.to(dtype)
    if s.dim() == 1:
        s = s[:, None]
    return w8.to(dtype) * s


@torch.compiler.assume_constant_result  # under torch.compile: asked once, when the layer is traced
def scaled_mm_supported(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether `torch._scaled_mm` is used there: CUDA at compute capability 8.9+ (Ada, Hopper, Blackwell),
    bf16 compute, and HIDREAM_FP8_MATMUL not "0"."""
    if device.type != "cuda" or dtype != torch.bfloat16 or os.environ.get(MATMUL_ENV, "1") == "0":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(Linear):
    """A Linear whose weight is float8_e4m3fn [out, in] with a float32 scale per output row [out].

    The input is cast to `compute_dtype`, the output comes in it; `bias` is kept in it. Build one with
    `from_float` or `from_quantized`; do not `.to(dtype)` it (that would upcast the fp8 weight).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: torch.device | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and initialize a weight in `dtype`
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros((out_features, in_features), device=device, dtype=FP8_DTYPE),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, device=device, dtype=torch.float32))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=compute_dtype),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._compute_dtype = compute_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    @classmethod
    def from_float(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None,
                   per_row: bool = True) -> Fp8Linear:
        """`linear` quantized (absmax, per row or per tensor); computes in `compute_dtype`, else its weight's dtype."""
        if isinstance(linear, Fp8Linear):
            raise ValueError("the layer is fp8 already")
        w8, scale = quantize_weight(linear.weight.detach(), per_row)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_quantized(w8, scale, bias, compute_dtype or linear.weight.dtype)

    @classmethod
    def from_quantized(cls, weight8: Tensor, scale: Tensor, bias: Tensor | None,
                       compute_dtype: torch.dtype) -> Fp8Linear:
        """From stored tensors: weight8 [out, in] float8_e4m3fn (or its uint8 bytes), scale [], [out] or [out, 1]."""
        weight8 = _as_fp8(weight8)
        out_features, in_features = weight8.shape
        layer = cls(in_features, out_features, bias is not None, torch.device("meta"), compute_dtype)
        layer.weight = nn.Parameter(weight8, requires_grad=False)
        layer.weight_scale = _row_scale(scale, out_features).to(weight8.device)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(weight8.device, compute_dtype), requires_grad=False)
        return layer

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # ComfyUI files store one scale per tensor ([]) and may store the weight as uint8 bytes.
        if prefix + "weight" in state_dict:
            state_dict[prefix + "weight"] = _as_fp8(state_dict[prefix + "weight"])
        if prefix + "weight_scale" in state_dict:
            state_dict[prefix + "weight_scale"] = _row_scale(state_dict[prefix + "weight_scale"], self.out_features)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out] in compute_dtype."""
        x = x.to(self.compute_dtype)
        scaled = SCALED_MM if SCALED_MM is not None else scaled_mm_supported(x.device, self.compute_dtype)
        if scaled and self.in_features % 16 == 0 and self.out_features % 16 == 0:  # _scaled_mm's layout rule
            return self._scaled_forward(x)
        return F.linear(x, dequantize(self.weight, self.weight_scale, self.compute_dtype), self.bias)

    def _scaled_forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x8, x_scale = _absmax_quantize(x.reshape(-1, self.in_features), per_row=True)  # [N, in], [N]
        out = torch._scaled_mm(x8.contiguous(), self.weight.t(),  # row-major [N, in] @ column-major [in, out]
                               scale_a=x_scale[:, None], scale_b=self.weight_scale[None],
                               out_dtype=self.compute_dtype)  # [N, out]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)


def _as_fp8(t: Tensor) -> Tensor:
    if t.dtype == torch.uint8:
        return t.view(FP8_DTYPE)
    if t.dtype != FP8_DTYPE:
        raise ValueError(f"an fp8 weight must be float8_e4m3fn or its uint8 bytes, got {t.dtype}")
    return t


def _row_scale(scale: Tensor, rows: int) -> Tensor:
    """A scale of shape [], [1], [rows] or [rows, 1] as float32 [rows]."""
    s = scale.detach().float().reshape(-1)
    if s.numel() == 1:
        return s.expand(rows).clone()
    if s.numel() != rows:
        raise ValueError(f"an fp8 scale must have 1 or {rows} values, got shape {list(scale.shape)}")
    return s.contiguous()


def fuse_fp8(parts: list[Fp8Linear]) -> Fp8Linear | None:
    """One Fp8Linear with the parts' fp8 rows and scales concatenated in order; None unless they share
    compute dtype and bias presence (then they stay apart)."""
    first = parts[0]
    if any(p.compute_dtype != first.compute_dtype or (p.bias is None) != (first.bias is None) for p in parts):
        return None
    bias = None if first.bias is None else torch.cat([p.bias for p in parts])
    return Fp8Linear.from_quantized(torch.cat([p.weight for p in parts]), torch.cat([p.weight_scale for p in parts]),
                                    bias, first.compute_dtype)


def decoder_linears(model: HiDreamO1) -> Iterator[tuple[nn.Module, str, Linear]]:
    """(parent, attribute name, Linear) of every projection of the decoder layers, fused or not."""
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in parent.named_children():
                if isinstance(child, Linear):
                    yield parent, name, child


def quantize_model(model: HiDreamO1, compute_dtype: torch.dtype | None = None) -> int:
    """Replace the decoder layers' linears by Fp8Linear in place (the ViT, embeddings, norms and generation
    parts keep their dtype); returns how many were quantized (already fp8 ones are left as they are)."""
    count = 0
    with torch.no_grad():
        for parent, name, linear in list(decoder_linears(model)):
            if not isinstance(linear, Fp8Linear):
                setattr(parent, name, Fp8Linear.from_float(linear, compute_dtype))
                count += 1
    return count
