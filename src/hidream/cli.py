"""The `hidream` command: generate | submit | serve | worker | keys | status | demo-model | bench | convert |
train."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from hidream.client import ApiError, Client, ClientError, InputError
from hidream.engine.errors import CheckpointError, HiDreamError, InvalidRequestError
from hidream.rules import (
    CACHE_MODES, DEFAULT_SIZE, DEMO_SIZE, GUIDANCE_RULE, IMAGES_RULE, LORA_SCALE_RULE, LORAS_RULE, MAX_LORAS, MAX_REFERENCES,
    MAX_SEED, MAX_TIMESTEP, NOISE_DEFAULTS, RANDOM_SEED, SCHEDULERS, SEED_RULE, STEPS_RULE, guidance_ok, images_ok,
    lora_scale_ok, sampling_problem, seed_ok, steps_ok,
)
from hidream.service.errors import ServiceError
from hidream.service.settings import (
    CHECKPOINT_HELP, DTYPES, ENV_NAMES, HELP, OFFLOAD, PARSERS, PRECISIONS, QUANTIZE, default_home, help_text,
    precision_of, shown_default,
)
from hidream.sizes import SIZE_HELP, resolve_size

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
URL_SCHEMES = ("http://", "https://", "data:")

# The engine's and the API's names of a request's inputs -> the flag of `generate` / `submit` that sets each.
ENGINE_FLAGS = {"prompt": "prompt", "steps": "--steps", "guidance": "--guidance", "shift": "--shift",
                "seed": "--seed", "num_images": "--num-images", "width": "--size", "height": "--size",
                "size": "--size", "references": "--ref", "keep_original_aspect": "--keep-original-aspect",
                "snap_to_native": "--native-size", "refine": "--refine", "layout": "--layout", "seam_smoothing": "--seam-smoothing", "cache": "--cache",
                "device": "--device", "dtype": "--dtype", "variant": "--variant", "precision": "--precision",
                "compile": "--compile", "quantize": "--quantize", "offload": "--offload", "tokenizer": "--tokenizer",
                "scheduler": "--scheduler", "timesteps": "--timesteps",
                "noise_scale": "--noise-scale", "noise_scale_end": "--noise-scale-end",
                "noise_clip_std": "--noise-clip-std", "loras": "--lora"}
API_FLAGS = {"prompt": "prompt", "num_inference_steps": "--steps", "guidance_scale": "--guidance", "seed": "--seed",
             "num_images": "--num-images", "image_size": "--size", "reference_image_urls": "--ref",
             "keep_original_aspect": "--keep-original-aspect", "snap_to_native": "--native-size",
             "refine_prompt": "--refine", "layout_boxes": "--layout", "seam_smoothing": "--seam-smoothing",
             "cache": "--cache", "output_format": "--format", "model": "--model",
             "webhook_url": "--webhook-url", "Idempotency-Key": "--idempotency-key", "loras": "--lora"}


NATIVE_SIZE_HELP = ("generate at the native size (one of the 11 the model was trained at, about 4 MP) nearest the "
                    "aspect asked for (--size, or the reference's with --keep-original-aspect), as the official "
                    "code always does: 512x512 becomes 2048x2048")

def resolve_model(arg: str | None) -> tuple[Path, bool]:
    """(checkpoint, is_demo): --model, else $HIDREAM_MODEL, else the demo model shipped in the package."""
    from hidream.data import demo_model

    chosen = arg or os.environ.get("HIDREAM_MODEL")
    if chosen:
        return Path(chosen).expanduser(), False
    try:
        return demo_model(), True
    except FileNotFoundError as err:
        raise InvalidRequestError("--model", str(err)) from None


DEMO_NOTE = ("the demo model: a tiny model trained on coloured shapes, e.g. 'a red circle on a blue background'; "
             "pass --model /path/to/HiDream-O1-Image for real images")


def _dtype(args: argparse.Namespace, note: bool = True) -> str | None:
    """The precision mode of --precision, or of the deprecated --dtype (bf16, fp32; fp16 is refused);
    None: the device's default. An error names the flag."""
    try:
        precision = precision_of(getattr(args, "precision", None), getattr(args, "dtype", None))
    except InvalidRequestError as err:
        raise InvalidRequestError(f"--{err.field}", err.rule) from None
    if note and getattr(args, "dtype", None) is not None:
        print(f"note: --dtype is deprecated: use --precision {precision}", file=sys.stderr)
    return precision


def _tokenizer(args: argparse.Namespace) -> Path | None:
    """--tokenizer DIR, checked to be a directory; None when not given."""
    raw = getattr(args, "tokenizer", None)
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        why = "is a file" if path.exists() else "does not exist"
        raise InvalidRequestError("--tokenizer", f"must be a directory with the tokenizer and image-processor "
                                                 f"files ({path} {why})")
    return path


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """Engine.load's precision, compile, quantize, offload and tokenizer, from the flags; only those set (an
    engine without them loads). An error names the flag."""
    precision = _dtype(args)
    quantize, offload = getattr(args, "quantize", None), getattr(args, "offload", None)
    return {k: v for k, v in (("precision", precision), ("compile", getattr(args, "compile", False)),
                              ("quantize", None if quantize == "none" else quantize),
                              ("offload", None if offload == "none" else offload),
                              ("tokenizer", _tokenizer(args))) if v}


def _timesteps(raw: str) -> list[int]:
    """--timesteps 999,857,515,110: comma-separated integers (the rule itself is checked with the others)."""
    try:
        return [int(part) for part in raw.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 999,857,515,110 "
                                         f"(got {raw!r})") from None


def _box(raw: str) -> tuple[float, ...]:
    """--layout x1,y1,x2,y2 -> four numbers (their ranges are the engine's rule, checked with the references)."""
    parts = raw.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a box x1,y1,x2,y2 (four numbers, fractions of the output)")
    return values


def _seams(raw: str) -> dict[str, float | int]:
    """--seam-smoothing [START,END,PASSES] -> the API's object (its ranges checked by the engine's rule)."""
    parts = [p.strip() for p in raw.split(",")] if raw else []
    try:
        if not 1 <= len(parts) <= 3 or not parts[0]:
            raise ValueError
        values = [float(parts[0]), *(float(p) for p in parts[1:2]), *(int(p) for p in parts[2:3])]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not START[,END[,PASSES]] (fractions of the schedule, then "
                                         "2, 4 or 8 passes)") from None
    return dict(zip(("start", "end", "passes"), values, strict=False))


