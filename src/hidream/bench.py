"""`hidream bench`: seconds per step and per image, peak memory, and the engine's step against a plain one.

The engine's step reuses the text keys/values and batches both guidance branches in one forward.
The plain step recomputes the whole sequence, one guidance branch after the other, as a
straightforward port would. Both run the same request and seed, and the images are compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hidream.demo_eval import psnr
from hidream.sizes import resolve_size

PROMPT = ("medium shot, eye-level, front view. A woman is seated in an ornate bedroom, illuminated by candlelight, "
          "with a calm and composed expression. She wears a cream-colored satin robe with delicate floral "
          "embroidery. To her left, a wooden nightstand holds three lit white candles.")


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # resets the process's peak RSS (VmHWM) on Linux
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def random_engine(config: str, device: torch.device, dtype: torch.dtype, workdir: Path, *,
                  precision: str | None = None, compile: bool = False):
    """An Engine over random weights of a named configuration (no checkpoint on disk).

    precision bf16-fp32acc overrides `dtype`: float32 weights, bf16 GEMM weights (as Engine.load does it).
    """
    from transformers import Qwen3VLConfig

    from hidream.engine.checkpoint import _materialize_buffers, gemm_weights
    from hidream.engine.config import spec_from_config
    from hidream.engine.checkpoint import load_processors
    from hidream.engine.demo import demo_config, full_config
    from hidream.engine.demo_assets import write_demo_processor_config, write_demo_tokenizer
    from hidream.engine.model import HiDreamO1
    from hidream.engine.pipeline import Engine
    from hidream.engine.sequence import PromptEncoder

    ids = write_demo_tokenizer(workdir)
    write_demo_processor_config(workdir, patch_size=16, merge_size=2, temporal_patch_size=2)
    raw = full_config(ids) if config == "full" else demo_config(ids, -(-(max(ids.values()) + 1) // 64) * 64)
    spec = spec_from_config(Qwen3VLConfig.from_dict(raw))
    with torch.device("meta"):
        model = HiDreamO1(spec)
    fp32acc = precision == "bf16-fp32acc"
    if fp32acc:
        dtype = torch.float32
    model = model.to(dtype)  # cast on meta first: no fp32 copy on the device
    gemms = gemm_weights(model) if fp32acc else set()
    for name, p in model.named_parameters():
        if name in gemms:
            p.data = p.data.to(torch.bfloat16)
    model = model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    _materialize_buffers(model, device)
    if fp32acc:
        model.vision_autocast = torch.bfloat16
    tokenizer, processor = load_processors(workdir)
    encoder = PromptEncoder(tokenizer, processor, spec.image_token_id)
    options = {k: v for k, v in (("precision", precision), ("compile", compile)) if v}
    return Engine(model.eval().requires_grad_(False), encoder, "full", workdir, **options)


def _references(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (480 + 32 * i, 640, 3), dtype=np.uint8)) for i in range(count)]


def _run(engine, request, mode: str, batch: bool) -> dict:
    _peak_reset(engine.device)
    result = engine.generate(request, mode=mode, batch_guidance=batch, timings=True)
    steps = result.step_seconds
    # The first step includes warm-up work of the kernels; the median is the steady state.
    out = {
        "image": result.images[0],
        "seconds_per_image": result.seconds,
        "seconds_per_step": float(np.median(steps)),
        "peak_memory_gib": _peak_bytes(engine.device) / 2**30,
    }
    if result.cached_steps:  # step caching: how many steps reused, and what a reused and a full step take
        reused = set(result.cached_steps[0])
        out["cached_steps"] = len(reused)
        out["seconds_per_reused_step"] = float(np.median([s for i, s in enumerate(steps) if i in reused])) \
            if reused else None
        out["seconds_per_full_step"] = float(np.median([s for i, s in enumerate(steps) if i not in reused]))
    return out


def run_bench(args: argparse.Namespace) -> int:
    from hidream.cli import engine_options, resolve_model
    from hidream.engine.pipeline import Engine, GenerationRequest, default_dtype, resolve_device

    device = resolve_device(args.device)
    options = engine_options(args)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(options.get("precision"), default_dtype(device))
    width, height = resolve_size(args.size, "--size")
    with tempfile.TemporaryDirectory() as tmp:
        if args.config:
            engine = random_engine(args.config, device, dtype, Path(tmp), **options)
            source = f"random weights, {args.config} configuration"
        else:
            checkpoint, _ = resolve_model(args.model)
            engine = Engine.load(checkpoint, device=device, variant=args.variant, **options)
            source = str(checkpoint)
        refs = _references(args.refs)

        def request(steps: int) -> GenerationRequest:
            return GenerationRequest(PROMPT, width=width, height=height, references=refs,
                                     steps=steps, guidance=args.guidance, seed=42)

        engine.generate(request(1))  # warm-up: kernels, allocator, caches
        engine.generate(request(1), mode="full", batch_guidance=False)
        fast = _run(engine, request(args.steps), "cached", True)
        cached = _run(engine, replace(request(args.steps), cache=args.cache), "cached", True) \
            if args.cache != "off" else None
        plain_steps = args.plain_steps or args.steps
        plain = _run(engine, request(plain_steps), "full", False)

    report = {
        "source": source,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(engine.dtype).replace("torch.", ""),
        "precision": getattr(engine, "precision", None),
        "compiled": bool(options.get("compile")),
        "size": f"{width}x{height}",
        "references": args.refs,
        "steps": args.steps,
        "guidance": args.guidance,
        "engine": {k: v for k, v in fast.items() if k != "image"},
        "plain": {k: v for k, v in plain.items() if k != "image"} | {"steps": plain_steps},
        "speedup_per_step": plain["seconds_per_step"] / fast["seconds_per_step"],
    }
    if cached is not None:
        report["cache"] = {k: v for k, v in cached.items() if k != "image"} | {"mode": args.cache}
        report["cache"]["psnr_db_vs_engine"] = psnr([fast["image"]], [cached["image"]])
    if plain_steps == args.steps:
        a = np.asarray(fast["image"], dtype=np.int16)
        b = np.asarray(plain["image"], dtype=np.int16)
        report["images_max_abs_diff"] = int(np.abs(a - b).max())
        report["images_mean_abs_diff"] = float(np.abs(a - b).mean())
    print(f"{source} on {report['device']} ({report['dtype']}), {report['size']}, {args.steps} steps, "
          f"guidance {args.guidance:g}, {args.refs} reference(s)")
    print("| path | s/step | s/image | peak memory GiB |")
    print("|---|---|---|---|")
    for name, r in (("engine (cached text, batched guidance)", fast), ("plain (full recompute, 2 forwards)", plain)):
        print(f"| {name} | {r['seconds_per_step']:.4f} | {r['seconds_per_image']:.2f} | {r['peak_memory_gib']:.2f} |")
    print(f"speed-up per step: {report['speedup_per_step']:.2f}x")
    if cached is not None:
        c = report["cache"]
        reused = f"{c['seconds_per_reused_step']:.4f}" if c["seconds_per_reused_step"] is not None else "none"
        print(f"--cache {args.cache}: {c['cached_steps']} of {args.steps} steps reused, {c['seconds_per_image']:.2f} "
              f"s/image ({fast['seconds_per_image'] / c['seconds_per_image']:.2f}x), s per reused step {reused}, per "
              f"full step {c['seconds_per_full_step']:.4f}; {c['psnr_db_vs_engine']:.1f} dB against the exact image "
              f"(random weights: the reuse count says little of real ones)")
    if "images_max_abs_diff" in report:
        print(f"same image: max |diff| {report['images_max_abs_diff']} of 255, "
              f"mean {report['images_mean_abs_diff']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
