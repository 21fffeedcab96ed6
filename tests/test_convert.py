"""`hidream convert` builds every layout the engine reads from the demo checkpoint; each loads and draws.

Layouts: the official directory (one file or shards), a single bf16 file, a single fp8 file with a
scale per row or per tensor (ComfyUI's), with and without lm_head and the DeepStack mergers. Equal
weights give equal pixels; fp8 gives the measured small difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from hidream import cli
from hidream.convert import convert
from hidream.engine.checkpoint import load_model, open_checkpoint
from hidream.engine.errors import InvalidRequestError
from hidream.engine.fp8 import Fp8Linear
from hidream.engine.pipeline import Engine, GenerationRequest

CPU = torch.device("cpu")
LAYER = "model.language_model.layers.0."


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def layouts(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("layouts")
    return {
        "file": convert(demo_checkpoint, out / "demo.safetensors"),
        "file-no-lm-head": convert(demo_checkpoint, out / "demo-nolm.safetensors", drop=("lm_head",)),
        "file-no-deepstack": convert(demo_checkpoint, out / "demo-nods.safetensors", drop=("lm_head", "deepstack")),
        "directory-shards": convert(demo_checkpoint, out / "shards", shard_gb=0.0004),
        "fp8-row": convert(demo_checkpoint, out / "demo-fp8.safetensors", dtype="fp8"),
        "fp8-tensor": convert(demo_checkpoint, out / "demo-fp8-comfy.safetensors", dtype="fp8", fp8_scaling="tensor"),
        "fp8-directory": convert(demo_checkpoint, out / "fp8-dir", dtype="fp8", drop=("lm_head",)),
    }


@pytest.fixture(scope="module")
def requests_(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GenerationRequest]:
    ref = tmp_path_factory.mktemp("ref") / "ref.png"
    Image.fromarray((np.random.RandomState(0).rand(64, 48, 3) * 255).astype(np.uint8)).save(ref)
    return {"t2i": GenerationRequest("a red circle", width=64, height=64, steps=3, seed=3),
            "edit": GenerationRequest("make it blue", width=64, height=64, steps=3, seed=3, references=[str(ref)])}


@pytest.fixture(scope="module")
def reference(engine, requests_) -> dict[str, np.ndarray]:
    return {mode: pixels(engine.generate(req).images[0]) for mode, req in requests_.items()}


def test_directory_output_is_the_official_layout(layouts: dict[str, Path], demo_checkpoint: Path) -> None:
    shards = layouts["directory-shards"]
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in shards.glob("*.safetensors"))
    assert len(files) >= 2 and set(index["weight_map"].values()) == set(files)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (shards / name).read_text() == (demo_checkpoint / name).read_text(), name
    stored = {}
    for f in files:  # written by our streaming writer, read by the safetensors library
        stored.update(load_file(str(shards / f)))
    original = load_file(str(demo_checkpoint / "model.safetensors"))
    assert stored.keys() == original.keys()
    assert all(torch.equal(stored[k], original[k]) for k in original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())


def test_single_file_carries_config_variant_and_tokenizer(layouts: dict[str, Path], demo_checkpoint: Path) -> None:
    with safe_open(str(layouts["file"]), "pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert json.loads(meta["hidream.config"]) == json.loads((demo_checkpoint / "config.json").read_text())
    assert meta["hidream.variant"] == "full"
    assert set(json.loads(meta["hidream.files"])) >= {"tokenizer.json", "preprocessor_config.json"}
    assert "lm_head.weight" in names
    with safe_open(str(layouts["file-no-deepstack"]), "pt") as f:
        names = set(f.keys())
        config = json.loads(f.metadata()["hidream.config"])
    assert "lm_head.weight" not in names and not any("deepstack_merger_list" in n for n in names)
    assert config["vision_config"]["deepstack_visual_indexes"] == []


def test_fp8_layouts_store_decoder_linears_in_fp8_with_scales(layouts: dict[str, Path]) -> None:
    with safe_open(str(layouts["fp8-row"]), "pt") as f:
        weight, scale = f.get_tensor(LAYER + "mlp.up_proj.weight"), f.get_tensor(LAYER + "mlp.up_proj.weight_scale")
        assert f.get_tensor("model.x_embedder.proj1.weight").dtype == torch.bfloat16  # kept bf16
        assert f.get_tensor("model.visual.blocks.0.attn.qkv.weight").dtype == torch.bfloat16
        assert f.get_tensor(LAYER + "input_layernorm.weight").dtype == torch.bfloat16
    assert weight.dtype == torch.float8_e4m3fn and scale.shape == (weight.shape[0],) and scale.dtype == torch.float32
    with safe_open(str(layouts["fp8-tensor"]), "pt") as f:
        meta = f.metadata()
        scale = f.get_tensor(LAYER + "self_attn.q_proj.weight_scale")
        marker = f.get_tensor(LAYER + "self_attn.q_proj.comfy_quant")
    assert scale.shape == () and json.loads(bytes(marker.tolist()))["format"] == "float8_e4m3fn"
    layers = json.loads(meta["_quantization_metadata"])["layers"]
    assert LAYER + "mlp.down_proj" in layers and "model.x_embedder.proj1" not in layers


@pytest.mark.parametrize("layout", ["file", "file-no-lm-head", "directory-shards"])
def test_equal_weights_give_equal_pixels(layouts, layout, requests_, reference) -> None:
    engine = Engine.load(layouts[layout], device="cpu")
    assert engine.quantize is None and engine.variant == "full"
    for mode, req in requests_.items():
        assert np.array_equal(pixels(engine.generate(req).images[0]), reference[mode]), mode


def test_without_deepstack_text_to_image_is_unchanged_and_edits_differ_slightly(layouts, requests_, reference) -> None:
    engine = Engine.load(layouts["file-no-deepstack"], device="cpu")
    assert engine.model.spec.vision.deepstack_visual_indexes == []
    assert np.array_equal(pixels(engine.generate(requests_["t2i"]).images[0]), reference["t2i"])
    edit = pixels(engine.generate(requests_["edit"]).images[0])
    assert not np.array_equal(edit, reference["edit"])  # the DeepStack features did reach the decoder before
    assert psnr(edit, reference["edit"]) > 40  # measured 56 dB on the demo checkpoint


@pytest.mark.parametrize("layout", ["fp8-row", "fp8-tensor", "fp8-directory"])
def test_fp8_files_load_as_fp8_layers_and_draw_close_to_bf16(layouts, layout, requests_, reference) -> None:
    engine = Engine.load(layouts[layout], device="cpu")
    assert engine.quantize == "fp8"
    fp8 = [m for m in engine.model.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == 4 * len(engine.model.layers)  # fused qkv and gate_up, o and down
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    assert not isinstance(engine.model.model.final_layer2.linear, Fp8Linear)
    for mode, req in requests_.items():
        image = pixels(engine.generate(req).images[0])
        assert not np.array_equal(image, reference[mode]) and psnr(image, reference[mode]) > 40, mode


def test_fp8_weights_are_copied_bit_for_bit_and_scales_kept(layouts, tmp_path: Path) -> None:
    again = convert(layouts["fp8-row"], tmp_path / "again.safetensors", dtype="fp8")
    a, b = load_file(str(layouts["fp8-row"])), load_file(str(again))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    # per-tensor scales become per-row scales exactly: same dequantized weights
    rows = convert(layouts["fp8-tensor"], tmp_path / "rows.safetensors", dtype="fp8")
    t, r = load_file(str(layouts["fp8-tensor"])), load_file(str(rows))
    w = LAYER + "mlp.gate_proj."
    assert torch.equal(t[w + "weight"].view(torch.uint8), r[w + "weight"].view(torch.uint8))
    assert torch.equal(r[w + "weight_scale"], t[w + "weight_scale"].expand(r[w + "weight"].shape[0]))


def test_fp8_back_to_bf16_is_the_dequantized_weights(layouts, tmp_path: Path) -> None:
    back = convert(layouts["fp8-row"], tmp_path / "bf16.safetensors")
    stored, restored = load_file(str(layouts["fp8-row"])), load_file(str(back))
    w = LAYER + "mlp.down_proj."
    expected = (stored[w + "weight"].float() * stored[w + "weight_scale"][:, None]).to(torch.bfloat16)
    assert torch.equal(restored[w + "weight"], expected)
    assert w + "weight_scale" not in restored


def test_loaded_fp8_layer_holds_the_stored_weight_and_scale(layouts) -> None:
    model = load_model(layouts["fp8-row"], CPU, torch.float32)
    stored = load_file(str(layouts["fp8-row"]))
    layer = model.layers[0].mlp.down_proj
    assert isinstance(layer, Fp8Linear)
    assert torch.equal(layer.weight.view(torch.uint8), stored[LAYER + "mlp.down_proj.weight"].view(torch.uint8))
    assert torch.equal(layer.weight_scale, stored[LAYER + "mlp.down_proj.weight_scale"])


def test_variant_is_recorded_and_overridable(demo_checkpoint: Path, tmp_path: Path) -> None:
    dev = convert(demo_checkpoint, tmp_path / "plain-name.safetensors", variant="dev")
    assert open_checkpoint(dev).variant == "dev"
    assert open_checkpoint(dev, variant="full").variant == "full"


def test_bad_arguments_are_refused_before_writing(demo_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="bf16 or fp8"):
        convert(demo_checkpoint, tmp_path / "x.safetensors", dtype="int4")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    with pytest.raises(InvalidRequestError) as info:
        convert(demo_checkpoint, taken)
    assert info.value.field == "dst" and "--force" in info.value.rule and taken.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]


def test_cli_convert(demo_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.safetensors"
    assert cli.main(["convert", str(demo_checkpoint), str(out), "--dtype", "fp8", "--drop", "lm_head"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", str(demo_checkpoint), str(tmp_path / "y.safetensors"), "--drop", "vae"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--drop" in err and "'vae'" in err and "lm_head" in err and not (tmp_path / "y.safetensors").exists()
    assert cli.main(["convert", str(tmp_path / "nothing"), str(tmp_path / "z")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_quantize_at_load_equals_the_fp8_file_and_quantize_model(demo_checkpoint, layouts, requests_) -> None:
    from hidream.engine.fp8 import quantize_model

    at_load = Engine.load(demo_checkpoint, device="cpu", quantize="fp8")
    from_file = Engine.load(layouts["fp8-row"], device="cpu")
    model = load_model(demo_checkpoint, CPU, torch.float32)
    assert quantize_model(model) == 7 * len(model.layers)  # q, k, v, o, gate, up, down (fused later)
    after = Engine(model, from_file.encoder, "full", demo_checkpoint)
    assert at_load.quantize == "fp8"
    for a, b in zip(at_load.model.state_dict().values(), from_file.model.state_dict().values(), strict=True):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    req = requests_["t2i"]
    image = pixels(at_load.generate(req).images[0])
    assert np.array_equal(image, pixels(from_file.generate(req).images[0]))
    assert np.array_equal(image, pixels(after.generate(req).images[0]))
