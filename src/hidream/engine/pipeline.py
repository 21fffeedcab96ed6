"""The engine's one door: load a checkpoint once, then `generate(request)` -> images."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import Tensor

from hidream.engine import images as img
from hidream.engine.checkpoint import load_model, open_checkpoint
from hidream.engine.config import PATCH_SIZE, Recipe, SchedulerName, Variant, recipe_for
from hidream.engine.errors import CheckpointError, InvalidRequestError
from hidream.engine.host import keep_freed_memory
from hidream.engine.lora import LoraCache, LoraError, LoraSpec, apply_loras, check_scale
from hidream.engine.model import HiDreamO1, VisualInjection
from hidream.engine.sampling import Conditioning, Denoiser, Mode, denoise
from hidream.engine.schedulers import (
    DEV_TIMESTEPS,
    EulerFlow,
    FlashEuler,
    Sampler,
    Schedule,
    UniPCMultistep,
    fixed_schedule,
    linear_schedule,
    noise_scale_schedule,
    unipc_schedule,
)
from hidream.engine.seams import SeamSmoothing
from hidream.engine.sequence import UNCONDITIONAL_PROMPT, PromptEncoder
from hidream.engine.stepcache import CacheMode, StepCache
from hidream.engine.stepcache import policy as step_cache_policy
from hidream.rules import (
    CACHE_MODES,
    CACHE_RULE,
    GUIDANCE_RULE,
    IMAGES_RULE,
    MAX_REFERENCES,
    MAX_SEED,
    STEPS_RULE,
    guidance_ok,
    images_ok,
    sampling_problem,
    seed_ok,
    steps_ok,
)


ImageInput = str | Path | bytes | Image.Image
# progress(step, total, preview): preview() -> the current x0 estimate as an image.
ProgressFn = Callable[[int, int, Callable[[], Image.Image]], None]


@dataclass
class GenerationRequest:
    """One generation. None means the checkpoint recipe's default for the mode."""

    prompt: str
    width: int = 2048
    height: int = 2048
    references: Sequence[ImageInput] = ()
    keep_original_aspect: bool = False
    # The native size nearest the aspect asked for (hidream.sizes.native_size), as the official code always
    # does: 512x512 becomes 2048x2048 (the result's width and height say what was generated).
    snap_to_native: bool = False
    # One (x1, y1, x2, y2) box per reference, fractions of the output (hidream.engine.layout): where each goes.
    layout: Sequence[Sequence[float]] | None = None
    # Patch seam smoothing on the late steps (hidream.engine.seams.SeamSmoothing); None: off, as the official code.
    seam_smoothing: SeamSmoothing | None = None
    # Step caching (hidream.engine.stepcache): "fast" reuses the decoder's residual on steps where its first
    # layer barely changes; "off" (the default, as the official code) runs every layer on every step.
    cache: CacheMode = "off"
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    seed: int = 0
    num_images: int = 1
    scheduler: SchedulerName | None = None
    # An explicit schedule: one model timestep per step (sigma t/1000, then 0), for every scheduler;
    # `steps` must then be None or its length, and `shift` None (it has no effect).
    timesteps: Sequence[int] | None = None
    # None: the chosen scheduler's (flash 7.5, 7.5, 2.5; unipc and euler 8.0 and no re-noise). noise_scale
    # scales the initial noise; noise_scale_end and noise_clip_std shape flash's re-noise only.
    noise_scale: float | None = None
    noise_scale_end: float | None = None
    noise_clip_std: float | None = None
    # LoRAs for this request only (each a LoraSpec, or a (path, scale) pair), applied as a runtime branch
    # (or merged, with Engine.lora_mode) and taken off after.
    loras: Sequence[LoraSpec | tuple[str | Path, float]] = ()


