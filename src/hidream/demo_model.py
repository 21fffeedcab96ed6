"""The demo model: a tiny HiDream-O1 (the official architecture, a stock `qwen3_vl` config) trained from
initialization, every parameter, on the synthetic world of `hidream.world`, with the engine's own flow-matching
objective (`hidream.engine.training`), and written as an ordinary official-layout checkpoint directory.

The recipe (`DemoShape`, `TrainSettings`), reproducible from a seed: the data of step k, its timesteps and
noise are functions of (seed, k) alone, so a run resumed from a checkpoint continues the same curve exactly.
Each step draws `batch` examples of the world's training split, mixing text-to-image, edits (one reference)
and personalization (2-3 references), 10% of them with the empty prompt (the branch classifier-free guidance
subtracts); examples whose sequences are laid out alike share one forward (`batched_flow_matching_loss`: the
loss is the mean over the batch, as if each were its own forward). AdamW,
linear warm-up then cosine decay, gradients clipped at norm 1, float32 on the CPU.

Files, for an output directory OUT:
    OUT/                    config.json, model.safetensors (bf16), tokenizer and processor files: `Engine.load(OUT)`
    OUT.checkpoints/        step-NNNNNN.pt: fp32 weights, AdamW's state, the step, the losses, the settings
Run it: `scripts/train-demo-model` (`hidream train demo-model --help`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from hidream import demo_eval, world
from hidream.demo_eval import Sample, draw
from hidream.engine.demo import demo_config
from hidream.engine.demo_assets import write_demo_processor_config, write_demo_tokenizer

STATE_FORMAT = "hidream-demo-train/1"
KEEP_STATES = 2
STOP_AT: int | None = 4250  # the shipped model: the state after this step of the default schedule
MAX_GRAD_NORM = 1.0
MODES = demo_eval.MODES
EMPTY_PROMPT = " "  # the guidance's unconditional prompt (hidream.engine.sequence.UNCONDITIONAL_PROMPT)


@dataclass(frozen=True)
class DemoShape:
    """The demo model's size: a Qwen3-VL decoder and ViT, scaled down (the generation patch stays 32)."""

    hidden: int = 256
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 768
    vit_hidden: int = 64
    vit_depth: int = 2
    vit_heads: int = 2
    vit_intermediate: int = 128
    # ViT patches of 32 pixels: a 384x384 reference copy is 36 tokens after the 2x2 merge, not 144.
    vit_patch: int = 32
    merge: int = 2
    # The full model's. 200 (more RoPE frequencies useful on an 8x8 grid) was tried: no clear gain by step 3000.
    rope_theta: float = 5000000.0


@dataclass(frozen=True)
class TrainSettings:
    """How the demo model trains; `steps` fixes the schedule (and so the model), `minutes` only stops early."""

    seed: int = 0
    steps: int = 5800  # the cosine's length; the shipped model stops at STOP_AT (about 100 minutes on 2 cores)
    resolution: int = 256
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    schedule: str = "cosine"  # or "constant" (after the warm-up)
    min_lr: float = 0.05  # the cosine's floor, a fraction of lr
    caption_dropout: float = 0.1
    mix: tuple[float, float, float] = (0.4, 0.3, 0.3)  # text-to-image, edit, personalization
    timestep_shift: float = 1.0


def world_corpus() -> str:
    """Every word of the world's grammar, in its prompts' forms, for the tokenizer's merges."""
    lines = []
    for colour in world.COLOURS:
        for kind in world.SHAPES:
            for position in world.POSITIONS:
                background = next(c for c in world.COLOURS if c != colour)
                scene = world.Scene(background, (world.Shape(kind, colour, position),))
                lines.append(world.prompt_of(scene))
            lines.append(world.edit_prompt(world.Edit("colour", colour, kind)))
            lines.append(world.edit_prompt(world.Edit("shape", kind, world.SHAPES[0])))
            lines.append(world.personalize_prompt(world.PersonalizePrompt((kind, kind, kind), colour)))
            lines.append(world.personalize_prompt(world.PersonalizePrompt((kind, kind), colour)))
        lines.append(world.edit_prompt(world.Edit("background", colour)))
    for kind in world.SHAPES:
        for position in world.POSITIONS:
            lines.append(world.edit_prompt(world.Edit("position", position, kind)))
    lines += ["in the center", "in the middle", "at the center", "to the middle"]
    lines += [f"please {line}" for line in lines]  # each word after a space too, as mid-sentence
    return "\n".join(lines) + "\n"


