"""`hidream train lora`: a LoRA trained on a folder of captioned images (and edit pairs) with the model's own
flow-matching objective (hidream.engine.training), written as a PEFT-style file our loader reads back.

The folder (its top level only):
    NAME.png + NAME.txt                          text-to-image: the image and its caption
    NAME.ref.png + NAME.png + NAME.txt           an edit pair: the reference, the edited image, the instruction
    NAME.ref1.png, NAME.ref2.png, ... + NAME.png + NAME.txt     personalization from several references
(any of .png .jpg .jpeg .webp .bmp). Every image is trained at its own aspect: resized and centre-cropped
to the largest 32-pixel-multiple size with area <= resolution**2; references are sized for that target
exactly as `Engine.generate` sizes them.

Checkpoints: a directory beside the output, `OUTPUT_STEM.checkpoints/`, gets `step-NNNNNN.pt` (the LoRA,
AdamW's state, the step, the loss history; the randomness of step k comes from (seed, k), so the step is
its RNG state) and `step-NNNNNN.safetensors` (the LoRA so far) every `save_every` steps and at the end.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from hidream.engine.errors import InvalidRequestError
from hidream.engine.images import load_image, plan_references
from hidream.rules import MAX_REFERENCES, MULTIPLE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REF = re.compile(r"^(?P<name>.+)\.ref(?P<index>\d*)$")
STATE_FORMAT = "hidream-lora-train/1"
KEEP_STATES = 2  # training states kept in the checkpoint directory (the LoRA files are all kept)


class TrainingDataError(InvalidRequestError):
    """A training folder or file that cannot be used; the message starts with the file at fault."""

    def __init__(self, path: Path, rule: str) -> None:
        super().__init__(str(path), rule)
        self.path = path


@dataclass(frozen=True)
class Item:
    """One training example on disk: the caption file, the target image, its references in order."""

    caption: Path
    image: Path
    references: tuple[Path, ...] = ()


def scan_dataset(folder: str | Path) -> list[Item]:
    """The examples of a training folder, by name; TrainingDataError naming the file for a caption without
    an image, an image without a caption, a stray or duplicate reference, or a folder with no example."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingDataError(folder, "is not a directory" if folder.exists() else "does not exist")
    captions: dict[str, Path] = {}
    targets: dict[str, list[Path]] = {}
    refs: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix == ".txt":
            captions[path.stem] = path
        elif suffix in IMAGE_SUFFIXES:
            ref = _REF.match(path.stem)
            if ref is None:
                targets.setdefault(path.stem, []).append(path)
                continue
            index = int(ref["index"] or 0)
            known = refs.setdefault(ref["name"], {})
            if index in known:
                raise TrainingDataError(path, f"a second reference {index or ''} for {ref['name']!r} "
                                              f"(also {known[index].name})")
            known[index] = path
    for name, images in targets.items():
        if name not in captions:
            raise TrainingDataError(images[0], f"has no caption {name}.txt beside it")
        if len(images) > 1:
            raise TrainingDataError(images[0], f"several images for the caption {name}.txt "
                                               f"({', '.join(p.name for p in images)}): keep one")
    for name, known in refs.items():
        if name not in targets:
            first = known[min(known)]
            raise TrainingDataError(first, f"is a reference of {name!r}, but there is no target image "
                                           f"{name}.png (or .jpg, ...) beside it")
        if len(known) > MAX_REFERENCES:
            raise TrainingDataError(known[min(known)], f"{len(known)} references for {name!r}: at most "
                                                       f"{MAX_REFERENCES}")
    items = []
    for name, caption in sorted(captions.items()):
        if name not in targets:
            raise TrainingDataError(caption, f"has no image {name}.png (or {', '.join(IMAGE_SUFFIXES[1:])}) "
                                             "beside it")
        found = refs.get(name, {})
        items.append(Item(caption, targets[name][0], tuple(found[i] for i in sorted(found))))
    if not items:
        raise TrainingDataError(folder, "holds no training example (an image NAME.png with its caption NAME.txt, "
                                        "and for edits NAME.ref.png)")
    return items


