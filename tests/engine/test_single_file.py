"""Single-file checkpoints as the community ships them: no config, no tokenizer, nested names, fp8 with
ComfyUI's scales and markers; and every malformed file an error naming the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hidream.convert import convert
from hidream.engine.checkpoint import load_model, open_checkpoint
from hidream.engine.config import detect_variant, spec_from_dict
from hidream.engine.demo import full_config
from hidream.engine.demo_assets import write_demo_tokenizer
from hidream.engine.errors import CheckpointError
from hidream.engine.fp8 import Fp8Linear
from hidream.engine.model import HiDreamO1
from hidream.engine.pipeline import Engine, GenerationRequest
from hidream.engine.singlefile import CONFIG_TOKENS, infer_config

CPU = torch.device("cpu")
DOWN = "model.language_model.layers.1.mlp.down_proj"
REQUEST = GenerationRequest("a red circle", width=64, height=64, steps=2, seed=5)


@pytest.fixture(scope="module")
def files(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("single")
    return {"bf16": convert(demo_checkpoint, out / "demo.safetensors"),
            "fp8": convert(demo_checkpoint, out / "demo-fp8.safetensors", dtype="fp8", fp8_scaling="tensor")}


@pytest.fixture(scope="module")
def reference(engine) -> np.ndarray:
    return np.asarray(engine.generate(REQUEST).images[0])


def repack(src: Path, dst: Path, change=None, metadata: dict | None = None) -> Path:
    """`src`'s tensors, edited by change(tensors), saved as `dst` with only `metadata` (none by default)."""
    tensors = load_file(str(src))
    if change is not None:
        change(tensors)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=metadata or {"format": "pt"})
    return dst


def error_of(path: Path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(open_checkpoint(path, **kw), CPU, torch.float32)
    return str(info.value)


# --- the configuration ------------------------------------------------------------------------------


def test_the_published_configuration_is_inferred_from_its_shapes(tmp_path: Path) -> None:
    ids = write_demo_tokenizer(tmp_path)
    published = full_config(ids)
    with torch.device("meta"):
        model = HiDreamO1(spec_from_dict(published, "published"))
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    inferred = infer_config(shapes, {t: ids[t] for t in CONFIG_TOKENS}, tmp_path / "x.safetensors")
    for part in ("text_config", "vision_config"):
        for key, value in published[part].items():
            assert inferred[part][key] == value, f"{part}.{key}"
    # and without the DeepStack mergers, none are configured
    no_deepstack = {n: s for n, s in shapes.items() if "deepstack_merger_list" not in n}
    assert infer_config(no_deepstack, ids, tmp_path / "x.safetensors")["vision_config"]["deepstack_visual_indexes"] == []


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.update({"model.visual.blocks.0.norm1.weight": (1024,)}), "vision_config.num_heads"),
    (lambda s: [s.pop(n) for n in list(s) if "deepstack_merger_list.2." in n], "deepstack_visual_indexes"),
    (lambda s: [s.pop(n) for n in list(s) if ".layers.7." in n], "model.language_model.layers.7"),
    (lambda s: s.pop("model.language_model.embed_tokens.weight"), "embed_tokens.weight: missing"),
])
def test_inference_refuses_to_guess(tmp_path: Path, edit, field) -> None:
    ids = write_demo_tokenizer(tmp_path)
    with torch.device("meta"):
        model = HiDreamO1(spec_from_dict(full_config(ids), "published"))
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    edit(shapes)
    with pytest.raises(CheckpointError, match=field):
        infer_config(shapes, ids, tmp_path / "x.safetensors")


