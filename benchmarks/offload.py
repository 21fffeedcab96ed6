"""Layer offload (`--offload layers`) against none: seconds per step and peak device memory.

    benchmarks/offload.py                    # CUDA: full-size random weights, 1024² and 2048² (gpu.sh)
    benchmarks/offload.py --device cpu       # the demo checkpoint: equal latents, resident-layer counts

On CUDA the published 8B shape is built with random bf16 weights on the GPU (hidream.bench.random_engine)
and drawn without offload; then its layers go to pinned host memory (hidream.engine.offload.enable_offload)
and the same requests are drawn again. Per case: the median seconds per step after a 1-step warm-up,
torch.cuda.max_memory_allocated over the request (reset before it), the most layers resident at once,
the decoder bytes streamed per step over its time (a floor on the host-to-device rate), and the largest
difference of the uint8 images against no offload. On the CPU (host == device, the same streaming code)
it checks that the latents are bitwise equal with fewer slots than layers, and prints the counts.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hidream.bench import PROMPT, _references, random_engine
from hidream.engine.offload import enable_offload
from hidream.engine.pipeline import Engine, GenerationRequest

SEED = 42


def draw(engine: Engine, req: GenerationRequest, repeats: int) -> dict:
    """One request after a 1-step warm-up, the least disturbed of `repeats` runs: median s/step, peak
    device bytes, the most layers resident at once, the image and the final latent."""
    latents: list[torch.Tensor] = []

    def keep(z: torch.Tensor, width: int, height: int) -> Image.Image:
        latents.append(z.float().cpu())
        return Engine.to_image(z, width, height)

    engine.generate(GenerationRequest(req.prompt, width=req.width, height=req.height, references=req.references,
                                      steps=1, guidance=req.guidance, seed=req.seed))
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
    offload = engine.model.offload
    if offload is not None:
        offload.reset_max_resident()
    engine.to_image = keep
    try:
        results = [engine.generate(req, timings=True) for _ in range(repeats)]
    finally:
        del engine.to_image
    best = min(range(repeats), key=lambda i: float(np.median(results[i].step_seconds)))
    assert all(torch.equal(z, latents[0]) for z in latents)  # the same request: the same latent every time
    return {
        "s_per_step": float(np.median(results[best].step_seconds)),
        "s_per_image": results[best].seconds,
        "peak_gib": torch.cuda.max_memory_allocated(engine.device) / 2**30 if cuda else None,
        "max_resident": offload.max_resident if offload is not None else len(engine.model.layers),
        "image": np.asarray(results[best].images[0], dtype=np.int16),
        "latent": latents[0],
    }


def cases(args: argparse.Namespace) -> list[tuple[str, GenerationRequest]]:
    out = []
    for size in args.sizes:
        w, h = (int(v) for v in size.split("x"))
        out.append((f"text-to-image {w}x{h}", GenerationRequest(PROMPT, width=w, height=h, steps=args.steps,
                                                                guidance=args.guidance, seed=SEED)))
    if args.edit:
        w, h = (int(v) for v in args.edit.split("x"))
        out.append((f"edit {w}x{h}, 1 reference", GenerationRequest(
            PROMPT, width=w, height=h, references=_references(1), steps=args.steps, guidance=args.guidance,
            seed=SEED)))
    return out


def run(engine: Engine, args: argparse.Namespace) -> list[dict]:
    """Every case without offload, then every case with the layers offloaded (same engine, same seeds);
    each row printed as it is measured."""
    todo = cases(args)
    rows = []
    plain = {}
    print(HEADER, flush=True)
    for name, req in todo:
        r = draw(engine, req, args.repeats)
        plain[name] = r
        rows.append({"case": name, "offload": "none"} | r)
        print(row(rows[-1]), flush=True)
    started = time.perf_counter()
    enable_offload(engine.model, engine.device, args.ahead)
    gc.collect()
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(engine.device)
    setup_s = time.perf_counter() - started
    resident_bytes = torch.cuda.memory_allocated(engine.device) if engine.device.type == "cuda" else None
    streamed = engine.model.offload.layer_bytes()
    print(f"(offload set up in {setup_s:.1f} s: the layers copied to {'pinned ' if engine.device.type == 'cuda' else ''}"
          f"host memory, {streamed / 1e6:.1f} MB streamed per pass"
          + (f"; device memory held after: {resident_bytes / 2**30:.2f} GiB)" if resident_bytes else ")"), flush=True)
    for name, req in todo:
        r = draw(engine, req, args.repeats)
        base = plain[name]
        r["image_max_diff"] = int(np.abs(r["image"] - base["image"]).max())
        r["latent_equal"] = bool(torch.equal(r["latent"], base["latent"]))
        if engine.device.type == "cuda":
            r["stream_gb_per_s"] = streamed / r["s_per_step"] / 1e9
        rows.append({"case": name, "offload": f"layers (ahead {args.ahead})"} | r)
        print(row(rows[-1]), flush=True)
    return rows


HEADER = ("| case | offload | s/step | s/image | peak GiB | layers resident (max) | streamed GB/s (floor) "
          "| image max diff | latent equal |\n|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
    rate = f"{r['stream_gb_per_s']:.1f}" if "stream_gb_per_s" in r else "-"
    diff = str(r.get("image_max_diff", "-"))
    equal = {True: "yes", False: "no"}.get(r.get("latent_equal"), "-")
    return (f"| {r['case']} | {r['offload']} | {r['s_per_step']:.4f} | {r['s_per_image']:.2f} | {peak} "
            f"| {r['max_resident']} | {rate} | {diff} | {equal} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=lambda s: s.split(","), default=None,
                        help="comma-separated WxH (default: 1024x1024,2048x2048 on CUDA, 64x64,256x256 on the CPU)")
    parser.add_argument("--edit", default=None, help="also an edit at WxH (default 1024x1024 on CUDA, 64x64 CPU)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--ahead", type=int, default=None, help="layers prefetched (default 2; 1 on the demo)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per case, the least disturbed kept "
                        "(default 1 on CUDA, 3 on the CPU)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.sizes = args.sizes or (["1024x1024", "2048x2048"] if cuda else ["64x64", "256x256"])
    args.edit = args.edit or ("1024x1024" if cuda else "64x64")
    args.ahead = (2 if cuda else 1) if args.ahead is None else args.ahead  # the demo has 3 layers
    args.repeats = args.repeats or (1 if cuda else 3)
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            engine = random_engine("full", device, torch.bfloat16, Path(tmp))
            source = f"random weights, full configuration, bf16, on {torch.cuda.get_device_name(device)}"
        else:
            from hidream.engine.demo import write_demo_checkpoint

            engine = Engine.load(write_demo_checkpoint(Path(tmp) / "demo", seed=0), device="cpu")
            source = "demo checkpoint, fp32, on the CPU"
        print(f"{source}; {len(engine.model.layers)} layers; {args.steps} steps, guidance {args.guidance:g}")
        rows = run(engine, args)
    if args.json:
        keep = [{k: v for k, v in r.items() if k not in ("image", "latent")} for r in rows]
        Path(args.json).write_text(json.dumps({"source": source, "rows": keep}, indent=2) + "\n")
    offloaded = [r for r in rows if r["offload"] != "none"]
    ok = all(r["max_resident"] <= args.ahead + 1 for r in offloaded)
    if not cuda:  # the CPU check: bitwise equal latents
        ok = ok and all(r["latent_equal"] for r in offloaded)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