SEAMS_HELP = ("patch seam smoothing: on the steps from START to END (fractions of the schedule, default 0.8,1.0) "
              "average the prediction over PASSES patch grids (2, 4 or 8, default 2) shifted by part of a patch, "
              "against 32-pixel grid seams; PASSES - 1 extra forwards on each of those steps. Alone: the defaults")


LAYOUT_HELP = ("one box x1,y1,x2,y2 per --ref, in the same order (fractions of the output, 0-1: 0,0,0.5,1 is the "
               "left half): where each reference goes (the official code's [x1, x2, y1, y2] order becomes "
               "x1,y1,x2,y2 here); at most 5")


CACHE_HELP = ("step caching: 'fast' skips all but the first decoder layer on the steps where that layer's "
              "change since the last full step is small, reusing the rest's output (about half the steps at "
              "the full recipe, approximate: docs/benchmarks.md); 'off' (the default) runs every layer")


def add_request_extension_flags(p: argparse.ArgumentParser) -> None:
    """The request extensions `generate` and `submit` both take: --native-size, --layout, --seam-smoothing,
    --cache."""
    p.add_argument("--native-size", action="store_true", help=NATIVE_SIZE_HELP)
    p.add_argument("--layout", type=_box, nargs="+", metavar="X1,Y1,X2,Y2", help=LAYOUT_HELP)
    p.add_argument("--seam-smoothing", type=_seams, nargs="?", const="0.8", metavar="START,END,PASSES",
                   help=SEAMS_HELP)
    p.add_argument("--cache", choices=CACHE_MODES, default="off", help=CACHE_HELP)


def _lora(raw: str) -> tuple[str, float]:
    """--lora FILE[:SCALE] -> (FILE, SCALE); SCALE 1.0 when absent. A ':' followed by anything but a number
    is part of the path (`a:b.safetensors`, `https://host:8443/x.safetensors`)."""
    head, sep, tail = raw.rpartition(":")
    if not sep or "/" in tail or "\\" in tail:
        return raw, 1.0
    if "://" in head and "/" not in head.split("://", 1)[1]:  # https://host:PORT, no path after the port
        return raw, 1.0
    if not tail:
        raise argparse.ArgumentTypeError(f"{raw!r} ends in ':': give a scale after it (FILE:0.8) or leave it out")
    try:
        scale = float(tail)
    except ValueError:
        return raw, 1.0
    if not head:
        raise argparse.ArgumentTypeError(f"{raw!r} has no file before the ':' (FILE[:SCALE])")
    return head, scale


def check_lora_flags(loras: Sequence[tuple[str, float]]) -> None:
    """--lora's count and scales, before a model loads or a request is sent."""
    if len(loras) > MAX_LORAS:
        raise InvalidRequestError("--lora", f"{LORAS_RULE} (got {len(loras)})")
    for i, (path, scale) in enumerate(loras):
        if not lora_scale_ok(scale):
            raise InvalidRequestError(f"--lora[{i}]" if len(loras) > 1 else "--lora",
                                      f"{path}: the scale {LORA_SCALE_RULE} (got {scale:g})")


def lora_specs(loras: Sequence[tuple[str, float]]) -> list[Any]:
    """generate's --lora files as LoraSpecs, each checked (its header: no weight is read) before the model
    loads; InvalidRequestError naming --lora (--lora[i] among several) otherwise."""
    from hidream.engine.lora import LoraSpec, check_lora_file

    specs = []
    for i, (raw, scale) in enumerate(loras):
        flag = f"--lora[{i}]" if len(loras) > 1 else "--lora"
        path = Path(raw).expanduser()
        if not path.is_file():
            raise InvalidRequestError(flag, f"cannot read {raw}: {'a directory' if path.is_dir() else 'no such file'}")
        try:
            check_lora_file(path)
        except InvalidRequestError as err:
            raise InvalidRequestError(flag, err.rule if raw in err.rule or path.name in err.rule
                                      else f"{raw}: {err.rule}") from None
        specs.append(LoraSpec(path, scale))
    return specs


def _loras_said(loras: Sequence[tuple[str, float]]) -> str:
    """`, LoRA a.safetensors x0.8` for the line printed per image."""
    if not loras:
        return ""
    said = ", ".join(f"{Path(path).name} x{scale:g}" for path, scale in loras)
    return f", LoRA{'s' if len(loras) > 1 else ''} {said}"


# --- the parser: one-line errors ---------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake prints `error: <flag>: <rule>` and one `see: ... --help` line, not the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self._rewrite(message)}\nsee: {self.prog} --help\n")

    def _rewrite(self, message: str) -> str:
        if m := re.fullmatch(r"argument (\S+): (.*)", message, re.S):
            names, rule = m.group(1).split("/"), m.group(2)
            name = next((n for n in names if n.startswith("--")), names[0])
            if t := re.fullmatch(r"invalid (int|float) value: (.*)", rule):
                rule = f"must be {'an integer' if t.group(1) == 'int' else 'a number'} (got {t.group(2)})"
            return f"{name}: {rule}"
        if m := re.fullmatch(r"the following arguments are required: (.*)", message):
            missing = []
            for name in m.group(1).split(", "):
                action = next((a for a in self._actions if name in (a.dest, a.metavar)), None)
                choices = f" (one of {', '.join(action.choices)})" if action is not None and action.choices else ""
                missing.append(f"missing {name}{choices}")
            said = "; ".join(missing)
            # `keys: missing action`, `train lora: missing --data`
            return f"{' '.join(self.prog.split()[1:])}: {said}" if " " in self.prog else said
        return message

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:  # no command takes more than it declares: a leftover is a mistake, said here, by this parser
            self._unknown(extras)
        return namespace, extras

    def _unknown(self, extras: list[str]) -> NoReturn:
        option = next((a for a in extras if a.startswith("-") and a != "-"), None)
        if option is None:
            quote = " (quote a prompt of several words)" if any(a.dest == "prompt" for a in self._actions) else ""
            self.error(f"unexpected argument {extras[0]!r}{quote}")
        name = option.split("=", 1)[0]
        known = [s for a in self._actions if a.help != argparse.SUPPRESS for s in a.option_strings]
        if name in known:  # a real option, left over: it came after `--`, where everything is an argument
            self.error(f"{name}: after --, options are arguments; put {name} before the --")
        takers = [c for c, names in COMMAND_SETTINGS.items() if name in map(setting_flag, names)]
        if takers:  # a setting of another command (`keys --port`)
            who = " and ".join(takers) + (" does" if len(takers) == 1 else " do")
            self.error(f"unknown option {name} ({self.prog.split()[-1]} does not read it; {who})")
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
        self.error(f"unknown option {name}" + (f" (did you mean {close[0]}?)" if close else ""))

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is None or value in action.choices:
            return
        choices = [str(c) for c in action.choices]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"did you mean {close[0]}?" if close else f"one of {', '.join(choices)}"
        if isinstance(action, argparse._SubParsersAction):
            raise argparse.ArgumentError(None, f"unknown command {value!r} ({hint})")
        if not action.option_strings:  # `keys creat`: the command names the positional
            raise argparse.ArgumentError(None, f"{self.prog.split()[-1]}: unknown {action.dest} {value!r} ({hint})")
        got = f"got {value!r}" + (f"; did you mean {close[0]}?" if close else "")
        raise argparse.ArgumentError(action, f"must be one of {', '.join(choices)} ({got})")