def test_shapes_that_leave_a_choice_open_ask_for_the_config(files, tmp_path: Path, demo_checkpoint: Path,
                                                           reference) -> None:
    bare = repack(files["bf16"], tmp_path / "bare" / "demo.safetensors")
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(demo_checkpoint, tokenizer, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    message = error_of(bare, tokenizer=tokenizer)  # tokenizer files, no config.json: the shapes are all there is
    # the demo's head_dim (16) and ViT width (32) are not the published ones: no rotary sections, no ViT heads
    assert "mrope_section" in message and "head_dim 16" in message
    assert "--tokenizer" in message and "config.json" in message
    shutil.copy(demo_checkpoint / "config.json", tokenizer / "config.json")
    engine = Engine.load(bare, device="cpu", tokenizer=tokenizer)
    assert np.array_equal(np.asarray(engine.generate(REQUEST).images[0]), reference)


def test_a_file_without_a_tokenizer_asks_for_one(files, tmp_path: Path) -> None:
    bare = repack(files["bf16"], tmp_path / "alone" / "demo.safetensors")
    message = error_of(bare)
    assert str(bare) in message and "--tokenizer DIR" in message
    with pytest.raises(CheckpointError, match="--tokenizer"):
        open_checkpoint(bare, tokenizer=tmp_path / "alone")  # a directory without tokenizer files


def test_tokenizer_beside_the_file_is_used(files, tmp_path: Path, demo_checkpoint: Path, reference) -> None:
    home = tmp_path / "beside"
    shutil.copytree(demo_checkpoint, home, ignore=shutil.ignore_patterns("*.safetensors"))
    bare = repack(files["bf16"], home / "hidream_o1_image_bf16.safetensors")
    engine = Engine.load(bare, device="cpu")  # config.json and tokenizer from the file's directory
    assert np.array_equal(np.asarray(engine.generate(REQUEST).images[0]), reference)


def test_nested_names_load(files, tmp_path: Path, reference) -> None:
    def nest(t):
        for name in list(t):
            t["model.diffusion_model." + name] = t.pop(name)

    with safe_open(str(files["bf16"]), "pt") as f:
        meta = f.metadata()
    nested = repack(files["bf16"], tmp_path / "nested.safetensors", nest, meta)
    engine = Engine.load(nested, device="cpu")
    assert np.array_equal(np.asarray(engine.generate(REQUEST).images[0]), reference)


def test_variant_from_the_file_name(files, tmp_path: Path) -> None:
    bare = repack(files["bf16"], tmp_path / "hidream_o1_image_dev_bf16.safetensors")
    assert detect_variant(bare) == "dev"
    assert detect_variant(repack(files["bf16"], tmp_path / "hidream_o1_image_bf16.safetensors")) == "full"
    with safe_open(str(files["bf16"]), "pt") as f:
        meta = {**f.metadata(), "hidream.variant": "dev"}
    assert detect_variant(repack(files["bf16"], tmp_path / "plain.safetensors", metadata=meta)) == "dev"


# --- fp8 as ComfyUI stores it ------------------------------------------------------------------------


def _meta(file: Path) -> dict:
    with safe_open(str(file), "pt") as f:
        return f.metadata()


def test_fp8_stored_as_uint8_bytes_with_a_comfy_quant_marker(files, tmp_path: Path) -> None:
    def as_bytes(t):
        for name in list(t):
            if t[name].dtype == torch.float8_e4m3fn:
                t[name] = t[name].view(torch.uint8)

    raw = repack(files["fp8"], tmp_path / "u8.safetensors", as_bytes, _meta(files["fp8"]))
    a, b = load_model(files["fp8"], CPU, torch.float32), load_model(raw, CPU, torch.float32)
    layer = b.get_submodule(DOWN)
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight.view(torch.uint8), a.get_submodule(DOWN).weight.view(torch.uint8))


def test_fp8_without_a_scale_has_scale_one(files, tmp_path: Path) -> None:
    def plain_cast(t):
        t[DOWN + ".weight"] = t[DOWN + ".weight"].float().to(torch.float8_e4m3fn)
        del t[DOWN + ".weight_scale"], t[DOWN + ".comfy_quant"]

    path = repack(files["fp8"], tmp_path / "cast.safetensors", plain_cast, _meta(files["fp8"]))
    layer = load_model(path, CPU, torch.float32).get_submodule(DOWN)
    assert isinstance(layer, Fp8Linear) and torch.equal(layer.weight_scale, torch.ones(layer.out_features))