def read_caption(path: Path) -> str:
    """The caption of a .txt file (UTF-8, surrounding whitespace stripped); TrainingDataError naming it."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as err:
        raise TrainingDataError(path, f"is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise TrainingDataError(path, f"cannot be read ({err.strerror or err})") from None
    if not text:
        raise TrainingDataError(path, "is empty: every image needs a caption")
    return text


def load_item(item: Item) -> tuple[str, Image.Image, list[Image.Image]]:
    """(caption, image, references) of an item, decoded; errors name the file."""

    def image(path: Path) -> Image.Image:
        try:
            return load_image(path, "--data")
        except InvalidRequestError as err:
            raise TrainingDataError(path, err.rule) from None

    return read_caption(item.caption), image(item.image), [image(p) for p in item.references]


def check_dataset(items: Sequence[Item], resolution: int, check_prompt: Callable[[str, str], None]) -> None:
    """Read every caption and decode every image once, before training starts, so a bad file stops the run
    at once, named, rather than at step 347."""
    from hidream.engine.training import target_size

    for item in items:
        caption, image, refs = load_item(item)
        try:
            check_prompt(caption, str(item.caption))
        except InvalidRequestError as err:
            raise TrainingDataError(item.caption, err.rule) from None
        try:
            width, height = target_size(image.width, image.height, resolution)
        except ValueError as err:
            raise TrainingDataError(item.image, str(err)) from None
        try:
            plan_references([r.size for r in refs], width, height, False, field="references")
        except InvalidRequestError as err:
            index = int(err.field.rsplit("[", 1)[1].rstrip("]")) if "[" in err.field else 0
            raise TrainingDataError(item.references[index], err.rule) from None


def resolve_targets(spec: str | Sequence[str]) -> list[str]:
    """fnmatch patterns over official module names of a --targets value: "attn", "mlp", or patterns."""
    from hidream.engine.lora import ATTN_TARGETS, MLP_TARGETS

    words = [w.strip() for w in (spec.split(",") if isinstance(spec, str) else spec) if w.strip()]
    if not words:
        raise InvalidRequestError("targets", "must name at least one of attn, mlp or a module-name pattern")
    patterns: list[str] = []
    for word in words:
        patterns.extend(ATTN_TARGETS if word == "attn" else MLP_TARGETS if word == "mlp" else [word])
    return list(dict.fromkeys(patterns))


def checkpoint_dir(output: Path) -> Path:
    """Where the checkpoints of a run writing `output` go: `OUTPUT_STEM.checkpoints/` beside it."""
    return output.with_name(output.stem + ".checkpoints")


def warmup_steps(steps: int) -> int:
    """A short linear warm-up: 5% of the run, at least 1 step and at most 100."""
    return max(1, min(100, steps // 20))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step (example noise, timesteps): a function of (seed, step) alone."""
    return torch.Generator("cpu").manual_seed((seed % 2**32) * 2**31 + step)


def example_order(seed: int, count: int, epoch: int) -> list[int]:
    """The examples' order in one epoch (a pass over the data): a function of (seed, epoch) alone."""
    gen = torch.Generator("cpu").manual_seed((seed % 2**32) * 2**31 + 2**30 + epoch)
    return torch.randperm(count, generator=gen).tolist()


@dataclass
class TrainResult:
    """What a run wrote and how it went."""

    output: Path
    steps: int  # the step the LoRA stands at
    losses: list[float]  # one per step, from step 1 (a resumed run's include the checkpoint's)
    seconds_per_step: float  # median over this run's steps
    checkpoints: Path
    sample: Path | None = None
    trainable_parameters: int = 0


MAX_GRAD_NORM = 1.0
EXAMPLE_CACHE = 64  # prepared examples kept in memory (conditioning and target patches)