def _typed(parse: Callable[[str], Any], kind: str | None = None) -> Callable[[str], Any]:
    """An argparse type whose error says the rule: `must be an integer (got 'x')`."""

    def convert(raw: str) -> Any:
        try:
            return parse(raw)
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(f"must be {kind} (got {raw!r})" if kind else
                                             f"cannot use {raw!r} ({err})") from None

    return convert


INT, NUMBER = _typed(int, "an integer"), _typed(float, "a number")


class _Removed(argparse.Action):
    """A flag that is gone: using it says what to do instead."""

    def __init__(self, option_strings: list[str], dest: str, advice: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.advice = advice

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        raise argparse.ArgumentError(self, self.advice)


# --- generate and submit -----------------------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"{CHECKPOINT_HELP} (default: $HIDREAM_MODEL, else the demo model "
                                   "shipped in the package: coloured shapes only)")
    p.add_argument("--variant", choices=["full", "dev"], help="recipe (default: from the checkpoint: a name "
                                                              "ending in -Dev, or a single file's metadata)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--precision", metavar="{" + ",".join(PRECISIONS) + "}",  # checked by precision_of: fp16 gets its reason
                   help="bf16: weights and activations in bf16; bf16-fp32acc: bf16 matmuls on a float32 residual "
                        "stream with float32 norms (more detail, more memory); fp32 (default: bf16 on CUDA, fp32 "
                        "on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder layer (regional): faster steps after a warm-up per image size")
    p.add_argument("--dtype", choices=DTYPES, help="deprecated: use --precision; bf16 or fp32 (fp16 is refused)")
    p.add_argument("--quantize", choices=QUANTIZE, help=f"{HELP['quantize']} (default: none)")
    p.add_argument("--offload", choices=OFFLOAD, help=f"{HELP['offload']} (default: none)")
    p.add_argument("--tokenizer", metavar="DIR", help=f"{HELP['tokenizer']} (default: the checkpoint's own)")


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


def check_prompt_given(args: argparse.Namespace) -> None:
    """`generate --ref a.png "a prompt"`: --ref took the prompt too; say so, and how to write it."""
    if args.prompt is not None:
        return
    if args.ref:
        last = args.ref[-1]
        if not last.startswith(URL_SCHEMES) and not Path(last).expanduser().is_file():
            args.parser.error(f"prompt: missing; --ref took {last!r} for an image: put the prompt before the "
                              "options, or end the --ref list with --")
        args.parser.error("prompt: missing; with --ref, put the prompt before the options or end the --ref "
                          "list with --")
    args.parser.error(f"prompt: missing (the first argument, e.g. {args.parser.prog} \"a red fox in the snow\")")


def check_request_flags(args: argparse.Namespace) -> None:
    """The request's rules (hidream.rules), checked on the flags before a model loads or a request is sent."""
    if not args.prompt.strip():
        raise InvalidRequestError("prompt", "must be a non-empty string, not only whitespace")
    if args.size is not None:
        resolve_size(args.size, "--size")
    if args.steps is not None and not steps_ok(args.steps):
        raise InvalidRequestError("--steps", f"{STEPS_RULE} (got {args.steps})")
    if args.guidance is not None and not guidance_ok(args.guidance):
        raise InvalidRequestError("--guidance", f"{GUIDANCE_RULE} (got {args.guidance:g})")
    if getattr(args, "shift", None) is not None and not 0.0 < args.shift <= 100.0:
        raise InvalidRequestError("--shift", f"must be above 0 and at most 100 (got {args.shift:g})")
    if args.seed is not None and not seed_ok(args.seed):
        raise InvalidRequestError("--seed", f"{SEED_RULE} (got {args.seed})")
    if args.num_images is not None and not images_ok(args.num_images):
        raise InvalidRequestError("--num-images", f"{IMAGES_RULE} (got {args.num_images})")
    if len(args.ref or []) > MAX_REFERENCES:
        raise InvalidRequestError("--ref", f"at most {MAX_REFERENCES} images (got {len(args.ref)})")
    check_lora_flags(args.lora or [])
    if args.command == "generate":
        _dtype(args, note=False)
        _tokenizer(args)
        check_sampling_flags(args, None)


def check_sampling_flags(args: argparse.Namespace, recipe_scheduler: str | None) -> None:
    """--scheduler, --timesteps and the noise flags; with `recipe_scheduler` (the scheduler the recipe of the
    variant and mode samples with), whether the flash-only ones fit the scheduler too."""
    problem = sampling_problem(
        recipe_scheduler or "flash", scheduler=args.scheduler, steps=args.steps, shift=args.shift,
        timesteps=args.timesteps, noise_scale=args.noise_scale, noise_scale_end=args.noise_scale_end,
        noise_clip_std=args.noise_clip_std)
    if problem is not None:
        field, rule = problem
        raise InvalidRequestError(ENGINE_FLAGS[field], rule.replace("explicit timesteps", "--timesteps"))


