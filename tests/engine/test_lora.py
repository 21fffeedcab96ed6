"""LoRA files in every community key format change the model exactly as a checkpoint whose weights were
changed by hand by the same update; runtime == merged; scale 0 is no LoRA; two LoRAs add; errors name keys."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hidream.engine import lora as L
from hidream.engine.checkpoint import load_model
from hidream.engine.fp8 import Fp8Linear
from hidream.engine.pipeline import Engine, GenerationRequest

CPU = torch.device("cpu")
Q = "model.language_model.layers.0.self_attn.q_proj"
V = "model.language_model.layers.1.self_attn.v_proj"
UP = "model.language_model.layers.2.mlp.up_proj"
DOWN = "model.language_model.layers.1.mlp.down_proj"
HEAD = "model.final_layer2.linear"
VIT = "model.visual.blocks.0.mlp.linear_fc1"
SHAPES = {Q: (64, 64), V: (32, 64), UP: (128, 64), DOWN: (64, 128), HEAD: (3072, 64), VIT: (64, 32)}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def random_lora(names, rank: int = 4, seed: int = 0, std: float = 0.3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, SHAPES[n][1], generator=gen) * std,
                torch.randn(SHAPES[n][0], rank, generator=gen) * std) for n in names}


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def peft(path: Path, mods, prefix: str = "", alpha: float | None = None, strip_model: bool = False) -> Path:
    out = {}
    for name, (a, b) in mods.items():
        key = prefix + (name.removeprefix("model.") if strip_model else name)
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = a, b
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(alpha)
    return write(path, out)


def kohya(path: Path, mods, alpha: float) -> Path:
    out = {}
    for name, (a, b) in mods.items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = a, b
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return write(path, out)


def hand_merged(demo: Path, dst: Path, updates: dict[str, torch.Tensor]) -> Path:
    """A copy of the demo checkpoint whose weights were changed by `updates` (official names), in fp32."""
    shutil.copytree(demo, dst)
    state = load_file(str(dst / "model.safetensors"))
    state = {k: v.float() for k, v in state.items()}
    for name, delta in updates.items():
        state[name + ".weight"] = state[name + ".weight"] + delta
    save_file(state, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def lora_engine(demo_checkpoint: Path) -> Engine:
    """A demo engine of this module's own (the LoRAs put on it come off after each request)."""
    return Engine.load(demo_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def ref_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "ref.png"
    Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8)).save(path)
    return path


def request(*loras, refs=()) -> GenerationRequest:
    return GenerationRequest("a red circle", width=64, height=64, steps=3, seed=2, references=list(refs),
                             loras=list(loras))