def _check(name: str, ok: bool, rule: str, value: object) -> None:
    if not ok:
        raise InvalidRequestError(name, f"{rule} (got {value!r})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(*, rank: int, alpha: float | None, steps: int, lr: float, batch: int, resolution: int,
                  save_every: int, caption_dropout: float, timestep_shift: float) -> None:
    """InvalidRequestError naming the first option out of its range."""
    _check("rank", _is_int(rank) and 1 <= rank <= 1024, "must be an integer from 1 to 1024", rank)
    _check("alpha", alpha is None or (math.isfinite(alpha) and alpha > 0), "must be above 0", alpha)
    _check("steps", _is_int(steps) and steps >= 1, "must be an integer >= 1", steps)
    _check("lr", math.isfinite(lr) and 0 < lr < 1, "must be above 0 and below 1", lr)
    _check("batch", _is_int(batch) and batch >= 1, "must be an integer >= 1", batch)
    _check("resolution", _is_int(resolution) and resolution % MULTIPLE == 0 and 64 <= resolution <= 2048,
           f"must be a multiple of {MULTIPLE} from 64 to 2048", resolution)
    _check("save_every", _is_int(save_every) and save_every >= 1, "must be an integer >= 1", save_every)
    _check("caption_dropout", 0.0 <= caption_dropout < 1.0, "must be from 0 up to (not including) 1", caption_dropout)
    _check("timestep_shift", math.isfinite(timestep_shift) and timestep_shift > 0, "must be above 0", timestep_shift)


