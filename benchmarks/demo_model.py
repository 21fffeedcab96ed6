"""The demo model's prompt following, and the yardstick of every lossy speed-up.

    .venv/bin/python benchmarks/demo_model.py                                # 100 held-out prompts per mode
    .venv/bin/python benchmarks/demo_model.py --compare steps=20 --compare quantize=fp8
    .venv/bin/python benchmarks/demo_model.py --count 20 --compare seam_smoothing=0.8:1:2

Draws a fixed, seeded set of held-out prompts per mode (`hidream.demo_eval.held_out_set`: combinations of
shape, colour and background never seen in training) through `Engine.generate` at the recipe's default steps
and guidance (the exact path), reads each image back with the world's evaluator, and prints the accuracy
table with the targets of issue 14. Each `--compare KEY=VALUE[,KEY=VALUE]` draws the same set again with the
change (a GenerationRequest field such as steps, guidance, scheduler; or an Engine.load option: quantize,
precision, offload, compile) and reports its accuracy and its PSNR against the exact path's images, so a
speed-up that breaks prompt following shows up. s/image is the mean wall time per image; grid is the mean
`hidream.engine.seams.grid_ratio` of the images (about 1: no patch grid; above it, 32-pixel seams), reused
the mean number of steps per image that step caching (`cache=fast`) skipped the decoder on, and
`seam_smoothing=START:END:PASSES` a request's patch seam smoothing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from hidream import demo_eval

ENGINE_KEYS = ("quantize", "precision", "offload", "compile")
COLUMNS = (("t2i", "background"), ("t2i", "colour"), ("t2i", "shape"), ("t2i", "position"), ("t2i", "all"),
           ("edit", "changed"), ("edit", "kept"), ("edit", "all"),
           ("personalize", "colours"), ("personalize", "shapes"), ("personalize", "all"))


def parse_change(raw: str) -> dict[str, object]:
    """'steps=20,guidance=3' -> {'steps': 20, 'guidance': 3.0}; numbers as numbers, true/false as booleans."""
    change: dict[str, object] = {}
    for part in raw.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"must be KEY=VALUE[,KEY=VALUE] (got {raw!r})")
        change[key.strip()] = _value(value.strip())
    return change


def _value(text: str) -> object:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def request_fields(change: dict[str, object]) -> dict[str, object]:
    """The GenerationRequest fields of a change: seam_smoothing's START:END:PASSES made a SeamSmoothing."""
    from hidream.engine.seams import SeamSmoothing

    out = {k: v for k, v in change.items() if k not in ENGINE_KEYS}
    if "seam_smoothing" in out:
        start, end, passes = str(out["seam_smoothing"]).split(":")
        out["seam_smoothing"] = SeamSmoothing(float(start), float(end), int(passes))
    return out


def grid(images) -> float:
    from hidream.engine.seams import grid_ratio

    return sum(grid_ratio(i) for i in images) / len(images)


def load(model: Path, device: str, options: dict[str, object]):
    from hidream.engine.pipeline import Engine

    return Engine.load(model, device=device, **options)


def run(engine, samples, size: int, request: dict[str, object]) -> tuple[list, float, float]:
    """The images, the mean seconds per image, and the mean steps per image step caching reused."""
    reused = []
    generate = engine.generate

    def counting(req, *args, **kwargs):
        result = generate(req, *args, **kwargs)
        reused.extend(len(steps) for steps in result.cached_steps)
        return result

    engine.generate = counting  # this instance only
    try:
        began = time.perf_counter()
        images = demo_eval.generate(engine, samples, size, **request)
        seconds = (time.perf_counter() - began) / len(samples)
    finally:
        del engine.generate
    return images, seconds, sum(reused) / len(samples)


def main(argv: list[str] | None = None) -> int:
    from hidream.data import demo_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a demo model directory (default: the shipped one)")
    parser.add_argument("--count", type=int, default=100, help="held-out prompts per mode (default 100)")
    parser.add_argument("--seed", type=int, default=demo_eval.EVAL_SEED, help="the held-out set's seed")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default=None, help="the exact path's precision (default: the device's)")
    parser.add_argument("--compare", type=parse_change, action="append", default=[],
                        help="a change to measure against the exact path, e.g. steps=20 or quantize=fp8")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or demo_model()
    base_options = {"precision": args.precision} if args.precision else {}
    samples = demo_eval.held_out_set(args.count, args.seed)
    engine = load(model, args.device, base_options)
    exact, seconds, _ = run(engine, samples, args.size, {})
    rows = [{"run": "exact (recipe defaults)", "accuracy": demo_eval.accuracy(samples, exact), "psnr_db": math.inf,
             "s_per_image": seconds, "grid": grid(exact), "reused_steps": 0.0,
             "scores": [demo_eval.score(s, i) for s, i in zip(samples, exact)]}]
    for change in args.compare:
        options = {k: v for k, v in change.items() if k in ENGINE_KEYS}
        request = request_fields(change)
        other = load(model, args.device, {**base_options, **options}) if options else engine
        images, seconds, reused = run(other, samples, args.size, request)
        rows.append({"run": ",".join(f"{k}={v}" for k, v in change.items()),
                     "accuracy": demo_eval.accuracy(samples, images), "psnr_db": demo_eval.psnr(exact, images),
                     "s_per_image": seconds, "grid": grid(images), "reused_steps": reused,
                     "scores": [demo_eval.score(s, i) for s, i in zip(samples, images)]})
    print(f"# {model.name}: {args.count} held-out prompts per mode, {args.size}x{args.size}, seeds 0..; "
          f"{engine.device}, torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    print()
    header = " | ".join(f"{demo_eval.MODE_NAMES[m]} {f}" for m, f in COLUMNS)
    print(f"| run | {header} | PSNR vs exact dB | grid | reused | s/image |")
    print("|---" * (len(COLUMNS) + 5) + "|")
    for row in rows:
        acc = row["accuracy"]
        cells = [f"{acc[m][f]:.0f}%" for m, f in COLUMNS]
        psnr = "exact" if math.isinf(row["psnr_db"]) else f"{row['psnr_db']:.1f}"
        print(f"| {row['run']} | " + " | ".join(cells) + f" | {psnr} | {row['grid']:.2f} | {row['reused_steps']:.1f} | {row['s_per_image']:.2f} |")
    print()
    print("Targets (exact path): " + "; ".join(
        f"{demo_eval.MODE_NAMES[m]} {f} {v:.0f}% (>= {t}%: {'met' if v >= t else 'NOT met'})"
        for m, f, v, t in demo_eval.headline(rows[0]["accuracy"])))
    if args.json:
        # each row's per-sample scores too (samples in held_out_set's order: mode by mode, seeds 0.. per mode)
        args.json.write_text(json.dumps({"model": str(model), "count": args.count, "size": args.size,
                                         "prompts": [s.prompt for s in samples],
                                         "rows": [{**r, "psnr_db": None if math.isinf(r["psnr_db"]) else r["psnr_db"]}
                                                  for r in rows]}, indent=2) + "\n")
    met = all(v >= t for _, _, v, t in demo_eval.headline(rows[0]["accuracy"]))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