def as_flag_error(field: str, rule: str, flags: dict[str, str], refs: Sequence[str]) -> InvalidRequestError:
    """An engine's or the API's error on `field` (`steps`, `references[1]`, `loras[0].path`, ...) as one on the
    CLI's flag."""
    m = re.fullmatch(r"([^\[]+)\[(\d+)\](?:\.\w+)?", field)
    base, index = (m.group(1), int(m.group(2))) if m else (field, None)
    flag = flags.get(base, field)
    if index is None:
        return InvalidRequestError(flag, rule)
    if index < len(refs) and refs[index] not in rule:
        rule = f"{refs[index]}: {rule}"
    return InvalidRequestError(f"{flag}[{index}]", rule)


def _mode(count: int) -> str:
    """How the references were used, for the line printed per image."""
    if count == 0:
        return ""
    return ", edit of 1 reference" if count == 1 else f", personalization from {count} references"


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hidream.engine.config import detect_variant, recipe_for
    from hidream.engine.images import load_image, plan_references
    from hidream.engine.pipeline import Engine, GenerationRequest
    from hidream.engine.seams import SeamSmoothing

    checkpoint, is_demo = resolve_model(args.model)
    # The flash-only noise flags against the recipe's scheduler, before the model loads (minutes for the real one)
    check_sampling_flags(args, recipe_for(args.variant or detect_variant(checkpoint), len(args.ref or [])).scheduler)
    width, height = resolve_size(args.size or (DEMO_SIZE if is_demo else DEFAULT_SIZE), "--size")
    fmt = args.format or FORMATS.get(Path(args.output).suffix.lower().lstrip("."), "PNG").lower()
    paths = output_paths(Path(args.output), args.num_images, fmt)
    if is_demo:
        print(f"note: no --model given, using {DEMO_NOTE}", file=sys.stderr)
    refs = args.ref or []
    references = [load_image(path, f"--ref[{i}]") for i, path in enumerate(refs)]
    loras = lora_specs(args.lora or [])  # their files' headers, before the model loads
    prompt = refined_prompt(args.prompt, len(references)) if args.refine else args.prompt
    try:
        # The references' sizes are checked before the model loads (minutes for the real one).
        plan_references([image.size for image in references], width, height, args.keep_original_aspect,
                        field="references", snap_to_native=args.native_size, layout=args.layout)
        seams = SeamSmoothing(**args.seam_smoothing) if args.seam_smoothing is not None else None
        if seams is not None and (problem := seams.problem()) is not None:
            raise InvalidRequestError("seam_smoothing", problem)
        engine = Engine.load(checkpoint, device=args.device, variant=args.variant, **engine_options(args))
        seed = args.seed if args.seed != RANDOM_SEED else secrets.randbelow(MAX_SEED + 1)
        request = GenerationRequest(
            prompt=prompt, width=width, height=height, references=references,
            keep_original_aspect=args.keep_original_aspect, snap_to_native=args.native_size, layout=args.layout,
            seam_smoothing=seams, cache=args.cache, steps=args.steps,
            guidance=args.guidance, shift=args.shift, seed=seed, num_images=args.num_images, scheduler=args.scheduler,
            timesteps=args.timesteps, noise_scale=args.noise_scale, noise_scale_end=args.noise_scale_end,
            noise_clip_std=args.noise_clip_std, loras=loras,
        )
        engine.validate(request)
        with tqdm(total=1, unit="step", desc="generating", disable=args.quiet) as bar:
            def progress(step: int, total: int, _preview) -> None:
                bar.total = total
                bar.update(step - bar.n)

            result = engine.generate(request, progress=progress)
    except CheckpointError as err:
        raise InvalidRequestError("--model", str(err)) from None
    except InvalidRequestError as err:
        named = [path for path, _ in args.lora or []] if err.field.startswith("loras") else \
            [] if err.field.startswith("layout") else refs
        raise as_flag_error(err.field, err.rule, ENGINE_FLAGS, named) from None
    for k, (image, path, seed) in enumerate(zip(result.images, paths, result.seeds, strict=True)):
        cached = len(result.cached_steps[k]) if result.cached_steps else 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, format=FORMATS[fmt], **({"quality": 95} if fmt != "png" else {}))
        except OSError as err:
            raise InvalidRequestError("-o", f"cannot write {path} ({err.strerror or err})") from err
        print(f"{path}  ({result.width}x{result.height}, seed {seed}, {result.steps} steps, {engine.variant}/"
              f"{result.scheduler}, {result.seconds:.1f} s{_mode(len(references))}{_loras_said(args.lora or [])}"
              f"{f', seam smoothing: {result.extra_forwards} extra forwards' if seams is not None else ''}"
              f"{f', step cache: {cached} of {result.steps} steps reused' if args.cache != 'off' else ''})")
    return 0


def refined_prompt(prompt: str, num_references: int) -> str:
    """`generate --refine`: the HIDREAM_REFINE_* refiner's rewrite of the prompt (said on stderr), or the
    prompt as given with a warning when the refiner fails."""
    from hidream.refine import config_from_env, refine
    from hidream.rules import mode_of

    try:
        config = config_from_env(os.environ)
    except ValueError as err:
        raise InvalidRequestError("--refine", str(err)) from None
    if config is None:
        raise InvalidRequestError("--refine", "needs a prompt refiner: set HIDREAM_REFINE_URL to an "
                                              "OpenAI-compatible chat endpoint (and HIDREAM_REFINE_MODEL)")
    result = refine(config, prompt, mode_of(num_references))
    if result.refined is None:
        print(f"warning: {result.warning}", file=sys.stderr)
        return prompt
    print(f"refined prompt: {result.refined}", file=sys.stderr)
    return result.refined


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


def _rule_of(err: ApiError) -> str:
    """The API's message without its leading `field: `."""
    return err.message.removeprefix(f"{err.field}: ") if err.field else err.message


def upload_references(client: Client, refs: Sequence[str]) -> list[str]:
    """Each --ref as a URL the server takes: URLs as they are, files uploaded; errors name `--ref[i]`."""
    for i, ref in enumerate(refs):  # every file checked before the first upload
        path = Path(ref).expanduser()
        if not ref.startswith(URL_SCHEMES) and not path.is_file():
            why = "a directory" if path.is_dir() else "no such file"
            raise InvalidRequestError(f"--ref[{i}]", f"cannot read {ref}: {why}")
    urls = []
    for i, ref in enumerate(refs):
        try:
            urls.append(client.upload(ref))
        except InputError as err:
            raise InvalidRequestError(f"--ref[{i}]", str(err)) from None
        except ApiError as err:
            if err.status not in (400, 413, 415, 422):  # not about this image (a bad key, a busy server)
                raise
            raise InvalidRequestError(f"--ref[{i}]", f"{ref}: {_rule_of(err)}") from None
    return urls


