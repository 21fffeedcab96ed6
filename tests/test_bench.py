"""`hidream bench` runs both paths and checks they agree (no timing is asserted: figures live in docs)."""

import json
from pathlib import Path

from hidream.cli import main


def test_bench_reports_both_paths_and_the_same_image(tmp_path: Path, demo_checkpoint: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(demo_checkpoint), "--device", "cpu", "--size", "64x64",
                 "--steps", "2", "--refs", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    for path in ("engine", "plain"):
        assert report[path]["seconds_per_step"] > 0
        assert report[path]["seconds_per_image"] > 0
        assert report[path]["peak_memory_gib"] > 0
    assert report["plain"]["steps"] == 2 and report["references"] == 1
    assert report["images_max_abs_diff"] <= 1
    printed = capsys.readouterr().out
    assert "speed-up per step" in printed and "| engine (cached text, batched guidance) |" in printed


def test_bench_with_the_step_cache_reports_reused_and_full_steps(tmp_path: Path, demo_checkpoint: Path, capsys,
                                                                   monkeypatch) -> None:
    from hidream.engine import stepcache

    monkeypatch.setitem(stepcache.POLICIES, "fast", stepcache.CachePolicy(threshold=1e9, max_run=3))
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(demo_checkpoint), "--device", "cpu", "--size", "64x64", "--steps", "6",
                 "--plain-steps", "1", "--cache", "fast", "--json", str(out)]) == 0
    cache = json.loads(out.read_text())["cache"]
    assert cache["mode"] == "fast" and cache["cached_steps"] == 3  # 1-3; 4 after 3 in a row, 5 the last
    assert cache["seconds_per_reused_step"] > 0 and cache["seconds_per_full_step"] > 0
    assert 0 < cache["psnr_db_vs_engine"] < 100  # reused steps change the image, a little
    assert "--cache fast: 3 of 6 steps reused" in capsys.readouterr().out


def test_bench_random_weights_of_a_named_configuration(tmp_path: Path, capsys) -> None:
    assert main(["bench", "--config", "demo", "--device", "cpu", "--size", "64x64", "--steps", "1"]) == 0
    assert "random weights, demo configuration" in capsys.readouterr().out


