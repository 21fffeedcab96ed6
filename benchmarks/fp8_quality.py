"""fp8 weights against bf16: how far the image moves, and seconds per step, on one seed and size.

    .venv/bin/python benchmarks/fp8_quality.py                      # the demo checkpoint on the CPU
    python benchmarks/fp8_quality.py --device cuda --checkpoints full --size 1024x1024 --steps 8  # gpu.sh

`demo` is the demo checkpoint (written to a temporary directory, loaded in bf16); `full` the published 8B
shape with random bf16 weights made on the device (hidream.bench.random_engine). The bf16 engine draws the
reference; its decoder linears are then quantized in place (hidream.engine.fp8.quantize_model: fp8 e4m3,
a scale per output row) and the same request is drawn by the upcast path (each weight dequantized to bf16
just before its GEMM) and by the scaled-matmul path (torch._scaled_mm on fp8 inputs quantized per row)
where it runs: CUDA at compute capability 8.9+, and the CPU's reference kernel. On the CPU the demo also
gets an fp32 row, bf16's own distance from fp32, as a yardstick. Differences are of the uint8 images;
s/step is the median of per-step wall times after a 1-step warm-up, the lowest of --repeats runs. On
the CPU the upcast path is not meant to be faster (it adds an upcast to every GEMM): fp8 is for the
GPU's memory and its fp8 tensor cores.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from hidream.bench import PROMPT, random_engine
from hidream.engine import fp8
from hidream.engine.errors import InvalidRequestError
from hidream.engine.pipeline import Engine, GenerationRequest
from hidream.sizes import resolve_size

SEED = 42


def decoder_linear_bytes(engine: Engine) -> int:
    """Bytes of the decoder layers' linear weights (and fp8 scales)."""
    return sum(t.numel() * t.element_size() for _, _, layer in fp8.decoder_linears(engine.model)
               for t in (*layer.parameters(), *layer.buffers()))


def draw(engine: Engine, args: argparse.Namespace, scaled_mm: bool | None) -> dict:
    """One image and its median seconds per step, with fp8.SCALED_MM set to `scaled_mm` meanwhile."""
    fp8.SCALED_MM = scaled_mm
    try:
        def request(steps: int) -> GenerationRequest:
            return GenerationRequest(PROMPT, width=args.width, height=args.height, steps=steps,
                                     guidance=args.guidance, seed=SEED)

        engine.generate(request(1))  # warm-up: kernels, allocator
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        runs = [engine.generate(request(args.steps), timings=True) for _ in range(args.repeats)]
    finally:
        fp8.SCALED_MM = None
    peak = torch.cuda.max_memory_allocated(engine.device) if engine.device.type == "cuda" else None
    result = min(runs, key=lambda r: float(np.median(r.step_seconds)))  # the least disturbed run
    return {"image": np.asarray(result.images[0], dtype=np.int16), "s_per_step": float(np.median(result.step_seconds)),
            "decoder_linear_mib": decoder_linear_bytes(engine) / 2**20,
            "peak_gib": None if peak is None else peak / 2**30}


def compare(image: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(image - reference)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return {"max_abs_diff": int(diff.max()), "mean_abs_diff": float(diff.mean()),
            "psnr_db": math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)}


def scaled_mm_runs(device: torch.device) -> bool:
    if device.type == "cuda":
        return fp8.scaled_mm_supported(device)
    a = torch.zeros(16, 16, dtype=fp8.FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def run_checkpoint(kind: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    device = torch.device(args.device)
    rows: list[dict] = []
    if kind == "demo":
        from hidream.engine.demo import write_demo_checkpoint

        checkpoint = write_demo_checkpoint(workdir / "demo", seed=0)
        if device.type == "cpu":
            exact = draw(Engine.load(checkpoint, device=device, precision="fp32"), args, None)
            rows.append({"weights": "fp32 (yardstick)", **exact})
        engine = Engine.load(checkpoint, device=device, precision="bf16")
    else:
        (workdir / "full").mkdir()
        engine = random_engine("full", device, torch.bfloat16, workdir / "full")
    reference = draw(engine, args, None)
    rows.append({"weights": "bf16 (reference)", **reference})
    count = fp8.quantize_model(engine.model)  # in place, on the fused projections
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows.append({"weights": f"fp8 upcast ({count} linears)", **draw(engine, args, False)})
    if scaled_mm_runs(device):
        rows.append({"weights": "fp8 scaled_mm", **draw(engine, args, True)})
    else:
        print(f"{kind}: no fp8 scaled matmul on {device} (CUDA 8.9+ needed, or {fp8.MATMUL_ENV}=0)", file=sys.stderr)
    for row in rows:
        row.update(compare(row.pop("image"), reference["image"]), checkpoint=kind)
    return rows


def print_table(rows: list[dict], args: argparse.Namespace, device_name: str) -> None:
    print(f"{device_name}, torch {torch.__version__}, {args.width}x{args.height}, {args.steps} steps, "
          f"guidance {args.guidance:g}, seed {SEED}, best of {args.repeats}; differences against the bf16 image (uint8)")
    print("| checkpoint | weights | max abs diff | mean abs diff | PSNR dB | s/step | decoder linears MiB | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        psnr = "identical" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.1f}"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"| {r['checkpoint']} | {r['weights']} | {r['max_abs_diff']} | {r['mean_abs_diff']:.3f} | {psnr} | "
              f"{r['s_per_step']:.4f} | {r['decoder_linear_mib']:.2f} | {peak} |")


def parse_size(text: str) -> tuple[int, int]:
    """--size as the service reads sizes (WxH, rounded to multiples of 32, within the size rule)."""
    try:
        return resolve_size(text, "--size")
    except InvalidRequestError as err:
        raise argparse.ArgumentTypeError(err.rule) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--checkpoints", nargs="+", choices=("demo", "full"), default=["demo"],
                   help="demo: the demo checkpoint; full: the 8B shape, random bf16 weights (needs a GPU)")
    p.add_argument("--size", type=parse_size, default=(1024, 1024), metavar="WxH", help="default 1024x1024")
    p.add_argument("--steps", type=int, default=8, help="default 8")
    p.add_argument("--guidance", type=float, default=5.0, help="default 5 (two branches per step)")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the lowest median s/step counts (default 3)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    args.width, args.height = args.size
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: this torch sees no CUDA device")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.checkpoints:
            rows += run_checkpoint(kind, args, Path(tmp))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print_table(rows, args, device_name)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "size": f"{args.width}x{args.height}",
                                               "steps": args.steps, "guidance": args.guidance, "seed": SEED,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
