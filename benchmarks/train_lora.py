"""`hidream train lora`'s step: seconds per training step and peak memory, per image size.

    benchmarks/train_lora.py                                  # CPU, the demo checkpoint, 64² and 512²
    benchmarks/train_lora.py --edit                           # the same with an edit pair (one reference)
    benchmarks/train_lora.py --device cuda --config full --sizes 1024 2048      # the published 8B shape

Each case trains a fresh LoRA (rank 16 on the decoder's attention and MLP projections and the pixel head, as
tests/test_train.py does) on one synthetic picture for --steps steps through hidream.train.train_lora, and
reports the median seconds per step (the first step included in the count, not in the median's weight) and
the peak memory over the run: torch.cuda.max_memory_allocated on CUDA, the process's peak resident set
(VmHWM, reset first) on the CPU, with the resident set before training beside it (the model and the Python
process). --config full builds the published shape with random bf16 weights on the device
(hidream.bench.random_engine): no checkpoint is read.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from hidream.bench import _peak_bytes, _peak_reset, random_engine
from hidream.engine.pipeline import Engine, resolve_device
from hidream.train import train_lora

TARGETS = "attn,mlp,model.final_layer2.linear"


def picture(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (30, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 8, size // 8, size // 2, size // 2), fill=(240, 200, 20))
    draw.rectangle((size // 2, size // 2, size - size // 8, size - size // 8), fill=(220, 30, 40))
    return image


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def case(engine: Engine, workdir: Path, size: int, edit: bool, steps: int, checkpointing: bool | None) -> dict:
    data = workdir / f"data-{size}-{int(edit)}"
    data.mkdir(exist_ok=True)
    picture(size).save(data / "a.png")
    (data / "a.txt").write_text("a yellow circle and a red square on blue", encoding="utf-8")
    if edit:
        picture(size).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "a.ref.png")
    before = rss_bytes() if engine.device.type == "cpu" else torch.cuda.memory_allocated(engine.device)
    _peak_reset(engine.device)
    result = train_lora(engine, data, workdir / f"lora-{size}.safetensors", steps=steps, resolution=size,
                        targets=TARGETS, save_every=10**6, sample=False, progress=False,
                        gradient_checkpointing=checkpointing)
    return {"size": size, "edit": edit, "steps": steps, "gradient_checkpointing": checkpointing,
            "s_per_step": round(result.seconds_per_step, 4), "peak_gib": round(_peak_bytes(engine.device) / 2**30, 3),
            "before_gib": round(before / 2**30, 3), "trainable_parameters": result.trainable_parameters}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", choices=["demo", "full"], default="demo")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 512])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--edit", action="store_true", help="an edit pair (one reference) instead of text-to-image")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.config == "demo":
            from hidream.engine.demo import write_demo_checkpoint

            engine = Engine.load(write_demo_checkpoint(workdir / "demo"), device=device)
        else:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            engine = random_engine("full", device, dtype, workdir)
        for size in args.sizes:
            row = case(engine, workdir, size, args.edit, args.steps, args.gradient_checkpointing)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