def cmd_submit(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("HIDREAM_API_KEY")
    if not api_key:
        raise InvalidRequestError("--api-key", "no API key: pass --api-key or set HIDREAM_API_KEY")
    base_url = args.base_url or os.environ.get("HIDREAM_BASE_URL") or "http://127.0.0.1:8000"
    fmt = args.format or FORMATS.get(Path(args.output).suffix.lower().lstrip("."), "").lower() or None
    target = submit_target(args.output, fmt, args.num_images or 1)
    refs = args.ref or []
    with Client(base_url, api_key) as client:
        urls = upload_references(client, refs)
        try:
            prediction = client.submit(
                args.prompt, references=urls, keep_original_aspect=args.keep_original_aspect,
                snap_to_native=args.native_size, refine_prompt=args.refine, layout_boxes=args.layout,
                seam_smoothing=args.seam_smoothing, cache=args.cache,
                model=args.model, image_size=args.size,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance, seed=args.seed, output_format=fmt or "png",
                num_images=args.num_images or 1, webhook_url=args.webhook_url, idempotency_key=args.idempotency_key,
                loras=[{"path": path, "scale": scale} for path, scale in args.lora or []],
            )
        except ApiError as err:
            base = (err.field or "").split("[")[0]
            if base not in API_FLAGS:
                raise
            named = [path for path, _ in args.lora or []] if base == "loras" else [] if base == "layout_boxes" else refs
            raise as_flag_error(err.field, _rule_of(err), API_FLAGS, named) from None
        if args.no_wait:
            print(prediction.id)
            return 0
        if not args.quiet:
            print(f"submitted prediction {prediction.id}", file=sys.stderr)
        try:
            prediction = client.wait(prediction, progress=not args.quiet)
        except KeyboardInterrupt:
            return cancel_on_interrupt(client, prediction.id)
        if "refined_prompt" in prediction.input and not args.quiet:
            print(f"refined prompt: {prediction.input['refined_prompt']}", file=sys.stderr)
        for warning in prediction.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for path in client.download(prediction.raise_for_status(), target):
            print(path)
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from hidream.engine.demo import write_demo_checkpoint

    path = write_demo_checkpoint(args.directory, seed=args.seed, shards=args.shards)
    print(f"wrote a demo checkpoint (random weights, official layout) to {path}")
    return 0


def _checkpoint_only_flags(args: argparse.Namespace, instead_of: str) -> None:
    """--quantize, --offload and --tokenizer load a checkpoint: refused with --config's random weights."""
    for flag, value in (("--quantize", args.quantize), ("--offload", args.offload), ("--tokenizer", args.tokenizer)):
        if value not in (None, "none"):
            raise InvalidRequestError(flag, f"applies to a loaded checkpoint (--model), not {instead_of}")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.memory_table and not args.dry_run:
        raise InvalidRequestError("--memory-table", "is a --dry-run report: add --dry-run")
    if args.dry_run and args.offload == "auto":
        raise InvalidRequestError("--offload", "auto depends on a device's free memory: the dry run estimates none "
                                  "or layers (--memory-table shows both)")
    if args.dry_run and args.tokenizer is not None and args.config:
        raise InvalidRequestError("--tokenizer", f"reads a checkpoint's tokenizer, not --config {args.config}'s")
    if args.config and not args.dry_run:  # random weights: the loading flags would be ignored
        _checkpoint_only_flags(args, f"--config {args.config} (random weights)")
    if args.dry_run:
        from hidream.dry_run import run_dry_run

        return run_dry_run(args)  # steps and guidance default to the recipe's
    from hidream.bench import run_bench

    args.steps = 10 if args.steps is None else args.steps
    args.guidance = 5.0 if args.guidance is None else args.guidance
    return run_bench(args)


# --- convert -----------------------------------------------------------------------------------------------

DROPPABLE = ("lm_head", "deepstack")


def _drop(raw: str) -> list[str]:
    """--drop lm_head,deepstack: a comma list of the parts the image model never uses."""
    names = [part.strip() for part in raw.split(",") if part.strip()]
    unknown = [n for n in names if n not in DROPPABLE]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"must be a comma list of {', '.join(DROPPABLE)} (got {raw!r})")
    return list(dict.fromkeys(names))


