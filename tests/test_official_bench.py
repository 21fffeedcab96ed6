"""benchmarks/official.py's own helpers. The official side needs a checkout of the official code and its
environment, so it is not run here (docs/benchmarks.md has the command and its figures)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("official_bench", ROOT / "benchmarks" / "official.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_scaled_checkpoint_has_the_official_layout_and_loads(bench, tmp_path: Path) -> None:
    from hidream.engine.pipeline import Engine, GenerationRequest

    ckpt = bench.write_scaled_checkpoint(tmp_path / "scaled")
    text = json.loads((ckpt / "config.json").read_text())["text_config"]
    assert {k: text[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "head_dim")} == {
        "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 64}
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.get_tensor("model.language_model.norm.weight").float().eq(1).all()
        assert f.get_tensor("model.language_model.layers.7.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert stored["model.language_model.layers.7.self_attn.q_proj.weight"] == (512, 512)
    assert stored["model.language_model.layers.7.self_attn.k_proj.weight"] == (256, 512)
    assert stored["model.language_model.layers.0.mlp.gate_proj.weight"] == (1536, 512)
    assert stored["model.x_embedder.proj1.weight"] == (128, 3072)
    assert "model.language_model.layers.8.input_layernorm.weight" not in stored
    # Engine.load checks every tensor's name and shape against the model it builds.
    engine = Engine.load(ckpt, device="cpu")
    image = engine.generate(GenerationRequest("a red square", width=64, height=64, steps=1, guidance=2.0)).images[0]
    assert image.size == (64, 64)


def test_scaled_checkpoint_is_the_same_every_time(bench, tmp_path: Path) -> None:
    small = dict(bench.SCALED_TEXT, hidden_size=64, num_hidden_layers=1, intermediate_size=128)
    a = bench.write_scaled_checkpoint(tmp_path / "a", text=small)
    b = bench.write_scaled_checkpoint(tmp_path / "b", text=small)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_text() == (b / "config.json").read_text()


def test_references_cover_every_case(bench, tmp_path: Path) -> None:
    paths = bench.write_references(tmp_path)
    for case in bench.CASES.values():
        for size in case["refs"]:
            assert Image.open(paths[size]).size == size
    assert len(bench.CASES["refs3"]["refs"]) == 3 and bench.CASES["edit_keep"]["keep_original_aspect"]


def test_sdpa_keeps_the_flash_contract(bench) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 4, 8, generator=gen)  # [B, S, H, D]
    k, v = torch.randn(1, 6, 2, 8, generator=gen), torch.randn(1, 6, 2, 8, generator=gen)
    out = bench._sdpa_as_flash(q, k, v, softmax_scale=0.5, causal=True)
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)  # query head h reads kv head h // 2
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) * 0.5
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vv)
    assert out.shape == q.shape
    torch.testing.assert_close(out, expected)


def test_dtype_torch_maps_only_bf16(bench) -> None:
    fp32 = bench._DtypeTorch(torch, torch.float32)
    assert fp32.bfloat16 is torch.float32 and fp32.float16 is torch.float16 and fp32.randn is torch.randn
    with fp32.autocast("cpu", dtype=fp32.bfloat16, cache_enabled=False):
        assert not torch.is_autocast_enabled("cpu")
    assert bench._DtypeTorch(torch, torch.bfloat16).autocast is torch.autocast


def test_image_diff_and_table(bench, tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(a)
    pixels[0, 0, 0] = 3
    Image.fromarray(pixels).save(b)
    diff = bench.image_diff(a, b)
    assert diff["max_abs_diff"] == 3 and diff["mean_abs_diff"] == pytest.approx(3 / 48)
    side = {"cpu_s": 2.0, "user_s": 1.5, "wall_s": 2.0, "peak_bytes": 2**30, "rss_before_bytes": 2**29}
    bench.print_table([{"checkpoint": "demo", "label": "text-to-image", "steps": 3, "size": "2048x2048", "official": side,
                        "ours": side | {"cpu_s": 1.0, "user_s": 0.5}, "ratio_cpu": 2.0, "ratio_wall": 1.0, "ratio_peak": 1.0,
                        **diff}])
    assert ("| demo | text-to-image, 3 steps | 2048x2048 | 2.00 (2.00) | 1.00 (2.00) | 2.00x | 3.00x | 1.00x | 1.00 (+0.50) | "
            "1.00 (+0.50) | 1.00x | 3 / 0.0625 |") in capsys.readouterr().out


def test_full_checkpoint_writer_shards_and_loads(bench, tmp_path: Path) -> None:
    """The full checkpoint's writer, on a tiny text/vision override of the published config: shards with an
    index, the published vocabulary, and a checkpoint that Engine.load (which checks every name and shape) takes."""
    from hidream.engine.demo import FULL_VOCAB
    from hidream.engine.pipeline import Engine, GenerationRequest

    text = dict(bench.SCALED_TEXT, hidden_size=64, num_hidden_layers=2, intermediate_size=192, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rope_scaling={"mrope_interleaved": True, "mrope_section": [4, 2, 2],
                                                                  "rope_type": "default"})
    vision = {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "deepstack_visual_indexes": [0]}
    ckpt = bench.write_full_checkpoint(tmp_path / "full", shard_bytes=8 << 20, _text=text, _vision=vision)
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["text_config"]["vocab_size"] == FULL_VOCAB and raw["vision_config"]["out_hidden_size"] == 64
    assert "rope_theta" not in raw["text_config"]["rope_scaling"]  # as written, not as transformers rewrote it
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (ckpt / "model.safetensors").exists()
    for file in files:
        with safe_open(str(ckpt / file), "pt") as f:
            assert {index["weight_map"][k] for k in f.keys()} == {file}
    engine = Engine.load(ckpt, device="cpu")
    image = engine.generate(GenerationRequest("a red square", width=64, height=64, steps=1, guidance=2.0)).images[0]
    assert image.size == (64, 64)


def test_gpu_mode_options(bench) -> None:
    args = bench.parse_args(["--device", "cuda", "--checkpoints", "full", "--size", "2048x1024", "--steps", "50",
                             "--guidance", "5"])
    assert (args.device, args.dtype, args.checkpoints, args.size, args.steps, args.guidance) == (
        "cuda", "bfloat16", ["full"], (2048, 1024), 50, 5.0)
    assert bench.run_cases(args) == {"t2i": dict(bench.CASES["t2i"], width=2048, height=1024)}
    cpu = bench.parse_args([])
    assert (cpu.device, cpu.dtype, cpu.size, cpu.guidance) == ("cpu", "float32", None, bench.GUIDANCE)
    assert list(bench.run_cases(cpu)) == list(bench.CASES)
    assert bench.parse_args(["--device", "cuda", "--dtype", "float32"]).dtype == "float32"
    for bad in ("2048", "2048x100", "axb"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--size", bad])
    request = bench.case_request("t2i", 50, {}, 5.0, bench.run_cases(args))
    assert (request["width"], request["height"], request["guidance"], request["steps"]) == (2048, 1024, 5.0, 50)


def test_official_import_failure_is_one_line(bench, tmp_path: Path, capsys) -> None:
    """An official checkout that does not import: a one-line message and exit code 1, before any checkpoint."""
    src = tmp_path / "src"
    (src / "models").mkdir(parents=True)
    (src / "models" / "pipeline.py").write_text("")
    (src / "inference.py").write_text("raise ImportError('needs transformers 4.57')\n")
    report = tmp_path / "report.json"
    code = bench.main(["--official-src", str(src), "--workdir", str(tmp_path / "work"), "--json", str(report)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "ImportError: needs transformers 4.57" in err
    assert json.loads(report.read_text())["error"] == err
    assert not (tmp_path / "work").exists()