@dataclass
class GenerationResult:
    images: list[Image.Image]
    width: int
    height: int
    seeds: list[int]
    steps: int
    guidance: float
    scheduler: SchedulerName
    seconds: float
    step_seconds: list[float] = field(default_factory=list)
    # What else the request sampled with (its resolved recipe).
    shift: float | None = None
    timesteps: tuple[int, ...] | None = None  # the explicit or Dev's fixed list; None: the scheduler's own
    noise_scale: float | None = None
    noise_scale_end: float | None = None
    noise_clip_std: float | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    extra_forwards: int = 0  # forwards seam smoothing added, per image
    cached_steps: list[list[int]] = field(default_factory=list)  # per image: the steps (from 0) step caching reused


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device, checked to exist here; CUDA when present if none was asked for."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidRequestError("device", f"not a torch device name such as cuda, cuda:1 or cpu ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device", f"{device} requested but this torch build sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidRequestError("device", f"{device} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# bf16: every weight and activation in bf16 (the default on CUDA).
# bf16-fp32acc: the official "fp32" mode without its float32 weights: bf16 GEMMs and attention on a
#   float32 residual stream, float32 norms, RoPE, embeddings and latent; the ViT under bf16 autocast.
# fp32: float32 throughout (the default on the CPU; exact parity).
Precision = Literal["bf16", "bf16-fp32acc", "fp32"]
PRECISIONS: tuple[Precision, ...] = ("bf16", "bf16-fp32acc", "fp32")
FP16_REFUSED = "fp16 is not supported: Qwen3 activations overflow float16; use bf16"


Quantize = Literal["fp8"]
Offload = Literal["none", "layers"]
OFFLOADS = ("none", "layers", "auto")


def resolve_quantize(quantize: str | None) -> Quantize | None:
    """None or "fp8" ("none" is None)."""
    if quantize in (None, "none"):
        return None
    if quantize != "fp8":
        raise InvalidRequestError("quantize", f"must be none or fp8 (got {quantize!r})")
    return "fp8"


def resolve_precision(precision: str | None, dtype: torch.dtype | None, device: torch.device) -> Precision:
    """The precision mode asked for (by name, or by a plain dtype), else bf16 on CUDA and fp32 on the CPU."""
    if dtype == torch.float16 or precision in ("fp16", "float16"):
        raise InvalidRequestError("precision", FP16_REFUSED)
    if precision is None:
        if dtype is None:
            dtype = default_dtype(device)
        named = {torch.bfloat16: "bf16", torch.float32: "fp32"}
        if dtype not in named:
            raise InvalidRequestError("precision", f"must be one of {', '.join(PRECISIONS)} (got dtype {dtype})")
        return named[dtype]  # type: ignore[return-value]
    if precision not in PRECISIONS:
        raise InvalidRequestError("precision", f"must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    return precision  # type: ignore[return-value]


# On CUDA the token embeddings stay in host memory: the prefill looks up a few hundred rows there and
# copies them (model.embed_text), and 1.2 GB of the 8B model never takes device memory.
EMBED = "model.language_model.embed_tokens."


class Engine:
    """A loaded checkpoint, warm for any number of requests."""

    def __init__(self, model: HiDreamO1, encoder: PromptEncoder, variant: Variant, checkpoint: Path,
                 precision: Precision | None = None, compile: bool = False, fuse: bool = True,
                 offload: Offload = "none", device: torch.device | None = None) -> None:
        """`model` is used as given, then (once) its projections fused; with offload "layers" its decoder
        layers stay on the host and stream to `device` (all else is moved there); with `compile`, its
        layer compiled. Without offload, `device` is where the model's weights are."""
        self.model = model
        self.encoder = encoder
        self.variant = variant
        self.checkpoint = checkpoint
        weight = model.model.language_model.embed_tokens.weight
        # dtype: the residual stream's and the latent's; device: where the model computes (the token table
        # may be in host memory)
        self.device, self.dtype = device or model.model.x_embedder.proj2.weight.device, weight.dtype
        self.precision = precision or ("fp32" if self.dtype == torch.float32 else "bf16")
        if fuse and model.layers[0].self_attn.qkv_proj is None:
            model.fuse_projections()
        fp8 = any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
        self.quantize: Quantize | None = "fp8" if fp8 else None
        self.offload: Offload = offload
        if offload == "layers":
            from hidream.engine.offload import enable_offload

            enable_offload(model, self.device)
        elif offload != "none":
            raise InvalidRequestError("offload", f"must be none or layers here (got {offload!r})")
        else:
            model.place(self.device, host=(EMBED,) if self.device.type == "cuda" else ())
        self.compiled = compile
        if compile:
            model.compile_layers()
        self.lora_cache = LoraCache()  # parsed LoRA files, least recently used out first (max_bytes)
        self.lora_mode: str = "runtime"  # or "merged": the updates added to the weights for the request

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None, variant: Variant | None = None, *,
             precision: Precision | None = None, compile: bool = False, fuse: bool = True,
             quantize: str | None = None, offload: str = "none", tokenizer: str | Path | None = None,
             lora_mode: str = "runtime") -> Engine:
        """Load an official checkpoint directory or a single `.safetensors` file (CUDA and bf16 when available).

        precision: bf16 | bf16-fp32acc | fp32 (see PRECISIONS); `dtype` is the older spelling of
        bf16/fp32. fp16 is refused. compile: regional torch.compile of the decoder layer for the steps.
        fuse=False keeps q/k/v and gate/up as separate GEMMs (for comparisons). quantize "fp8": the
        decoder's linear layers stored in fp8 (a file's own fp8 layers always are). offload: none |
        layers | auto (layers when the model does not fit the device's free memory). tokenizer: the
        directory of tokenizer and processor files, for a single file that carries none. lora_mode:
        how a request's LoRAs are applied, "runtime" (a low-rank branch) or "merged" (into the weights,
        restored after; fp8 layers take the branch).
        """
        if lora_mode not in ("runtime", "merged"):
            raise InvalidRequestError("lora_mode", f"must be runtime or merged (got {lora_mode!r})")
        device = resolve_device(device)
        precision = resolve_precision(precision, dtype, device)
        quantize = resolve_quantize(quantize)
        if offload not in OFFLOADS:
            raise InvalidRequestError("offload", f"must be one of {', '.join(OFFLOADS)} (got {offload!r})")
        if device.type == "cpu":
            keep_freed_memory()
        ckpt = open_checkpoint(checkpoint, tokenizer=tokenizer, variant=variant)
        tokenizer_, processor = ckpt.processors()
        encoder = PromptEncoder(tokenizer_, processor, ckpt.spec.image_token_id)
        dtype = torch.float32 if precision in ("fp32", "bf16-fp32acc") else torch.bfloat16
        gemm = torch.bfloat16 if precision == "bf16-fp32acc" else None
        # Offloaded layers stay on the host: the model is loaded there and Engine() places the rest.
        staged = offload != "none"
        host = (EMBED,) if device.type == "cuda" else ()  # a lookup: kept in host memory (1.2 GB)
        model = load_model(ckpt, torch.device("cpu") if staged else device, dtype, gemm_dtype=gemm, host=host,
                           quantize=quantize == "fp8")
        if offload == "auto":
            from hidream.engine.offload import choose_offload

            offload = choose_offload(offload, model, device)
        engine = cls(model, encoder, ckpt.variant, ckpt.path, precision, compile, fuse, offload, device)
        engine.lora_mode = lora_mode
        return engine

    # --- the request ----------------------------------------------------------------------------

    def recipe(self, num_references: int) -> Recipe:
        return recipe_for(self.variant, num_references)

    def resolve(self, req: GenerationRequest) -> Recipe:
        """The recipe `req` samples with: its mode's official one, the request's choices on top, and the
        noise settings of the scheduler chosen (explicitly or by the recipe), unless the request sets them."""
        recipe = self.recipe(len(req.references))
        recipe = recipe.with_scheduler(req.scheduler or recipe.scheduler)
        if req.timesteps is not None:
            timesteps: tuple[int, ...] | None = tuple(req.timesteps)
            steps = len(timesteps)
        else:
            steps = req.steps or recipe.steps
            timesteps = DEV_TIMESTEPS if recipe.fixed_timesteps and steps == len(DEV_TIMESTEPS) else None

        def given(value: float | None, default: float) -> float:
            return default if value is None else float(value)

        return replace(
            recipe, steps=steps, timesteps=timesteps,
            guidance=given(req.guidance, recipe.guidance), shift=given(req.shift, recipe.shift),
            noise_scale=given(req.noise_scale, recipe.noise_scale),
            noise_scale_end=given(req.noise_scale_end, recipe.noise_scale_end),
            noise_clip_std=given(req.noise_clip_std, recipe.noise_clip_std),
        )

    def validate(self, req: GenerationRequest) -> None:
        """Raise InvalidRequestError naming the first field that breaks a rule."""
        if not isinstance(req.prompt, str) or not req.prompt.strip():
            raise InvalidRequestError("prompt", "must be a non-empty string, not only whitespace")
        self.encoder.check_prompt(req.prompt)
        img.check_size(req.width, req.height)
        if len(req.references) > MAX_REFERENCES:
            raise InvalidRequestError("references", f"at most {MAX_REFERENCES} images (got {len(req.references)})")
        if req.steps is not None and not steps_ok(req.steps):
            raise InvalidRequestError("steps", f"{STEPS_RULE} (got {req.steps!r})")
        if req.guidance is not None and not (isinstance(req.guidance, int | float) and guidance_ok(req.guidance)):
            raise InvalidRequestError("guidance", f"{GUIDANCE_RULE} (got {req.guidance!r})")
        if req.shift is not None and not (0.0 < req.shift <= 100.0):
            raise InvalidRequestError("shift", f"must be above 0 and at most 100 (got {req.shift})")
        if not seed_ok(req.seed, random_allowed=False):
            raise InvalidRequestError("seed", f"must be an integer from 0 to {MAX_SEED} (got {req.seed!r})")
        if not images_ok(req.num_images):
            raise InvalidRequestError("num_images", f"{IMAGES_RULE} (got {req.num_images!r})")
        if req.seam_smoothing is not None and (problem := req.seam_smoothing.problem()) is not None:
            raise InvalidRequestError("seam_smoothing", problem)
        if req.cache not in CACHE_MODES:
            raise InvalidRequestError("cache", f"{CACHE_RULE} (got {req.cache!r})")
        self._validate_sampling(req)
        self.lora_specs(req)

    @staticmethod
    def lora_specs(req: GenerationRequest) -> list[LoraSpec]:
        """The request's LoRAs as LoraSpecs, each file there and each scale in range; InvalidRequestError
        naming `loras[i].path` or `loras[i].scale` otherwise."""
        specs = []
        for i, item in enumerate(req.loras):
            path, scale = (item.path, item.scale) if isinstance(item, LoraSpec) else item
            if not Path(path).is_file():
                raise InvalidRequestError(f"loras[{i}].path", f"{path}: no such file")
            specs.append(LoraSpec(Path(path), check_scale(scale, f"loras[{i}].scale")))
        return specs

    @contextmanager
    def loras_applied(self, specs: Sequence[LoraSpec]) -> Iterator[None]:
        """The model with `specs` on it for the block (read through `lora_cache`), as it was after."""
        if not specs:
            yield
            return
        files = []
        for i, spec in enumerate(specs):
            try:
                files.append((self.lora_cache.get(spec.path), spec.scale))
            except LoraError as err:
                raise LoraError(err.rule, err.key, f"loras[{i}].path") from None
        with apply_loras(self.model, files, self.effective_lora_mode()):
            yield

    def effective_lora_mode(self) -> str:
        """How LoRAs go on: offloaded layers take the runtime branch (their weights stream from host copies);
        a compiled layer takes them merged (a branch would recompile it for every LoRA set); else lora_mode."""
        if self.offload == "layers":
            return "runtime"
        return "merged" if self.compiled else self.lora_mode

    def _validate_sampling(self, req: GenerationRequest) -> None:
        problem = sampling_problem(
            self.recipe(len(req.references)).scheduler, scheduler=req.scheduler, steps=req.steps, shift=req.shift,
            timesteps=req.timesteps, noise_scale=req.noise_scale, noise_scale_end=req.noise_scale_end,
            noise_clip_std=req.noise_clip_std)
        if problem is not None:
            raise InvalidRequestError(*problem)

    def _schedule(self, recipe: Recipe, steps: int, shift: float, scheduler: SchedulerName) -> Schedule:
        if recipe.timesteps is not None:  # the official timesteps_list: the same override for every scheduler
            return fixed_schedule(recipe.timesteps)
        return unipc_schedule(steps, shift) if scheduler == "unipc" else linear_schedule(steps, shift)

    def _sampler(self, recipe: Recipe, schedule: Schedule, scheduler: SchedulerName, seed: int) -> Sampler:
        if scheduler == "unipc":
            return UniPCMultistep(schedule)
        if scheduler == "euler":
            return EulerFlow(schedule)
        generator = torch.Generator(self.device).manual_seed(seed + 1)
        scales = noise_scale_schedule(recipe.noise_scale, recipe.noise_scale_end, len(schedule.timesteps))
        return FlashEuler(schedule, scales, recipe.noise_clip_std, generator)

    def conditioning(self, prompts: list[str], width: int, height: int,
                      refs: list[Image.Image], refs_vit: list[Image.Image]) -> Conditioning:
        encoder, model = self.encoder, self.model
        vision = encoder.encode_references(refs_vit) if refs else None
        feats, deep = None, None
        if vision is not None:
            # Without a graph, unless a caller records one (a full-parameter trainer trains the ViT too).
            with torch.inference_mode(not torch.is_grad_enabled()):
                feats, deep = model.encode_images(vision.pixel_values.to(self.device), vision.grid_thw.to(self.device))
        ref_sizes = [(r.height, r.width) for r in refs]
        branches, embeds, visual = [], [], []
        for prompt in prompts:
            branch = encoder.branch(prompt, (height, width), ref_sizes, vision)
            ids = branch.input_ids.to(self.device)
            branches.append(branch)
            embeds.append(model.embed_text(ids, feats))
            visual.append(VisualInjection(ids == encoder.image_token_id, deep) if deep else None)
        ref_patches = None
        if refs:
            ref_patches = torch.cat([img.patchify(img.to_tensor(r)[None]) for r in refs], dim=1)
            ref_patches = ref_patches.to(self.device, self.dtype)
        return Conditioning(branches, embeds, visual, ref_patches, (height // PATCH_SIZE) * (width // PATCH_SIZE))

    @torch.inference_mode()
    def generate(self, req: GenerationRequest, progress: ProgressFn | None = None,
                 should_cancel: Callable[[], bool] | None = None, mode: Mode = "cached",
                 batch_guidance: bool = True, timings: bool = False) -> GenerationResult:
        """Generate `req.num_images` images (image i uses seed + i).

        progress(step, total, preview) is called after every step (step counts over all images);
        preview(max_side=256) gives the current x0 estimate of the conditional branch as an image,
        downsampled on the device first. should_cancel() is asked before every step; True stops
        with GenerationCanceled. timings: fill `step_seconds`, waiting for the device after every
        step (otherwise nothing in the loop waits for it).
        """
        self.validate(req)
        specs = self.lora_specs(req)
        with self.loras_applied(specs):
            result = self._generate(req, progress, should_cancel, mode, batch_guidance, timings)
        result.loras = [(str(s.path), s.scale) for s in specs]
        return result

    def _generate(self, req: GenerationRequest, progress: ProgressFn | None, should_cancel: Callable[[], bool] | None,
                  mode: Mode, batch_guidance: bool, timings: bool) -> GenerationResult:
        started = time.perf_counter()
        sources = [img.load_image(r, f"references[{i}]") for i, r in enumerate(req.references)]
        recipe = self.resolve(req)
        width, height, refs, refs_vit = img.prepare_references(
            sources, req.width, req.height, req.keep_original_aspect, field="references",
            snap_to_native=req.snap_to_native, layout=req.layout)
        steps, guidance, shift, scheduler = recipe.steps, recipe.guidance, recipe.shift, recipe.scheduler
        prompts = [req.prompt] + ([UNCONDITIONAL_PROMPT] if guidance > 1.0 else [])
        cond = self.conditioning(prompts, width, height, refs, refs_vit)
        denoiser = Denoiser(self.model, cond, mode=mode, batch=batch_guidance)
        result = GenerationResult([], width, height, [], steps, guidance, scheduler, 0.0, shift=shift,
                                  timesteps=recipe.timesteps, noise_scale=recipe.noise_scale,
                                  noise_scale_end=recipe.noise_scale_end, noise_clip_std=recipe.noise_clip_std)
        cache_policy = step_cache_policy(req.cache)
        for k in range(req.num_images):
            seed = req.seed + k
            schedule = self._schedule(recipe, steps, shift, scheduler)
            sampler = self._sampler(recipe, schedule, scheduler, seed)
            z = self.initial_noise(seed, width, height, recipe.noise_scale)
            tick = [time.perf_counter()]

            def on_step(i: int, n: int, preview: Callable[[], Tensor], k: int = k) -> None:
                if timings:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)  # honest step times (kernels run asynchronously)
                    now = time.perf_counter()
                    result.step_seconds.append(now - tick[0])
                    tick[0] = now
                if progress is not None:
                    progress(k * n + i, req.num_images * n,
                             lambda max_side=256: self.preview(preview(), width, height, max_side))

            seams = (req.seam_smoothing, width, height) if req.seam_smoothing is not None else None
            step_cache = StepCache(cache_policy) if cache_policy is not None else None
            z = denoise(denoiser, z, schedule, sampler, guidance,
                        on_step if timings or progress is not None else None, should_cancel, seams, step_cache)
            if step_cache is not None:
                result.cached_steps.append(step_cache.skipped)
            if seams is not None:
                result.extra_forwards = req.seam_smoothing.extra_forwards(len(schedule.timesteps))
            result.images.append(self.to_image(z, width, height))
            result.seeds.append(seed)
        result.seconds = time.perf_counter() - started
        return result

    def initial_noise(self, seed: int, width: int, height: int, scale: float) -> Tensor:
        """The official initial noise: drawn on the CPU from seed + 1, then patchified: [1, L, 3072].

        Cast to the model's dtype before scaling, as the official code does: with bf16 and the
        Dev scale 7.5 the order changes a quarter of the values by one rounding step.
        """
        gen = torch.Generator("cpu").manual_seed(seed + 1)
        noise = scale * torch.randn((1, 3, height, width), generator=gen).to(self.device, self.dtype)
        return img.patchify(noise)

    @staticmethod
    def to_image(z: Tensor, width: int, height: int) -> Image.Image:
        return img.to_pil(img.unpatchify(z, height, width)[0])

    @staticmethod
    def preview(z: Tensor, width: int, height: int, max_side: int = 256) -> Image.Image:
        """A small picture of patches z: area-downsampled on their device, then copied (a few hundred KB)."""
        x = img.unpatchify(z, height, width).float()  # [1, 3, H, W]
        scale = min(1.0, max_side / max(width, height))
        if scale < 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = torch.nn.functional.interpolate(x, size=size, mode="area")
        return img.to_pil(x[0])