def add_convert_args(p: argparse.ArgumentParser) -> None:
    """The arguments of `hidream convert`, what hidream.convert.run reads (declared here, not by that module:
    it imports torch, which every other command would then wait for)."""
    p.add_argument("src", metavar="SRC", help=f"the checkpoint to convert: {CHECKPOINT_HELP}")
    p.add_argument("dst", metavar="DST", help="a single file when it ends in .safetensors (the config, variant and "
                                              "tokenizer in its metadata), else a directory in the official layout")
    p.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16",
                   help="the weights' type in DST: bf16, or fp8 (the decoder's linear weights in float8 with "
                        "scales; about half the size) (default: bf16)")
    p.add_argument("--drop", type=_drop, default=[], metavar="PART[,PART]",
                   help=f"leave out parts the image model never uses, a comma list of {', '.join(DROPPABLE)} "
                        "(default: keep everything)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="the tokenizer and image-processor files, when SRC is a single file that carries none")
    p.add_argument("--variant", choices=["full", "dev"],
                   help="the recipe recorded in DST's metadata (default: from SRC: a name ending in -Dev, or a "
                        "single file's metadata)")
    p.add_argument("--fp8-scaling", choices=["row", "tensor"], default="row",
                   help="with --dtype fp8: one scale per output row, or one per tensor, as ComfyUI lays it out "
                        "(default: row)")
    p.add_argument("--shard-gb", type=NUMBER, default=5.0, metavar="GB",
                   help="a directory's shard size, in GB (default: 5)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")


def cmd_convert(args: argparse.Namespace) -> int:
    from hidream.convert import run

    return run(args)


# --- train -------------------------------------------------------------------------------------------------


def add_train_lora_args(p: argparse.ArgumentParser) -> None:
    """The arguments of `hidream train lora`, what hidream.train.run_lora reads (declared here, not by that
    module: it imports torch, which every other command would then wait for)."""
    p.add_argument("--model", metavar="CKPT", help=f"{CHECKPOINT_HELP} (default: $HIDREAM_MODEL, else the demo "
                                                   "model, a tiny model of coloured shapes)")
    p.add_argument("--data", metavar="DIR", required=True,
                   help="images with same-named .txt captions, and edit pairs NAME.ref.png + NAME.png + NAME.txt")
    p.add_argument("--output", metavar="FILE.safetensors", required=True, help="the LoRA file to write")
    p.add_argument("--rank", type=INT, default=16, help="the LoRA's rank (default: 16)")
    p.add_argument("--alpha", type=NUMBER, help="the LoRA's alpha: its update is scaled by alpha / rank "
                                                "(default: the rank, so 1)")
    p.add_argument("--targets", default="attn,mlp", metavar="PATTERN[,PATTERN]",
                   help="the layers to train, a comma list: attn (the decoder's attention projections), mlp (its "
                        "MLP projections), or fnmatch patterns over official module names such as "
                        "'model.language_model.layers.*.mlp.*_proj' (default: attn,mlp)")
    p.add_argument("--steps", type=INT, default=500, help="optimizer steps (default: 500)")
    p.add_argument("--lr", type=NUMBER, default=1e-4, help="learning rate (default: 1e-4)")
    p.add_argument("--batch", type=INT, default=1, help="examples per step (default: 1)")
    p.add_argument("--resolution", type=INT, default=512,
                   help="training images are fitted to about this many pixels per side (default: 512)")
    p.add_argument("--seed", type=INT, default=0, help="seeds the LoRA's initial weights, the noise and the "
                                                       "timesteps (default: 0)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--precision", metavar="{" + ",".join(PRECISIONS) + "}",
                   help="as generate's: bf16, bf16-fp32acc or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each decoder layer in the backward pass: less memory, slower steps "
                        "(default: on with CUDA)")
    p.add_argument("--save-every", type=INT, default=100, metavar="N",
                   help="a checkpoint every N steps, to --resume from (default: 100)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from one of its checkpoints")
    p.add_argument("--sample-prompt", metavar="TEXT",
                   help="the prompt of the sample image made at the end (default: the first caption)")
    p.add_argument("--no-sample", action="store_true", help="make no sample image at the end")
    p.add_argument("--caption-dropout", type=NUMBER, default=0.0, metavar="P",
                   help="train on the empty prompt with probability P, so the LoRA also holds under guidance "
                        "(default: 0)")


def cmd_train_lora(args: argparse.Namespace) -> int:
    _dtype(args, note=False)  # --precision checked as generate checks it (fp16 gets its reason)
    from hidream.train import run_lora

    return run_lora(args)


# --- the service's commands --------------------------------------------------------------------------------

_DATABASE = ("home", "database_url")
_ENGINE = ("model", "variant", "device", "dtype", "precision", "compile", "quantize", "offload", "tokenizer")
_STORAGE = ("storage_dir", "storage_url", "s3_endpoint_url", "s3_region", "s3_access_key_id",
            "s3_secret_access_key", "url_ttl_s")
# The settings each command reads (its flags): `serve` all of them; `worker` its model, the database, the
# storage and what a task's run reads (lease, attempts, price, previews, LoRAs), none of the HTTP side; `keys` and
# `status` the database, plus the defaults `keys` shows (rate, concurrency) and the lease `status` judges
# heartbeats by.
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "serve": tuple(name for name in PARSERS if name != "worker"),
    "worker": (*_DATABASE, *_ENGINE, "model_ids", *_STORAGE, "price_usd", "lease_s", "max_attempts",
               "preview_every", "preview_size", "lora_dir", "lora_cache_bytes"),
    "keys": (*_DATABASE, "rate_per_minute", "max_concurrent"),
    "status": (*_DATABASE, "lease_s"),
}
# Secrets are read from a file or the environment, never from a flag's value (which `ps` shows to everyone).
SECRET_FILE_FLAGS = {"secret": "--secret-file", "s3_secret_access_key": "--s3-secret-access-key-file",
                     "refine_key": "--refine-key-file"}
_CHOICES = {"variant": ["full", "dev"], "dtype": list(DTYPES), "precision": list(PRECISIONS),
            "quantize": list(QUANTIZE), "offload": list(OFFLOAD)}
_METAVARS = {"tokenizer": "DIR"}


def setting_flag(name: str) -> str:
    return "--" + ("model-aliases" if name == "aliases" else name.replace("_", "-"))


def add_service_args(p: argparse.ArgumentParser, command: str) -> None:
    """One flag per setting `command` reads (`--max-queue` for HIDREAM_MAX_QUEUE, ...); a flag beats the variable."""
    names = COMMAND_SETTINGS[command]
    group = p.add_argument_group("settings (each also an environment variable; a flag beats it)")
    for name in PARSERS:
        if name not in names:
            continue
        flag, env = setting_flag(name), ENV_NAMES[name]
        if name in SECRET_FILE_FLAGS:
            file_flag = SECRET_FILE_FLAGS[name]
            group.add_argument(file_flag, dest=f"file_{name}", metavar="PATH",
                               help=f"{HELP[name]}, read from the file PATH: no flag takes the value, which ps "
                                    f"would show (default: {shown_default(name)}; or the value itself in env {env})")
            p.add_argument(flag, action=_Removed, advice=f"removed: a value on the command line shows in ps; "
                                                         f"set {env} or pass {file_flag} PATH")
            continue
        if name == "compile":  # a switch: --compile, or HIDREAM_COMPILE=true
            group.add_argument(flag, dest=f"svc_{name}", action="store_const", const=True, help=help_text(name))
            continue
        parse = str if name in _CHOICES else PARSERS[name]  # a choice's error is argparse's: `must be one of ...`
        kind = {int: "an integer", float: "a number"}.get(parse)
        group.add_argument(flag, dest=f"svc_{name}", metavar=_METAVARS.get(name, name.upper()),
                           type=_typed(parse, kind), choices=_CHOICES.get(name), help=help_text(name))
    if command == "serve":
        group.add_argument("--no-worker", action="store_true",
                           help="API only: no worker in this process; run `hidream worker` elsewhere "
                                "(env HIDREAM_WORKER=false)")


def read_secret_file(path: str, flag: str) -> str:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as err:
        raise InvalidRequestError(flag, f"cannot read {path} ({getattr(err, 'strerror', None) or err})") from None
    if not text:
        raise InvalidRequestError(flag, f"{path} is empty")
    return text


