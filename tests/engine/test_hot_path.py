"""The GPU-grade hot path, proved on the CPU: mask-free attention, no host reads in the step loop,
fused == unfused, compiled == eager (with one compile per size), and the precision modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hidream.engine import layers
from hidream.engine.errors import InvalidRequestError
from hidream.engine.pipeline import Engine, GenerationRequest
from hidream.engine.sampling import Denoiser, denoise
from test_model import conditioning, noisy, picture


def edit_request(**kw) -> GenerationRequest:
    return GenerationRequest("a red bicycle", width=96, height=64, references=[picture(80, 64, 3)],
                             steps=2, guidance=4.0, seed=5, **kw)


def test_no_mask_reaches_sdpa_and_no_kv_is_expanded(engine, monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((attn_mask, kw.get("enable_gqa"), q.shape[1], k.shape[1]))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    real_repeat = torch.Tensor.repeat_interleave

    def no_repeat(x, *args, **kw):
        if x.is_floating_point():  # (integer positions may be built with it)
            raise AssertionError("K/V expanded with repeat_interleave")
        return real_repeat(x, *args, **kw)

    class Functional:  # torch.nn.functional as the decoder's layers see it, SDPA spied on (not the ViT's)
        scaled_dot_product_attention = staticmethod(spy)

        def __getattr__(self, name):
            return getattr(F, name)

    monkeypatch.setattr(layers, "F", Functional())
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_repeat)
    for mode, batch in (("cached", True), ("cached", False), ("full", False)):
        calls.clear()
        engine.generate(edit_request(), mode=mode, batch_guidance=batch)
        assert calls, mode
        assert all(mask is None for mask, *_ in calls), f"{mode}: a mask reached SDPA"
        heads, kv_heads = engine.model.spec.text.num_attention_heads, engine.model.spec.text.num_key_value_heads
        assert all(h == heads and kvh == kv_heads and gqa for _, gqa, h, kvh in calls), mode


class HostReads(TorchFunctionMode):
    """Records every read of a tensor's value into Python (what waits for the device on CUDA)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
             torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scheduler", ["unipc", "flash", "euler"])
def test_the_step_loop_never_reads_a_tensor_back(engine, scheduler):
    cond = conditioning(engine, 1)
    denoiser = Denoiser(engine.model, cond)
    recipe = engine.recipe(1)
    schedule = engine._schedule(recipe, 3, 3.0, scheduler)
    sampler = engine._sampler(recipe, schedule, scheduler, 0)
    z = noisy(cond)
    with HostReads() as mode:
        out = denoise(denoiser, z, schedule, sampler, 4.0, progress=lambda *a: None)
    assert mode.reads == [], f"{scheduler}: {mode.reads}"
    # the spy does see reads: a loop that did one would fail
    with HostReads() as mode:
        out.abs().max().item()
    assert mode.reads == ["item"]


def test_fused_projections_equal_unfused(demo_checkpoint, engine):
    unfused = Engine.load(demo_checkpoint, device="cpu", fuse=False)
    names = set(unfused.model.state_dict())
    assert any(n.endswith("self_attn.q_proj.weight") for n in names)  # the on-disk names
    fused_names = set(engine.model.state_dict())
    assert any(n.endswith("self_attn.qkv_proj.weight") for n in fused_names)
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n in fused_names)
    for n_refs in (0, 2):
        cond_a, cond_b = conditioning(engine, n_refs), conditioning(unfused, n_refs)
        z, t = noisy(cond_a), torch.tensor(0.42)
        torch.testing.assert_close(Denoiser(engine.model, cond_a)(z, t), Denoiser(unfused.model, cond_b)(z, t),
                                   rtol=1e-5, atol=1e-5)


def test_compiled_layer_equals_eager_and_compiles_once_per_size(demo_checkpoint, engine):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = Engine.load(demo_checkpoint, device="cpu", compile=True)
    req = GenerationRequest("a lighthouse at dusk", width=64, height=64, steps=3, guidance=5.0, seed=2)
    a = compiled.generate(req)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and not counters["graph_break"]  # the whole layer in one graph
    compiled.generate(req)  # same size, more steps: nothing new
    compiled.generate(GenerationRequest(req.prompt, width=64, height=64, steps=5, guidance=5.0, seed=3))
    assert counters["stats"]["unique_graphs"] == graphs
    b = engine.generate(req)
    diff = np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16))
    assert diff.max() <= 1
    cond = conditioning(engine, 1)
    z, t = noisy(cond), torch.tensor(0.3)
    torch.testing.assert_close(Denoiser(compiled.model, cond)(z, t), Denoiser(engine.model, cond)(z, t),
                               rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_fp16_is_refused_with_its_reason(demo_checkpoint):
    for kw in ({"dtype": torch.float16}, {"precision": "fp16"}):
        with pytest.raises(InvalidRequestError) as err:
            Engine.load(demo_checkpoint, device="cpu", **kw)
        assert err.value.field == "precision" and "overflow" in err.value.rule
    with pytest.raises(InvalidRequestError, match="bf16-fp32acc"):
        Engine.load(demo_checkpoint, device="cpu", precision="int4")


def test_bf16_fp32acc_is_the_official_fp32_mode(demo_checkpoint, engine):
    """bf16 GEMMs and attention on a float32 stream: what float32 weights under bf16 autocast compute."""
    acc = Engine.load(demo_checkpoint, device="cpu", precision="bf16-fp32acc")
    bf16 = Engine.load(demo_checkpoint, device="cpu", precision="bf16")
    layer = acc.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.bfloat16 and layer.mlp.down_proj.weight.dtype == torch.bfloat16
    assert layer.input_layernorm.weight.dtype == torch.float32
    assert acc.model.model.language_model.embed_tokens.weight.dtype == torch.float32
    assert acc.dtype == torch.float32 and acc.precision == "bf16-fp32acc"  # latent and residual stream

    cond = conditioning(engine, 1)
    z, t = noisy(cond), torch.tensor(0.55)
    exact = Denoiser(engine.model, cond)(z, t)
    with torch.autocast("cpu", torch.bfloat16):  # the official "fp32" mode: float32 weights, bf16 autocast
        official = Denoiser(engine.model, conditioning(engine, 1))(z, t).float()
    ours = Denoiser(acc.model, conditioning(acc, 1))(z, t).float()
    torch.testing.assert_close(ours, official, rtol=0, atol=0)  # bit for bit, at half the weight memory
    plain = Denoiser(bf16.model, conditioning(bf16, 1))(z.bfloat16(), t).float()
    assert (ours - exact).abs().mean() < (plain - exact).abs().mean()


def test_the_mlp_in_token_chunks_equals_one_pass(engine, monkeypatch):
    from hidream.engine import model as model_module

    cond = conditioning(engine, 1)
    z, t = noisy(cond), torch.tensor(0.45)
    whole = Denoiser(engine.model, cond)(z, t)
    monkeypatch.setattr(model_module, "MLP_CHUNK", 5)  # the sequences here are 6 to 30 tokens long
    chunked = Denoiser(engine.model, conditioning(engine, 1))(z, t)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert cond.target_len + 1 > 5  # the step's rows really were split