def close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal within float32 rounding: at most one step of 255 anywhere, and almost nowhere."""
    diff = np.abs(a - b)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


# --- formats, against the hand-merged checkpoint ---------------------------------------------------------


FORMATS = {
    "peft": lambda p, m: peft(p, m),
    "peft-alpha": lambda p, m: peft(p, m, alpha=2.0),
    "peft-diffusion_model": lambda p, m: peft(p, m, prefix="diffusion_model."),
    "peft-base_model": lambda p, m: peft(p, m, prefix="base_model.model."),
    "peft-transformer": lambda p, m: peft(p, m, prefix="transformer.", strip_model=True),
    "kijai (no model.)": lambda p, m: peft(p, m, strip_model=True),
    "kohya-alpha": lambda p, m: kohya(p, m, alpha=8.0),
}
FACTOR = {"peft-alpha": 2.0 / 4, "kohya-alpha": 8.0 / 4}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_changes_the_output_as_the_hand_merged_checkpoint(fmt, tmp_path, demo_checkpoint, lora_engine,
                                                                      ref_image) -> None:
    mods = random_lora([Q, V, UP, DOWN, HEAD, VIT])
    path = FORMATS[fmt](tmp_path / "lora.safetensors", mods)
    factor = FACTOR.get(fmt, 1.0) * 0.7
    merged_ckpt = hand_merged(demo_checkpoint, tmp_path / "merged", {n: factor * b @ a for n, (a, b) in mods.items()})
    by_hand = Engine.load(merged_ckpt, device="cpu")
    info = L.check_lora_file(path)
    assert sorted(info.modules) == sorted(mods) and info.ranks == {4}
    for refs in ((), (ref_image,)):
        base = pixels(lora_engine.generate(request(refs=refs)).images[0])
        expected = pixels(by_hand.generate(request(refs=refs)).images[0])
        assert np.abs(expected - base).max() > 10  # the update matters
        for mode in ("runtime", "merged"):
            lora_engine.lora_mode = mode
            try:
                got = lora_engine.generate(request(L.LoraSpec(path, 0.7), refs=refs))
            finally:
                lora_engine.lora_mode = "runtime"
            close(pixels(got.images[0]), expected)
            assert got.loras == [(str(path), 0.7)]
        # and off again: the base model, bit for bit
        assert np.array_equal(pixels(lora_engine.generate(request(refs=refs)).images[0]), base)


def test_lokr_full_and_factored(tmp_path, demo_checkpoint, lora_engine) -> None:
    gen = torch.Generator().manual_seed(3)
    w1 = torch.randn(8, 4, generator=gen) * 0.3  # DOWN is [64, 128] = kron([8, 4], [8, 32])
    w2 = torch.randn(8, 32, generator=gen) * 0.3
    w2a, w2b = torch.randn(16, 2, generator=gen) * 0.3, torch.randn(2, 16, generator=gen) * 0.3  # UP [128, 64]
    w1u = torch.randn(8, 4, generator=gen) * 0.3
    path = write(tmp_path / "lokr.safetensors", {
        f"{DOWN}.lokr_w1": w1, f"{DOWN}.lokr_w2": w2,
        f"{UP}.lokr_w1": w1u, f"{UP}.lokr_w2_a": w2a, f"{UP}.lokr_w2_b": w2b,
        f"{UP}.alpha": torch.tensor(1.0)})
    assert L.check_lora_file(path).format == "lokr"
    updates = {DOWN: torch.kron(w1, w2), UP: torch.kron(w1u, w2a @ w2b) * (1.0 / 2)}
    by_hand = Engine.load(hand_merged(demo_checkpoint, tmp_path / "merged", updates), device="cpu")
    expected = pixels(by_hand.generate(request()).images[0])
    close(pixels(lora_engine.generate(request(L.LoraSpec(path))).images[0]), expected)


def test_scale_zero_is_no_lora_bit_for_bit(tmp_path, lora_engine) -> None:
    path = peft(tmp_path / "l.safetensors", random_lora([Q, DOWN, HEAD]))
    base = pixels(lora_engine.generate(request()).images[0])
    for mode in ("runtime", "merged"):
        lora_engine.lora_mode = mode
        try:
            assert np.array_equal(pixels(lora_engine.generate(request(L.LoraSpec(path, 0.0))).images[0]), base)
        finally:
            lora_engine.lora_mode = "runtime"


def test_two_loras_add_their_updates_and_negative_scales_subtract(tmp_path, demo_checkpoint, lora_engine) -> None:
    one, two = random_lora([Q, DOWN], seed=1), random_lora([DOWN, UP], seed=2, std=0.2)
    p1, p2 = peft(tmp_path / "one.safetensors", one), kohya(tmp_path / "two.safetensors", two, alpha=4.0)
    updates: dict[str, torch.Tensor] = {}
    for mods, scale in ((one, 0.5), (two, -0.8)):
        for n, (a, b) in mods.items():
            updates[n] = updates.get(n, 0) + scale * b @ a
    by_hand = Engine.load(hand_merged(demo_checkpoint, tmp_path / "merged", updates), device="cpu")
    expected = pixels(by_hand.generate(request()).images[0])
    close(pixels(lora_engine.generate(request(L.LoraSpec(p1, 0.5), L.LoraSpec(p2, -0.8))).images[0]), expected)


def test_fused_and_unfused_layers_take_the_same_update(tmp_path, demo_checkpoint) -> None:
    mods = random_lora([Q, V, UP])
    path = peft(tmp_path / "l.safetensors", mods)
    outs = []
    for fuse in (True, False):
        model = load_model(demo_checkpoint, CPU, torch.float32)
        engine = Engine(model, Engine.load(demo_checkpoint, device="cpu").encoder, "full", demo_checkpoint, fuse=fuse)
        outs.append(pixels(engine.generate(request(L.LoraSpec(path))).images[0]))
    close(outs[0], outs[1])


def test_fp8_layers_take_the_runtime_branch_even_when_merging(tmp_path, demo_checkpoint) -> None:
    path = peft(tmp_path / "l.safetensors", random_lora([DOWN, UP]))
    engine = Engine.load(demo_checkpoint, device="cpu", quantize="fp8")
    layer = engine.model.layers[1].mlp.down_proj
    assert isinstance(layer, Fp8Linear)
    before = layer.weight.view(torch.uint8).clone()
    runtime = pixels(engine.generate(request(L.LoraSpec(path))).images[0])
    engine.lora_mode = "merged"
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(torch.equal(m.weight.view(torch.uint8), before)))
    try:
        merged = pixels(engine.generate(request(L.LoraSpec(path))).images[0])
    finally:
        handle.remove()
    assert seen and all(seen)  # the fp8 weight was never rewritten: the update was not rounded into it
    assert np.array_equal(runtime, merged)
    assert not np.array_equal(runtime, pixels(engine.generate(request()).images[0]))


# --- the cache and the trainable branch -----------------------------------------------------------------


def test_cache_keeps_the_recent_files_within_its_bytes(tmp_path) -> None:
    paths = [peft(tmp_path / f"l{i}.safetensors", random_lora([HEAD], seed=i)) for i in range(3)]
    one = L.read_lora(paths[0]).nbytes
    cache = L.LoraCache(max_bytes=2 * one)
    first = cache.get(paths[0])
    assert cache.get(paths[0]) is first  # parsed once
    cache.get(paths[1]), cache.get(paths[2])
    assert len(cache) == 2 and cache.nbytes <= 2 * one
    assert cache.get(paths[0]) is not first  # evicted, read again
    peft(paths[2], random_lora([HEAD], seed=9, rank=2))  # changed on disk: read again
    assert cache.get(paths[2]).modules[HEAD].rank == 2


def test_a_trained_branch_saves_a_file_the_loader_applies_identically(tmp_path, demo_checkpoint) -> None:
    engine = Engine.load(demo_checkpoint, device="cpu")
    trainable = L.add_lora(engine.model, [*L.ATTN_TARGETS, *L.MLP_TARGETS], rank=2, alpha=4.0, seed=1)
    assert len(trainable.parameters()) == 2 * 7 * len(engine.model.layers)
    assert np.array_equal(pixels(engine.generate(request()).images[0]),
                          pixels(Engine.load(demo_checkpoint, device="cpu").generate(request()).images[0]))
    with torch.no_grad():
        for p in trainable.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    with_branch = pixels(engine.generate(request()).images[0])
    path = trainable.save(tmp_path / "trained.safetensors")
    trainable.remove()
    assert set(load_file(str(path))) >= {f"{Q}.lora_A.weight", f"{Q}.lora_B.weight", f"{Q}.alpha"}
    close(pixels(engine.generate(request(L.LoraSpec(path))).images[0]), with_branch)


# --- errors name the key ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tensors, words", [
    ({"model.language_model.layers.0.mlp.down_proj.weight": torch.zeros(64, 128)},
     ["model.language_model.layers.0.mlp.down_proj.weight", "not a LoRA key"]),
    ({"model.unet.down_blocks.0.lora_A.weight": torch.zeros(4, 8), "model.unet.down_blocks.0.lora_B.weight":
      torch.zeros(8, 4)}, ["model.unet.down_blocks.0.lora_A.weight", "matches no layer"]),
    ({f"{DOWN}.lora_A.weight": torch.zeros(4, 128), f"{DOWN}.lora_B.weight": torch.zeros(64, 3)},
     [f"{DOWN}.lora_B.weight", "rank mismatch"]),
    ({f"{DOWN}.lora_A.weight": torch.zeros(4, 128)}, [DOWN, "lora_B missing"]),
    ({f"{DOWN}.lora_A.weight": torch.zeros(4, 128), f"{DOWN}.lora_B.weight": torch.zeros(64, 4),
      f"{DOWN}.dora_scale": torch.ones(64)}, [f"{DOWN}.dora_scale", "DoRA"]),
    ({f"{DOWN}.lora_A.weight": torch.zeros(4, 128), f"{DOWN}.lora_B.weight": torch.zeros(64, 4),
      f"{DOWN}.alpha": torch.ones(3)}, [f"{DOWN}.alpha", "one number"]),
    ({f"{DOWN}.lokr_w1": torch.zeros(8, 4)}, [DOWN, "LoKr"]),
])
def test_malformed_files_name_the_key(tmp_path, tensors, words) -> None:
    path = write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(L.LoraError) as info:
        L.check_lora_file(path)
    for word in words:
        assert word in str(info.value), str(info.value)
    with pytest.raises(L.LoraError):
        L.read_lora(path)


def test_errors_at_generation_name_the_request_field(tmp_path, lora_engine) -> None:
    wrong = peft(tmp_path / "wrong.safetensors",
                 {DOWN: (torch.zeros(4, 256), torch.zeros(64, 4))})  # a LoRA for a wider model
    with pytest.raises(L.LoraError) as info:
        lora_engine.generate(request(L.LoraSpec(wrong)))
    assert info.value.field == "loras[0].path" and DOWN in info.value.rule and "[64, 256]" in info.value.rule
    absent = peft(tmp_path / "absent.safetensors", {"model.language_model.layers.7.mlp.down_proj":
                                                    (torch.zeros(4, 128), torch.zeros(64, 4))})
    with pytest.raises(L.LoraError, match="no such layer in this model"):
        lora_engine.generate(request(L.LoraSpec(absent)))
    nan = peft(tmp_path / "nan.safetensors", {DOWN: (torch.full((4, 128), math.nan), torch.zeros(64, 4))})
    with pytest.raises(L.LoraError, match="NaN") as info:
        lora_engine.generate(request(L.LoraSpec(nan)))
    assert info.value.field == "loras[0].path"
    empty = write(tmp_path / "empty.safetensors", {})
    with pytest.raises(L.LoraError, match="no tensors"):
        lora_engine.generate(request(L.LoraSpec(empty)))
    for bad, field in (((tmp_path / "missing.safetensors", 1.0), "loras[0].path"), ((wrong, 11.0), "loras[0].scale"),
                       ((wrong, math.inf), "loras[0].scale")):
        with pytest.raises(Exception) as info:
            lora_engine.generate(request(bad))
        assert getattr(info.value, "field", None) == field
    # the failed requests left nothing on the model
    hooks = [m for m in lora_engine.model.modules() if m._forward_hooks]
    assert hooks == []


def test_offloaded_layers_take_the_branch_and_draw_the_same(tmp_path, demo_checkpoint, lora_engine) -> None:
    path = peft(tmp_path / "l.safetensors", random_lora([Q, DOWN, UP, VIT]))
    offloaded = Engine.load(demo_checkpoint, device="cpu", offload="layers", lora_mode="merged")
    assert offloaded.effective_lora_mode() == "runtime"
    host = [t.clone() for t in offloaded.model.offload.host_tensors()]
    got = pixels(offloaded.generate(request(L.LoraSpec(path))).images[0])
    assert np.array_equal(got, pixels(lora_engine.generate(request(L.LoraSpec(path))).images[0]))
    assert all(torch.equal(a, b) for a, b in zip(host, offloaded.model.offload.host_tensors(), strict=True))


def test_a_compiled_layer_takes_loras_merged(tmp_path, demo_checkpoint, lora_engine) -> None:
    """A hook would change the compiled layer's guards for every LoRA set: the update goes into the weights."""
    path = peft(tmp_path / "l.safetensors", random_lora([Q, DOWN]))
    engine = Engine.load(demo_checkpoint, device="cpu")
    engine.compiled = True  # as Engine(compile=True) marks it; the layer itself need not be compiled here
    assert engine.effective_lora_mode() == "merged"
    hooked = []
    probe = engine.model.layers[1].mlp.register_forward_pre_hook(
        lambda m, a: hooked.append(bool(m.down_proj._forward_hooks)))
    before = engine.model.layers[1].mlp.down_proj.weight.clone()
    try:
        got = pixels(engine.generate(request(L.LoraSpec(path))).images[0])
    finally:
        probe.remove()
    assert hooked and not any(hooked)
    assert torch.equal(engine.model.layers[1].mlp.down_proj.weight, before)  # restored after
    close(got, pixels(lora_engine.generate(request(L.LoraSpec(path))).images[0]))
