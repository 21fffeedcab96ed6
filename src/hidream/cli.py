"""The `hidream` command: generate | submit | serve | worker | keys | status | demo-model | bench."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from hidream.client import Client, ClientError
from hidream.engine.errors import HiDreamError, InvalidRequestError
from hidream.service.errors import ServiceError
from hidream.service.settings import default_home
from hidream.rules import DEFAULT_SIZE, DEMO_SIZE, GUIDANCE_RULE, IMAGES_RULE, MAX_SEED, RANDOM_SEED, STEPS_RULE
from hidream.sizes import SIZE_HELP, resolve_size

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


def demo_checkpoint() -> Path:
    """The demo checkpoint under HIDREAM_HOME, written on first use."""
    from hidream.engine.demo import write_demo_checkpoint

    path = default_home() / "demo-model"
    if not (path / "config.json").is_file():
        write_demo_checkpoint(path)
    return path


def resolve_model(arg: str | None) -> tuple[Path, bool]:
    """(checkpoint, is_demo): --model, else $HIDREAM_MODEL, else the demo checkpoint."""
    chosen = arg or os.environ.get("HIDREAM_MODEL")
    if chosen:
        return Path(chosen).expanduser(), False
    return demo_checkpoint(), True


def _dtype(name: str | None):
    import torch

    return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory in the official layout (default: $HIDREAM_MODEL, "
                                   "else the demo checkpoint, whose images are noise)")
    p.add_argument("--variant", choices=["full", "dev"], help="recipe (default: from the directory name; "
                                                              "'-Dev' means dev)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")


def output_paths(out: Path, count: int, fmt: str) -> list[Path]:
    """Where the images go: the extension follows the format (`-o a.png --format webp` -> a.webp)."""
    if FORMATS.get(out.suffix.lower().lstrip(".")) != FORMATS[fmt]:
        out = out.with_name(out.name + "." + fmt) if out.suffix.lower().lstrip(".") not in FORMATS \
            else out.with_suffix("." + fmt)
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]
    for path in paths:  # fail now, not after the generation
        if path.is_dir():
            raise InvalidRequestError("-o", f"{path} is a directory")
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise InvalidRequestError("-o", f"cannot write under {parent}")
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hidream.engine.images import load_image
    from hidream.engine.pipeline import Engine, GenerationRequest

    checkpoint, is_demo = resolve_model(args.model)
    width, height = resolve_size(args.size or (DEMO_SIZE if is_demo else DEFAULT_SIZE), "--size")
    fmt = args.format or FORMATS.get(Path(args.output).suffix.lower().lstrip("."), "PNG").lower()
    paths = output_paths(Path(args.output), args.num_images, fmt)
    if is_demo:
        print(f"note: no --model given, using the demo checkpoint at {checkpoint} (random weights: the image "
              "will be noise; pass --model /path/to/HiDream-O1-Image for real images)", file=sys.stderr)
    references = [load_image(path, "--ref") for path in args.ref or []]
    engine = Engine.load(checkpoint, device=args.device, dtype=_dtype(args.dtype), variant=args.variant)
    seed = args.seed if args.seed != RANDOM_SEED else secrets.randbelow(MAX_SEED + 1)
    request = GenerationRequest(
        prompt=args.prompt, width=width, height=height, references=references,
        keep_original_aspect=args.keep_original_aspect, steps=args.steps, guidance=args.guidance,
        shift=args.shift, seed=seed, num_images=args.num_images,
    )
    engine.validate(request)
    with tqdm(total=1, unit="step", desc="generating", disable=args.quiet) as bar:
        def progress(step: int, total: int, _preview) -> None:
            bar.total = total
            bar.update(step - bar.n)

        result = engine.generate(request, progress=progress)
    for image, path, seed in zip(result.images, paths, result.seeds, strict=True):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, format=FORMATS[fmt], **({"quality": 95} if fmt != "png" else {}))
        except OSError as err:
            raise InvalidRequestError("-o", f"cannot write {path} ({err.strerror or err})") from err
        print(f"{path}  ({result.width}x{result.height}, seed {seed}, {result.steps} steps, {result.seconds:.1f} s)")
    return 0


def submit_target(output: str, fmt: str | None, count: int) -> str | list[Path]:
    """`-o` of `hidream submit`: a directory as it is (the client names the files), a file as output_paths says."""
    path = Path(output).expanduser()
    if path.is_dir() or output.endswith(("/", os.sep)) or not path.suffix:
        return output
    return output_paths(path, count, fmt or "png")


def cancel_on_interrupt(client: Client, prediction_id: str) -> int:
    """Ctrl-C while waiting: cancel the prediction (no question asked) and say how it ended."""
    print(f"\ninterrupted: canceling prediction {prediction_id}", file=sys.stderr)
    try:
        pred = client.cancel(prediction_id)
    except ClientError as err:
        print(f"error: could not cancel prediction {prediction_id}: {err}", file=sys.stderr)
        return 130
    if pred.done:
        print(f"prediction {prediction_id} {'canceled' if pred.canceled else 'had already ' + pred.status}",
              file=sys.stderr)
    else:
        print(f"cancel requested: prediction {prediction_id} stops at its next step", file=sys.stderr)
    return 130


def cmd_submit(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("HIDREAM_API_KEY")
    if not api_key:
        raise InvalidRequestError("--api-key", "no API key: pass --api-key or set HIDREAM_API_KEY")
    base_url = args.base_url or os.environ.get("HIDREAM_BASE_URL") or "http://127.0.0.1:8000"
    fmt = args.format or FORMATS.get(Path(args.output).suffix.lower().lstrip("."), "").lower() or None
    target = submit_target(args.output, fmt, args.num_images or 1)
    with Client(base_url, api_key) as client:
        prediction = client.submit(
            args.prompt, references=args.ref or [], keep_original_aspect=args.keep_original_aspect,
            model=args.model, image_size=args.size, num_inference_steps=args.steps, guidance_scale=args.guidance,
            seed=args.seed, output_format=fmt or "png", num_images=args.num_images or 1,
            webhook_url=args.webhook_url, idempotency_key=args.idempotency_key,
        )
        if args.no_wait:
            print(prediction.id)
            return 0
        if not args.quiet:
            print(f"submitted prediction {prediction.id}", file=sys.stderr)
        try:
            prediction = client.wait(prediction, progress=not args.quiet)
        except KeyboardInterrupt:
            return cancel_on_interrupt(client, prediction.id)
        for path in client.download(prediction.raise_for_status(), target):
            print(path)
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from hidream.engine.demo import write_demo_checkpoint

    path = write_demo_checkpoint(args.directory, seed=args.seed, shards=args.shards)
    print(f"wrote a demo checkpoint (random weights, official layout) to {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from hidream.bench import run_bench

    return run_bench(args)


def add_service_args(p: argparse.ArgumentParser, worker_flag: bool) -> None:
    """One flag per service setting (`--max-queue` for HIDREAM_MAX_QUEUE, ...); a flag beats the variable."""
    from hidream.service.settings import ENV_NAMES, PARSERS

    for name, parse in PARSERS.items():
        if name == "worker":
            continue
        flag = "--" + ("model-aliases" if name == "aliases" else name.replace("_", "-"))
        p.add_argument(flag, dest=f"svc_{name}", metavar=name.upper(), type=parse, help=f"({ENV_NAMES[name]})")
    if worker_flag:
        p.add_argument("--no-worker", action="store_true", help="API only: no in-process worker (HIDREAM_WORKER=false)")


def service_settings(args: argparse.Namespace):
    from hidream.service.settings import PARSERS, load_settings

    overrides = {name: getattr(args, f"svc_{name}", None) for name in PARSERS}
    if getattr(args, "no_worker", False):
        overrides["worker"] = False
    return load_settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from hidream.service.runtime import serve

    return serve(service_settings(args))


def cmd_worker(args: argparse.Namespace) -> int:
    from hidream.service.runtime import run_worker

    return run_worker(service_settings(args))


def cmd_keys(args: argparse.Namespace) -> int:
    from hidream.service.runtime import keys_command

    return keys_command(service_settings(args), args.action, args.name, args.key,
                        args.key_rate, args.key_concurrent)


def cmd_status(args: argparse.Namespace) -> int:
    from hidream.service.status import status_command

    return status_command(service_settings(args), args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hidream", description="HiDream-O1-Image engine and service")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an image from a prompt (and reference images)")
    g.add_argument("prompt")
    add_model_args(g)
    g.add_argument("--size", help=f"{SIZE_HELP} (default: {DEFAULT_SIZE}; {DEMO_SIZE[0]}x{DEMO_SIZE[1]} on the "
                                  "demo checkpoint)")
    g.add_argument("--steps", type=int, help=f"denoising steps: {STEPS_RULE.removeprefix('must be ')} "
                                             "(default: the recipe's, 50 full / 28 dev)")
    g.add_argument("--guidance", type=float, help=f"classifier-free guidance: {GUIDANCE_RULE.removeprefix('must be ')} "
                                                  "(default: 5.0 full / 1.0 dev)")
    g.add_argument("--shift", type=float, help="timestep shift (default: 3.0; 1.0 with 2+ references)")
    g.add_argument("--seed", type=int, default=RANDOM_SEED,
                   help=f"0 to {MAX_SEED}; default {RANDOM_SEED}: a random seed, printed with the image "
                        "(pass it back to get the same image)")
    g.add_argument("--num-images", type=int, default=1,
                   help=f"{IMAGES_RULE.removeprefix('must be ')}; image i uses seed + i")
    g.add_argument("--ref", nargs="+", metavar="IMAGE", help="reference image(s): 1 edits, 2-10 personalize")
    g.add_argument("--keep-original-aspect", action="store_true",
                   help="with one reference: the output takes its aspect ratio (2K pixel budget)")
    g.add_argument("--format", choices=["png", "jpeg", "webp"], help="default: from -o's extension, else png")
    g.add_argument("-o", "--output", default="output.png")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    sm = sub.add_parser("submit", help="submit a generation to a running service, wait for it, download the images")
    sm.add_argument("prompt")
    sm.add_argument("--ref", nargs="+", metavar="IMAGE",
                    help="reference image(s), files (uploaded first) or URLs: 1 edits, 2-10 personalize")
    sm.add_argument("--keep-original-aspect", action="store_true",
                    help="with one reference: the output takes its aspect ratio")
    sm.add_argument("--size", help=f"{SIZE_HELP} (default: the server's, {DEFAULT_SIZE})")
    sm.add_argument("--steps", type=int, help="denoising steps (default: the served recipe's)")
    sm.add_argument("--guidance", type=float, help="guidance scale (default: the served recipe's)")
    sm.add_argument("--seed", type=int, help="default: random (the seed used is in the prediction)")
    sm.add_argument("--format", choices=["png", "jpeg", "webp"], help="default: from -o's extension, else png")
    sm.add_argument("--num-images", type=int, help="1 to 4; image i uses seed + i (default 1)")
    sm.add_argument("--model", default="hidream-o1-image", help="model id (default: hidream-o1-image)")
    sm.add_argument("-o", "--output", default=".",
                    help="directory (files named after the prediction id) or file name (name_i.ext for "
                         "several images); default: the current directory")
    sm.add_argument("--no-wait", action="store_true", help="print the prediction id and exit")
    sm.add_argument("--webhook-url", help="POST the final prediction there, signed with the key's webhook secret")
    sm.add_argument("--idempotency-key",
                    help="a rerun with the same key and request returns the same prediction (24 h); "
                         "default: a fresh key, so only this command's own retries are deduplicated")
    sm.add_argument("--base-url", help="the service (default: $HIDREAM_BASE_URL, else http://127.0.0.1:8000)")
    sm.add_argument("--api-key", help="default: $HIDREAM_API_KEY")
    sm.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sm.set_defaults(func=cmd_submit)

    s = sub.add_parser("serve", help="run the API with an in-process worker (HIDREAM_* settings)")
    add_service_args(s, worker_flag=True)
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run a worker alone, sharing the API's database and storage")
    add_service_args(w, worker_flag=False)
    w.set_defaults(func=cmd_worker)

    k = sub.add_parser("keys", help="create, list or revoke API keys")
    k.add_argument("action", choices=["create", "list", "revoke", "limits"])
    k.add_argument("key", nargs="?", help="with revoke or limits: the key's id or prefix")
    k.add_argument("--name", help="with create: a label for the key")
    k.add_argument("--rate", type=int, metavar="N", dest="key_rate",
                   help="with create or limits: this key's submits per minute (0: no limit, -1: the service default)")
    k.add_argument("--concurrent", type=int, metavar="N", dest="key_concurrent",
                   help="with create or limits: this key's tasks queued or running at once (0: no limit, "
                        "-1: the service default)")
    add_service_args(k, worker_flag=False)
    k.set_defaults(func=cmd_keys)

    st = sub.add_parser("status", help="queue depth, running tasks, workers and throughput, from the database")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    add_service_args(st, worker_flag=False)
    st.set_defaults(func=cmd_status)

    d = sub.add_parser("demo-model", help="write the tiny random-weight demo checkpoint")
    d.add_argument("directory")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--shards", type=int, default=1, help="write N shards with an index, as the real ones are")
    d.set_defaults(func=cmd_demo_model)

    b = sub.add_parser("bench", help="seconds per step and image, peak memory, speed-up over a plain step")
    add_model_args(b)
    b.add_argument("--config", choices=["demo", "full"],
                   help="random weights of a named configuration instead of a checkpoint "
                        "(full = the 8B HiDream-O1 shape)")
    b.add_argument("--size", default="512x512")
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--guidance", type=float, default=5.0)
    b.add_argument("--refs", type=int, default=0, help="number of reference images (random pictures)")
    b.add_argument("--plain-steps", type=int, default=None,
                   help="steps for the plain baseline (default: the same as --steps)")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HiDreamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ServiceError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    except ClientError as err:  # hidream submit: the API's message, a connection failure, a failed prediction
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