def _dry_run(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "dry.json"
    assert main(["bench", "--dry-run", *flags, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _meta_params(config: str, tmp_path: Path) -> int:
    import torch

    from hidream.dry_run import named_spec
    from hidream.engine.model import HiDreamO1

    spec, _ = named_spec(config, tmp_path)
    with torch.device("meta"):
        return sum(p.numel() for p in HiDreamO1(spec).parameters())


def named_spec_of(config: str, tmp_path: Path):
    from hidream.dry_run import named_spec

    return named_spec(config, tmp_path)[0]


def test_dry_run_figures_add_up(tmp_path: Path, capsys) -> None:
    r = _dry_run(tmp_path, "--config", "demo", "--size", "128x128", "--tflops", "100")
    assert r["params"] == _meta_params("demo", tmp_path / "spec")
    assert r["steps"] == 50 and r["guidance"] == 5 and r["branches"] == 2  # the full recipe
    assert r["flops_per_step"] > 0 and r["prefill_flops"] > 0
    assert r["flops_per_image"] == 50 * r["flops_per_step"] + r["prefill_flops"]
    assert r["floor_seconds"] == r["flops_per_image"] / 100e12
    # The counter books no CPU SDPA kernel; the formula fills in, per layer and branch: 4 Sq Sk D H
    # with Sq the generation tokens and Sk the branch's text plus them (demo: 3 layers, 4 heads of 16).
    step, tokens = r["step"], r["tokens"]
    g = tokens["generation"]
    assert g == 1 + 16 and tokens["target"] == 16
    assert step["attention_analytic"] == sum(3 * 4 * g * (t + g) * 16 * 4 for t in tokens["text"])
    assert step["attention_added"] + step["attention_counted"] >= step["attention_analytic"] > 0
    assert r["flops_per_step"] == step["counted"] + step["attention_added"]
    mem = r["memory"]
    # bf16, and the ViT's rotary buffer; embed_tokens is in host memory (as Engine keeps it on CUDA)
    spec = named_spec_of("demo", tmp_path / "spec2")
    assert mem["host_weights_bytes"] == 2 * spec.text.vocab_size * spec.text.hidden_size
    assert 0 <= mem["weights_bytes"] + mem["host_weights_bytes"] - 2 * r["params"] < 1024
    assert mem["peak_bytes"] >= mem["peak_step_bytes"] > mem["resident_after_prefill_bytes"] > mem["weights_bytes"]
    printed = capsys.readouterr().out
    assert "estimate from fake tensors" in printed and "| flops per step |" in printed


def test_dry_run_scales_with_the_image(tmp_path: Path) -> None:
    small = _dry_run(tmp_path, "--config", "demo", "--size", "256x256", "--steps", "4")
    large = _dry_run(tmp_path, "--config", "demo", "--size", "512x512", "--steps", "4")
    assert large["tokens"]["target"] == 4 * small["tokens"]["target"]
    # GEMMs grow with the generation tokens (4x the target), attention with their square.
    assert 3.5 < large["step"]["counted"] / small["step"]["counted"] < 4.5
    assert large["step"]["attention_analytic"] / small["step"]["attention_analytic"] > 6
    assert large["flops_per_image"] == 4 * large["flops_per_step"] + large["prefill_flops"]


def test_dry_run_with_references_and_without_guidance(tmp_path: Path) -> None:
    r = _dry_run(tmp_path, "--config", "demo", "--size", "128x128", "--refs", "2", "--guidance", "1")
    assert r["branches"] == 1 and len(r["tokens"]["text"]) == 1
    assert r["tokens"]["generation"] > 1 + r["tokens"]["target"]  # reference patches follow the target
    assert r["prefill"]["counted"] > 0  # the ViT and the text prefill, once per request


def test_dry_run_of_the_full_configuration(tmp_path: Path) -> None:
    r = _dry_run(tmp_path, "--config", "full", "--size", "256x256", "--steps", "1")
    assert r["params"] == _meta_params("full", tmp_path / "spec")
    assert 8.0e9 < r["params"] < 8.4e9
    m = r["memory"]
    assert m["host_weights_bytes"] == 2 * 151936 * 4096  # embed_tokens, in host memory
    assert 0 <= m["weights_bytes"] + m["host_weights_bytes"] - 2 * r["params"] < 2**20
    # cache="fast": a reused step runs the first of 36 layers (plus the patch embedding and the head), and keeps
    # three float32 residuals of [2 branches, 1 + 64 tokens, 4096]: the probe's, and the rest's of two full steps
    c = r["cache"]
    assert 1 / 36 < c["flops_per_reused_step"] / r["flops_per_step"] < 1.5 / 36
    assert 0 <= c["residual_bytes"] - 3 * 2 * 65 * 4096 * 4 < 4096


def test_dry_run_estimates_fp8_and_offload(tmp_path: Path) -> None:
    base = _dry_run(tmp_path, "--config", "demo", "--size", "128x128", "--steps", "2")
    fp8 = _dry_run(tmp_path, "--config", "demo", "--size", "128x128", "--steps", "2", "--quantize", "fp8")
    off = _dry_run(tmp_path, "--config", "demo", "--size", "128x128", "--steps", "2", "--offload", "layers")
    spec = named_spec_of("demo", tmp_path / "spec")
    t = spec.text
    layer = 2 * (t.hidden_size * spec.head_dim * (t.num_attention_heads * 2 + t.num_key_value_heads * 2)
                 + 3 * t.hidden_size * t.intermediate_size)  # bf16 linear weights of one decoder layer
    # fp8: each layer's linear weights take one byte per value, plus a float32 scale per output row
    rows = spec.head_dim * (t.num_attention_heads + 2 * t.num_key_value_heads) + t.hidden_size \
        + 2 * t.intermediate_size + t.hidden_size
    saved = t.num_hidden_layers * (layer // 2 - 4 * rows)
    assert base["memory"]["weights_bytes"] - fp8["memory"]["weights_bytes"] == saved
    assert fp8["weights"] == "bfloat16, decoder linears fp8" and off["offload"] == "layers"
    # offload: layers and ViT on the host, the device holds 3 slots (ahead 2: all 3 demo layers, copies)
    import torch

    from hidream.engine.model import DecoderLayer

    with torch.device("meta"):
        one = sum(p.numel() for p in DecoderLayer(spec).parameters()) * 2
    m, b = off["memory"], base["memory"]
    assert m["host_weights_bytes"] - b["host_weights_bytes"] > t.num_hidden_layers * one  # + the ViT
    assert m["weights_bytes"] + m["host_weights_bytes"] - b["weights_bytes"] - b["host_weights_bytes"] == 3 * one


def test_dry_run_memory_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "table.json"
    assert main(["bench", "--dry-run", "--memory-table", "--config", "demo", "--size", "512x512",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["weights"], r["offload"]) for r in rows[::3]] == [("bf16", "none"), ("bf16", "layers"),
                                                                 ("fp8", "none"), ("fp8", "layers")]
    assert [r["references"] for r in rows[:3]] == [0, 1, 10]
    by = {(r["weights"], r["offload"], r["references"]): r for r in rows}
    for refs in (0, 1, 10):
        assert by[("fp8", "none", refs)]["weights_bytes"] < by[("bf16", "none", refs)]["weights_bytes"]
        assert by[("bf16", "layers", refs)]["host_bytes"] > by[("bf16", "none", refs)]["host_bytes"]
    printed = capsys.readouterr().out
    assert "| fp8 | layers | 10 references |" in printed


def test_memory_table_needs_the_dry_run(capsys) -> None:
    assert main(["bench", "--memory-table", "--config", "demo"]) == 2
    assert "--memory-table" in capsys.readouterr().err