def find_state(resume: str | Path) -> Path:
    """The training state a --resume value means: the file itself, or the newest state in a checkpoint directory."""
    path = Path(resume)
    if path.is_dir():
        states = sorted(path.glob("step-*.pt"))
        if not states:
            raise InvalidRequestError("resume", f"{path} holds no training state (step-NNNNNN.pt)")
        return states[-1]
    if not path.is_file():
        raise InvalidRequestError("resume", f"{path} does not exist")
    return path


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: pickle, zip and torch errors of many kinds
        raise InvalidRequestError("resume", f"{path} is not a training state ({err})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InvalidRequestError("resume", f"{path} is not a training state of `hidream train lora`")
    return state


def _check_resumable(state: dict, path: Path, settings: dict) -> None:
    """A resumed run continues the same curve only with the settings the state was trained with."""
    for key, value in settings.items():
        then = state["settings"].get(key)
        if key == "data" and then != value:
            raise InvalidRequestError("data", f"{path.name} was trained on other examples ({len(then)} then, "
                                              f"{len(value)} now, or other names): resuming continues a run only "
                                              "on its own data")
        if then != value:
            raise InvalidRequestError(key, f"{path.name} was trained with {key} {then!r}, "
                                           f"not {value!r}: resuming continues a run only with its own settings")


def _save_state(directory: Path, step: int, lora, optimizer, losses: list[float], settings: dict,
                metadata: dict[str, str]) -> Path:
    """step-NNNNNN.pt (written whole, then renamed into place) and step-NNNNNN.safetensors; the oldest
    states beyond KEEP_STATES are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:06d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"format": STATE_FORMAT, "step": step, "lora": lora.state_dict(),
                "optimizer": optimizer.state_dict(), "losses": list(losses), "settings": settings}, tmp)
    tmp.replace(path)
    lora.save(path.with_suffix(".safetensors"), {**metadata, "hidream.steps": str(step)})
    for old in sorted(directory.glob("step-*.pt"))[:-KEEP_STATES]:
        old.unlink()
    return path


def train_lora(engine, data: str | Path, output: str | Path, *, rank: int = 16, alpha: float | None = None,
               targets: str | Sequence[str] = "attn,mlp", steps: int = 500, lr: float = 1e-4, batch: int = 1,
               resolution: int = 512, seed: int = 0, gradient_checkpointing: bool | None = None,
               save_every: int = 100, resume: str | Path | None = None, sample_prompt: str | None = None,
               sample: bool = True, sample_steps: int | None = None, warmup: int | None = None,
               timestep_shift: float = 1.0, caption_dropout: float = 0.0, progress: bool = True) -> TrainResult:
    """Train a LoRA on `engine`'s model from the folder `data` and write it to `output` (.safetensors).

    Only the LoRA's parameters train (float32, AdamW, constant `lr` after a linear warm-up of `warmup` steps,
    None: warmup_steps(steps); gradients clipped at norm 1); `batch` examples per step, each its own forward
    (the loss their mean). gradient_checkpointing: per decoder layer (None: on CUDA). resume: a state file or
    a checkpoint directory; the run continues its loss curve exactly. sample: afterwards, an image of
    `sample_prompt` (None: the first caption, with the first example's references) with the LoRA applied,
    at OUTPUT with .png. The engine's model is left as it was found (the branches are removed).
    """
    from tqdm import tqdm

    from hidream.engine.lora import LoraSpec, add_lora
    from hidream.engine.pipeline import GenerationRequest
    from hidream.engine.training import flow_matching_loss, layer_checkpointing, make_example, target_size

    check_options(rank=rank, alpha=alpha, steps=steps, lr=lr, batch=batch, resolution=resolution,
                  save_every=save_every, caption_dropout=caption_dropout, timestep_shift=timestep_shift)
    output = Path(output)
    if output.suffix != ".safetensors":
        raise InvalidRequestError("output", f"must be a .safetensors file (got {output})")
    if engine.model.offload is not None:
        raise InvalidRequestError("offload", "training needs the decoder layers on the device (no layer offload)")
    if engine.quantize is not None:
        raise InvalidRequestError("model", "training needs bf16 or fp32 weights; training through fp8 layers is "
                                           "not supported: load the bf16 checkpoint")
    items = scan_dataset(data)
    check_dataset(items, resolution, engine.encoder.check_prompt)
    patterns = resolve_targets(targets)
    alpha = float(rank if alpha is None else alpha)
    if gradient_checkpointing is None:
        gradient_checkpointing = engine.device.type == "cuda"
    settings = {"rank": rank, "alpha": alpha, "targets": patterns, "seed": seed, "batch": batch,
                "resolution": resolution, "data": [item.image.name for item in items],
                "timestep_shift": timestep_shift, "caption_dropout": caption_dropout}
    state_path = find_state(resume) if resume is not None else None
    state = load_state(state_path) if state_path is not None else None
    if state is not None:
        _check_resumable(state, state_path, settings)
        warmup = state["settings"]["warmup"]
    settings["warmup"] = warm = warmup_steps(steps) if warmup is None else max(1, warmup)
    metadata = {"hidream.base_model": engine.checkpoint.name, "hidream.base_variant": engine.variant,
                "hidream.targets": ",".join(patterns), "hidream.resolution": str(resolution),
                "hidream.trainer": "hidream train lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
                "ss_base_model_version": f"hidream_o1_{engine.variant}"}
    directory = checkpoint_dir(output)

    lora = add_lora(engine.model, patterns, rank, alpha, seed=seed)
    try:
        visual = [n for n in lora.names if n.startswith("model.visual.")]
        if visual:
            raise InvalidRequestError("targets", f"{visual[0]} is in the ViT, which encodes the references once "
                                                 "per example without gradients: train the decoder and the "
                                                 "generation parts")
        params = lora.parameters()
        optimizer = torch.optim.AdamW(params, lr=lr)
        start, losses = 0, []
        if state is not None:
            lora.load_state_dict(state["lora"])
            optimizer.load_state_dict(state["optimizer"])
            start, losses = int(state["step"]), [float(x) for x in state["losses"]]

        @lru_cache(maxsize=EXAMPLE_CACHE)
        def example(index: int):
            caption, image, refs = load_item(items[index])
            return make_example(engine, image, caption, refs, resolution, caption_dropout > 0)

        order = lru_cache(maxsize=2)(lambda epoch: example_order(seed, len(items), epoch))
        times: list[float] = []
        with layer_checkpointing(engine.model, gradient_checkpointing), \
                tqdm(total=steps, initial=start, unit="step", desc="training", disable=not progress,
                     file=sys.stderr) as bar:
            for step in range(start, steps):
                began = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, (step + 1) / warm)
                generator = step_generator(seed, step)
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for j in range(batch):
                    epoch, position = divmod(step * batch + j, len(items))
                    loss = flow_matching_loss(example(order(epoch)[position]), generator, timestep_shift,
                                              caption_dropout) / batch
                    loss.backward()
                    total += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                losses.append(total)
                times.append(time.perf_counter() - began)
                recent = losses[-20:]
                bar.set_postfix(loss=f"{total:.4f}", mean20=f"{sum(recent) / len(recent):.4f}")
                bar.update(1)
                if (step + 1) % save_every == 0 or step + 1 == steps:
                    _save_state(directory, step + 1, lora, optimizer, losses, settings, metadata)
        done = max(start, steps)
        lora.save(output, {**metadata, "hidream.steps": str(done)})
        trainable = sum(p.numel() for p in params)
    finally:
        lora.remove()
    result = TrainResult(output, done, losses, sorted(times)[len(times) // 2] if times else 0.0, directory,
                         trainable_parameters=trainable)
    if sample:
        caption, image, refs = load_item(items[0])
        width, height = target_size(image.width, image.height, resolution)
        request = GenerationRequest(sample_prompt or caption, width=width, height=height, references=refs,
                                    seed=seed, steps=sample_steps, loras=[LoraSpec(output, 1.0)])
        result.sample = output.with_suffix(".png")
        engine.generate(request).images[0].save(result.sample)
    return result


def _flag(field: str) -> str:
    """The `hidream train lora` flag of a train_lora option (a file's path stays as it is)."""
    if field == "prompt":  # the sample's request
        return "--sample-prompt"
    return "--" + field.replace("_", "-") if field.isidentifier() else field


def run_lora(args) -> int:
    """`hidream train lora`: load the model, train, write the LoRA (and a sample); errors name the flag or file."""
    from hidream.cli import resolve_model
    from hidream.engine.errors import CheckpointError
    from hidream.engine.pipeline import Engine

    checkpoint, is_demo = resolve_model(args.model)
    output = Path(args.output).expanduser()
    try:
        # What can be checked without the model is, before it loads (minutes for the real one).
        check_options(rank=args.rank, alpha=args.alpha, steps=args.steps, lr=args.lr, batch=args.batch,
                      resolution=args.resolution, save_every=args.save_every,
                      caption_dropout=args.caption_dropout,
                      timestep_shift=1.0)
        if output.suffix != ".safetensors":
            raise InvalidRequestError("output", f"must be a .safetensors file (got {output})")
        scan_dataset(Path(args.data).expanduser())
        resolve_targets(args.targets)
        if args.resume is not None:
            find_state(Path(args.resume).expanduser())
        if is_demo:
            print(f"note: no --model given, training on the demo model at {checkpoint} (coloured shapes)",
                  file=sys.stderr)
        try:
            engine = Engine.load(checkpoint, device=args.device, precision=args.precision)
        except CheckpointError as err:
            raise InvalidRequestError("--model", str(err)) from None
        result = train_lora(
            engine, Path(args.data).expanduser(), output, rank=args.rank, alpha=args.alpha, targets=args.targets,
            steps=args.steps, lr=args.lr, batch=args.batch, resolution=args.resolution, seed=args.seed,
            gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
            resume=None if args.resume is None else Path(args.resume).expanduser(),
            sample_prompt=args.sample_prompt, sample=not args.no_sample, caption_dropout=args.caption_dropout)
    except TrainingDataError:
        raise
    except InvalidRequestError as err:
        raise InvalidRequestError(_flag(err.field), err.rule) from None
    last = result.losses[-1] if result.losses else float("nan")
    print(f"{result.output}  (rank {args.rank}, {result.trainable_parameters:,} parameters, step {result.steps}, "
          f"loss {last:.4f}, {result.seconds_per_step:.3f} s/step; checkpoints in {result.checkpoints})")
    if result.sample is not None:
        print(f"{result.sample}  (sample with the LoRA applied)")
    return 0