def model_config(token_ids: dict[str, int], vocab_size: int, shape: DemoShape = DemoShape()) -> dict:
    """config.json of the demo model: `demo_config`'s stock qwen3_vl config at `shape`."""
    raw = demo_config(token_ids, vocab_size, layers=shape.layers, hidden=shape.hidden)
    third = shape.head_dim // 2 // 3
    raw["text_config"].update({
        "rope_theta": shape.rope_theta,
        "head_dim": shape.head_dim, "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
        "intermediate_size": shape.intermediate,
        "rope_scaling": {"mrope_interleaved": True, "rope_type": "default",
                         "mrope_section": [shape.head_dim // 2 - 2 * third, third, third]},
    })
    grid = world.SIZES[-1] // shape.vit_patch  # position embeddings for up to a 512-pixel copy
    raw["vision_config"].update({
        "depth": shape.vit_depth, "hidden_size": shape.vit_hidden, "num_heads": shape.vit_heads,
        "intermediate_size": shape.vit_intermediate, "patch_size": shape.vit_patch,
        "spatial_merge_size": shape.merge, "num_position_embeddings": grid * grid,
        "deepstack_visual_indexes": list(range(min(2, shape.vit_depth, shape.layers))),
    })
    return raw


def write_base(directory: str | Path, shape: DemoShape = DemoShape(), size: int = 256) -> dict:
    """Write the tokenizer (its merges learned with the world's words too), processor files, config.json and
    the world's description (`world.DESCRIPTION_FILE`, for the service and the playground) of the demo model
    trained at `size` into `directory`; return the config."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    token_ids = write_demo_tokenizer(out, corpus=world_corpus())
    vocab_size = -(-(max(token_ids.values()) + 1) // 64) * 64
    raw = model_config(token_ids, vocab_size, shape)
    write_demo_processor_config(out, patch_size=shape.vit_patch, merge_size=shape.merge, temporal_patch_size=2)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    (out / world.DESCRIPTION_FILE).write_text(json.dumps(world.describe(size), indent=2) + "\n", encoding="utf-8")
    return raw


def initialize(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Qwen-style initialization (normal(0, std) weights, zero biases), the pixel head at zero (it starts
    by predicting grey); the ViT keeps its own initializer's, redrawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in model.named_modules():
            if name.startswith("model.visual"):
                continue
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        visual = model.model.visual
        visual.apply(visual._init_weights)
        nn.init.zeros_(model.model.final_layer2.linear.weight)
        nn.init.zeros_(model.model.final_layer2.linear.bias)


def write_weights(model: nn.Module, directory: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """model.safetensors of `model` in `dtype` (official names; lm_head, which nothing reads, as the token
    table), written whole then renamed into place."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"].clone()
    path = directory / "model.safetensors"
    tmp = directory / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


def build(directory: str | Path, shape: DemoShape = DemoShape(), seed: int = 0, size: int = 256):
    """The untrained demo model written to `directory` (fp32 weights) and loaded from there for training:
    an Engine (CPU, fp32, unfused: its parameters keep the official names) whose every parameter trains."""
    from transformers import Qwen3VLConfig

    from hidream.engine.config import spec_from_config
    from hidream.engine.model import HiDreamO1
    from hidream.engine.pipeline import Engine

    out = Path(directory)
    raw = write_base(out, shape, size)
    model = HiDreamO1(spec_from_config(Qwen3VLConfig.from_dict(raw)))
    initialize(model, seed)
    write_weights(model, out, torch.float32)
    engine = Engine.load(out, device="cpu", precision="fp32", fuse=False)
    engine.model.requires_grad_(True)
    return engine


# --- data ---------------------------------------------------------------------------------------

def step_samples(settings: TrainSettings, step: int) -> list[Sample]:
    """The training samples of one step: a function of (seed, step) alone; the caption dropped (the empty
    prompt) with probability caption_dropout."""
    rng = random.Random(f"hidream-demo/{settings.seed}/{step}")
    samples = []
    for _ in range(settings.batch):
        mode = rng.choices(MODES, weights=settings.mix)[0]
        sample = draw(rng, "train", mode)
        if rng.random() < settings.caption_dropout:
            sample.prompt = EMPTY_PROMPT
        samples.append(sample)
    return samples


def example_of(engine, sample: Sample, resolution: int, trainable: bool = True):
    from hidream.engine.training import make_example

    refs = [world.render(r, resolution) for r in sample.references]
    return make_example(engine, world.render(sample.target, resolution), sample.prompt, refs, resolution,
                        trainable=trainable)


# --- training -----------------------------------------------------------------------------------

def learning_rate(settings: TrainSettings, step: int) -> float:
    """The lr of step `step` (from 0): linear warm-up, then constant or cosine down to min_lr * lr."""
    s = settings
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if s.schedule == "constant":
        return s.lr
    progress = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.lr * (s.min_lr + (1 - s.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(settings: TrainSettings, step: int) -> torch.Generator:
    from hidream.train import step_generator as lora_step_generator

    return lora_step_generator(settings.seed, step)


def check_settings(s: TrainSettings) -> None:
    """ValueError naming the first setting out of range."""
    from hidream.rules import MULTIPLE

    rules = [
        ("steps", s.steps >= 1, "must be >= 1"), ("batch", s.batch >= 1, "must be >= 1"),
        ("resolution", s.resolution in world.SIZES and s.resolution % MULTIPLE == 0,
         f"must be a multiple of {MULTIPLE} from {world.SIZES[0]} to {world.SIZES[-1]}"),
        ("lr", 0 < s.lr < 1, "must be above 0 and below 1"), ("warmup", s.warmup >= 1, "must be >= 1"),
        ("schedule", s.schedule in ("cosine", "constant"), "must be cosine or constant"),
        ("caption_dropout", 0 <= s.caption_dropout < 1, "must be from 0 up to 1"),
        ("mix", len(s.mix) == 3 and min(s.mix) >= 0 and sum(s.mix) > 0, "must be 3 weights >= 0, not all 0"),
    ]
    for name, ok, rule in rules:
        if not ok:
            raise ValueError(f"{name} {rule} (got {getattr(s, name)!r})")


def checkpoint_dir(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoints")


def _settings_dict(settings: TrainSettings, shape: DemoShape) -> dict:
    return {"train": {**asdict(settings), "mix": list(settings.mix)}, "shape": asdict(shape)}


def save_state(directory: Path, step: int, engine, optimizer, losses: list[float], settings: dict) -> Path:
    """step-NNNNNN.pt (written whole, then renamed); the oldest beyond KEEP_STATES removed."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:06d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"format": STATE_FORMAT, "step": step, "model": engine.model.state_dict(),
                "optimizer": optimizer.state_dict(), "losses": list(losses), "settings": settings}, tmp)
    tmp.replace(path)
    for old in sorted(directory.glob("step-*.pt"))[:-KEEP_STATES]:
        old.unlink()
    return path


def load_state(resume: str | Path) -> tuple[Path, dict]:
    """The state a --resume value names (a file, or the newest in a checkpoint directory) and its contents."""
    path = Path(resume)
    if path.is_dir():
        states = sorted(path.glob("step-*.pt"))
        if not states:
            raise ValueError(f"resume: {path} holds no training state (step-NNNNNN.pt)")
        path = states[-1]
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"resume: {path} is not a training state of the demo model")
    return path, state


@dataclass
class Evaluation:
    step: int
    loss: float  # the objective on the held-out samples, at fixed draws
    accuracy: dict[str, dict[str, float]]  # per mode: the evaluator's percentages


def evaluate(engine, settings: TrainSettings, step: int, count: int = 4, steps: int = 10,
             guidance: float | None = None) -> Evaluation:
    """Held-out loss (fixed timesteps and noise) and the world evaluator's accuracy per mode of images
    generated through `engine.generate` (`demo_eval`: seed i, `steps` steps, the recipe's guidance unless given)."""
    from hidream.engine.training import flow_matching_loss

    samples = demo_eval.held_out_set(count)
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        losses = [float(flow_matching_loss(example_of(engine, s, settings.resolution, False), generator,
                                           settings.timestep_shift)) for s in samples]
    images = demo_eval.generate(engine, samples, settings.resolution, steps=steps, guidance=guidance)
    return Evaluation(step, sum(losses) / len(losses), demo_eval.accuracy(samples, images))


def describe(e: Evaluation) -> str:
    parts = [f"eval step {e.step}: loss {e.loss:.4f}"]
    for mode, acc in e.accuracy.items():
        parts.append(f"{mode} " + " ".join(f"{k} {v:.0f}%" for k, v in acc.items()))
    return " | ".join(parts)


@dataclass
class TrainRun:
    """What a run wrote and how it went."""

    output: Path
    step: int
    losses: list[float]
    seconds_per_step: float  # median over this run's steps
    evaluations: list[Evaluation]
    checkpoints: Path
    finished: bool  # the schedule's last step (or stop_at) reached, else stopped by `minutes`


def train(output: str | Path, settings: TrainSettings = TrainSettings(), shape: DemoShape = DemoShape(), *,
          minutes: float | None = None, stop_at: int | None = None, resume: str | Path | None = None,
          save_every: int = 250,
          eval_every: int = 500, eval_count: int = 4, eval_steps: int = 10, log_every: int = 25,
          log: Callable[[str], None] | None = print) -> TrainRun:
    """Train the demo model from initialization (or resume a run) and write it to the directory `output`.
    stop_at: end after that step of the schedule (the model of step `stop_at` of `settings.steps`, the same
    whatever the machine); minutes: end after that long (resumable)."""
    check_settings(settings)
    if stop_at is not None and not 1 <= stop_at <= settings.steps:
        raise ValueError(f"stop_at must be from 1 to steps ({settings.steps}) (got {stop_at})")
    last = settings.steps if stop_at is None else stop_at
    output = Path(output)
    directory = checkpoint_dir(output)
    described = _settings_dict(settings, shape)
    state = None
    if resume is not None:
        path, state = load_state(resume)
        if state["settings"] != described:
            raise ValueError(f"resume: {path.name} was trained with other settings {state['settings']}: resuming "
                             "continues a run only with its own settings")
    engine = build(output, shape, settings.seed, settings.resolution)
    params = [p for p in engine.model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.99))
    start, losses = 0, []
    if state is not None:
        engine.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), [float(x) for x in state["losses"]]
    from hidream.engine.training import batched_flow_matching_loss

    say = log or (lambda _: None)
    if start == 0:
        count = sum(p.numel() for p in params)
        say(f"demo model: {count:,} parameters ({shape}), training {settings}")
    began = time.monotonic()
    times: list[float] = []
    evaluations: list[Evaluation] = []
    step = start
    while step < last:
        if minutes is not None and time.monotonic() - began > minutes * 60:
            break
        tick = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        generator = step_generator(settings, step)
        optimizer.zero_grad(set_to_none=True)
        examples = [example_of(engine, sample, settings.resolution) for sample in step_samples(settings, step)]
        loss = batched_flow_matching_loss(examples, generator, settings.timestep_shift)
        loss.backward()
        total = float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        step += 1
        losses.append(total)
        times.append(time.perf_counter() - tick)
        if step % log_every == 0 or step == last:
            recent = losses[-log_every:]
            say(f"step {step}/{settings.steps}  loss {total:.4f}  mean{len(recent)} {sum(recent) / len(recent):.4f}  "
                f"lr {learning_rate(settings, step - 1):.2e}  {times[-1]:.2f} s/step")
        if step % save_every == 0 or step == last:
            save_state(directory, step, engine, optimizer, losses, described)
        if eval_every and (step % eval_every == 0 or step == last):
            evaluations.append(evaluate(engine, settings, step, eval_count, eval_steps))
            say(describe(evaluations[-1]))
    if start < step < last:  # stopped by `minutes`: a state to resume from, and where it stands
        if step % save_every:
            save_state(directory, step, engine, optimizer, losses, described)
        if eval_every and step % eval_every:
            evaluations.append(evaluate(engine, settings, step, eval_count, eval_steps))
            say(describe(evaluations[-1]))
    write_weights(engine.model, output)
    return TrainRun(output, step, losses, sorted(times)[len(times) // 2] if times else 0.0, evaluations, directory,
                    step >= last)


# --- the command --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    d = TrainSettings()
    parser = argparse.ArgumentParser(
        prog="hidream train demo-model",
        description="Train the demo model (hidream.demo_model) from a seed on the CPU.")
    parser.add_argument("--out", default="demo-model-trained", help="the checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--steps", type=int, default=d.steps, help="the schedule's length (fixes the model)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help=f"end after this step of the schedule, whatever the machine's speed (default: {STOP_AT} "
                             f"with the default --steps {d.steps}, as the shipped model; else the last)")
    parser.add_argument("--minutes", type=float, default=115.0,
                        help="stop (resumable) after this long (default 115: within 2 hours, evaluations included)")
    parser.add_argument("--resolution", type=int, default=d.resolution)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule)
    parser.add_argument("--hidden", type=int, default=DemoShape.hidden)
    parser.add_argument("--layers", type=int, default=DemoShape.layers)
    parser.add_argument("--rope-theta", type=float, default=DemoShape.rope_theta,
                        help="the decoder's RoPE base (default: the full model's)")
    parser.add_argument("--resume", default=None, help="a state file, or a checkpoint directory (its newest)")
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=500, help="0: only at the end")
    parser.add_argument("--eval-count", type=int, default=4, help="held-out samples per mode")
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainSettings(seed=args.seed, steps=args.steps, resolution=args.resolution, batch=args.batch,
                             lr=args.lr, warmup=args.warmup, schedule=args.schedule)
    shape = DemoShape(hidden=args.hidden, layers=args.layers, rope_theta=args.rope_theta)
    try:
        stop_at = args.stop_at if args.stop_at is not None else STOP_AT if args.steps == d.steps else None
        run = train(Path(args.out).expanduser(), settings, shape, minutes=args.minutes, stop_at=stop_at,
                    resume=args.resume, save_every=args.save_every, eval_every=args.eval_every or settings.steps,
                    eval_count=args.eval_count, eval_steps=args.eval_steps)
    except ValueError as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 2
    end = stop_at or settings.steps
    state = "finished" if run.finished else f"stopped at step {run.step} of {end} (--resume to go on)"
    print(f"{run.output}  ({state}; {run.seconds_per_step:.2f} s/step; checkpoints in {run.checkpoints})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
