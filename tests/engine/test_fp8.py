"""fp8 weights: quantization error bounds, the two Fp8Linear paths, stored forms, fusing, the model and an image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hidream.engine import fp8
from hidream.engine.checkpoint import load_model
from hidream.engine.fp8 import FP8_DTYPE, FP8_MAX, Fp8Linear, dequantize, quantize_model, quantize_weight
from hidream.engine.layers import Linear, fuse_linears
from hidream.engine.model import HiDreamO1
from hidream.engine.pipeline import Engine, GenerationRequest

CPU = torch.device("cpu")
# e4m3 keeps 3 mantissa bits: rounding to nearest errs by at most 2^-4 of the value (normal range), and by
# half the subnormal spacing 2^-9, i.e. 2^-10 times the scale, below it.
REL = 2.0**-4
PROJECTIONS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def _cpu_scaled_mm() -> bool:
    a = torch.zeros(16, 16, dtype=FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


CPU_SCALED_MM = _cpu_scaled_mm()


def weights(out: int = 48, inp: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes (1e-3 to 1e2)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * torch.logspace(-3, 2, out)[:, None]


def row_error(w: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """Relative L2 error of each row, [out]."""
    return (w - approx).norm(dim=1) / w.norm(dim=1)


# --- quantize / dequantize -------------------------------------------------------------------------


def test_quantize_weight_errs_by_e4m3_rounding_only():
    w = weights()
    w8, scale = quantize_weight(w)
    assert w8.dtype == FP8_DTYPE and w8.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (48,)
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / FP8_MAX)  # absmax: each row's peak maps to 448
    assert torch.equal(w8.float().abs().amax(dim=1), torch.full((48,), FP8_MAX))
    approx = w8.float() * scale[:, None]
    assert ((w - approx).abs() <= REL * w.abs() + 2.0**-10 * scale[:, None]).all()
    assert (row_error(w, approx) < REL).all()
    assert (row_error(w, approx) > 2.0**-8).all()  # it is fp8: not exact


def test_all_zero_rows_get_a_finite_scale():
    w = weights(8, 32)
    w[3] = 0
    w8, scale = quantize_weight(w)
    assert torch.isfinite(scale).all() and scale[3] > 0
    assert torch.equal(w8[3].float(), torch.zeros(32))
    assert torch.isfinite(w8.float()).all()
    w8, scale = quantize_weight(torch.zeros(4, 16), per_row=False)
    assert scale.shape == () and scale > 0 and torch.equal(dequantize(w8, scale, torch.float32), torch.zeros(4, 16))


def test_per_row_scales_beat_one_per_tensor_on_rows_of_different_magnitude():
    w = weights()
    w8, scale = quantize_weight(w, per_row=False)
    assert scale.shape == ()
    per_tensor = row_error(w, dequantize(w8, scale, torch.float32))
    per_row = row_error(w, dequantize(*quantize_weight(w), torch.float32))
    assert per_row.max() < REL
    assert per_tensor[:4].min() > 0.1  # the smallest rows fall into fp8's subnormals, or to zero
    assert per_tensor.max() > 10 * per_row.max()


def test_dequantize_takes_scalar_row_and_column_scales():
    w8, scale = quantize_weight(weights())
    by_row = dequantize(w8, scale, torch.float32)
    assert torch.equal(by_row, dequantize(w8, scale[:, None], torch.float32))
    assert torch.equal(by_row, w8.float() * scale[:, None])
    assert torch.equal(dequantize(w8, scale[5], torch.float32), w8.float() * scale[5])
    assert dequantize(w8, scale, torch.bfloat16).dtype == torch.bfloat16


# --- Fp8Linear -------------------------------------------------------------------------------------


def linear(inp: int = 64, out: int = 48, bias: bool = True, dtype: torch.dtype = torch.float32) -> Linear:
    torch.manual_seed(0)
    layer = Linear(inp, out, bias=bias, dtype=dtype).requires_grad_(False)
    if bias:
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upcast_path_is_f_linear_with_the_dequantized_weight(dtype, monkeypatch):
    monkeypatch.setattr(fp8, "SCALED_MM", False)
    plain = linear(dtype=dtype)
    layer = Fp8Linear.from_float(plain)
    assert isinstance(layer, Linear) and layer.compute_dtype == dtype
    assert layer.weight.dtype == FP8_DTYPE and not layer.weight.requires_grad
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (48,)
    assert layer.bias.dtype == dtype and torch.equal(layer.bias, plain.bias)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"} and sd["weight"].dtype == FP8_DTYPE
    x = torch.randn(2, 5, 64, dtype=torch.float64)  # [B, S, in], cast to the compute dtype
    out = layer(x)
    assert out.shape == (2, 5, 48) and out.dtype == dtype
    expected = F.linear(x.to(dtype), dequantize(layer.weight, layer.weight_scale, dtype), plain.bias)
    assert torch.equal(out, expected)
    ref = plain(x).float()
    assert (out.float() - ref).norm() / ref.norm() < REL


def test_per_tensor_from_float_expands_its_scale_to_rows():
    layer = Fp8Linear.from_float(linear(), per_row=False)
    assert layer.weight_scale.shape == (48,) and (layer.weight_scale == layer.weight_scale[0]).all()
    with pytest.raises(ValueError, match="fp8 already"):
        Fp8Linear.from_float(layer)


@pytest.mark.skipif(not CPU_SCALED_MM, reason="this torch's CPU build has no torch._scaled_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_path_is_the_fp8_product_of_per_row_quantized_inputs(dtype, monkeypatch):
    layer = Fp8Linear.from_float(linear(dtype=dtype))
    x = torch.randn(3, 7, 128).to(dtype)[..., ::2]  # [B, S, in], not contiguous
    monkeypatch.setattr(fp8, "SCALED_MM", False)
    upcast = layer(x)
    monkeypatch.setattr(fp8, "SCALED_MM", True)
    scaled = layer(x)
    assert scaled.shape == (3, 7, 48) and scaled.dtype == dtype
    x8, x_scale = quantize_weight(x.reshape(21, 64))  # what the path must do: the input's rows in fp8 too
    expected = F.linear(dequantize(x8, x_scale, torch.float32), dequantize(layer.weight, layer.weight_scale,
                                                                         torch.float32)) + layer.bias.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(scaled.float(), expected.reshape(3, 7, 48), rtol=tol, atol=tol)
    assert not torch.equal(scaled, upcast)
    assert (scaled.float() - upcast.float()).norm() / upcast.float().norm() < REL


def test_scaled_mm_falls_back_where_shapes_do_not_fit(monkeypatch):
    layer = Fp8Linear.from_float(linear(inp=40, out=24))  # _scaled_mm needs multiples of 16
    x = torch.randn(2, 3, 40)
    monkeypatch.setattr(fp8, "SCALED_MM", True)
    assert torch.equal(layer(x), F.linear(x, dequantize(layer.weight, layer.weight_scale, torch.float32), layer.bias))


def test_scaled_mm_needs_cuda_8_9_bf16_and_no_opt_out(monkeypatch):
    cuda = torch.device("cuda")
    assert not fp8.scaled_mm_supported(CPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv(fp8.MATMUL_ENV, raising=False)
    assert fp8.scaled_mm_supported(cuda)
    assert not fp8.scaled_mm_supported(cuda, torch.float32)
    monkeypatch.setenv(fp8.MATMUL_ENV, "0")
    assert not fp8.scaled_mm_supported(cuda)
    monkeypatch.setenv(fp8.MATMUL_ENV, "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100: no fp8 GEMM
    assert not fp8.scaled_mm_supported(cuda)


def test_from_quantized_takes_scalar_row_and_column_scales_and_uint8_bytes(monkeypatch):
    monkeypatch.setattr(fp8, "SCALED_MM", False)
    w8, scale = quantize_weight(weights(), per_row=False)
    bias = torch.randn(48)
    x = torch.randn(4, 64)
    layers = [Fp8Linear.from_quantized(w8, s, bias, torch.float32)
              for s in (scale, scale.expand(48), scale.expand(48, 1), scale.reshape(1))]
    layers.append(Fp8Linear.from_quantized(w8.view(torch.uint8), scale, bias, torch.float32))
    expected = F.linear(x, w8.float() * scale, bias)
    for layer in layers:
        assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.shape == (48,)
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    assert Fp8Linear.from_quantized(w8, scale, None, torch.bfloat16)(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="1 or 48 values"):
        Fp8Linear.from_quantized(w8, torch.ones(47), None, torch.float32)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        Fp8Linear.from_quantized(w8.float(), scale, None, torch.float32)


def test_a_comfyui_state_dict_loads_with_its_scalar_scale_and_byte_weight():
    w8, scale = quantize_weight(weights(), per_row=False)
    layer = Fp8Linear(64, 48, bias=False, compute_dtype=torch.float32)
    layer.load_state_dict({"weight": w8.view(torch.uint8), "weight_scale": scale})
    assert torch.equal(layer.weight.view(torch.uint8), w8.view(torch.uint8))
    assert torch.equal(layer.weight_scale, scale.expand(48))


def test_fused_fp8_parts_equal_the_parts(monkeypatch):
    parts = [Fp8Linear.from_float(linear(out=n, bias=False)) for n in (64, 32, 32)]
    fused = fuse_linears(parts)
    assert isinstance(fused, Fp8Linear) and fused.weight.dtype == FP8_DTYPE
    assert torch.equal(fused.weight.view(torch.uint8), torch.cat([p.weight.view(torch.uint8) for p in parts]))
    assert torch.equal(dequantize(fused.weight, fused.weight_scale, torch.float32),
                       torch.cat([dequantize(p.weight, p.weight_scale, torch.float32) for p in parts]))
    x = torch.randn(2, 3, 64)
    for scaled in (False, True) if CPU_SCALED_MM else (False,):
        monkeypatch.setattr(fp8, "SCALED_MM", scaled)
        torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=0, atol=1e-6)


def test_mixed_fp8_and_plain_parts_stay_unfused():
    plain = [linear(out=32, bias=False), linear(out=32, bias=False)]
    assert fuse_linears([Fp8Linear.from_float(plain[0]), plain[1]]) is None
    assert fuse_linears([Fp8Linear.from_float(plain[0]),
                         Fp8Linear.from_float(plain[1], compute_dtype=torch.bfloat16)]) is None
    fused = fuse_linears(plain)
    assert type(fused) is Linear and fused.weight.dtype == torch.float32


# --- the model -------------------------------------------------------------------------------------


def module_names(model: torch.nn.Module, kind: type) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, kind)}


def test_quantize_model_converts_exactly_the_decoder_linears(demo_checkpoint: Path):
    model = load_model(demo_checkpoint, CPU, torch.float32)
    layers = len(model.layers)
    decoder = {f"model.language_model.layers.{i}.{p}" for i in range(layers) for p in PROJECTIONS}
    before = model.state_dict()
    linears_before = module_names(model, Linear)
    assert decoder < linears_before  # the generation parts' linears are Linears too

    assert quantize_model(model) == 7 * layers
    assert module_names(model, Fp8Linear) == decoder
    assert module_names(model, Linear) == linears_before
    after = model.state_dict()
    kept = {n for n in before if n.rsplit(".", 1)[0] not in decoder}
    assert {n for n in after if n.rsplit(".", 1)[0] not in decoder} == kept
    for name in kept:  # embeddings, norms, x_embedder, t_embedder1, final_layer2, the ViT: untouched
        assert after[name].dtype == torch.float32 and torch.equal(after[name], before[name]), name
    bf16_bytes = sum(before[f"{n}.weight"].numel() * 2 for n in decoder)
    fp8_bytes = sum(after[f"{n}.{k}"].numel() * after[f"{n}.{k}"].element_size()
                    for n in decoder for k in ("weight", "weight_scale"))
    assert fp8_bytes <= bf16_bytes / 2 * 1.1  # the row scales add 4 bytes per row
    assert all(after[f"{n}.weight"].dtype == FP8_DTYPE for n in decoder)
    assert quantize_model(model) == 0  # already fp8


def test_quantize_model_after_fusing_and_on_meta(demo_checkpoint: Path):
    model = load_model(demo_checkpoint, CPU, torch.float32)
    model.fuse_projections()
    assert quantize_model(model, torch.bfloat16) == 4 * len(model.layers)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert {type(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)} == {Fp8Linear}
    assert attn.qkv_proj.compute_dtype == torch.bfloat16
    assert model.model.x_embedder.proj1.weight.dtype == torch.float32

    with torch.device("meta"):
        meta = HiDreamO1(model.spec)
    assert quantize_model(meta) == 7 * len(meta.layers)
    assert meta.layers[0].mlp.down_proj.weight.is_meta and meta.layers[0].mlp.down_proj.weight.dtype == FP8_DTYPE


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_an_engine_over_fp8_weights_draws_nearly_the_same_image(demo_checkpoint: Path, engine, monkeypatch):
    monkeypatch.setattr(fp8, "SCALED_MM", False)
    model = load_model(demo_checkpoint, CPU, torch.float32)
    quantize_model(model)
    quantized = Engine(model, engine.encoder, engine.variant, demo_checkpoint)  # fuses the fp8 projections
    assert isinstance(model.layers[0].self_attn.qkv_proj, Fp8Linear)
    request = GenerationRequest("a red circle", width=64, height=64, steps=8, seed=3)
    exact = np.asarray(engine.generate(request).images[0])
    ours = np.asarray(quantized.generate(request).images[0])
    # Measured: 49.8 dB here (max |diff| 3, mean 0.57 of 255); 47.4-49.8 dB, max 3-5, over seeds 0-5.
    assert 40.0 < psnr(exact, ours) < float("inf")
    assert np.abs(exact.astype(int) - ours).max() <= 16