def service_settings(args: argparse.Namespace):
    from hidream.service.settings import load_settings

    overrides = {name: getattr(args, f"svc_{name}", None) for name in PARSERS}
    for name, flag in SECRET_FILE_FLAGS.items():
        if path := getattr(args, f"file_{name}", None):
            overrides[name] = read_secret_file(path, flag)
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


KEYS_HELP = """actions:
  create       make a key and print it, once (only its hash is kept); with --name, --rate, --concurrent
  list         every key: id, prefix, name, when created, active or revoked, its limits
  revoke KEY   revoke the key: requests made with it get 401 from now on
  limits KEY   print the key's own limits; with --rate and/or --concurrent, set them first

KEY: the key's id, or its prefix as `keys list` shows it (hd-..., with or without the …), or any start of
either that only one key has, or the whole key."""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("hidream")
    except PackageNotFoundError:
        import hidream

        return getattr(hidream, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hidream", description="HiDream-O1-Image engine and service")
    parser.add_argument("--version", action="version", version=f"hidream {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    g = sub.add_parser("generate", help="generate an image from a prompt (and reference images)")
    g.add_argument("prompt", nargs="?", help="what to draw (required; quote it)")
    add_model_args(g)
    g.add_argument("--size", help=f"{SIZE_HELP} (default: {DEFAULT_SIZE}; {DEMO_SIZE[0]}x{DEMO_SIZE[1]} on the "
                                  "demo model)")
    g.add_argument("--steps", type=INT, help=f"denoising steps: {STEPS_RULE.removeprefix('must be ')} "
                                             "(default: the recipe's, 50 full / 28 dev)")
    g.add_argument("--guidance", type=NUMBER,
                   help=f"classifier-free guidance: {GUIDANCE_RULE.removeprefix('must be ')} "
                        "(default: 5.0 full / 1.0 dev)")
    g.add_argument("--shift", type=NUMBER, help="timestep shift (default: 3.0; 1.0 with 2+ references)")
    g.add_argument("--scheduler", choices=SCHEDULERS,
                   help="sampler (default: the recipe's: unipc full; flash dev, euler for a dev edit); the noise "
                        "defaults follow it")
    g.add_argument("--timesteps", type=_timesteps, metavar="T1,T2,...",
                   help=f"an explicit schedule for any scheduler: model timesteps, one per step, strictly "
                        f"decreasing from {MAX_TIMESTEP} to 1, each step's sigma t/1000 (e.g. 999,857,515,110; "
                        "--steps then defaults to their count). Default: the scheduler's own schedule for --steps "
                        "and --shift; dev at 28 steps: its 28 fixed timesteps")
    flash, plain = NOISE_DEFAULTS["flash"], NOISE_DEFAULTS["unipc"]
    g.add_argument("--noise-scale", type=NUMBER,
                   help=f"the initial noise's scale, and flash's first re-noise (default: {flash[0]:g} flash, "
                        f"{plain[0]:g} unipc and euler)")
    g.add_argument("--noise-scale-end", type=NUMBER,
                   help=f"flash only: the last step's re-noise scale, linear from --noise-scale (default: "
                        f"{flash[1]:g})")
    g.add_argument("--noise-clip-std", type=NUMBER,
                   help=f"flash only: clip the re-noise at this many standard deviations, 0 for none (default: "
                        f"{flash[2]:g})")
    g.add_argument("--seed", type=INT, default=RANDOM_SEED,
                   help=f"0 to {MAX_SEED}; default {RANDOM_SEED}: a random seed, printed with the image "
                        "(pass it back to get the same image)")
    g.add_argument("--num-images", type=INT, default=1,
                   help=f"{IMAGES_RULE.removeprefix('must be ')}; image i uses seed + i")
    g.add_argument("--ref", nargs="+", action="extend", metavar="IMAGE",
                   help="reference image(s): 1 edits, 2-10 personalize; repeat --ref or list several after one "
                        "(a prompt after them needs -- before it)")
    g.add_argument("--keep-original-aspect", action="store_true",
                   help="with one reference: the output takes its aspect ratio (2K pixel budget)")
    add_request_extension_flags(g)
    g.add_argument("--refine", action="store_true",
                   help="rewrite the prompt into a detailed one first, with the OpenAI-compatible chat endpoint "
                        "HIDREAM_REFINE_URL names (HIDREAM_REFINE_MODEL, _KEY, _TIMEOUT_S); printed on stderr, and "
                        "the prompt is used as given, with a warning, when the refiner fails")
    g.add_argument("--lora", type=_lora, action="append", metavar="FILE[:SCALE]",
                   help=f"apply a LoRA file (.safetensors with PEFT, kohya or LoKr keys) at SCALE, default 1.0 "
                        f"({LORA_SCALE_RULE.removeprefix('must be ')}; negative subtracts it); repeat --lora for "
                        f"several, at most {MAX_LORAS}")
    g.add_argument("--format", choices=["png", "jpeg", "webp"], help="default: from -o's extension, else png")
    g.add_argument("-o", "--output", default="output.png")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate, parser=g)

    sm = sub.add_parser("submit", help="submit a generation to a running service, wait for it, download the images")
    sm.add_argument("prompt", nargs="?", help="what to draw (required; quote it)")
    sm.add_argument("--ref", nargs="+", action="extend", metavar="IMAGE",
                    help="reference image(s), files (uploaded first) or URLs: 1 edits, 2-10 personalize; repeat "
                         "--ref or list several after one (a prompt after them needs -- before it)")
    sm.add_argument("--keep-original-aspect", action="store_true",
                    help="with one reference: the output takes its aspect ratio")
    add_request_extension_flags(sm)
    sm.add_argument("--refine", action="store_true",
                    help="the service rewrites the prompt with its prompt refiner first (refine_prompt); the "
                         "rewrite is printed on stderr")
    sm.add_argument("--lora", type=_lora, action="append", metavar="NAME[:SCALE]",
                    help="a LoRA the service serves (a name GET /api/v1/loras lists, or an https URL where the "
                         "service takes them) at SCALE, default 1.0; repeat --lora for several")
    sm.add_argument("--size", help=f"{SIZE_HELP} (default: the server's, {DEFAULT_SIZE})")
    sm.add_argument("--steps", type=INT, help=f"denoising steps: {STEPS_RULE.removeprefix('must be ')} "
                                              "(default: the served recipe's)")
    sm.add_argument("--guidance", type=NUMBER, help=f"guidance scale: {GUIDANCE_RULE.removeprefix('must be ')} "
                                                    "(default: the served recipe's)")
    sm.add_argument("--seed", type=INT, help=f"0 to {MAX_SEED}, or {RANDOM_SEED}; default: random (the seed used "
                                             "is in the prediction)")
    sm.add_argument("--format", choices=["png", "jpeg", "webp"], help="default: from -o's extension, else png")
    sm.add_argument("--num-images", type=INT, help=f"{IMAGES_RULE.removeprefix('must be ')}; image i uses "
                                                   "seed + i (default 1)")
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
    sm.set_defaults(func=cmd_submit, parser=sm)

    s = sub.add_parser("serve", help="run the API with an in-process worker (HIDREAM_* settings)",
                       description="Run the API (and, unless --no-worker, a worker) on 127.0.0.1:8000 by default.")
    add_service_args(s, "serve")
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run a worker alone, sharing the API's database and storage",
                       description="Run a worker: it takes tasks from the API's database and writes the images "
                                   "to its storage; give it the same database and storage settings as the API.")
    add_service_args(w, "worker")
    w.set_defaults(func=cmd_worker)

    k = sub.add_parser("keys", help="create, list, revoke API keys, or set a key's limits", epilog=KEYS_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("action", choices=["create", "list", "revoke", "limits"], metavar="action",
                   help="create, list, revoke or limits (see below)")
    k.add_argument("key", nargs="?", help="with revoke or limits: the key (see below)")
    k.add_argument("--name", help="with create: a label for the key (default: key)")
    k.add_argument("--rate", type=INT, metavar="N", dest="key_rate",
                   help="with create or limits: this key's submits per minute (0: no limit, -1: the service default)")
    k.add_argument("--concurrent", type=INT, metavar="N", dest="key_concurrent",
                   help="with create or limits: this key's tasks queued or running at once (0: no limit, "
                        "-1: the service default)")
    add_service_args(k, "keys")
    k.set_defaults(func=cmd_keys)

    st = sub.add_parser("status", help="queue depth, running tasks, workers and throughput, from the database")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    add_service_args(st, "status")
    st.set_defaults(func=cmd_status)

    d = sub.add_parser("demo-model", help="write the tiny random-weight demo checkpoint")
    d.add_argument("directory")
    d.add_argument("--seed", type=INT, default=0)
    d.add_argument("--shards", type=INT, default=1, help="write N shards with an index, as the real ones are")
    d.set_defaults(func=cmd_demo_model)

    b = sub.add_parser("bench", help="seconds per step and image, peak memory, speed-up over a plain step")
    add_model_args(b)
    b.add_argument("--config", choices=["demo", "full"],
                   help="random weights of a named configuration instead of a checkpoint "
                        "(full = the 8B HiDream-O1 shape)")
    b.add_argument("--size", default="512x512")
    b.add_argument("--steps", type=INT, help="default 10; with --dry-run the recipe's (full: 50)")
    b.add_argument("--guidance", type=NUMBER, help="default 5; with --dry-run the recipe's")
    b.add_argument("--refs", type=INT, default=0, help="number of reference images (random pictures)")
    b.add_argument("--plain-steps", type=INT, default=None,
                   help="steps for the plain baseline (default: the same as --steps)")
    b.add_argument("--cache", choices=CACHE_MODES, default="off",
                   help="also run the engine's path with step caching (fast) and report its reused steps")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.add_argument("--dry-run", action="store_true",
                   help="no weights, no device: one request and one step on fake tensors; reports params, "
                        "flops per step and image, the seconds floor at --tflops and peak memory (estimates)")
    b.add_argument("--tflops", type=NUMBER, default=800.0,
                   help="dense throughput for the --dry-run floor, in TFLOP/s (default 800)")
    b.add_argument("--memory-table", action="store_true",
                   help="with --dry-run: peak device memory and the seconds floor for bf16 and fp8 weights, each with "
                        "and without --offload layers, at --size for text-to-image, an edit and 10 references")
    b.add_argument("--pcie-gbps", type=NUMBER, default=25.0,
                   help="host-to-device bandwidth for the --memory-table floor with offload, in GB/s (default 25)")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("convert", help="write a checkpoint as one .safetensors file (ComfyUI-style) or an official "
                                       "directory, in bf16 or fp8",
                       description="Write SRC (an official checkpoint directory, or a single .safetensors file) as "
                                   "DST: one .safetensors file, or a directory in the official layout; --model and "
                                   "HIDREAM_MODEL load either.")
    add_convert_args(c)
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="train an adapter on your own images (hidream train lora ...), or the demo "
                                     "model (hidream train demo-model ...)",
                       description="Train an adapter of the model on a folder of images and captions, or the demo "
                                   "model from a seed.")
    what = t.add_subparsers(dest="train_command", required=True, metavar="what")
    tl = what.add_parser("lora", help="train a LoRA (a PEFT .safetensors file that --lora and the API apply)",
                         description="Train a LoRA on DIR: images with same-named .txt captions (text-to-image), "
                                     "and edit pairs NAME.ref.png + NAME.png + NAME.txt (several references: "
                                     "NAME.ref1.png, NAME.ref2.png, ...). Writes a PEFT-style .safetensors file "
                                     "with the model's official module names.")
    add_train_lora_args(tl)
    tl.set_defaults(func=cmd_train_lora)
    # listed for `hidream train --help`; `run` hands its arguments to hidream.demo_model before parsing
    what.add_parser("demo-model", help="train the demo model from a seed on the CPU (scripts/train-demo-model; "
                                       "hidream train demo-model --help)")
    return parser


def run(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:2] == ["train", "demo-model"]:  # its flags, --help included, are hidream.demo_model's own
        from hidream.demo_model import main as train_demo_model

        return train_demo_model(argv[2:])
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "submit"):
        check_prompt_given(args)
    try:
        if args.command in ("generate", "submit"):
            check_request_flags(args)  # before a model loads or anything is sent
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


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return run(argv)
        finally:  # `--help` exits by SystemExit: its output too is flushed here, where a closed pipe is caught
            sys.stdout.flush()
    except BrokenPipeError:  # `hidream status --json | head`: the reader has gone; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a process killed by SIGPIPE (128 + 13), what the shell expects of a writer cut short


if __name__ == "__main__":
    sys.exit(main())