@pytest.mark.parametrize("case, change, named, words", [
    ("mxfp8", lambda t: t.update({DOWN + ".comfy_quant": torch.tensor(list(b'{"format": "mxfp8"}'), dtype=torch.uint8)}),
     DOWN + ".comfy_quant", ["'mxfp8'", "float8_e4m3fn"]),
    ("e5m2", lambda t: t.update({DOWN + ".weight": t[DOWN + ".weight"].float().to(torch.float8_e5m2)}),
     DOWN + ".weight", ["float8_e5m2"]),
    ("scale-without-fp8", lambda t: t.update({"model.x_embedder.proj1.weight_scale": torch.ones(())}),
     "model.x_embedder.proj1", ["not float8_e4m3fn"]),
    ("scale-shape", lambda t: t.update({DOWN + ".weight_scale": torch.ones(3, 3)}),
     DOWN, ["[3, 3]", "per output row"]),
    ("fp8-norm", lambda t: t.update({"model.language_model.norm.weight":
                                     t["model.language_model.norm.weight"].float().to(torch.float8_e4m3fn)}),
     "model.language_model.norm", ["linear layers"]),
    ("shape", lambda t: t.update({DOWN + ".weight": t[DOWN + ".weight"][:, :10].contiguous()}),
     DOWN + ".weight", ["[64, 10]", "[64, 128]"]),
    ("missing", lambda t: t.pop("model.x_embedder.proj2.bias"), "model.x_embedder.proj2.bias", ["missing"]),
])
def test_malformed_fp8_files_name_the_tensor(files, tmp_path: Path, case, change, named, words) -> None:
    path = repack(files["fp8"], tmp_path / f"{case}.safetensors", change, _meta(files["fp8"]))
    message = error_of(path)
    assert named in message, message
    for word in words:
        assert word in message, message


# --- files that are not what they say ------------------------------------------------------------------


def test_truncated_single_file_names_a_tensor(files, tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    data = files["bf16"].read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    message = error_of(path)
    assert "truncated" in message and str(path) in message
    name = message.split(":")[0]
    assert name in load_file(str(files["bf16"]))  # the message starts with the tensor's name


@pytest.mark.parametrize("content, words", [
    (b"", ["not a safetensors file"]),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", ["not valid JSON"]),
    (b"\xff" * 64, ["header length"]),
])
def test_a_file_that_is_not_safetensors(tmp_path: Path, content: bytes, words: list[str]) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    message = error_of(path)
    assert str(path) in message and all(w in message for w in words), message


def test_other_suffixes_and_missing_paths(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert ".safetensors" in error_of(gguf)
    assert "no such checkpoint" in error_of(tmp_path / "absent.safetensors")


def test_fp8_on_the_mlp_only_as_comfy_ships_it(files, tmp_path: Path, reference) -> None:
    """ComfyUI's fp8_scaled repack: fp8 matmuls on the MLP layers, attention in bf16."""
    def attention_bf16(t):
        for name in [n for n in t if ".self_attn." in n and n.endswith(".weight_scale")]:
            layer = name.removesuffix(".weight_scale")
            t[layer + ".weight"] = (t[layer + ".weight"].float() * t.pop(name)).to(torch.bfloat16)
            t.pop(layer + ".comfy_quant")

    path = repack(files["fp8"], tmp_path / "mlp-fp8.safetensors", attention_bf16, _meta(files["fp8"]))
    engine = Engine.load(path, device="cpu")
    layer = engine.model.layers[0]
    assert engine.quantize == "fp8"
    assert isinstance(layer.mlp.gate_up_proj, Fp8Linear) and isinstance(layer.mlp.down_proj, Fp8Linear)
    assert not isinstance(layer.self_attn.qkv_proj, Fp8Linear) and not isinstance(layer.self_attn.o_proj, Fp8Linear)
    image = np.asarray(engine.generate(REQUEST).images[0]).astype(np.float64)
    mse = ((image - reference) ** 2).mean()
    assert 0 < mse and 10 * np.log10(255.0**2 / mse) > 40


def test_a_group_mixing_fp8_and_bf16_stays_unfused_and_draws_the_same(files, tmp_path: Path) -> None:
    up = "model.language_model.layers.0.mlp.up_proj"

    def up_bf16(t):
        t[up + ".weight"] = (t[up + ".weight"].float() * t.pop(up + ".weight_scale")).to(torch.bfloat16)
        t.pop(up + ".comfy_quant")

    path = repack(files["fp8"], tmp_path / "mixed.safetensors", up_bf16, _meta(files["fp8"]))
    mixed = Engine.load(path, device="cpu")
    mlp = mixed.model.layers[0].mlp
    assert mlp.gate_up_proj is None and isinstance(mlp.gate_proj, Fp8Linear) and not isinstance(mlp.up_proj, Fp8Linear)
    assert mixed.model.layers[1].mlp.gate_up_proj is not None  # the other layers fuse as usual
    unfused = Engine.load(path, device="cpu", fuse=False)
    a = np.asarray(mixed.generate(REQUEST).images[0])
    assert np.array_equal(a, np.asarray(unfused.generate(REQUEST).images[0]))
